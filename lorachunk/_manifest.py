"""The manifest: what a packed LoRA holds, pinned by digests and Merkle roots.

A manifest is canonical JSON (sorted keys, no insignificant whitespace, UTF-8), stored as one zstd
frame. Like a pack, it is named by the digest of its stored bytes (its id), so a reader checks it
before decompressing and any flipped byte is caught. The id pins every byte of one store's copy;
the root pins the LoRA's content, whatever store, pack layout or codec level holds it. See
docs/format.md for the field-by-field specification.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

import zstandard

from lorachunk._digest import ALGORITHMS, digest, split_digest
from lorachunk._entries import Module, Source, Split, TensorEntry, module_from_json
from lorachunk._exceptions import FormatError, IntegrityError, ManifestError, UsageError
from lorachunk._json import parse_json
from lorachunk._layout import auto_splits, base_model_of, natural_key
from lorachunk._manifest_json import (
    AUTO_KINDS,
    MAX_FILES,
    MAX_FILES_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_MODULE_RAW_BYTES,
    MAX_MODULES,
    MAX_PACK_BYTES,
    MAX_SPLIT_ENTRIES,
    MAX_TENSORS,
    canonical_json,
    check_files,
    check_lora_name,
    check_name,
    count,
    default_lora_name,
    load_json,
    shown,
    typed,
)
from lorachunk._merkle import merkle_root
from lorachunk._safetensors import MAX_HEADER_BYTES, TensorInfo, encode_header, parse_header

__all__ = [
    "AUTO_KINDS",
    "FORMAT_ID",
    "FORMAT_V1",
    "MAX_FILES",
    "MAX_FILES_BYTES",
    "MAX_MANIFEST_BYTES",
    "MAX_MODULES",
    "MAX_MODULE_RAW_BYTES",
    "MAX_PACK_BYTES",
    "MAX_SPLIT_ENTRIES",
    "MAX_TENSORS",
    "Manifest",
    "Module",
    "Source",
    "Split",
    "TensorEntry",
    "canonical_json",
    "check_files",
    "check_name",
]

FORMAT_ID: Final = "lorachunk/2"
FORMAT_V1: Final = "lorachunk/1"
_MANIFEST_LEVEL: Final = 12


@dataclass(frozen=True, slots=True)
class Manifest:
    """A packed LoRA. Build with :meth:`build`, read with :meth:`from_bytes`."""

    hash: str
    codec: Mapping[str, object]
    source: Source
    modules: tuple[Module, ...]
    splits: tuple[Split, ...]
    root: str
    format: str = FORMAT_ID
    #: Small text files packed with the tensors (name → text), e.g. PEFT's ``adapter_config.json``.
    files: Mapping[str, str] = field(default_factory=dict)
    #: ``lorachunk/2``: every pack the modules lie in, digest → size in bytes, in table order.
    packs: Mapping[str, int] = field(default_factory=dict)
    #: The ``lorachunk/1`` root of the store this was converted from (by ``repack``, records
    #: unchanged), which the module entries still prove: a root pinned before keeps working.
    v1_root: str | None = None
    #: The LoRA's name in its store when it was given one (``pack --name``); see :attr:`name`.
    given_name: str | None = None
    _by_name: dict[str, Module] = field(default_factory=dict, init=False, repr=False, compare=False)
    _stored: list[bytes] = field(default_factory=list, init=False, repr=False, compare=False)
    # Derived tables, built on first use: a manifest is immutable, and a program that opens one
    # LoRA again and again (one split per call) should not rebuild them every time.
    _derived: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name.update((m.name, m) for m in self.modules)

    @classmethod
    def build(
        cls,
        *,
        hash: str,
        codec: Mapping[str, object],
        source: Source,
        modules: Iterable[Module],
        splits: Mapping[str, tuple[str, Iterable[str]]],
        files: Mapping[str, str] | None = None,
        packs: Mapping[str, int] | None = None,
        format: str = FORMAT_ID,
        v1_root: str | None = None,
        name: str | None = None,
    ) -> Manifest:
        """Assemble a manifest, sorting modules and computing every root.

        ``packs`` lists the packs the modules lie in (``lorachunk/2``); ``format`` is
        ``lorachunk/1`` only to read old manifests, whose roots are over encoded entries.
        """
        files = dict(sorted((files or {}).items()))
        check_files(files)
        ordered = tuple(sorted(modules, key=lambda m: m.name))
        # A module sits in several splits; its leaf is serialised once (this dominates reading a manifest).
        leaves = {m.name: m.leaf() if format == FORMAT_V1 else m.content_leaf() for m in ordered}
        built = []
        # Listed with their numbers in order (blocks.7 before blocks.12); JSON sorts them anyway.
        for split, (kind, members) in sorted(splits.items(), key=lambda item: natural_key(item[0])):
            names = tuple(sorted(set(members)))
            built.append(Split(split, kind, names, merkle_root(hash, [leaves[n] for n in names])))
        root = merkle_root(hash, list(leaves.values()) + _extra_leaves(files, built))
        # Packs sorted by digest: the table is a function of where the records are, not of the
        # order a writer happened to make or meet the packs in.
        table = dict(sorted((packs or {}).items()))
        if name is not None:
            check_lora_name(name)
        return cls(hash, dict(codec), source, ordered, tuple(built), root, format, files, table, v1_root, name)

    @property
    def roots(self) -> frozenset[str]:
        """Every root this manifest proves: its own, the content root of a ``lorachunk/1``
        manifest (what the same LoRA packed today has) and a converted store's ``v1_root``."""
        if "roots" not in self._derived:
            found = {self.root} | ({self.v1_root} if self.v1_root else set())
            if self.format == FORMAT_V1:
                leaves = [m.content_leaf() for m in self.modules]
                found.add(merkle_root(self.hash, leaves + _extra_leaves(self.files, self.splits)))
            self._derived["roots"] = frozenset(found)
        roots: frozenset[str] = self._derived["roots"]
        return roots

    def split_pinned(self, name: str, *, root: str | None = None) -> bool:
        """Whether ``root`` (default: the manifest's own) pins what the split ``name`` selects.

        Splits of a non-automatic kind (``user``, ``part``) are a leaf of the manifest's root, of a
        ``lorachunk/1`` manifest's content root, and of a ``v1_root`` that hashed them; not of a
        root written before that leaf existed (an old root vouches only for what the old format
        hashed). Automatic splits are pinned when they are what this version derives from the
        module names, which every root pins.
        """
        split = self.split(name)
        if split.kind not in AUTO_KINDS:
            return self._covers_user_splits(self.root if root is None else root)
        if "auto" not in self._derived:
            self._derived["auto"] = auto_splits(m.name for m in self.modules)
        expected = self._derived["auto"].get(name)
        return expected is not None and expected[0] == split.kind and tuple(sorted(expected[1])) == split.modules

    def _covers_user_splits(self, root: str) -> bool:
        if root == self.root:
            return not self._derived.get("legacy_root", False)
        if root == self.v1_root:
            # The v1 root with the user splits' leaf; the one without it (packed before the leaf
            # existed) says nothing of which modules a user split names.
            return root == _v1_roots(self)[0] or not any(s.kind not in AUTO_KINDS for s in self.splits)
        return root in self.roots  # a lorachunk/1 manifest's content root, which has the leaf

    @property
    def name(self) -> str:
        """The LoRA's name in a store: the one it was packed under (``--name``), else its source
        file's stem made a valid name. Pinned by the manifest id, not by the root (the same LoRA
        may go by different names in different libraries)."""
        return self.given_name or default_lora_name(self.source.name.rpartition(".")[0] or self.source.name)

    @property
    def base_model(self) -> str | None:
        """The base model this LoRA was trained for, where its config, metadata or shapes tell
        (``sd_v1``, ``sd_v2``, ``sdxl``, a PEFT config's model name); a hint, not a check."""
        if "base_model" not in self._derived:
            shapes = ((t.key, t.shape) for m in self.modules for t in m.tensors)
            self._derived["base_model"] = base_model_of(self.metadata, self.files, shapes)
        found: str | None = self._derived["base_model"]
        return found

    def module(self, name: str) -> Module:
        try:
            return self._by_name[name]
        except KeyError:
            raise UsageError(f"no module {name!r} in this LoRA") from None

    def split(self, name: str) -> Split:
        for split in self.splits:
            if split.name == name:
                return split
        known = ", ".join(s.name for s in self.splits) or "none"
        raise UsageError(f"no split {name!r} in this LoRA (splits: {known})")

    @property
    def metadata(self) -> Mapping[str, str] | None:
        """The source file's ``__metadata__``."""
        return self.source.metadata

    def file_order(self) -> list[TensorInfo]:
        """Every tensor in the source file's data order, with its offset in the data area."""
        if "file_order" not in self._derived:
            flat = [t for m in self.modules for t in m.tensors]
            tensors, position = [], 0
            for first, length in self.source.order:
                for entry in flat[first : first + length]:
                    tensors.append(TensorInfo(entry.key, entry.dtype, entry.shape, position, entry.length))
                    position += entry.length
            self._derived["file_order"] = tuple(tensors)
        return list(self._derived["file_order"])

    @property
    def owners(self) -> Mapping[str, Module]:
        """Tensor key → the module holding it, in the source file's order."""
        if "owners" not in self._derived:
            by_key = {t.key: m for m in self.modules for t in m.tensors}
            self._derived["owners"] = MappingProxyType({t.key: by_key[t.key] for t in self.file_order()})
        owners: Mapping[str, Module] = self._derived["owners"]
        return owners

    @property
    def raw_offsets(self) -> Mapping[str, int]:
        """Module name → where its raw bytes start when all modules' are laid back to back in
        manifest order (the layout of a cache bundle)."""
        if "raw_offsets" not in self._derived:
            offsets, position = {}, 0
            for module in self.modules:
                offsets[module.name] = position
                position += module.raw_size
            self._derived["raw_offsets"] = MappingProxyType(offsets)
        raw_offsets: Mapping[str, int] = self._derived["raw_offsets"]
        return raw_offsets

    def header_bytes(self) -> bytes:
        """The source file's length prefix and header, exactly."""
        if self.source.header is None:
            return encode_header(self.file_order(), self.source.metadata, align=self.source.align)
        header = self.source.header.encode()
        return len(header).to_bytes(8, "little") + header

    @property
    def stored_size(self) -> int:
        return sum(m.stored_size for m in self.modules)

    @property
    def raw_size(self) -> int:
        return sum(m.raw_size for m in self.modules)

    def to_json(self) -> dict[str, Any]:
        body = {
            "format": self.format,
            "hash": self.hash,
            "codec": dict(self.codec),
            "source": self.source.to_json(),
            "splits": {s.name: s.to_json() for s in self.splits},
            "root": self.root,
        } | ({"files": dict(self.files)} if self.files else {})
        if self.format == FORMAT_V1:
            return body | {"modules": [m.to_json() for m in self.modules]}
        index = {pack: i for i, pack in enumerate(self.packs)}
        modules = []
        for module, implied in zip(self.modules, _implied_offsets(self.modules), strict=True):
            entry = module.to_json() | {"pack": index[module.pack]}  # type: ignore[index]
            modules.append(entry if module.offset == implied else entry | {"offset": module.offset})
        packs = [{"id": pack, "size": size} for pack, size in self.packs.items()]
        extra = {"v1_root": self.v1_root, "name": self.given_name}
        return body | {"modules": modules, "packs": packs} | {k: v for k, v in extra.items() if v}

    def canonical(self) -> bytes:
        return canonical_json(self.to_json())

    @property
    def id(self) -> str:
        """Digest of the stored bytes: pins every field, metadata and splits included."""
        return digest(self.hash, self.to_bytes())

    def to_bytes(self) -> bytes:
        """The stored form: one zstd frame (with its content size) of the canonical JSON."""
        if not self._stored:  # compressed once: pack, write and id all want it
            self._stored.append(zstandard.ZstdCompressor(level=_MANIFEST_LEVEL).compress(self.canonical()))
        return self._stored[0]

    @classmethod
    def from_bytes(cls, stored: bytes, *, root: str | None = None) -> Manifest:
        """Decode and validate a stored manifest.

        Raises :class:`ManifestError` for anything malformed, over a limit or of an unknown format,
        and :class:`IntegrityError` when a root does not match its modules, or is not ``root``
        (compared as soon as the JSON is read, before any table is built).
        """
        try:
            declared = zstandard.frame_content_size(stored)
        except zstandard.ZstdError as exc:
            raise ManifestError(f"manifest is not a zstd frame: {exc}") from exc
        if declared < 0 or declared > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest declares {declared} bytes; the limit is {MAX_MANIFEST_BYTES}")
        try:
            text = zstandard.ZstdDecompressor().decompress(stored, max_output_size=MAX_MANIFEST_BYTES)
        except zstandard.ZstdError as exc:
            raise ManifestError(f"manifest does not decompress: {exc}") from exc
        manifest = cls.from_json(text, root=root)
        # Keep the bytes as read: the id is their digest, whatever zstd version or level wrote them,
        # and nobody pays for compressing them again.
        manifest._stored.append(bytes(stored))
        return manifest

    @classmethod
    def from_json(cls, text: bytes, *, root: str | None = None) -> Manifest:
        raw = load_json(text)
        # Compared before any table is built; a lorachunk/1 manifest may also answer to the
        # content root, known only once its tables are.
        if root is not None and root not in (raw.get("root"), raw.get("v1_root")) and raw.get("format") != FORMAT_V1:
            raise IntegrityError(f"manifest root is {shown(raw.get('root'))}, expected {root}")
        try:
            manifest = _parse(raw)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            if isinstance(exc, (ManifestError, IntegrityError)):
                raise
            raise ManifestError(f"malformed manifest: {exc!r}") from exc
        if root is not None and root not in manifest.roots:
            raise IntegrityError(f"manifest root is {manifest.root}, expected {root}")
        return manifest


