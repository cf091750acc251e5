"""Reading and writing the safetensors container, bytes only (no torch).

The parser is strict in the same places as the reference implementation: the header is JSON
of at most :data:`MAX_HEADER_BYTES`, every tensor has a known dtype, its byte length equals
``prod(shape) * itemsize``, and the tensors tile the data area exactly — no gaps, no overlap,
nothing after the last one.
"""

from __future__ import annotations

import json
import math
import struct
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from lorachunk._exceptions import FormatError
from lorachunk._json import parse_json

__all__ = ["DTYPE_BITS", "MAX_HEADER_BYTES", "SafetensorsLayout", "TensorInfo", "encode_header", "parse_header"]

#: Bits per element of each dtype safetensors knows.
DTYPE_BITS: Final[dict[str, int]] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
}
#: The reference implementation refuses headers over 100 MB; so do we.
MAX_HEADER_BYTES: Final = 100_000_000
_LENGTH_PREFIX: Final = 8


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor: where it sits (in a file's data area, or in a module's raw bytes) and its type."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int

    @property
    def itemsize(self) -> int:
        return DTYPE_BITS[self.dtype] // 8

    def to_json(self) -> dict[str, object]:
        return {
            "key": self.key,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "offset": self.offset,
            "length": self.length,
        }


@dataclass(frozen=True, slots=True)
class SafetensorsLayout:
    """A parsed header: tensors in the order of their data, and where the data starts."""

    header: bytes
    metadata: Mapping[str, str] | None
    tensors: tuple[TensorInfo, ...]

    @property
    def data_start(self) -> int:
        return _LENGTH_PREFIX + len(self.header)

    @property
    def data_length(self) -> int:
        return sum(t.length for t in self.tensors)


def read_header_length(prefix: bytes, *, file_size: int) -> int:
    """Validate the 8-byte little-endian header length against the file size and the cap."""
    if len(prefix) < _LENGTH_PREFIX:
        raise FormatError(f"not a safetensors file: {file_size} bytes is too short for the 8-byte header length")
    (length,) = struct.unpack("<Q", prefix[:_LENGTH_PREFIX])
    kind = next((name for magic, name in _OTHER_FORMATS if prefix.startswith(magic)), None)
    if kind is not None and (length > MAX_HEADER_BYTES or _LENGTH_PREFIX + length > file_size):
        raise FormatError(f"not a safetensors file: it looks like {kind}")
    if length > MAX_HEADER_BYTES:
        raise FormatError(f"header of {length} bytes is over the {MAX_HEADER_BYTES}-byte cap")
    if _LENGTH_PREFIX + length > file_size:
        raise FormatError(f"header length {length} runs past the end of the {file_size}-byte file (truncated?)")
    return int(length)


#: What a file that is not safetensors usually is, by its first bytes; only named when the
#: header length those bytes make is impossible anyway.
_CHECKPOINT: Final = "a PyTorch checkpoint (pickle); convert it to .safetensors first"
_OTHER_FORMATS: Final = (
    (b"PK\x03\x04", "a zip archive, as a PyTorch .bin/.pt/.ckpt is; convert it to .safetensors first"),
    (b"\x80\x02", _CHECKPOINT),
    (b"\x80\x03", _CHECKPOINT),
    (b"\x80\x04", _CHECKPOINT),
    (b"\x80\x05", _CHECKPOINT),
    (b"GGUF", "a GGUF file; lorachunk reads .safetensors"),
    (b"{", "JSON text, not a weights file"),
)


