"""Local loads with a warm page cache: lorachunk vs safetensors.torch.load_file, side by side.

    python benchmarks/load.py           # real fixtures + a synthetic SDXL-shaped LoRA (~230 MB F16)
    python benchmarks/load.py --quick   # synthetic LoRA at 1/4 width

For each file: ``load_file`` followed by touching every page of every tensor (``load_file``
alone is a lazy mmap and reads nothing), lorachunk's full load of the packed folder, and a
one-split load (the split nearest 10% of the modules). The same touch runs on every result, so
each column is "time until every byte is in memory and usable". Best of five, the four runs
taking turns so that a slow spell on a shared machine hits every column; default threads
(``LORACHUNK_THREADS`` or the CPU count) and concurrency.

lorachunk runs two ways: *warm*, the default (a cache under a temporary folder holding decoded
modules after the first load, so a load maps them and checks their xxh3), and *decode*
(``cache=False``: every record is read, checked, and decoded). *fresh memory* is the time to
get new memory of the LoRA's decoded size and write each page once: the floor for any reader
that hands out new tensors (``load_file`` maps the file's pages, already in the page cache).
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from _timing import best_of_each, machine, stage_times
from safetensors.torch import load_file

import lorachunk
import lorachunk._pipeline
from lorachunk.testing import synth

ROOT = Path(__file__).resolve().parent.parent

PAGE = 4096


def touch(tensors: Mapping[str, torch.Tensor]) -> int:
    """Read one byte of every page of every tensor, so lazily mapped data is really loaded."""
    total = 0
    for tensor in tensors.values():
        flat = tensor.reshape(-1).view(torch.uint8) if tensor.numel() else tensor.reshape(-1)
        if flat.numel():
            total += int(flat[::PAGE].sum())
    return total


def fresh_memory(size: int) -> int:
    """New memory of ``size`` bytes, every page written once: what any decoder that hands out
    new tensors pays before decoding a byte (the kernel faults in and zeroes each page)."""
    buffer = torch.empty(size, dtype=torch.uint8)
    buffer[::PAGE] = 1
    return int(buffer[0])


def tenth_split(manifest: lorachunk.Manifest) -> lorachunk.Split | None:
    splits = [s for s in manifest.splits if len(s.modules) < len(manifest.modules)]
    return min(splits, key=lambda s: abs(len(s.modules) / len(manifest.modules) - 0.1), default=None)


def row(path: Path, work: Path) -> str:
    packed = work / f"{path.stem}.lcs"
    manifest = lorachunk.pack(path, packed)
    split = tenth_split(manifest)
    lora = lorachunk.open(packed, cache=work / "cache")
    plain = lorachunk.open(packed, cache=False)
    path.read_bytes()  # warm the page cache for both sides
    runs = [
        lambda: touch(load_file(path)),
        lambda: touch(lora.load()),  # the first run fills the cache; the best of five is warm
        lambda: touch(plain.load()),
    ]
    if split is not None:
        runs.append(lambda: touch(lora.load(splits=[split.name])))
    runs.append(lambda: fresh_memory(manifest.raw_size))
    baseline, full, decode, *part, floor = best_of_each(runs, repeat=5)
    mb = path.stat().st_size / 1e6
    cells = (
        f"| {path.name} | {mb:.2f} | {baseline * 1000:.1f} | {full * 1000:.1f} ({full / baseline:.2f}x) "
        f"| {decode * 1000:.1f} ({decode / baseline:.2f}x) | {floor * 1000:.1f} ({floor / baseline:.2f}x) "
    )
    if split is None:
        return cells + "| (no split) | |"
    share = len(split.modules) / len(manifest.modules)
    return cells + f"| {split.name} ({share:.0%}) | {part[0] * 1000:.1f} ({part[0] / baseline:.2f}x) |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="synthetic LoRA at 1/4 width")
    parser.add_argument(
        "--run-bytes",
        type=int,
        help="decoded bytes of the records one thread decodes at once (lorachunk's: 1 MiB); 1 decodes record by record",
    )
    parser.add_argument(
        "--pool",
        action="store_true",
        help="decode runs on a pool of threads even on 2 cores (lorachunk's rule: the consuming thread there)",
    )
    args = parser.parse_args()
    if args.pool:
        lorachunk._pipeline.INLINE_MAX_THREADS = 0
        print("runs decoded on a pool of threads")
    if args.run_bytes is not None:
        lorachunk._pipeline.RUN_BYTES = args.run_bytes
        print(f"records decoded in runs of {args.run_bytes} bytes")
    print(f"{machine()}, torch {torch.__version__}\n")
    print(
        "| file | MB | load_file + touch ms | lorachunk warm ms (x) | lorachunk decode ms (x) "
        "| fresh memory ms (x) | split (share of modules) | split warm ms (x) |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for path in sorted((ROOT / "tests" / "data" / "loras").glob("*.safetensors")):
            print(row(path, work), flush=True)
        for dtype in ("F16", "BF16"):
            synthetic = synth.sdxl(
                work / f"synthetic_sdxl_{dtype.lower()}.safetensors",
                rank=64,
                scale=0.25 if args.quick else 1.0,
                dtype=dtype,
            )
            print(row(synthetic, work), flush=True)
        print()
        for dtype in ("F16", "BF16"):
            packed = work / f"synthetic_sdxl_{dtype.lower()}.lcs"
            cold = functools.partial(lorachunk.load, packed, cache=False)
            spent = min((stage_times(cold) for _ in range(5)), key=lambda s: s["wall"])
            print(
                f"synthetic {dtype}, one cold decode (the fastest of five), seconds summed over threads: "
                + ", ".join(f"{name} {seconds * 1e3:.0f} ms" for name, seconds in spent.items())
            )


if __name__ == "__main__":
    main()