def _extra_leaves(files: Mapping[str, str], splits: Iterable[Split]) -> list[bytes]:
    """Leaves after the modules': the packed files (a PEFT config says how the weights apply),
    and the splits not derived from module names, so the root pins what every name selects.
    Without either the root is that of the modules alone, as it always was."""
    extra = [canonical_json({"files": dict(files)})] if files else []
    pinned = {s.name: {"kind": s.kind, "modules": list(s.modules)} for s in splits if s.kind not in AUTO_KINDS}
    if pinned:
        extra.append(canonical_json({"splits": pinned}))
    return extra


def _parse(raw: dict[str, Any]) -> Manifest:
    fmt = raw["format"]
    if fmt not in (FORMAT_V1, FORMAT_ID):
        raise ManifestError(
            f"manifest format {shown(fmt)} is not supported by this reader, which reads {FORMAT_V1!r} and {FORMAT_ID!r}"
        )
    algorithm = typed(raw["hash"], str)
    if algorithm not in ALGORITHMS:
        raise ManifestError(f"unknown hash algorithm {shown(algorithm)}")
    _check_counts(raw)
    packs = None if fmt == FORMAT_V1 else _pack_table(raw["packs"], algorithm)
    pack_ids = None if packs is None else list(packs)
    modules = tuple(_modules(raw["modules"], algorithm, pack_ids))
    names = [m.name for m in modules]
    if names != sorted(set(names)):
        raise ManifestError("module names must be unique and sorted")
    if packs is not None:
        _check_places(modules, packs)
    src = typed(raw["source"], dict)
    check_name(typed(src["name"], str), "source name")
    metadata = src["metadata"]
    if metadata is not None and not all(isinstance(v, str) for v in typed(metadata, dict).values()):
        raise ManifestError("source metadata must map strings to strings")
    source = Source(
        name=typed(src["name"], str),
        size=count(src["size"]),
        sha256=typed(src["sha256"], str),
        metadata=metadata,
        order=tuple((count(a), count(b)) for a, b in typed(src["order"], list)),
        align=count(src["align"]),
        header=None if src["header"] is None else typed(src["header"], str),
    )
    if source.align not in (1, 8):
        raise ManifestError(f"source align must be 1 or 8, got {source.align}")
    if split_digest(source.sha256)[0] != "sha256":
        raise ManifestError("source sha256 must be a sha256 digest")
    splits_raw = raw["splits"]
    splits = {
        check_name(name, "split name"): (typed(s["kind"], str), [typed(n, str) for n in typed(s["modules"], list)])
        for name, s in splits_raw.items()
    }
    known = set(names)
    for split_name, (_, members) in splits.items():
        missing = sorted(set(members) - known)
        if missing:
            raise ManifestError(f"split {split_name!r} names modules that do not exist: {missing[:3]}")
    v1_root = raw.get("v1_root")
    if "v1_root" in raw:  # present means a digest: null, "" or a number is malformed, not absent
        if fmt == FORMAT_V1:
            raise ManifestError("a lorachunk/1 manifest has no v1_root")
        if split_digest(typed(v1_root, str))[0] != algorithm:
            raise ManifestError(f"v1_root {shown(v1_root)} does not use the manifest's {algorithm}")
    name: str | None = raw.get("name")
    if "name" in raw:
        if fmt == FORMAT_V1:
            raise ManifestError("a lorachunk/1 manifest has no name")
        check_lora_name(name)
    manifest = Manifest.build(
        hash=algorithm,
        codec=typed(raw["codec"], dict),
        source=source,
        modules=modules,
        splits=splits,
        files={typed(k, str): typed(v, str) for k, v in typed(raw.get("files", {}), dict).items()},
        packs=packs,
        format=fmt,
        v1_root=v1_root,
        name=name,
    )
    _check_source(manifest)
    if manifest.root != raw["root"]:
        # Packed before the root pinned user splits: its own root still holds, but those
        # splits are pinned only by the manifest id (Manifest.split_pinned).
        legacy = merkle_root(algorithm, [m.leaf() for m in manifest.modules] + _extra_leaves(manifest.files, ()))
        if fmt != FORMAT_V1 or legacy != raw["root"]:
            raise IntegrityError(f"manifest root {shown(raw['root'])} does not match its modules ({manifest.root})")
        manifest = dataclasses.replace(manifest, root=legacy)
        manifest._derived["legacy_root"] = True
    if v1_root is not None and v1_root not in _v1_roots(manifest):
        raise IntegrityError(f"manifest v1_root {shown(v1_root)} does not match its modules' records")
    for split in manifest.splits:
        if split.root != splits_raw[split.name]["root"]:
            raise IntegrityError(f"split {split.name!r}: root does not match its modules")
    return manifest


