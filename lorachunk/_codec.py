"""Record codecs: a module's raw tensor bytes in, stored bytes out, and back.

A codec is named in the manifest by its config (a JSON object with an ``id``), so a later codec
can be added without breaking readers: a reader looks the id up in :data:`REGISTRY` and refuses
ids it does not know.
"""

from __future__ import annotations

import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Final, TypeAlias

import numpy as np
import zstandard

from lorachunk._exceptions import IntegrityError, ManifestError

__all__ = [
    "REGISTRY",
    "BytePlaneZstd",
    "Codec",
    "RunRecord",
    "Segment",
    "codec_from_config",
    "plane_groups",
    "tiled_itemsize",
]

if TYPE_CHECKING:  # numpy.typing costs import time and only annotations use it
    import numpy.typing as npt

    _Bytes: TypeAlias = npt.NDArray[np.uint8]


#: One record of a run: its segments, its frame lengths, and the buffer it decodes into.
RunRecord: TypeAlias = "tuple[Sequence[Segment], Sequence[int], memoryview]"
_Groups: TypeAlias = "Sequence[tuple[int, list[Segment], int]]"


@dataclass(frozen=True, slots=True)
class Segment:
    """Where one tensor sits in a module's raw bytes, and its element size."""

    offset: int
    length: int
    itemsize: int


class Codec(ABC):
    """Encodes the raw bytes of one module (its tensors, back to back) into a record."""

    codec_id: ClassVar[str]

    @abstractmethod
    def get_config(self) -> dict[str, object]:
        """The JSON config that :func:`codec_from_config` turns back into this codec."""

    @classmethod
    @abstractmethod
    def from_config(cls, config: Mapping[str, object]) -> Codec: ...

    @abstractmethod
    def encode(self, raw: memoryview, segments: Sequence[Segment]) -> tuple[bytes, tuple[int, ...]]:
        """Return the stored bytes and the codec's frame lengths (kept in the manifest)."""

    @abstractmethod
    def decode(self, stored: memoryview, segments: Sequence[Segment], frames: Sequence[int], out: memoryview) -> None:
        """Decode ``stored`` into ``out``, a writable buffer of the module's raw size.

        Raises :class:`IntegrityError` when the stored bytes do not decode to the declared sizes.
        """

    def decode_run(self, stored: memoryview, records: Sequence[RunRecord]) -> None:
        """Decode records stored back to back, each ``(segments, frames, out)``, as :meth:`decode`
        would one by one (which is what this does unless a codec knows a faster way)."""
        position = 0
        for segments, frames, out in records:
            size = sum(frames)
            self.decode(stored[position : position + size], segments, frames, out)
            position += size
        if position != len(stored):
            raise IntegrityError("record frame table does not match its bytes")


