"""The bpz codec on its own: exact round trips, bounded expansion, corrupt frames refused."""

from __future__ import annotations

import os

import numpy as np
import pytest

import lorachunk
from lorachunk._codec import BytePlaneZstd, Segment, codec_from_config

SEGMENTS = (
    Segment(0, 6000, 2),
    Segment(6000, 4000, 4),
    Segment(10000, 8, 8),
    Segment(10008, 0, 2),
    Segment(10008, 7, 1),
)


def test_roundtrip_mixed_itemsizes() -> None:
    raw = os.urandom(10015)
    codec = BytePlaneZstd(level=3)
    stored, frames = codec.encode(memoryview(raw), SEGMENTS)
    # planes: 2 (itemsize 2) + 4 + 8 + 1 (itemsize 1); the empty tensor adds none
    assert len(frames) == 15 and sum(frames) == len(stored)
    out = bytearray(len(raw))
    codec.decode(memoryview(stored), SEGMENTS, frames, memoryview(out))
    assert bytes(out) == raw


def test_incompressible_data_grows_by_a_few_bytes_per_plane() -> None:
    """docs/format.md: zstd's raw blocks bound the expansion; no separate raw mode is needed."""
    raw = os.urandom(65536)
    stored, frames = BytePlaneZstd().encode(memoryview(raw), (Segment(0, 65536, 2),))
    assert len(stored) <= len(raw) + 8 * len(frames)


# Both decoder paths: one element size with tensors back to back (the usual module, decoded
# column by column) and mixed element sizes (decoded group by group, tensor by tensor).
LAYOUTS = {
    "one itemsize": (Segment(0, 4000, 4), Segment(4000, 6240, 4)),
    "mixed itemsizes": SEGMENTS,
}