def _implied_offsets(modules: Iterable[Module]) -> Iterator[int]:
    """Where each record starts unless its entry says otherwise (:func:`_offset`)."""
    previous: tuple[str | None, int] = (None, 0)
    for module in modules:
        yield _implied(module.pack, previous)
        previous = (module.pack, module.offset + module.stored_size)


def _implied(pack: str | None, previous: tuple[str | None, int]) -> int:
    """Right after the record of the entry before (its pack and end, ``previous``) when both lie
    in one pack, else 0. Writers lay records out in about the manifest's order, so most entries
    leave their offset out (offsets were 4% of a manifest's bytes)."""
    return previous[1] if pack is not None and pack == previous[0] else 0


def _offset(entry: Any, pack: str | None, previous: tuple[str | None, int]) -> int:
    """A record's offset: as its entry gives it, else as :func:`_implied`. An offset given where
    it is implied is refused, so one manifest has one encoding."""
    implied = _implied(pack, previous)
    if "offset" not in typed(entry, dict):
        return implied
    offset = count(entry["offset"])
    if offset == implied:
        raise ManifestError(f"module {shown(entry.get('name'))}: an offset the entry before implies is given")
    return offset


def _modules(entries: Any, algorithm: str, packs: list[str] | None) -> Iterator[Module]:
    """The module entries, with each record's offset (:func:`_offset`)."""
    previous: tuple[str | None, int] = (None, 0)
    for entry in typed(entries, list):
        if packs is None:
            yield module_from_json(entry, algorithm)
            continue
        index = _pack_index(entry)
        offset = _offset(entry, packs[index] if index < len(packs) else None, previous)
        module = module_from_json(entry, algorithm, packs, offset)
        previous = (module.pack, module.offset + module.stored_size)
        yield module