class BytePlaneZstd(Codec):
    """Byte planes by element size, one zstd frame per plane (codec id ``bpz``).

    The tensors of a module are grouped by element size; within a group, plane ``k`` holds byte
    ``k`` of every element of every tensor in table order. Each non-empty plane becomes one
    magicless zstd frame without content size, checksum or dictionary id (the manifest records
    every size and the record digest covers the bytes), so a plane pays 5 bytes of framing — it
    matters for LyCORIS files whose median tensor is 256 bytes.
    zstd stores incompressible planes as raw blocks by itself, so no separate raw mode is needed.
    Frames follow in order of (element size, plane). See docs/format.md for the measurements.

    ``params`` are zstd compression parameters that override level ``level``'s own. They change
    only the encoder (a decoder never needs them) and are kept in the config so that a config
    reproduces its records byte for byte. :meth:`for_level` picks them.
    """

    codec_id: ClassVar[str] = "bpz"
    DEFAULT_LEVEL: ClassVar[int] = 3
    #: Below zstd's optimal parsers (level 16), a fast match finder that wants 7-byte matches:
    #: planes of trained weights are close to random, and the short chance matches a deeper
    #: search finds cost more than the literals they replace. On the fixtures this is 1-5% smaller
    #: than level 3's own parameters and 2-4x faster (docs/format.md).
    PLANE_PARAMS: ClassVar[Mapping[str, int]] = {
        "chain_log": 8,
        "hash_log": 8,
        "min_match": 7,
        "search_log": 1,
        "strategy": 1,
    }
    OPTIMAL_LEVEL: ClassVar[int] = 16

    def __init__(self, *, level: int = DEFAULT_LEVEL, params: Mapping[str, int] | None = None) -> None:
        if not _is_int(level) or not 1 <= level <= 22:
            raise ValueError(f"zstd level must be an int in 1..22, got {level!r}")
        unknown = set(params or {}) - _PARAM_NAMES
        if unknown:
            raise ValueError(f"unknown zstd parameters {sorted(unknown)}; known: {sorted(_PARAM_NAMES)}")
        self.level = level
        self.params = dict(sorted((params or {}).items()))
        self._local = threading.local()

    @classmethod
    def for_level(cls, level: int = DEFAULT_LEVEL) -> BytePlaneZstd:
        """The codec :func:`lorachunk.pack` uses at ``level``."""
        fast = _is_int(level) and level < cls.OPTIMAL_LEVEL  # the constructor refuses a bad level
        return cls(level=level, params=cls.PLANE_PARAMS if fast else None)

    def get_config(self) -> dict[str, object]:
        config: dict[str, object] = {"id": self.codec_id, "level": self.level}
        if self.params:
            config["params"] = dict(self.params)
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> BytePlaneZstd:
        level, params = config.get("level"), config.get("params", {})
        if (
            not {"id", "level"} <= set(config) <= {"id", "level", "params"}
            or not _is_int(level)
            or not isinstance(params, dict)
            or not all(_is_int(v) for v in params.values())
        ):
            raise ManifestError(f"bad {cls.codec_id} codec config {dict(config)!r}")
        try:
            return cls(level=level, params=params)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ManifestError(f"bad {cls.codec_id} codec config: {exc}") from exc

    def _compressor(self) -> zstandard.ZstdCompressor:
        # ZstdCompressor objects are not thread-safe; one per thread keeps their buffers warm.
        cctx: zstandard.ZstdCompressor | None = getattr(self._local, "cctx", None)
        if cctx is None:
            params = zstandard.ZstdCompressionParameters.from_level(
                self.level, format=_FORMAT, write_content_size=0, write_checksum=0, write_dict_id=0, **self.params
            )
            cctx = zstandard.ZstdCompressor(compression_params=params)
            self._local.cctx = cctx
        return cctx

    def encode(self, raw: memoryview, segments: Sequence[Segment]) -> tuple[bytes, tuple[int, ...]]:
        cctx = self._compressor()
        buffer = np.frombuffer(raw, dtype=np.uint8)
        frames: list[bytes] = []
        for itemsize, group in _groups(segments):
            elements = np.concatenate([buffer[s.offset : s.offset + s.length] for s in group]).reshape(-1, itemsize)
            if elements.size == 0:
                continue
            planes = np.ascontiguousarray(elements.T)
            frames.extend(cctx.compress(plane.data) for plane in planes)
        return b"".join(frames), tuple(len(f) for f in frames)

    def decode(self, stored: memoryview, segments: Sequence[Segment], frames: Sequence[int], out: memoryview) -> None:
        groups = plane_groups(segments)
        _unplane(groups, list(self._planes(stored, groups, frames)), segments, out)

    def decode_run(self, stored: memoryview, records: Sequence[RunRecord]) -> None:
        """All frames of the run in one streaming call into a per-thread scratch buffer, then each
        record's planes joined into its ``out``.

        One zstd call for the run instead of one per plane: for LoRAs of many small modules
        that is most of the calls, and of the Python around them (docs/benchmarks.md #27).
        zstd checks each frame as it streams; the sizes are checked in total (a plane that
        decodes short and its neighbour long would only shift bytes, which the raw digest every
        caller checks then refuses).
        """
        if len(records) == 1:
            segments, frames, out = records[0]
            self.decode(stored, segments, frames, out)
            return
        layouts = []
        position = total = 0
        for segments, frames, out in records:
            groups = plane_groups(segments)
            if len(frames) != sum(itemsize for itemsize, _, _ in groups):
                raise IntegrityError("record frame table does not match its bytes")
            for length in frames:
                _check_header(stored[position : position + length])
                position += length
            layouts.append((groups, segments, out, total))
            total += sum(itemsize * count for itemsize, _, count in groups)
        if position != len(stored):
            raise IntegrityError("record frame table does not match its bytes")
        scratch = _scratch(total)
        try:
            _stream(stored, scratch.data[:total])
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"record does not decode with codec {self.codec_id}: {exc}") from exc
        for groups, segments, out, start in layouts:
            planes = []
            position = start
            for itemsize, _, count in groups:
                for _ in range(itemsize):
                    planes.append(scratch[position : position + count])
                    position += count
            _unplane(groups, planes, segments, out)

    def decode_planes(
        self, stored: memoryview, segments: Sequence[Segment], frames: Sequence[int], out: memoryview
    ) -> None:
        """Decode into ``out`` without un-grouping: for each group of :func:`plane_groups`, its
        planes back to back. A device can then un-group in parallel (see ``_torch._ungroup``)."""
        target = np.frombuffer(out, dtype=np.uint8)
        written = 0
        for plane in self._planes(stored, plane_groups(segments), frames):
            target[written : written + len(plane)] = plane
            written += len(plane)
        if written != len(target):
            raise IntegrityError("record frame table does not match its bytes")

    def _planes(self, stored: memoryview, groups: _Groups, frames: Sequence[int]) -> Iterator[_Bytes]:
        """Each plane in frame order, checked against the sizes the manifest declares;
        :class:`IntegrityError` for anything that does not fit."""
        if len(frames) != sum(itemsize for itemsize, _, _ in groups) or sum(frames) != len(stored):
            raise IntegrityError("record frame table does not match its bytes")
        dctx = _decompressor()
        lengths = iter(frames)
        position = 0
        try:
            for itemsize, _, count in groups:
                for _ in range(itemsize):
                    length = next(lengths)
                    yield np.frombuffer(_plane(dctx, stored[position : position + length], count), dtype=np.uint8)
                    position += length
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"record does not decode with codec {self.codec_id}: {exc}") from exc