@pytest.mark.parametrize("segments", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_roundtrip_each_decoder_path(segments: tuple[Segment, ...]) -> None:
    size = segments[-1].offset + segments[-1].length
    raw = np.random.default_rng(0).normal(size=size).astype(np.float16).tobytes()[:size]  # weight-like bytes
    codec = BytePlaneZstd()
    stored, frames = codec.encode(memoryview(raw), segments)
    out = bytearray(len(raw))
    codec.decode(memoryview(stored), segments, frames, memoryview(out))
    assert bytes(out) == raw


@pytest.mark.parametrize("segments", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_corrupt_frames_are_integrity_errors(segments: tuple[Segment, ...]) -> None:
    size = segments[-1].offset + segments[-1].length
    raw = (bytes(range(256)) * 41)[:size]
    codec = BytePlaneZstd()
    stored, frames = codec.encode(memoryview(raw), segments)
    out = memoryview(bytearray(len(raw)))
    with pytest.raises(lorachunk.IntegrityError):
        codec.decode(memoryview(stored[:-3]), segments, frames, out)
    with pytest.raises(lorachunk.IntegrityError):
        codec.decode(memoryview(stored), segments, frames[:-1], out)
    with pytest.raises(lorachunk.IntegrityError):  # lengths that add up, boundaries that don't
        codec.decode(memoryview(stored), segments, (frames[0] + 1, frames[1] - 1, *frames[2:]), out)
    first, *rest = segments
    shrunk = (
        Segment(0, first.length - 16, first.itemsize),
        *(Segment(s.offset - 16, s.length, s.itemsize) for s in rest),
    )
    shorter, short_frames = codec.encode(memoryview(raw[16:]), shrunk)
    with pytest.raises(lorachunk.IntegrityError):  # the first group's planes a few elements short
        codec.decode(memoryview(shorter), segments, short_frames, out)


@pytest.mark.parametrize("segments", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_a_frame_declaring_a_huge_size_is_refused_before_allocating(segments: tuple[Segment, ...]) -> None:
    """zstandard would allocate what a frame header declares (here 1 TiB) before decoding it."""
    size = segments[-1].offset + segments[-1].length
    codec = BytePlaneZstd()
    stored, frames = codec.encode(memoryview(bytes(size)), segments)
    # Frame header descriptor 0xE0: single segment, an 8-byte content size; then the blocks.
    crafted = bytes([0xE0]) + (2**40).to_bytes(8, "little") + stored[2 : frames[0]]
    hostile = crafted + stored[frames[0] :]
    hostile_frames = (len(crafted), *frames[1:])
    out = memoryview(bytearray(size))
    for decode in (codec.decode, codec.decode_planes):
        with pytest.raises(lorachunk.IntegrityError, match="declares its content size"):
            decode(memoryview(hostile), segments, hostile_frames, out)


def test_config_roundtrip_and_unknown_codec() -> None:
    assert codec_from_config(BytePlaneZstd(level=7).get_config()).get_config() == {"id": "bpz", "level": 7}
    with pytest.raises(lorachunk.ManifestError, match="unknown codec"):
        codec_from_config({"id": "zipnn"})
    with pytest.raises(lorachunk.ManifestError):
        codec_from_config({"id": "bpz", "level": "3"})


def test_config_keeps_encoder_params_and_refuses_bad_ones() -> None:
    codec = BytePlaneZstd.for_level(3)
    assert codec_from_config(codec.get_config()).get_config() == {
        "id": "bpz",
        "level": 3,
        "params": dict(BytePlaneZstd.PLANE_PARAMS),
    }
    # zstd's optimal parser is used as it is.
    assert BytePlaneZstd.for_level(19).get_config() == {"id": "bpz", "level": 19}
    bad_params: list[object] = [{"window_log": "9"}, {"dictionary": 1}, [], {"min_match": True}]
    for bad in bad_params:
        with pytest.raises(lorachunk.ManifestError):
            codec_from_config({"id": "bpz", "level": 3, "params": bad})


def _run_of_records(codec: BytePlaneZstd) -> tuple[bytes, list[tuple[tuple[Segment, ...], tuple[int, ...], bytes]]]:
    """Records of every layout, stored back to back as a pack holds them."""
    rng = np.random.default_rng(1)
    layouts = [
        (Segment(0, 8192, 2), Segment(8192, 4096, 2)),  # F16/BF16: joined as 16-bit words
        (Segment(0, 4000, 4), Segment(4000, 6240, 4)),  # one itemsize, columns
        SEGMENTS,  # mixed itemsizes, tensor by tensor
        (Segment(0, 3, 1),),  # a few bytes
    ]
    records = []
    for segments in layouts:
        size = segments[-1].offset + segments[-1].length
        raw = rng.normal(size=size).astype(np.float16).tobytes()[:size]
        stored, frames = codec.encode(memoryview(raw), segments)
        records.append((segments, frames, raw, stored))
    return b"".join(r[3] for r in records), [(s, f, raw) for s, f, raw, _ in records]


def test_a_run_decodes_as_its_records_one_by_one() -> None:
    codec = BytePlaneZstd()
    stored, records = _run_of_records(codec)
    for decode_run in (codec.decode_run, super(BytePlaneZstd, codec).decode_run):  # streamed, and one by one
        outs = [bytearray(len(raw)) for _, _, raw in records]
        decode_run(memoryview(stored), [(s, f, memoryview(o)) for (s, f, _), o in zip(records, outs, strict=True)])
        assert [bytes(o) for o in outs] == [raw for _, _, raw in records]


def test_a_corrupt_run_is_an_integrity_error() -> None:
    codec = BytePlaneZstd()
    stored, records = _run_of_records(codec)

    def decode(data: bytes, table: list[tuple[tuple[Segment, ...], tuple[int, ...], bytes]]) -> None:
        codec.decode_run(memoryview(data), [(s, f, memoryview(bytearray(len(raw)))) for s, f, raw in table])

    with pytest.raises(lorachunk.IntegrityError):
        decode(stored[:-3], records)  # truncated
    with pytest.raises(lorachunk.IntegrityError, match="frame table"):
        decode(stored + stored[-8:], records)  # bytes the table does not account for
    first, *rest = records
    with pytest.raises(lorachunk.IntegrityError, match="frame table"):
        decode(stored, [(first[0], first[1][:-1], first[2]), *rest])  # a plane short of its itemsize
    # The table's sizes add up, but the first record's tensors are declared 16 bytes shorter
    # than its planes decode to: the run decodes to more bytes than declared.
    segments = (Segment(0, 8192 - 16, 2), Segment(8192 - 16, 4096, 2))
    with pytest.raises(lorachunk.IntegrityError, match="more bytes"):
        decode(stored, [(segments, first[1], first[2][:-16]), *rest])
    # A frame that declares its content size, inside the run.
    frames = first[1]
    crafted = bytes([0xE0]) + (2**40).to_bytes(8, "little") + stored[2 : frames[0]]
    with pytest.raises(lorachunk.IntegrityError, match="declares its content size"):
        decode(crafted + stored[frames[0] :], [(first[0], (len(crafted), *frames[1:]), first[2]), *rest])
