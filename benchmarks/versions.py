"""A store of 100 versions of one LoRA, each changing 1% of its modules: what it stores, and what
loading the last version costs before and after ``repack``.

    python benchmarks/versions.py           # about 3 minutes
    python benchmarks/versions.py --quick   # 20 versions of a LoRA at 1/2 width

The LoRA is synthetic (SDXL-shaped, F16, rank 16, both text encoders: 894 modules). Version k+1
is version k with 9 more modules (1%) changed, never the same ones twice in a row, each version
packed into the same folder with ``lorachunk.pack``. Stored bytes are the packs' (records) and the
manifests'; the floor is the first version's records plus every changed module's record. Loads
are over plain HTTP from the test server on 127.0.0.1, counted in its log.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch  # noqa: F401 - imported before any timing
from _timing import machine
from safetensors.numpy import load_file, save_file

import lorachunk
from lorachunk.testing import synth
from lorachunk.testing.http_server import serve

MIB = 1024 * 1024


def folder_bytes(folder: Path, sub: str) -> int:
    return sum(p.stat().st_size for p in (folder / sub).rglob("*") if p.is_file())


def loads(url: str, manifest: lorachunk.Manifest, server: object) -> tuple[int, int, int, int]:
    """Packs touched and requests of a full load, and of the block split nearest 10% of the modules."""
    blocks = [s for s in manifest.splits if s.kind == "block"]
    split = min(blocks, key=lambda s: abs(len(s.modules) / len(manifest.modules) - 0.1))
    counts = []
    for splits in (None, [split.name]):
        chosen = manifest.modules if splits is None else [manifest.module(n) for n in split.modules]
        server.log.clear()  # type: ignore[attr-defined]
        lorachunk.load(url, splits=splits, cache=False)
        counts += [len({m.pack for m in chosen}), len(server.log)]  # type: ignore[attr-defined]
    return counts[0], counts[1], counts[2], counts[3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 versions of a LoRA at 1/2 width")
    args = parser.parse_args()
    versions, scale = (20, 0.5) if args.quick else (100, 1.0)
    print(f"{machine()}, lorachunk {lorachunk.__version__}\n")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = synth.sdxl(work / "v.safetensors", rank=16, text_encoders=True, scale=scale)
        store = work / "www" / "store"
        tensors = load_file(src)
        first = lorachunk.pack(src, store)
        floor = sum(first.packs.values())
        names = [m.name for m in first.modules]
        per_version = max(1, round(len(names) / 100))
        rng = np.random.default_rng(0)
        started = time.perf_counter()
        latest = first
        for version in range(2, versions + 1):
            changed = rng.choice(len(names), size=per_version, replace=False)
            for index in changed:
                module = latest.module(names[index])
                for tensor in module.tensors:
                    tensors[tensor.key] = tensors[tensor.key] + np.float16(0.001 * version)
            save_file(tensors, src)
            previous = latest
            latest = lorachunk.pack(src, store)
            floor += sum(m.stored_size for m in latest.modules if previous.module(m.name).record != m.record)
        pack_s = (time.perf_counter() - started) / (versions - 1)
        records = folder_bytes(store, "packs")
        manifests = folder_bytes(store, "manifests")
        size = sum(m.stored_size for m in latest.modules)
        print(
            f"LoRA: {len(names)} modules, {size / 1e6:.1f} MB stored; {versions} versions, {per_version} modules each"
        )
        print(f"pack of one version into the store: {pack_s:.2f} s on average\n")
        print(
            "| | packs in the store | records stored | / floor (target ≤ 1.05) | manifests | "
            "version "
            f"{versions}: packs | full load: requests | 10% split: packs touched, requests |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        with serve(work / "www") as server:
            url = f"{server.url}/store"
            full_packs, full_requests, split_packs, split_requests = loads(url, latest, server)
            count = sum(1 for _ in (store / "packs").iterdir())
            print(
                f"| before repack | {count} | {records / 1e6:.1f} MB | {records / floor:.3f} "
                f"| {manifests / 1e6:.2f} MB | {full_packs} | {full_requests} | {split_packs}, {split_requests} |"
            )
            started = time.perf_counter()
            report = lorachunk.repack(store, prune=True)
            repack_s = time.perf_counter() - started
            after = lorachunk.read_manifest(store)
            assert after.root == latest.root
            full_packs, full_requests, split_packs, split_requests = loads(url, after, server)
            records = folder_bytes(store, "packs")
            count = sum(1 for _ in (store / "packs").iterdir())
            print(
                f"| after repack --prune | {count} | {records / 1e6:.1f} MB | {records / floor:.3f} "
                f"| {folder_bytes(store, 'manifests') / 1e6:.2f} MB | {full_packs} | {full_requests} "
                f"| {split_packs}, {split_requests} |"
            )
        target = 1 + math.ceil(size / (16 * MIB))
        print(
            f"\nrepack: {report.rewritten} manifests rewritten, {report.packs_written} packs "
            f"({report.bytes_written / 1e6:.1f} MB) written, {report.deleted} objects deleted, {repack_s:.1f} s; "
            f"a full load of version {versions} after it: {full_requests} requests (target ≤ {target})"
        )
        lorachunk.verify(store)


if __name__ == "__main__":
    main()
