"""Which zstd parameters suit byte planes: stored bytes and speed of each candidate encoder.

    python benchmarks/zstd_params.py              # real fixtures + synthetic SDXL-shaped F16, BF16, F32
    python benchmarks/zstd_params.py --manifests  # only the manifest table

Encodes every module of every file with the bpz codec under each candidate and prints stored
bytes relative to zstd level 3's own parameters, and encode MB/s on one thread. Then the
manifests' compression: bytes and milliseconds (best of three) at the levels the packer could use. docs/format.md
quotes the run that chose ``BytePlaneZstd.PLANE_PARAMS`` and the manifest level.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import zstandard
from _timing import best, machine

import lorachunk
from lorachunk._codec import BytePlaneZstd
from lorachunk._repository import decode_module, read_manifest
from lorachunk.storage import LocalStore
from lorachunk.testing import synth

ROOT = Path(__file__).resolve().parent.parent

CANDIDATES = {
    "level 3": BytePlaneZstd(level=3),
    "level 3, min_match 7": BytePlaneZstd(level=3, params={"min_match": 7}),
    "chosen params": BytePlaneZstd.for_level(3),
    "level 19": BytePlaneZstd(level=19),
}
MANIFEST_LEVELS = (9, 12, 15, 17, 19)


def measure(path: Path, workdir: Path) -> dict[str, tuple[int, float]]:
    store = LocalStore(workdir / path.stem)
    manifest = read_manifest(store)
    modules = [(decode_module(store, manifest, m), m.segments) for m in manifest.modules]
    results = {}
    for name, codec in CANDIDATES.items():
        start = time.perf_counter()
        stored = sum(len(codec.encode(memoryview(raw), segments)[0]) for raw, segments in modules)
        results[name] = (stored, sum(len(raw) for raw, _ in modules) / (time.perf_counter() - start) / 1e6)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifests", action="store_true", help="only the manifest table (about a minute)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        files = sorted((ROOT / "tests" / "data" / "loras").glob("*.safetensors"))
        for dtype in ("F16", "BF16", "F32"):
            name = f"synthetic_sdxl_{dtype.lower()}.safetensors"
            files.append(synth.sdxl(workdir / name, rank=64, dtype=dtype, text_encoders=True, scale=0.5))
        print(f"{machine()}\n")
        for path in files:
            lorachunk.pack(path, workdir / path.stem)
        if not args.manifests:
            print("| file | " + " | ".join(CANDIDATES) + " |")
            print("|---|" + "---:|" * len(CANDIDATES))
            for path in files:
                results = measure(path, workdir)
                base = results["level 3"][0]
                cells = [f"{stored / base:.3f} ({speed:.0f} MB/s)" for stored, speed in results.values()]
                print(f"| {path.name} | " + " | ".join(cells) + " |", flush=True)
            print()
        levels = " | ".join(f"level {n}" for n in MANIFEST_LEVELS)
        print(f"| manifest of | modules | canonical JSON | {levels} |")
        print("|---|---:|---:|" + "---:|" * len(MANIFEST_LEVELS))
        for path in files:
            manifest = read_manifest(LocalStore(workdir / path.stem))
            text = manifest.canonical()
            cells = []
            for level in MANIFEST_LEVELS:
                compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)
                size = len(compressor.compress(text))
                seconds = best(lambda: compressor.compress(text), repeat=3)  # noqa: B023 - called at once
                cells.append(f"{size / 1e3:.1f} kB in {seconds * 1e3:.1f} ms")
            print(f"| {path.name} | {len(manifest.modules)} | {len(text) / 1e3:.0f} kB | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