def _pack_index(entry: dict[str, Any]) -> int:
    return count(entry["pack"])


def placements(stored: bytes, *, algorithm: str) -> tuple[dict[str, int], list[tuple[str, str, int, int]]]:
    """Where a ``lorachunk/2`` manifest's records lie, read from its stored bytes without
    building it: the pack table, and ``(record digest, pack, offset, size)`` per module. For
    writers deciding what a store holds (a full read costs ~7x more); values are checked for
    type and range, not against roots. :class:`ManifestError` for anything else (another format
    or algorithm included)."""
    try:
        text = zstandard.ZstdDecompressor().decompress(stored, max_output_size=MAX_MANIFEST_BYTES)
    except zstandard.ZstdError as exc:
        raise ManifestError(f"manifest does not decompress: {exc}") from exc
    raw = typed(parse_json(text, error=ManifestError, what="manifest"), dict)
    try:
        if raw.get("format") != FORMAT_ID or raw.get("hash") != algorithm:
            raise ManifestError(f"not a {FORMAT_ID} manifest using {algorithm}")
        packs = _pack_table(raw["packs"], algorithm)
        ids = list(packs)
        found = []
        previous: tuple[str | None, int] = (None, 0)
        for entry in typed(raw["modules"], list):
            pack = ids[_pack_index(entry)]
            size = count(entry["stored_size"])
            offset = _offset(entry, pack, previous)
            if offset + size > packs[pack]:
                raise ManifestError(f"a record lies outside pack {pack}")
            found.append((typed(entry["shard"], str), pack, offset, size))
            previous = (pack, offset + size)
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ManifestError(f"malformed manifest: {exc!r}") from exc
    return packs, found


