"""Fuzzing: mutated manifests, safetensors headers and shard frames end in a lorachunk error or
read correctly, never in another exception (a KeyError, a RecursionError, a MemoryError …).

Each mutation replaces, drops or repeats a node of a valid document; the hand-written cases in
test_manifest.py and test_bad_input.py name the known ones, these look for the rest. Randomized
like the round-trip property test: a failure here is a real bug, and hypothesis prints the case.
"""

from __future__ import annotations

import copy
import functools
import json
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zstandard
from conftest import DATA
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import lorachunk
from lorachunk._codec import BytePlaneZstd, Segment
from lorachunk._manifest import Manifest
from lorachunk.testing import synth

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2**65) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
# Values a reader has to tell apart from the right ones: well-formed but wrong.
NEAR_MISSES = st.sampled_from(
    ["xxh3-128:" + "0" * 32, "sha256:" + "0" * 64, "F16", "BF16", "U8", "lorachunk/1", [0, 2], [[0, 1]], 2**63, ".."]
)


class Raw(str):
    """A JSON token written as it is: what json.dumps refuses to write but a hostile file can hold."""


# NaN and infinities, a float past the double range, integers of thousands of digits (Python
# refuses to convert over 4300 with a bare ValueError), lone surrogates, control characters.
RAW = st.sampled_from(
    ["NaN", "-Infinity", "1e999", "9" * 5000, "-" + "9" * 25, "0.5", '"\\ud800"', '"a\\udfffb"', '"\\u001b[2J"']
).map(Raw)
EDITS = st.lists(
    st.tuples(st.integers(0, 10**6), st.sampled_from(["set", "drop", "repeat"]), JSON | NEAR_MISSES | RAW),
    min_size=1,
    max_size=3,
)


def _render(document: Any, **options: Any) -> bytes:
    """``json.dumps(document, **options)``, with each :class:`Raw` value written verbatim."""
    tokens: list[str] = []

    def marked(node: Any) -> Any:
        if isinstance(node, Raw):
            tokens.append(str(node))
            return f"\x00{len(tokens) - 1}\x00"
        if isinstance(node, dict):
            return {key: marked(value) for key, value in node.items()}
        if isinstance(node, list):
            return [marked(value) for value in node]
        return node

    text = json.dumps(marked(document), **options)
    for index, token in enumerate(tokens):
        text = text.replace(f'"\\u0000{index}\\u0000"', token)
    return text.encode()


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node[:3]):
            yield from _paths(value, (*prefix, index))


def _mutate(document: Any, edits: list[tuple[int, str, Any]]) -> Any:
    document = copy.deepcopy(document)
    for index, op, value in edits:
        paths = list(_paths(document))[1:]
        if not paths:
            return copy.deepcopy(value)
        *parents, last = paths[index % len(paths)]
        node = document
        for part in parents:
            node = node[part]
        if op == "drop" and isinstance(node, dict):
            del node[last]
        elif op == "repeat" and isinstance(node, list):
            node.append(copy.deepcopy(node[last]))
        else:
            node[last] = copy.deepcopy(value)  # sampled values are shared objects: no cycles
    return document


@functools.cache
def _manifest_json() -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        manifest = lorachunk.pack(DATA / "loras" / "sam_lora_rank16.safetensors", Path(tmp) / "s")
    return json.loads(manifest.canonical())


@SETTINGS
@given(edits=EDITS)
def test_a_mutated_manifest_is_read_or_refused(edits: list[tuple[int, str, Any]]) -> None:
    text = _render(_mutate(_manifest_json(), edits), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    try:
        manifest = Manifest.from_bytes(zstandard.ZstdCompressor().compress(text))
    except lorachunk.LorachunkError as exc:
        event(f"refused: {type(exc).__name__}")
        return
    event("read")
    assert manifest.canonical() == text  # what is accepted reads back as itself


@functools.cache
def _header() -> tuple[Any, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        tensors = {
            "lora_unet_a.lora_down.weight": ("F16", (2, 3), bytes(range(12))),
            "lora_unet_a.lora_up.weight": ("F32", (3, 1), bytes(range(12))),
            "lora_unet_a.alpha": ("BF16", (), b"\x80\x3f"),
            "lora_te_b.lora_down.weight": ("U8", (0,), b""),
        }
        data = synth.write(Path(tmp) / "x.safetensors", tensors, {"ss_network_dim": "4"}).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


@SETTINGS
@given(edits=EDITS, cut=st.none() | st.integers(0, 40))
def test_a_mutated_safetensors_file_packs_exactly_or_is_refused(
    edits: list[tuple[int, str, Any]], cut: int | None
) -> None:
    header, body = _header()
    text = _render(_mutate(header, edits))
    data = struct.pack("<Q", len(text)) + text + (body if cut is None else body[:cut])
    with tempfile.TemporaryDirectory() as tmp:
        src, dest = Path(tmp) / "x.safetensors", Path(tmp) / "store"
        src.write_bytes(data)
        try:
            lorachunk.pack(src, dest)
        except lorachunk.FormatError:
            event("refused")
            assert not dest.exists()
            return
        event("packed")
        assert lorachunk.unpack(dest, Path(tmp) / "out.safetensors").read_bytes() == data


SEGMENTS = (Segment(0, 12, 2), Segment(12, 12, 4), Segment(24, 3, 1))


# A frame header descriptor with random flags, then what may be a content size of any size.
FRAMES = st.binary(max_size=40) | st.builds(
    lambda flags, size, rest: bytes([flags]) + size.to_bytes(8, "little") + rest,
    st.integers(0, 255),
    st.integers(0, 2**64 - 1),
    st.binary(max_size=30),
)


@SETTINGS
@given(pieces=st.lists(FRAMES, max_size=8), table=st.none() | st.lists(st.integers(0, 120), max_size=8))
def test_random_shard_bytes_decode_to_an_integrity_error(pieces: list[bytes], table: list[int] | None) -> None:
    """Random frames, with a frame table that fits them (so each reaches zstd) or a random one."""
    stored = b"".join(pieces)
    frames = [len(p) for p in pieces] if table is None else table
    codec = BytePlaneZstd()
    for decode in (codec.decode, codec.decode_planes):
        try:
            decode(memoryview(stored), SEGMENTS, frames, memoryview(bytearray(27)))
        except lorachunk.IntegrityError:
            event("refused")
            continue
        event("decoded")
        # Decoding can succeed only where the frames are a real encoding of some 27 bytes.
        assert sum(frames) == len(stored)
