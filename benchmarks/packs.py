"""Format lorachunk/2 against lorachunk/1: objects, stored bytes, requests, where pack's time goes,
and whether bundling tiny modules pays.

    python benchmarks/packs.py           # about 2 minutes
    python benchmarks/packs.py --quick   # synthetic files at 1/4 width

1. **Objects and bytes.** Every real fixture and the synthetic SDXL-shaped files (F16, BF16, and a
   LoKr one with LyCORIS-sized factors) packed with the defaults: objects in the store (v2: packs +
   manifest + 2 refs; v1: one shard per distinct module + the same 3) and stored bytes (records +
   manifest; v1's manifest is the same LoRA's manifest in the v1 form, built here).
2. **Requests.** Loads over plain HTTP and over ``hf://`` (the test servers on 127.0.0.1, real
   huggingface_hub client for the push), counted in the servers' logs: a full load, the largest
   component split and the block split nearest 10% of the modules, each against 1 + packs touched.
3. **Where pack's time goes** on the small real fixtures, one thread: pack against the codec
   alone plus the hashes it takes (sha256 of the file, xxh3 of each record, raw and pack), best of
   five in turns; the rest is the files, the manifest and Python's bookkeeping.
4. **Bundling tiny modules.** Modules under 4 KiB of raw bytes, grouped by split and element size,
   encoded as one set of byte-plane frames instead of one per module: bytes and decode time (each
   module's raw digest still checked after decoding), on the fixtures with such modules.
5. **What a writer reads of each manifest in a store**: the placements only (``_manifest.placements``)
   against a full read (``Manifest.from_bytes``), best of twenty, for the synthetic files.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

os.environ["LORACHUNK_THREADS"] = "1"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

import torch  # noqa: F401 - imported before any timing
import xxhash
from _timing import best_of_each, machine

import lorachunk
from lorachunk._codec import Segment, codec_from_config
from lorachunk._digest import check
from lorachunk._manifest import FORMAT_V1, Manifest, placements
from lorachunk._repository import decode_module, read_record
from lorachunk.storage import LocalStore
from lorachunk.testing import synth
from lorachunk.testing.http_server import serve
from lorachunk.testing.hub_server import serve_hub

ROOT = Path(__file__).resolve().parent.parent
LORAS = ROOT / "tests" / "data" / "loras"
MIB = 1024 * 1024


def real_files() -> list[Path]:
    return sorted(LORAS.glob("*.safetensors"))


def synthetic_files(work: Path, scale: float) -> list[Path]:
    return [
        synth.sdxl(work / "synthetic_sdxl_f16.safetensors", rank=64, text_encoders=True, scale=scale),
        synth.sdxl(work / "synthetic_sdxl_bf16.safetensors", rank=64, dtype="BF16", text_encoders=True, scale=scale),
        synth.sdxl_lokr(work / "synthetic_sdxl_lokr.safetensors", scale=scale),
    ]


def v1_manifest(manifest: Manifest) -> Manifest:
    """The same LoRA's manifest as lorachunk/1 wrote it: the same records, no pack table."""
    import dataclasses

    return Manifest.build(
        hash=manifest.hash,
        codec=manifest.codec,
        source=manifest.source,
        modules=[dataclasses.replace(m, pack=None, offset=0) for m in manifest.modules],
        splits={s.name: (s.kind, s.modules) for s in manifest.splits},
        files=manifest.files,
        format=FORMAT_V1,
    )