def _v1_roots(manifest: Manifest) -> tuple[str, str]:
    """The ``lorachunk/1`` roots the module entries give: with the leaf for user splits, and
    without it (packed before that leaf existed)."""
    leaves = [m.leaf() for m in manifest.modules]
    return (
        merkle_root(manifest.hash, leaves + _extra_leaves(manifest.files, manifest.splits)),
        merkle_root(manifest.hash, leaves + _extra_leaves(manifest.files, ())),
    )


def v1_root_of(manifest: Manifest) -> str | None:
    """The ``lorachunk/1`` root a copy of ``manifest`` with unchanged records keeps proving."""
    return manifest.root if manifest.format == FORMAT_V1 else manifest.v1_root


def _pack_table(value: Any, algorithm: str) -> dict[str, int]:
    """The pack table: digests of ``algorithm``, each listed once, each within the size limit."""
    table = typed(value, list)
    if len(table) > MAX_MODULES:
        raise ManifestError(f"manifest lists {len(table)} packs; the limit is {MAX_MODULES}")
    packs: dict[str, int] = {}
    for entry in table:
        pack = typed(typed(entry, dict)["id"], str)
        if split_digest(pack)[0] != algorithm:
            raise ManifestError(f"pack {shown(pack)} does not use the manifest's {algorithm}")
        if pack in packs:
            raise ManifestError(f"pack {pack} is listed twice")
        if packs and pack < next(reversed(packs)):
            raise ManifestError(f"pack {pack} is out of order (the table is sorted by digest)")
        size = count(entry["size"])
        if size > MAX_PACK_BYTES:
            raise ManifestError(f"pack {pack}: {size} bytes is over the {MAX_PACK_BYTES}-byte limit")
        packs[pack] = size
    return packs


