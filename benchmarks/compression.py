"""Compression and codec speed: lorachunk vs whole-file zstd -3/-19, ZipNN and z4ai, side by side.

    python benchmarks/compression.py            # real fixtures + synthetic SDXL-shaped F16 and BF16
    python benchmarks/compression.py --quick    # smaller synthetic files

Prints Markdown tables; docs/benchmarks.md holds the last published run. Speeds are single
thread (LORACHUNK_THREADS=1), best of three, each taking turns with the baseline it is compared to.

z4ai (``pip install lorachunk[bench]``) two ways: its safetensors container (``ZSTN``: each
tensor compressed on its own, with an index for reading one tensor, the peer of lorachunk's
records) and one frame of the whole file (no random access), each with its decompression speed.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ["LORACHUNK_THREADS"] = "1"

import numpy as np
import zstandard
from _timing import best, best_of_each, machine

import lorachunk
from lorachunk._codec import Codec, codec_from_config, plane_groups
from lorachunk._keys import manifest_key, pack_key
from lorachunk._manifest import Module
from lorachunk._repository import read_record
from lorachunk.storage import LocalStore
from lorachunk.testing import synth

ROOT = Path(__file__).resolve().parent.parent

ZIPNN_DTYPE = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


def zipnn_sizes(path: Path, manifest: lorachunk.Manifest) -> tuple[int | None, int | None]:
    try:
        import zipnn
    except ImportError:
        return None, None
    data = path.read_bytes()
    dtypes = {t.dtype for m in manifest.modules for t in m.tensors}
    main_dtype = max(dtypes, key=lambda d: sum(t.length for m in manifest.modules for t in m.tensors if t.dtype == d))
    whole = len(zipnn.ZipNN(input_format="byte", bytearray_dtype=ZIPNN_DTYPE.get(main_dtype, "float32")).compress(data))
    per_module = 0
    header = manifest.header_bytes()
    per_module += len(zstandard.ZstdCompressor(level=19).compress(header))
    offsets = {t.key: t.offset for t in manifest.file_order()}
    base = len(header)
    for module in manifest.modules:
        dtype = module.tensors[0].dtype
        raw = b"".join(data[base + offsets[t.key] : base + offsets[t.key] + t.length] for t in module.tensors)
        codec = zipnn.ZipNN(input_format="byte", bytearray_dtype=ZIPNN_DTYPE.get(dtype, "float32"))
        per_module += len(codec.compress(raw))
    return whole, per_module


def z4ai_measure(data: bytes, manifest: lorachunk.Manifest) -> dict[str, object]:
    """z4ai's stored bytes and decompression MB/s (single thread): its per-tensor container and
    one whole-file frame; empty when z4ai is not installed."""
    try:
        import z4ai
        import z4ai.safetensors
    except ImportError:
        return {}
    sizes: dict[str, int] = {}
    for module in manifest.modules:
        for tensor in module.tensors:
            sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + tensor.length
    main_dtype = {"F16": "fp16", "BF16": "bf16", "F32": "fp32"}.get(max(sizes, key=sizes.__getitem__, default=""))
    container = z4ai.safetensors.compress_bytes(data, threads=1, workers=1)
    whole = z4ai.compress(data, dtype=main_dtype, threads=1)
    container_s, whole_s = best_of_each(
        [lambda: z4ai.safetensors.decompress_bytes(container, workers=1), lambda: z4ai.decompress(whole)], repeat=3
    )
    mb = len(data) / 1e6
    return {
        "z4ai": len(container),
        "z4ai_whole": len(whole),
        "z4ai_MBs": mb / container_s,
        "z4ai_whole_MBs": mb / whole_s,
    }


def measure(path: Path, workdir: Path) -> dict[str, object]:
    data = path.read_bytes()
    # Each run packs into a new folder: a second pack into the same one finds every shard there
    # and writes nothing, which is dedup, not packing.
    dests = (workdir / f"{path.stem}-{run}" for run in itertools.count())
    packed: list[Path] = []

    def pack_fresh() -> None:
        packed.append(next(dests))
        lorachunk.pack(path, packed[-1])

    z3 = zstandard.ZstdCompressor(level=3)
    lorachunk.pack(path, workdir / f"{path.stem}-reference")
    store = LocalStore(workdir / f"{path.stem}-reference")
    manifest = lorachunk.read_manifest(store)
    manifest_bytes = len(store.get(manifest_key(_latest(store))))
    stored = manifest.stored_size + manifest_bytes
    shards = [(m, read_record(store, m)) for m in manifest.modules]
    objects = {pack_key(pack): store.get(pack_key(pack)) for pack in manifest.packs}
    codec = codec_from_config(manifest.codec)
    raws = [_decoded(codec, module, blob) for module, blob in shards]

    def encode_only() -> None:
        # The codec over every module's bytes in memory: pack without the files, hashes, manifest
        # and threads, to tell what the files cost from what the encoding does.
        for (module, _), raw in zip(shards, raws, strict=True):
            codec.encode(raw, module.segments)

    pack_s, z3_s, encode_s = best_of_each([pack_fresh, lambda: z3.compress(data), encode_only], repeat=3)

    def write_only() -> None:
        # The pack objects written as pack writes them (in one batch) with no encoding: what the
        # file system alone costs.
        target = LocalStore(next(dests))
        with target.batch():
            for key, blob in objects.items():
                target.set(key, blob)

    write_s = best(write_only, repeat=3)
    z3_frame = z3.compress(data)
    z19 = len(zstandard.ZstdCompressor(level=19).compress(data))
    buffers = [bytearray(m.raw_size) for m in manifest.modules]
    frames = list(_frames(shards))
    dctx = zstandard.ZstdDecompressor()
    frame_dctx = zstandard.ZstdDecompressor(format=zstandard.FORMAT_ZSTD1_MAGICLESS)

    def decode_all() -> None:
        for (module, blob), out in zip(shards, buffers, strict=True):
            codec.decode(memoryview(blob), module.segments, module.frames, memoryview(out))

    decode_s, z3d_s, frames_s, one_call_s, unpack_s = best_of_each(
        [
            decode_all,
            lambda: dctx.decompress(z3_frame),
            # Every zstd frame of every shard decompressed, and nothing else: the least this
            # format's one frame per plane costs, before any un-grouping.
            lambda: [frame_dctx.decompress(frame, max_output_size=count) for frame, count in frames],
            _one_call(shards),
            lambda: lorachunk.unpack(store, workdir / f"{path.stem}-unpacked.safetensors"),
        ],
        repeat=3,
    )
    zipnn_whole, zipnn_module = zipnn_sizes(path, manifest)
    z4 = z4ai_measure(data, manifest)
    mb = len(data) / 1e6
    raw_mb = manifest.raw_size / 1e6
    return {
        "file": path.name,
        "MB": mb,
        "modules": len(manifest.modules),
        "lorachunk": stored,
        "zstd3": len(z3_frame),
        "zstd19": z19,
        "zipnn": zipnn_whole,
        "zipnn_module": zipnn_module,
        "pack_MBs": mb / pack_s,
        "zstd3_MBs": mb / z3_s,
        "write_MBs": mb / write_s,
        "encode_MBs": mb / encode_s,
        "decode_MBs": raw_mb / decode_s,
        "unpack_MBs": mb / unpack_s,
        "zstd3_dec_MBs": mb / z3d_s,
        "frames_MBs": raw_mb / frames_s,
        "one_call_MBs": raw_mb / one_call_s,
        **z4,
    }


def _frames(shards: list[tuple[Module, bytes]]) -> Iterator[tuple[memoryview, int]]:
    """Each zstd frame of each shard, with the size it decodes to."""
    for module, blob in shards:
        counts = [count for itemsize, _, count in plane_groups(module.segments) for _ in range(itemsize)]
        position = 0
        for length, count in zip(module.frames, counts, strict=True):
            yield memoryview(blob)[position : position + length], count
            position += length


def _one_call(shards: list[tuple[Module, bytes]]) -> Callable[[], object]:
    """Every frame of every shard decompressed by one call to zstandard's
    ``multi_decompress_to_buffer``, which loops over the frames in C: what a decoder that batched
    modules could reach before un-grouping. That call reads only frames with the magic number
    (it ignores a decompressor's magicless format), so the timed call first puts the 4 magic
    bytes back in front of each frame, as such a decoder would have to."""
    views = [memoryview(blob) for _, blob in shards]
    lengths = np.array([length for module, _ in shards for length in module.frames], dtype=np.int64)
    counts = np.array([count for _, count in _frames(shards)], dtype=np.uint64).tobytes()
    framed = lengths + len(_MAGIC)
    segments = np.stack([np.cumsum(framed) - framed, framed], axis=1).astype(np.uint64).tobytes()
    dctx = zstandard.ZstdDecompressor()

    def run() -> object:
        parts: list[bytes | memoryview] = []
        for (module, _), view in zip(shards, views, strict=True):
            position = 0
            for length in module.frames:
                parts += (_MAGIC, view[position : position + length])
                position += length
        return dctx.multi_decompress_to_buffer(
            zstandard.BufferWithSegments(b"".join(parts), segments), decompressed_sizes=counts
        )

    return run


_MAGIC = b"\x28\xb5\x2f\xfd"


def _decoded(codec: Codec, module: Module, blob: bytes) -> memoryview:
    out = bytearray(module.raw_size)
    codec.decode(memoryview(blob), module.segments, module.frames, memoryview(out))
    return memoryview(out)


def _speed(mb_per_s: object) -> str:
    """MB/s to three significant figures at most, so the small files' few MB/s still compare."""
    value = float(mb_per_s)  # type: ignore[arg-type]
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def _vs(row: dict[str, object], key: str, baseline: str, digits: int = 2) -> str:
    """A speed and its ratio to the baseline's, as ``"12 (0.34x)"``."""
    value, reference = float(row[key]), float(row[baseline])  # type: ignore[arg-type]
    return f"{_speed(value)} ({value / reference:.{digits}f}x)"


def _latest(store: LocalStore) -> str:
    return store.get("refs/latest").decode().strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="synthetic files at 1/4 size")
    parser.add_argument("--no-synthetic", action="store_true")
    args = parser.parse_args()
    files = sorted((ROOT / "tests" / "data" / "loras").glob("*.safetensors"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if not args.no_synthetic:
            rank = 16 if args.quick else 64
            files.append(synth.sdxl(workdir / "synthetic_sdxl_f16.safetensors", rank=rank, text_encoders=True))
            files.append(
                synth.sdxl(workdir / "synthetic_sdxl_bf16.safetensors", rank=rank, dtype="BF16", text_encoders=True)
            )
            files.append(synth.sdxl_lokr(workdir / "synthetic_sdxl_lokr.safetensors", scale=0.5 if args.quick else 1.0))
        for path in files:
            rows.append(measure(path, workdir))
            print(f"measured {path.name}", file=sys.stderr)
    print(f"{machine()}, zstandard {zstandard.__version__}; speeds single-thread\n")
    print(
        "| file | MB | modules | lorachunk / zstd -19 | / zstd -3 | / ZipNN | / ZipNN per module | "
        "pack MB/s (x zstd -3) | pack files alone MB/s | encode alone MB/s (x zstd -3) | "
        "decode MB/s (x zstd -3 dec) | shard frames alone MB/s | frames in one call MB/s (x zstd -3 dec) | "
        "unpack MB/s (x zstd -3 dec) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    totals = {"lorachunk": 0, "zstd19": 0}
    for r in rows:
        totals["lorachunk"] += int(r["lorachunk"])  # type: ignore[call-overload]
        totals["zstd19"] += int(r["zstd19"])  # type: ignore[call-overload]
        zipnn = f"{r['lorachunk'] / r['zipnn']:.3f}" if r["zipnn"] else "n/a"  # type: ignore[operator]
        zipnn_m = f"{r['lorachunk'] / r['zipnn_module']:.3f}" if r["zipnn_module"] else "n/a"  # type: ignore[operator]
        print(
            f"| {r['file']} | {r['MB']:.2f} | {r['modules']} | {r['lorachunk'] / r['zstd19']:.3f} | "  # type: ignore[operator]
            f"{r['lorachunk'] / r['zstd3']:.3f} | {zipnn} | {zipnn_m} | "  # type: ignore[operator]
            f"{_vs(r, 'pack_MBs', 'zstd3_MBs', 3)} | {_speed(r['write_MBs'])} | {_vs(r, 'encode_MBs', 'zstd3_MBs')} | "
            f"{_vs(r, 'decode_MBs', 'zstd3_dec_MBs')} | {_speed(r['frames_MBs'])} | "
            f"{_vs(r, 'one_call_MBs', 'zstd3_dec_MBs')} | {_vs(r, 'unpack_MBs', 'zstd3_dec_MBs')} |"
        )
    print(
        f"\nAll files: lorachunk stores {totals['lorachunk'] / totals['zstd19']:.3f}x the bytes of whole-file zstd -19."
    )
    z4rows = [r for r in rows if "z4ai" in r]
    if z4rows:
        print(
            "\n| file | lorachunk bytes | z4ai container bytes (lorachunk /) | z4ai whole-file bytes (lorachunk /) "
            "| lorachunk decode MB/s | z4ai container decompress MB/s | z4ai whole decompress MB/s |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in z4rows:
            print(
                f"| {r['file']} | {r['lorachunk']} | {r['z4ai']} ({r['lorachunk'] / r['z4ai']:.4f}) "  # type: ignore[operator]
                f"| {r['z4ai_whole']} ({r['lorachunk'] / r['z4ai_whole']:.4f}) | {_speed(r['decode_MBs'])} "  # type: ignore[operator]
                f"| {_speed(r['z4ai_MBs'])} | {_speed(r['z4ai_whole_MBs'])} |"
            )
        real = [r for r in z4rows if not str(r["file"]).startswith("synthetic")]
        for label, chosen in (("real files", real), ("all files", z4rows)):
            ours = sum(int(r["lorachunk"]) for r in chosen)  # type: ignore[call-overload]
            theirs = sum(int(r["z4ai"]) for r in chosen)  # type: ignore[call-overload]
            whole = sum(int(r["z4ai_whole"]) for r in chosen)  # type: ignore[call-overload]
            print(
                f"\n{label}: lorachunk {ours / theirs:.4f}x z4ai's container, {ours / whole:.4f}x its whole-file frames"
            )


if __name__ == "__main__":
    main()
