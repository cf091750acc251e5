"""Time to GPU on any CUDA machine: the gpu-marked tests, then a table. Runs in about a minute.

    python benchmarks/gpu.py

1. Runs ``pytest -m gpu`` (lorachunk's CUDA path against safetensors, every fixture).
2. On a synthetic SDXL-shaped LoRA (~230 MB F16, lorachunk/testing/synth.py), best of five after one warm-up,
   each ending in ``torch.cuda.synchronize()``:
   ``safetensors.torch.load_file(device="cuda")``; fastsafetensors if it is installed;
   ``lorachunk.load(device="cuda")`` (byte planes decoded into pinned buffers, copied on a side
   stream, un-grouped on the GPU) from a packed folder with no cache; and a one-split load.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from _timing import best as timing_best
from safetensors.torch import load_file

import lorachunk
from lorachunk.testing import synth

ROOT = Path(__file__).resolve().parent.parent


def best(fn: Callable[[], object]) -> float:
    return timing_best(fn, repeat=5, warmup=True, sync=torch.cuda.synchronize)


def fastsafetensors_load(path: Path) -> Callable[[], object] | None:
    try:
        from fastsafetensors import SafeTensorsFileLoader, SingleGroup  # type: ignore[import-not-found]
    except ImportError:
        return None

    def run() -> object:
        loader = SafeTensorsFileLoader(SingleGroup(), torch.device("cuda:0"))
        loader.add_filenames({0: [str(path)]})
        buffers = loader.copy_files_to_device()
        tensors = {key: buffers.get_tensor(key) for key in buffers.key_to_rank_lidx}
        loader.close()
        return tensors

    return run


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 1
    tests = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "gpu",
            str(ROOT / "tests" / "test_loader.py"),
        ],
        check=False,
    )
    print(f"gpu tests: {'passed' if tests.returncode == 0 else 'FAILED'}\n")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = synth.sdxl(work / "synthetic_sdxl_f16.safetensors", rank=64, dtype="F16")
        manifest = lorachunk.pack(path, work / "s")
        split = min(manifest.splits, key=lambda s: abs(len(s.modules) / len(manifest.modules) - 0.1))
        size = path.stat().st_size
        path.read_bytes()
        rows = [("safetensors load_file(device='cuda')", best(lambda: load_file(path, device="cuda")), size)]
        fast = fastsafetensors_load(path)
        if fast is not None:
            rows.append(("fastsafetensors", best(fast), size))
        lora = lorachunk.open(work / "s", cache=False)
        rows.append(("lorachunk load(device='cuda')", best(lambda: lora.load(device="cuda")), manifest.raw_size))
        # The host-side decode alone, on this machine's CPUs: the floor under the CUDA path.
        rows.append(("lorachunk load(device='cpu')", best(lambda: lora.load(device="cpu")), manifest.raw_size))
        split_bytes = sum(manifest.module(n).raw_size for n in split.modules)
        rows.append(
            (f"lorachunk split {split.name}", best(lambda: lora.load(device="cuda", splits=[split.name])), split_bytes)
        )
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, synthetic SDXL F16 {size / 1e6:.0f} MB\n")
    print("| method | ms | GB/s | x load_file |")
    print("|---|---:|---:|---:|")
    for name, seconds, nbytes in rows:
        print(f"| {name} | {seconds * 1000:.1f} | {nbytes / seconds / 1e9:.2f} | {seconds / rows[0][1]:.2f} |")
    return tests.returncode


if __name__ == "__main__":
    sys.exit(main())