def _check_places(modules: Iterable[Module], packs: Mapping[str, int]) -> None:
    """Every record lies inside its pack, and two records in one pack are the same record (one
    module stored once for two names) or do not overlap: no module's offset points into another."""
    by_pack: dict[str, list[Module]] = {}
    for module in modules:
        assert module.pack is not None  # parsed with the pack table
        if module.offset + module.stored_size > packs[module.pack]:
            raise ManifestError(
                f"module {module.name!r}: bytes {module.offset}..{module.offset + module.stored_size} "
                f"lie outside pack {module.pack} ({packs[module.pack]} bytes)"
            )
        by_pack.setdefault(module.pack, []).append(module)
    unused = [pack for pack in packs if pack not in by_pack]
    if unused:
        # Writers list only the packs they place records in; an entry for another pack could
        # only make a reader (or verify) trust a pack nothing checks.
        raise ManifestError(f"pack {unused[0]} is listed but holds no module's record")
    for pack, held in by_pack.items():
        held.sort(key=lambda m: (m.offset, m.stored_size))
        for before, after in itertools.pairwise(held):
            same = (before.offset, before.stored_size, before.record) == (after.offset, after.stored_size, after.record)
            if not same and after.offset < before.offset + before.stored_size:
                raise ManifestError(
                    f"pack {pack}: module {after.name!r} at offset {after.offset} points into module {before.name!r}"
                )