def parse_header(header: bytes, *, data_length: int, max_tensors: int | None = None) -> SafetensorsLayout:
    """Parse and validate a header whose data area holds ``data_length`` bytes; with
    ``max_tensors``, a header of more tensors is refused while it is parsed (a 100 MB header of
    1.3 M tensors took 16.5 s and 1.2 GB to parse whole before a cap after it refused it)."""
    objects = [0]

    def counted(pairs: list[tuple[str, object]]) -> dict[str, object]:
        # Called once per JSON object as the parser closes it: one per tensor, then the header.
        objects[0] += 1
        if max_tensors is not None and objects[0] > max_tensors + 2:  # + __metadata__ + the header
            raise FormatError(f"the header holds more than {max_tensors} tensors, the most lorachunk packs")
        return _unique_keys(pairs)

    raw = parse_json(header, error=FormatError, what="not a safetensors file: header", object_pairs_hook=counted)
    if not isinstance(raw, dict):
        raise FormatError("not a safetensors file: header is not a JSON object")
    # A lone surrogate (\ud800) parses, but no file or manifest can hold it as UTF-8. Text of
    # ASCII bytes without a \u escape cannot hold one, so only other text is checked (json
    # decodes bytes with surrogatepass: raw UTF-8 of a surrogate gets through as well).
    if b"\\u" in header or not header.isascii():
        try:
            json.dumps(raw, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise FormatError("not a safetensors file: the header holds text that is not valid Unicode") from None
    metadata = raw.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise FormatError("__metadata__ must map strings to strings")
    tensors = sorted((_tensor(key, entry) for key, entry in raw.items()), key=lambda t: (t.offset, t.length))
    position = 0
    for tensor in tensors:
        if tensor.offset != position:
            problem = "overlaps the previous tensor" if tensor.offset < position else "leaves a gap before it"
            raise FormatError(f"tensor {tensor.key!r} at offset {tensor.offset} {problem} (expected {position})")
        position += tensor.length
    if position != data_length:
        raise FormatError(
            f"tensors cover {position} bytes but the data area holds {data_length} "
            + ("(truncated file?)" if position > data_length else "(trailing bytes)")
        )
    return SafetensorsLayout(header=header, metadata=metadata, tensors=tuple(tensors))


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # JSON leaves a repeated key to the reader: Python and serde keep the last, others the first.
    # A file whose bytes get pinned must not mean two things, so a repeat is refused.
    result = dict(pairs)
    if len(result) != len(pairs):
        repeated = next(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
        raise FormatError(f"header names {repeated!r} twice")
    return result


def _tensor(key: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict):
        raise FormatError(f"tensor {key!r}: entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise FormatError(f"tensor {key!r}: unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise FormatError(f"tensor {key!r}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise FormatError(f"tensor {key!r}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    expected = math.prod(shape) * DTYPE_BITS[dtype] // 8
    if end - begin != expected:
        raise FormatError(f"tensor {key!r}: {dtype}{shape} needs {expected} bytes but data_offsets span {end - begin}")
    return TensorInfo(key=key, dtype=dtype, shape=tuple(shape), offset=begin, length=end - begin)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def encode_header(tensors: Sequence[TensorInfo], metadata: Mapping[str, str] | None, *, align: int = 8) -> bytes:
    """Serialise a header the way the safetensors library does.

    ``__metadata__`` first with its keys sorted, then tensors in data order with offsets counted from zero in that
    order, compact JSON, padded with spaces to a multiple of ``align`` bytes (8 since
    safetensors 0.3; older writers did not pad, ``align=1``); the result includes the 8-byte
    length prefix.
    """
    text = padded(header_json(tensors, metadata), align)
    return struct.pack("<Q", len(text)) + text


def padded(text: bytes, align: int) -> bytes:
    """Header text padded with spaces to a multiple of ``align`` bytes, as safetensors pads it."""
    return text + b" " * (-len(text) % align)


def header_json(tensors: Sequence[TensorInfo], metadata: Mapping[str, str] | None) -> bytes:
    """The JSON text of :func:`encode_header`, before padding and the length prefix."""
    entries: dict[str, object] = {}
    if metadata is not None:
        entries["__metadata__"] = dict(sorted(metadata.items()))
    position = 0
    for tensor in tensors:
        entries[tensor.key] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [position, position + tensor.length],
        }
        position += tensor.length
    return json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
