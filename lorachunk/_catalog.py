"""The catalog: which LoRAs a store holds, by name, in one object a reader fetches in one request.

``refs/catalog.json.zst`` is a journal: zstd frames whose text is JSON lines, one event a line::

    ["lorachunk-catalog/1"]
    ["add", name, manifest id, root, stored bytes, raw bytes, new bytes, base model or null, added]
    ["rm", manifest id]

A writer appends a frame of its events (the object is rewritten by temp file and rename, but
nothing is parsed or compressed again: adding the 30,000th LoRA costs what adding the first did),
and every :data:`COMPACT_AFTER` frames rewrites it as one frame of the versions that remain.

The catalog is derived data, like an index: it only points. A name resolves to a manifest id,
and that manifest is then read and checked against its id as always, so a hostile catalog can
make a reader open another LoRA of the store only where the reader pinned nothing; a pinned root
or manifest id is still compared, and a manifest whose name is not the one asked for is refused.
``verify`` checks it against the manifests and ``repack`` writes it again from them.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import Any, Final

import zstandard

from lorachunk._digest import hex_of, split_digest
from lorachunk._exceptions import ManifestError, ObjectNotFoundError, UsageError
from lorachunk._json import parse_json
from lorachunk._keys import CATALOG
from lorachunk._manifest import Manifest
from lorachunk._manifest_json import LORA_NAME, check_lora_name, shown
from lorachunk.storage import ByteRange, Store

__all__ = [
    "COMPACT_AFTER",
    "Catalog",
    "Version",
    "catalog_problems",
    "count_versions",
    "frame",
    "ordered_versions",
    "read_catalog",
    "same_name_ids",
    "update_catalog",
    "write_catalog",
]

FORMAT: Final = "lorachunk-catalog/1"
#: Reader limits (docs/format.md): stored and decompressed bytes, and events.
MAX_STORED_CATALOG_BYTES: Final = 64 * 1024 * 1024
MAX_CATALOG_BYTES: Final = 256 * 1024 * 1024
MAX_EVENTS: Final = 1_000_000
#: Frames appended before the journal is rewritten as one.
COMPACT_AFTER: Final = 256
_LEVEL: Final = 12
_DATE: Final = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


@dataclass(frozen=True, slots=True)
class Version:
    """One version of a named LoRA in a store. ``new_bytes``: the stored bytes it added when it
    was written (the rest of ``stored_size`` it shares with what the store held)."""

    name: str
    manifest: str
    root: str
    stored_size: int
    raw_size: int
    new_bytes: int
    base_model: str | None
    added: str

    def event(self) -> list[Any]:
        return [
            "add",
            self.name,
            self.manifest,
            self.root,
            self.stored_size,
            self.raw_size,
            self.new_bytes,
            self.base_model,
            self.added,
        ]

    @classmethod
    def of(cls, manifest: Manifest, *, new_bytes: int, added: str | None = None) -> Version:
        return cls(
            manifest.name,
            manifest.id,
            manifest.root,
            manifest.stored_size,
            manifest.raw_size,
            new_bytes,
            manifest.base_model,
            added or now(),
        )


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True, slots=True)
class Catalog:
    """The versions a store's catalog lists, in the order they were added (latest last), and how
    many frames its journal holds."""

    versions: tuple[Version, ...]
    frames: int = 1

    def names(self) -> dict[str, list[Version]]:
        """Name → its versions, oldest first; names in sorted order."""
        found: dict[str, list[Version]] = {}
        for version in self.versions:
            found.setdefault(version.name, []).append(version)
        return dict(sorted(found.items()))

    def find(self, selector: str) -> list[Version]:
        """The versions ``selector`` names: ``NAME`` (every version, latest last), ``NAME@N``
        (version N, from 1), a manifest id or a unique hex prefix of one, or a root."""
        name, at, number = selector.partition("@")
        if LORA_NAME.fullmatch(name) and ":" not in selector:
            versions = [v for v in self.versions if v.name == name]
            if at:
                if not number.isdigit() or not 1 <= int(number) <= len(versions):
                    raise UsageError(f"{name!r} has {len(versions)} version(s); no version {number!r}")
                return [versions[int(number) - 1]]
            if versions:
                return versions
        by_id = [v for v in self.versions if selector in (v.manifest, v.root)]
        if by_id:
            return by_id
        hexpart = selector.partition(":")[2] or selector
        if len(hexpart) >= 6 and not hexpart.strip("0123456789abcdef"):
            return [v for v in self.versions if hex_of(v.manifest).startswith(hexpart)]
        return []

    def added(self, versions: Iterable[Version]) -> Catalog:
        new = [v for v in versions if v.manifest not in {w.manifest for w in self.versions}]
        return replace(self, versions=(*self.versions, *new))

    def removed(self, manifest_ids: Iterable[str]) -> Catalog:
        gone = set(manifest_ids)
        return replace(self, versions=tuple(v for v in self.versions if v.manifest not in gone))

    def to_bytes(self) -> bytes:
        """The compact form: one frame of every version."""
        return frame([[FORMAT], *(v.event() for v in self.versions)])

    @classmethod
    def from_bytes(cls, stored: bytes) -> Catalog:
        """Read a catalog journal; :class:`ManifestError` for anything malformed or over a limit."""
        text, frames = _decompress(stored)
        lines = text.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        if len(lines) > MAX_EVENTS:
            raise ManifestError(f"catalog holds over {MAX_EVENTS} events")
        events = parse_json(
            b"[" + b",".join(lines) + b"]", error=ManifestError, what="catalog", parse_constant=_no_constant
        )
        if not isinstance(events, list) or not events or events[0] != [FORMAT]:
            raise ManifestError(f"catalog does not start with [{FORMAT!r}]; this reader reads that format only")
        versions: dict[str, Version] = {}
        for event in events[1:]:
            if isinstance(event, list) and event[:1] == ["rm"] and len(event) == 2:
                versions.pop(_digest(event[1]), None)
            else:
                version = _version(event)
                versions.setdefault(version.manifest, version)
        return cls(tuple(versions.values()), frames)


def frame(events: Iterable[list[Any]]) -> bytes:
    """One journal frame of ``events``."""
    text = "".join(json.dumps(e, ensure_ascii=False, separators=(",", ":")) + "\n" for e in events)
    return zstandard.ZstdCompressor(level=_LEVEL).compress(text.encode())


def _decompress(stored: bytes) -> tuple[bytes, int]:
    """Every frame's text, and how many frames there were; bounded before each is inflated."""
    pieces: list[bytes] = []
    total = frames = 0
    rest = memoryview(stored)
    while rest:
        try:
            declared = zstandard.frame_content_size(rest)
        except zstandard.ZstdError as exc:
            raise ManifestError(f"catalog is not zstd frames: {exc}") from exc
        if declared < 0 or total + declared > MAX_CATALOG_BYTES:
            raise ManifestError(f"catalog declares over {MAX_CATALOG_BYTES} bytes (or no size)")
        decompressor = zstandard.ZstdDecompressor().decompressobj()
        try:
            pieces.append(decompressor.decompress(rest))
        except zstandard.ZstdError as exc:
            raise ManifestError(f"catalog does not decompress: {exc}") from exc
        if len(pieces[-1]) != declared:
            raise ManifestError("catalog frame is shorter than it declares")
        total += declared
        frames += 1
        used = len(rest) - len(decompressor.unused_data)
        if used <= 0:
            raise ManifestError("catalog frame is truncated")
        rest = rest[used:]
    return b"".join(pieces), frames