def _check_counts(raw: dict[str, Any]) -> None:
    """Modules, tensors and split entries within the limits, counted before any is built."""
    modules = typed(raw["modules"], list)
    if len(modules) > MAX_MODULES:
        raise ManifestError(f"manifest has {len(modules)} modules; the limit is {MAX_MODULES}")
    tensors = sum(len(typed(typed(m, dict)["tensors"], list)) for m in modules)
    if tensors > MAX_TENSORS:
        raise ManifestError(f"manifest has {tensors} tensors; the limit is {MAX_TENSORS}")
    entries = sum(len(typed(typed(s, dict)["modules"], list)) for s in typed(raw["splits"], dict).values())
    if entries > MAX_SPLIT_ENTRIES:
        raise ManifestError(f"manifest splits list {entries} modules; the limit is {MAX_SPLIT_ENTRIES}")


def _check_source(manifest: Manifest) -> None:
    """The order runs are a permutation of the tensors and the header agrees with the tables."""
    source = manifest.source
    total = sum(len(m.tensors) for m in manifest.modules)
    covered = sorted(source.order)
    position = 0
    for first, length in covered:
        if first != position or length == 0:
            raise ManifestError("source order does not list every tensor exactly once")
        position += length
    if position != total:
        raise ManifestError("source order does not list every tensor exactly once")
    if len({t.key for m in manifest.modules for t in m.tensors}) != total:
        raise ManifestError("a tensor key appears more than once")
    if source.header is not None:
        header = source.header.encode()
        if len(header) > MAX_HEADER_BYTES:
            raise ManifestError(f"source header of {len(header)} bytes is over the {MAX_HEADER_BYTES}-byte cap")
        try:
            layout = parse_header(header, data_length=manifest.raw_size)
        except FormatError as exc:
            raise ManifestError(f"source header: {exc}") from exc
        if list(layout.tensors) != manifest.file_order() or layout.metadata != source.metadata:
            raise ManifestError("source header and module tables disagree")
    if source.size != len(manifest.header_bytes()) + manifest.raw_size:
        raise ManifestError("source size does not match its header and tensors")
