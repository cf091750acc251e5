"""A module's record: made from raw bytes, and decoded back with both digests checked."""

from __future__ import annotations

from collections.abc import Sequence

from lorachunk._codec import Codec, Segment
from lorachunk._digest import check, digest
from lorachunk._manifest import Module, TensorEntry

__all__ = ["decode_checked", "decode_checked_run", "encode_module"]


def encode_module(
    name: str, raw: bytes | bytearray | memoryview, tensors: Sequence[TensorEntry], *, codec: Codec, algorithm: str
) -> tuple[Module, bytes]:
    """The :class:`Module` for ``raw`` (``tensors`` back to back) and its stored bytes."""
    stored, frames = codec.encode(memoryview(raw), tuple(Segment(t.offset, t.length, t.itemsize) for t in tensors))
    module = Module(
        name, digest(algorithm, stored), digest(algorithm, raw), len(stored), len(raw), frames, tuple(tensors)
    )
    return module, stored


def decode_checked(
    codec: Codec, module: Module, stored: bytes | memoryview, out: memoryview, *, what: str = ""
) -> None:
    """Decode ``stored`` (already checked against ``module.record``) into ``out`` and check the
    result against ``module.raw``: no decoded byte is used unchecked."""
    codec.decode(memoryview(stored), module.segments, module.frames, out)
    check(module.raw, out, what=f"module {module.name!r}{what} after decoding")


def decode_checked_run(
    codec: Codec, modules: Sequence[Module], stored: memoryview, outs: Sequence[memoryview], *, what: str = ""
) -> None:
    """:func:`decode_checked` for records stored back to back in ``stored``, each into its ``out``."""
    codec.decode_run(stored, [(m.segments, m.frames, out) for m, out in zip(modules, outs, strict=True)])
    for module, out in zip(modules, outs, strict=True):
        check(module.raw, out, what=f"module {module.name!r}{what} after decoding")