def objects_and_bytes(paths: Iterable[Path], work: Path) -> None:
    print("\n## Objects and stored bytes\n")
    print("| file | MB | modules | v1 objects | v2 objects (target) | v1 stored | v2 stored | v2 / v1 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for path in paths:
        manifest = lorachunk.pack(path, work / f"objects-{path.stem}")
        records = sum(manifest.packs.values())
        v1 = v1_manifest(manifest)
        v1_stored = sum({m.record: m.stored_size for m in manifest.modules}.values()) + len(v1.to_bytes())
        v2_stored = records + len(manifest.to_bytes())
        synthetic = path.stem.startswith("synthetic")
        target = 3 + math.ceil(records / (16 * MIB)) if synthetic else 4
        files = sum(1 for p in (work / f"objects-{path.stem}").rglob("*") if p.is_file())
        assert files == len(manifest.packs) + 3
        print(
            f"| {path.name} | {path.stat().st_size / 1e6:.1f} | {len(manifest.modules)} "
            f"| {len({m.record for m in manifest.modules}) + 3} | {files} ({target}) "
            f"| {v1_stored:,} | {v2_stored:,} | {v2_stored / v1_stored:.4f} |"
        )


def requests(paths: Iterable[Path], work: Path) -> None:
    print("\n## Requests per load (counted by the servers)\n")
    print("| file | packs | what | modules | packs touched | HTTP requests | hf:// resolve requests | target |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for path in paths:
        folder = work / "www" / path.stem
        manifest = lorachunk.pack(path, folder)
        cases: list[tuple[str, list[str] | None]] = [("full load", None)]
        components = [s for s in manifest.splits if s.kind == "component" and len(s.modules) < len(manifest.modules)]
        if components:
            biggest = max(components, key=lambda s: len(s.modules))
            cases.append((f"component `{biggest.name}`", [biggest.name]))
        blocks = [s for s in manifest.splits if s.kind == "block"]
        if blocks:
            tenth = min(blocks, key=lambda s: abs(len(s.modules) / len(manifest.modules) - 0.1))
            cases.append((f"block `{tenth.name}`", [tenth.name]))
        with serve(work / "www") as server, serve_hub(token="hf_bench") as hub:
            os.environ["HF_ENDPOINT"], os.environ["HF_TOKEN"] = hub.url, "hf_bench"
            lorachunk.push(folder, "bench/lora")
            for what, splits in cases:
                chosen = (
                    manifest.modules
                    if splits is None
                    else [manifest.module(n) for n in manifest.split(splits[0]).modules]
                )
                touched = len({m.pack for m in chosen})
                server.log.clear()
                lorachunk.load(f"{server.url}/{path.stem}", splits=splits, cache=False)
                hub.log.clear()
                lorachunk.load("hf://bench/lora", splits=splits, cache=False)
                resolves = len(hub.requests("GET", "/resolve/"))
                print(
                    f"| {path.name} | {len(manifest.packs)} | {what} | {len(chosen)} | {touched} "
                    f"| {len(server.gets())} | {resolves} | {1 + touched} |"
                )


def time_shares(paths: Iterable[Path], work: Path) -> None:
    print("\n## Where pack's time goes (one thread, best of five in turns)\n")
    print("| file | MB | pack | encode + hashes | outside them | share outside (target ≤ 30%) |")
    print("|---|---:|---:|---:|---:|---:|")
    for path in paths:
        print(_time_share(path, work))


def _time_share(path: Path, work: Path) -> str:
    data = path.read_bytes()
    store = LocalStore(work / f"share-{path.stem}")
    manifest = lorachunk.pack(path, store)
    codec = codec_from_config(manifest.codec)
    raws = [decode_module(store, manifest, m) for m in manifest.modules]
    records = [read_record(store, m) for m in manifest.modules]
    counter = iter(range(10**6))

    def pack() -> None:
        lorachunk.pack(path, work / f"share-{path.stem}-{next(counter)}")

    def encode_and_hash() -> None:
        hashlib.sha256(data).digest()
        for module, raw, record in zip(manifest.modules, raws, records, strict=True):
            codec.encode(memoryview(raw), module.segments)
            xxhash.xxh3_128_digest(raw)
            xxhash.xxh3_128_digest(record)
        xxhash.xxh3_128_digest(b"".join(records))

    pack_s, inner_s = best_of_each([pack, encode_and_hash], repeat=5)
    return (
        f"| {path.name} | {len(data) / 1e6:.2f} | {pack_s * 1e3:.1f} ms | {inner_s * 1e3:.1f} ms "
        f"| {(pack_s - inner_s) * 1e3:.1f} ms | {max(0.0, 1 - inner_s / pack_s):.0%} |"
    )


def bundling(paths: Iterable[Path], work: Path, *, small: int = 4096) -> None:
    print(f"\n## Bundling modules under {small} B raw (by component and element size)\n")
    print(
        "| file | small modules | bundles | per module: bytes | bundled: bytes "
        "| per module: decode | bundled: decode | new version, one small module changed: per module | bundled |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for path in paths:
        row = _bundling(path, work, small)
        if row:
            print(row)


def _bundling(path: Path, work: Path, small: int) -> str | None:
    store = LocalStore(work / f"bundle-{path.stem}")
    manifest = lorachunk.pack(path, store)
    codec = codec_from_config(manifest.codec)
    owner = {}
    for split in manifest.splits:
        if split.kind == "component":
            owner.update(dict.fromkeys(split.modules, split.name))
    tiny = [m for m in manifest.modules if m.raw_size < small]
    if len(tiny) < 10:
        return None
    groups: dict[tuple[str, int], list[lorachunk.Module]] = {}
    for module in tiny:
        sizes = {t.itemsize for t in module.tensors}
        groups.setdefault((owner.get(module.name, ""), min(sizes) if len(sizes) == 1 else 0), []).append(module)
    raws = {m.name: bytes(decode_module(store, manifest, m)) for m in tiny}
    records = {m.name: read_record(store, m) for m in tiny}
    bundles = []
    for members in groups.values():
        raw = b"".join(raws[m.name] for m in members)
        segments, position = [], 0
        for module in members:
            for tensor in module.tensors:
                segments.append(Segment(position + tensor.offset, tensor.length, tensor.itemsize))
            position += module.raw_size
        stored, frames = codec.encode(memoryview(raw), segments)
        bundles.append((members, stored, frames, segments, len(raw)))

    def per_module() -> None:
        for module in tiny:
            out = bytearray(module.raw_size)
            codec.decode(memoryview(records[module.name]), module.segments, module.frames, memoryview(out))
            check(module.raw, out, what=module.name)

    def bundled() -> None:
        for members, stored, frames, segments, size in bundles:
            out = bytearray(size)
            codec.decode(memoryview(stored), segments, frames, memoryview(out))
            position = 0
            for module in members:
                check(module.raw, memoryview(out)[position : position + module.raw_size], what=module.name)
                position += module.raw_size

    module_s, bundle_s = best_of_each([per_module, bundled], repeat=5)
    # A new version that changes one small module: per module, its record is all that is new;
    # bundled, the whole bundle holding it is new.
    changed = tiny[len(tiny) // 2]
    holder = next(b for b in bundles if changed in b[0])
    return (
        f"| {path.name} | {len(tiny)} | {len(bundles)} | {sum(map(len, records.values())):,} "
        f"| {sum(len(b[1]) for b in bundles):,} | {module_s * 1e3:.2f} ms | {bundle_s * 1e3:.2f} ms "
        f"| {changed.stored_size:,} B | {len(holder[1]):,} B |"
    )


def manifest_reads(paths: Iterable[Path], work: Path) -> None:
    print("\n## Reading a manifest: placements only vs in full (best of twenty)\n")
    print("| file | modules | manifest | placements | full read | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for path in paths:
        print(_manifest_read(lorachunk.pack(path, work / f"objects-{path.stem}"), path.name))


def _manifest_read(manifest: Manifest, name: str) -> str:
    stored = manifest.to_bytes()
    fast, full = best_of_each(
        [lambda: placements(stored, algorithm=manifest.hash), lambda: Manifest.from_bytes(stored)], repeat=20
    )
    return (
        f"| {name} | {len(manifest.modules)} | {len(stored) / 1e3:.0f} kB | {fast * 1e3:.1f} ms "
        f"| {full * 1e3:.1f} ms | {full / fast:.1f}x |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="synthetic files at 1/4 width")
    args = parser.parse_args()
    print(f"{machine()}, lorachunk {lorachunk.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        synthetic = synthetic_files(work, 0.25 if args.quick else 1.0)
        objects_and_bytes([*real_files(), *synthetic], work)
        requests([LORAS / "diffusers_sd15_attnproc.safetensors", *synthetic], work)
        time_shares(real_files(), work)
        bundling(real_files(), work)
        manifest_reads(synthetic, work)


if __name__ == "__main__":
    main()