def _unplane(groups: _Groups, planes: Sequence[_Bytes], segments: Sequence[Segment], out: memoryview) -> None:
    """Write the planes of :func:`plane_groups` ``groups`` back as the tensors' bytes in ``out``."""
    itemsize = tiled_itemsize(segments, len(out))
    if itemsize == 2 and _LITTLE_ENDIAN:
        # F16/BF16, most LoRAs: whole 16-bit words (high << 8 | low) are written 2-3x faster
        # than two byte-strided columns (benchmarks/load.py, docs/benchmarks.md #27).
        _join16(planes[0], planes[1], np.frombuffer(out, dtype=np.uint16))
        return
    if itemsize == 4 and _LITTLE_ENDIAN:
        # F32: two 16-bit halves, then the words: 1.3-1.5x faster than four byte columns
        # (benchmarks/decode_steps.py).
        count = len(out) // 4
        low = _join16(planes[0], planes[1], np.empty(count, dtype=np.uint16))
        high = _join16(planes[2], planes[3], np.empty(count, dtype=np.uint16))
        words = np.frombuffer(out, dtype=np.uint32)
        np.left_shift(high, 16, out=words, dtype=np.uint32)
        words |= low
        return
    target = np.frombuffer(out, dtype=np.uint8)
    if itemsize:  # the usual module: one element size, tensors back to back
        columns = target.reshape(-1, itemsize)
        for plane_index in range(itemsize):
            columns[:, plane_index] = planes[plane_index]
        return
    planes_left = iter(planes)
    for itemsize, group, _ in groups:
        views = [target[s.offset : s.offset + s.length].reshape(-1, itemsize) for s in group]
        for plane_index in range(itemsize):
            _scatter(next(planes_left), views, plane_index)


def _stream(frames: memoryview, out: memoryview) -> None:
    """Decode ``frames``, back to back, into exactly ``out``: :class:`IntegrityError` for a byte
    fewer or more."""
    reader = _decompressor().stream_reader(frames, read_size=_RUN_READ, read_across_frames=True)
    got = 0
    while got < len(out) and (n := reader.readinto(out[got:])):
        got += n
    if got != len(out) or reader.read(1):
        wrong = "fewer" if got < len(out) else "more"
        raise IntegrityError(f"a run of records decoded to {wrong} bytes than declared")


