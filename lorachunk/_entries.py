"""The entries of a manifest: tensors, modules (one record each), splits and the source file."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lorachunk._codec import Segment
from lorachunk._digest import split_digest
from lorachunk._exceptions import ManifestError
from lorachunk._manifest_json import MAX_MODULE_RAW_BYTES, canonical_json, check_name, count, product, shown, typed
from lorachunk._safetensors import DTYPE_BITS, TensorInfo

__all__ = ["Module", "Source", "Split", "TensorEntry", "module_from_json", "order_runs"]

#: A tensor inside a module: ``offset`` and ``length`` locate it in the module's raw bytes.
TensorEntry = TensorInfo


@dataclass(frozen=True, slots=True)
class Module:
    """One module: its tensors, the digests that pin them, and where its stored record lies.

    ``record`` (the digest a manifest stores as ``"shard"``) and ``stored_size`` describe the
    record (the raw bytes encoded by the codec); ``raw`` and ``raw_size`` the raw bytes. In
    ``lorachunk/2`` the record sits in the pack ``pack`` at ``offset``; in ``lorachunk/1``
    (``pack`` None) it is an object of its own.
    """

    name: str
    record: str
    raw: str
    stored_size: int
    raw_size: int
    frames: tuple[int, ...]
    tensors: tuple[TensorEntry, ...]
    pack: str | None = None
    offset: int = 0
    #: Where each tensor sits in the raw bytes, for the codec. Kept, not derived on each call:
    #: a LoRA of tiny tensors decodes hundreds of modules in a few milliseconds.
    segments: tuple[Segment, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "segments", tuple(Segment(t.offset, t.length, t.itemsize) for t in self.tensors))

    def placed(self, pack: str, offset: int) -> Module:
        """This module with its record at ``offset`` in ``pack`` (the tables shared, not rebuilt:
        pack places every module once or twice, and ``dataclasses.replace`` rebuilds them)."""
        moved = copy.copy(self)
        object.__setattr__(moved, "pack", pack)
        object.__setattr__(moved, "offset", offset)
        return moved

    def to_json(self) -> dict[str, Any]:
        """The entry as ``lorachunk/1`` writes it (no place: the record is an object of its own)."""
        return {
            "name": self.name,
            "shard": self.record,  # the format's key since lorachunk/1
            "raw": self.raw,
            "stored_size": self.stored_size,
            "raw_size": self.raw_size,
            "frames": list(self.frames),
            "tensors": [t.to_json() for t in self.tensors],
        }

    def leaf(self) -> bytes:
        """The ``lorachunk/1`` Merkle leaf: the canonical JSON of the whole entry, so that root
        depends on how the module was encoded."""
        return canonical_json(self.to_json())

    def content_leaf(self) -> bytes:
        """The Merkle leaf of roots from ``lorachunk/2`` on: what the module is (name, tensor
        table, raw digest), not how or where it is stored, so no re-encoding or repack moves it."""
        return canonical_json(
            {
                "name": self.name,
                "raw": self.raw,
                "raw_size": self.raw_size,
                "tensors": [t.to_json() for t in self.tensors],
            }
        )


@dataclass(frozen=True, slots=True)
class Split:
    """A named group of modules, with its own Merkle root over them."""

    name: str
    kind: str
    modules: tuple[str, ...]
    root: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "modules": list(self.modules), "root": self.root}


@dataclass(frozen=True, slots=True)
class Source:
    """The packed file: enough to rebuild it byte for byte.

    ``order`` lists runs ``(first, count)`` of the tensors in module order (modules by name, each
    module's tensors in table order) that give the file's data order. ``header`` is ``None`` when
    the header is exactly what :func:`~lorachunk._safetensors.encode_header` writes for that order,
    ``metadata`` and ``align`` (as files written by the safetensors library are), else the
    original text.
    """

    name: str
    size: int
    sha256: str
    metadata: Mapping[str, str] | None
    order: tuple[tuple[int, int], ...]
    align: int
    header: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "metadata": None if self.metadata is None else dict(self.metadata),
            "order": [list(run) for run in self.order],
            "align": self.align,
            "header": self.header,
        }


def order_runs(flat_keys: Sequence[str], file_keys: Sequence[str]) -> tuple[tuple[int, int], ...]:
    """Compress the permutation from module order to file order into ``(first, count)`` runs."""
    index = {key: i for i, key in enumerate(flat_keys)}
    runs: list[list[int]] = []
    for key in file_keys:
        i = index[key]
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return tuple((a, b) for a, b in runs)


def module_from_json(
    raw: dict[str, Any], algorithm: str, packs: Sequence[str] | None = None, offset: int = 0
) -> Module:
    """A module entry of a manifest using ``algorithm``, checked field by field. ``packs`` (the
    manifest's pack table, ``lorachunk/2``) is what its ``pack`` index points into, and
    ``offset`` where its record starts (the caller works out an offset the entry leaves out)."""
    tensors = tuple(
        TensorEntry(
            key=check_name(typed(t["key"], str), "tensor key"),
            dtype=typed(t["dtype"], str),
            shape=tuple(count(d) for d in typed(t["shape"], list)),
            offset=count(t["offset"]),
            length=count(t["length"]),
        )
        for t in typed(raw["tensors"], list)
    )
    for tensor in tensors:
        if tensor.dtype not in DTYPE_BITS:
            raise ManifestError(f"tensor {tensor.key!r}: unknown dtype {tensor.dtype!r}")
    module = Module(
        name=check_name(typed(raw["name"], str), "module name"),
        record=typed(raw["shard"], str),
        raw=typed(raw["raw"], str),
        stored_size=count(raw["stored_size"]),
        raw_size=count(raw["raw_size"]),
        frames=tuple(count(f) for f in typed(raw["frames"], list)),
        tensors=tensors,
        pack=None if packs is None else _pack_of(raw, packs),
        offset=offset,
    )
    for value in (module.record, module.raw):
        if split_digest(value)[0] != algorithm:
            raise ManifestError(f"module {module.name!r}: digest {value} does not use the manifest's {algorithm}")
    if module.stored_size > 2 * MAX_MODULE_RAW_BYTES:  # zstd never grows data by more than a little
        raise ManifestError(f"module {module.name!r}: stored size {module.stored_size} is over the limit")
    if module.raw_size > MAX_MODULE_RAW_BYTES:
        raise ManifestError(
            f"module {module.name!r}: raw size {module.raw_size} is over the {MAX_MODULE_RAW_BYTES} limit"
        )
    if sum(module.frames) != module.stored_size:
        raise ManifestError(f"module {module.name!r}: frames do not add up to its stored size")
    position = 0
    for tensor in tensors:
        expected = product(tensor.shape) * tensor.itemsize
        if tensor.offset != position or tensor.length != expected:
            raise ManifestError(f"tensor {tensor.key!r}: offset/length do not tile module {module.name!r}")
        position += tensor.length
    if position != module.raw_size:
        raise ManifestError(f"module {module.name!r}: tensors cover {position} of {module.raw_size} raw bytes")
    return module


def _pack_of(raw: dict[str, Any], packs: Sequence[str]) -> str:
    index = count(raw["pack"])
    if index >= len(packs):
        raise ManifestError(f"module {shown(raw.get('name'))}: pack {index} is not in the pack table")
    return packs[index]