def _no_constant(name: str) -> object:
    raise ManifestError(f"{name} in the catalog (JSON has no such number)")


def _digest(value: object) -> str:
    if not isinstance(value, str):
        raise ManifestError(f"catalog: {shown(value)} is not a digest")
    split_digest(value)
    return value


def _size(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**53:
        raise ManifestError(f"catalog: {shown(value)} is not a size")
    return value


def _version(event: object) -> Version:
    if not isinstance(event, list) or len(event) != 9 or event[0] != "add":
        raise ManifestError(f"catalog: an event is not ['add', …] of 9 fields or ['rm', id]: {shown(event)}")
    _, name, manifest, root, stored, raw, new, base, added = event
    if base is not None and (not isinstance(base, str) or len(base) > 200 or not base.isprintable()):
        raise ManifestError(f"catalog: base model {shown(base)} is not a short printable text")
    if not isinstance(added, str) or not _DATE.fullmatch(added):
        raise ManifestError(f"catalog: date {shown(added)} is not YYYY-MM-DDTHH:MM:SSZ")
    return Version(
        check_lora_name(name),
        _digest(manifest),
        _digest(root),
        _size(stored),
        _size(raw),
        _size(new),
        base,
        added,
    )


def read_catalog(store: Store) -> Catalog | None:
    """The store's catalog; None where it has none (a store written before 0.3)."""
    try:
        stored = store.get(CATALOG, ByteRange(0, MAX_STORED_CATALOG_BYTES + 1))
    except ObjectNotFoundError:
        return None
    if len(stored) > MAX_STORED_CATALOG_BYTES:
        raise ManifestError(f"{CATALOG}: over the {MAX_STORED_CATALOG_BYTES}-byte limit")
    try:
        return Catalog.from_bytes(stored)
    except ManifestError as exc:
        raise ManifestError(f"{CATALOG} in {store!r}: {exc}") from exc


def update_catalog(store: Store, added: Iterable[Version], removed: Iterable[str] = ()) -> bool:
    """Append ``added`` and the removal of the manifest ids ``removed`` to the store's catalog,
    as one frame, without reading the versions it lists (call under ``store.serialized()``).
    Every :data:`COMPACT_AFTER` frames the catalog is written again as one. False, and nothing
    written, where there is no readable catalog to add to: the caller writes it whole."""
    try:
        stored = store.get(CATALOG, ByteRange(0, MAX_STORED_CATALOG_BYTES + 1))
        frames = _decompress(stored)[1]
    except (ObjectNotFoundError, ManifestError):
        return False
    events = [*(["rm", i] for i in removed), *(v.event() for v in added)]
    if frames + 1 < COMPACT_AFTER:
        store.set(CATALOG, stored + frame(events))
        return True
    catalog = Catalog.from_bytes(stored).removed(e[1] for e in events if e[0] == "rm")
    write_catalog(store, catalog.added(v for v in added))
    return True


#: A catalog of fewer versions is small enough that a writer reuses the records of every LoRA in
#: the store; past it, those of the LoRA's own versions and the latest (docs/library.md).
SCAN_ALL: Final = 64


def same_name_ids(store: Store, name: str) -> list[str] | None:
    """The manifest ids of ``name``'s versions, found in the catalog's text without parsing the
    rest of it; None where the store has no catalog or under :data:`SCAN_ALL` versions."""
    try:
        stored = store.get(CATALOG, ByteRange(0, MAX_STORED_CATALOG_BYTES + 1))
        text = _decompress(stored)[0]
    except (ObjectNotFoundError, ManifestError):
        return None
    if text.count(b'["add",') < SCAN_ALL:
        return None
    needle = json.dumps(["add", name], separators=(",", ":")).encode()[:-1] + b","
    ids = []
    start = text.find(needle)
    while start >= 0:
        end = text.find(b"\n", start)
        with suppress(ValueError, ManifestError):  # a damaged line costs a missed reuse; verify says so
            ids.append(_version(json.loads(text[start : end if end >= 0 else len(text)])).manifest)
        start = text.find(needle, start + 1)
    return ids


def count_versions(store: Store) -> int:
    """How many versions the catalog lists (adds less removals; 0 without a catalog), from its
    text, without parsing it."""
    try:
        stored = store.get(CATALOG, ByteRange(0, MAX_STORED_CATALOG_BYTES + 1))
        text = _decompress(stored)[0]
    except (ObjectNotFoundError, ManifestError):
        return 0
    return text.count(b'["add",') - text.count(b'["rm",')


def write_catalog(store: Store, catalog: Catalog) -> None:
    store.set(CATALOG, catalog.to_bytes())


def catalog_problems(catalog: Catalog, manifests: Iterable[Manifest]) -> list[str]:
    """Where ``catalog`` disagrees with the ``manifests`` a store holds (verify): a version whose
    manifest is missing or whose fields are not the manifest's, and a name listed twice for one id."""
    by_id = {m.id: m for m in manifests}
    problems = []
    for version in catalog.versions:
        manifest = by_id.get(version.manifest)
        if manifest is None:
            problems.append(f"{CATALOG}: {version.name!r} names manifest {version.manifest}, which is not in the store")
        elif (version.name, version.root) != (manifest.name, manifest.root) or version.stored_size != (
            manifest.stored_size
        ):
            problems.append(f"{CATALOG}: {version.name!r} ({version.manifest}) does not match its manifest")
    return problems


def ordered_versions(
    manifests: Iterable[Manifest], previous: Catalog | None, renamed: Mapping[str, str] | None = None
) -> list[Version]:
    """Versions for ``manifests`` in the order ``previous`` had them (new ones after, by name;
    ``renamed``: old manifest id → new, for a repack), with ``new_bytes`` derived again: the
    bytes of records no version before it holds."""
    manifests = list(manifests)
    renamed = renamed or {}
    versions_before = previous.versions if previous else ()
    order = {renamed.get(v.manifest, v.manifest): (i, v.added) for i, v in enumerate(versions_before)}
    manifests.sort(key=lambda m: (order.get(m.id, (len(order), ""))[0], m.name, m.id))
    seen: set[str] = set()
    versions = []
    for manifest in manifests:
        records = {m.record: m.stored_size for m in manifest.modules}
        new = sum(size for record, size in records.items() if record not in seen)
        seen.update(records)
        added = order.get(manifest.id, (0, ""))[1] or now()
        versions.append(Version.of(manifest, new_bytes=new, added=added))
    return versions