def _join16(low: _Bytes, high: _Bytes, words: npt.NDArray[np.uint16]) -> npt.NDArray[np.uint16]:
    """``words = high << 8 | low``: two byte planes back into little-endian 16-bit words."""
    np.left_shift(high, 8, out=words, dtype=np.uint16)
    words |= low
    return words


def _check_header(frame: memoryview) -> None:
    # bpz frames never declare their content size. One that does would have zstandard allocate
    # whatever it declares (a hostile frame: a terabyte) before the size check below could run.
    if not frame or frame[0] & _CONTENT_SIZE_FLAGS:
        raise IntegrityError("a plane's frame declares its content size, which bpz frames never do")


def _scratch(size: int) -> _Bytes:
    """A buffer of at least ``size`` bytes owned by this thread, reused: new memory costs a page
    fault per 4 KiB (``benchmarks/load.py``'s fresh-memory column)."""
    buffer: _Bytes | None = getattr(_local, "scratch", None)
    if buffer is None or len(buffer) < size:
        buffer = _local.scratch = np.empty(max(size, 2 * (0 if buffer is None else len(buffer))), dtype=np.uint8)
    return buffer


def _plane(dctx: zstandard.ZstdDecompressor, frame: memoryview, count: int) -> bytes:
    """One frame decoded to the ``count`` bytes the manifest says its plane has."""
    _check_header(frame)
    plane = dctx.decompress(frame, max_output_size=count)
    if len(plane) != count:
        raise IntegrityError(f"plane decoded to {len(plane)} bytes, expected {count}")
    return plane


def plane_groups(segments: Sequence[Segment]) -> list[tuple[int, list[Segment], int]]:
    """``(itemsize, segments, element count)`` of each non-empty group, in frame order."""
    return [
        (itemsize, group, count)
        for itemsize, group in _groups(segments)
        if (count := sum(s.length for s in group) // itemsize)
    ]


def _scatter(plane: _Bytes, views: Sequence[_Bytes], plane_index: int) -> None:
    start = 0
    for view in views:
        end = start + view.shape[0]
        view[:, plane_index] = plane[start:end]
        start = end


def tiled_itemsize(segments: Sequence[Segment], size: int) -> int:
    """The element size when ``segments`` share one and cover ``[0, size)`` back to back, else 0."""
    if not segments or not size:
        return 0
    itemsize = segments[0].itemsize
    position = 0
    for segment in segments:
        if segment.offset != position or segment.itemsize != itemsize:
            return 0
        position += segment.length
    return itemsize if position == size and size % itemsize == 0 else 0


def _groups(segments: Sequence[Segment]) -> list[tuple[int, list[Segment]]]:
    by_size: dict[int, list[Segment]] = {}
    for segment in segments:
        by_size.setdefault(segment.itemsize, []).append(segment)
    return sorted(by_size.items())


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_PARAM_NAMES: Final = frozenset(
    {"window_log", "chain_log", "hash_log", "search_log", "min_match", "target_length", "strategy"}
)
_local = threading.local()
_FORMAT: Final = zstandard.FORMAT_ZSTD1_MAGICLESS
#: In a magicless frame's first byte (the frame header descriptor): the content-size flag and
#: the single-segment flag, either of which puts a content size in the header.
_CONTENT_SIZE_FLAGS: Final = 0xE0


_LITTLE_ENDIAN: Final = sys.byteorder == "little"
#: Stored bytes zstd takes from a run per step when streaming (its default is 128 KiB).
_RUN_READ: Final = 1024 * 1024


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor(format=_FORMAT)
    return dctx


REGISTRY: Final[dict[str, type[Codec]]] = {BytePlaneZstd.codec_id: BytePlaneZstd}


def codec_from_config(config: Mapping[str, object]) -> Codec:
    """Build the codec a manifest names; :class:`ManifestError` for ids this version lacks."""
    codec_id = config.get("id")
    cls = REGISTRY.get(codec_id) if isinstance(codec_id, str) else None
    if cls is None:
        raise ManifestError(f"unknown codec {codec_id!r}; this version of lorachunk knows {sorted(REGISTRY)}")
    return cls.from_config(config)
