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

import io
import json
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

import xxhash
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
    "lookup",
    "ordered_versions",
    "read_catalog",
    "same_name_ids",
    "summary",
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
                return _nth(versions, name, number)
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
        listed = {w.manifest for w in self.versions}
        new = [v for v in versions if v.manifest not in listed]
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


def _frames(stored: bytes) -> list[memoryview]:
    """The zstd frames of a catalog, found by walking frame and block headers (RFC 8878 3.1.1):
    no byte is inflated, so an append costs the same in a catalog of 30,000 LoRAs as of one."""
    view, frames, at = memoryview(stored), [], 0
    while at < len(view):
        start = at
        if len(view) - at < 6 or bytes(view[at : at + 4]) != _MAGIC:
            raise ManifestError("catalog is not zstd frames (no magic number where a frame starts)")
        descriptor = view[at + 4]
        single = bool(descriptor & 0x20)
        fcs = (1 if single else 0, 2, 4, 8)[descriptor >> 6]
        at += 5 + (0 if single else 1) + (0, 1, 2, 4)[descriptor & 3] + fcs
        while True:
            if at + 3 > len(view):
                raise ManifestError("catalog frame is truncated")
            header = int.from_bytes(view[at : at + 3], "little")
            kind, size = (header >> 1) & 3, header >> 3
            if kind == 3:
                raise ManifestError("catalog frame holds a reserved block type")
            at += 3 + (1 if kind == 1 else size)
            if header & 1:
                break
        at += 4 if descriptor & 0x04 else 0
        if at > len(view):
            raise ManifestError("catalog frame is truncated")
        frames.append(view[start:at])
    return frames


_MAGIC: Final = b"\x28\xb5\x2f\xfd"


def _decompress(stored: bytes) -> tuple[bytes, int]:
    """Every frame's text, and how many frames there were; the sizes the frames declare are
    summed and bounded before any is inflated, then all are inflated in one pass."""
    frames = _frames(stored)
    total = 0
    for one in frames:
        try:
            declared = zstandard.frame_content_size(one)
        except zstandard.ZstdError as exc:
            raise ManifestError(f"catalog is not zstd frames: {exc}") from exc
        if declared < 0:
            raise ManifestError("catalog frame does not declare its size")
        total += declared
    if total > MAX_CATALOG_BYTES:
        raise ManifestError(f"catalog declares {total} bytes; the limit is {MAX_CATALOG_BYTES}")
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(stored), read_across_frames=True) as reader:
            text = reader.read(total + 1)
    except zstandard.ZstdError as exc:
        raise ManifestError(f"catalog does not decompress: {exc}") from exc
    if len(text) != total:
        raise ManifestError("catalog frames hold other than what they declare")
    return text, len(frames)


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


def _stored(store: Store) -> bytes | None:
    """The catalog's stored bytes, never more than the limit; None where there is none."""
    try:
        stored = store.get(CATALOG, ByteRange(0, MAX_STORED_CATALOG_BYTES + 1))
    except ObjectNotFoundError:
        return None
    if len(stored) > MAX_STORED_CATALOG_BYTES:
        raise ManifestError(f"{CATALOG}: over the {MAX_STORED_CATALOG_BYTES}-byte limit")
    return stored


def read_catalog(store: Store) -> Catalog | None:
    """The store's catalog; None where it has none (a store written before 0.3)."""
    stored = _stored(store)
    if stored is None:
        return None
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
        stored = _stored(store)
        frames = len(_frames(stored)) if stored is not None else 0
    except ManifestError:
        return False
    if stored is None:
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


def lookup(store: Store, selector: str | None, *, root: str | None = None) -> list[Version] | None:
    """The versions ``selector`` (or, without one, ``root``) names, as :meth:`Catalog.find` would
    say, found in the catalog's text: only the lines that mention the name or digest are parsed,
    so opening one LoRA of 30,000 costs a search, not a parse of all of them. None where the
    store has no catalog."""
    stored = _stored(store)
    if stored is None:
        return None
    # A program that opens LoRA after LoRA of one library (an engine) parses the catalog once,
    # the second time it sees the same bytes; a single lookup (the CLI) searches the text.
    key = xxhash.xxh3_128_hexdigest(stored)
    with _MEMO_LOCK:
        parsed = _MEMO.get(key)
        seen = key in _SEEN
        if len(_SEEN) > 1024:  # a writer appending again and again: each catalog is seen once
            _SEEN.clear()
        _SEEN.add(key)
    if parsed is None and seen:
        parsed = Catalog.from_bytes(stored)
        with _MEMO_LOCK:
            _MEMO[key] = parsed
            while len(_MEMO) > 4:
                _MEMO.pop(next(iter(_MEMO)))
    if parsed is not None:
        return parsed.find(selector) if selector is not None else [v for v in parsed.versions if v.root == root]
    text = _decompress(stored)[0]
    if not text.startswith(json.dumps([FORMAT]).encode()):
        raise ManifestError(f"{CATALOG} in {store!r}: not a {FORMAT} catalog")
    name, at, number = (selector or "").partition("@")
    versions = _search(text, selector, root)
    if selector is not None and ":" not in selector and not versions and not at:
        return Catalog.from_bytes(stored).find(selector)  # no such name: maybe a manifest id's hex prefix
    return _nth(versions, name, number) if at else versions


def _nth(versions: list[Version], name: str, number: str) -> list[Version]:
    """``NAME@N``: the N-th of a name's versions, from 1."""
    if not number.isdigit() or not 1 <= int(number) <= len(versions):
        raise UsageError(f"{name!r} has {len(versions)} version(s); no version {number!r}")
    return [versions[int(number) - 1]]


def _search(text: bytes, selector: str | None, root: str | None) -> list[Version]:
    """The live versions a name (``selector`` without ``@N``), a digest (``selector``) or a root
    names, from the lines of the catalog's ``text`` that mention it."""
    name = (selector or "").partition("@")[0]
    if selector is not None and LORA_NAME.fullmatch(name) and ":" not in selector:
        needle = json.dumps(["add", name], separators=(",", ":")).encode()[:-1] + b","
    else:
        needle = json.dumps(selector if selector is not None else root).encode()
    found = []
    start = text.find(needle)
    while start >= 0:
        line_start = text.rfind(b"\n", 0, start) + 1
        end = text.find(b"\n", start)
        line = text[line_start : end if end >= 0 else len(text)]
        event = parse_json(line, error=ManifestError, what="catalog line", parse_constant=_no_constant)
        if isinstance(event, list) and event[:1] == ["add"]:
            version = _version(event)
            if selector is None or version.name == name or selector in (version.manifest, version.root):
                found.append((line_start, version))
        start = text.find(needle, start + len(needle))
    # A version is live unless an ["rm", id] line comes after the line that added it.
    rm = [(json.dumps(["rm", v.manifest], separators=(",", ":")).encode(), at, v) for at, v in found]
    live = {v.manifest: v for needle_rm, at, v in rm if text.rfind(needle_rm) < at}
    return list(live.values())


_MEMO: dict[str, Catalog] = {}
_SEEN: set[str] = set()
_MEMO_LOCK = threading.Lock()


def same_name_ids(store: Store, name: str) -> list[str] | None:
    """The manifest ids of ``name``'s versions, found in the catalog's text without parsing the
    rest of it; None where the store has no catalog or under :data:`SCAN_ALL` versions."""
    try:
        stored = _stored(store)
        text = _decompress(stored)[0] if stored is not None else b""
    except ManifestError:
        return None
    if text.count(b'["add",') < SCAN_ALL:
        return None
    try:
        return [v.manifest for v in _search(text, name, None)]
    except ManifestError:
        return None  # a damaged line: this pack reuses less; verify says what is wrong


def summary(store: Store) -> Catalog | int | None:
    """The catalog, parsed, where it lists fewer than :data:`SCAN_ALL` versions; past that only
    how many (a library's totals are `ls`'s job, not worth a parse on every `info`); None where
    the store has none."""
    stored = _stored(store)
    if stored is None:
        return None
    text = _decompress(stored)[0]
    versions = text.count(b'["add",') - text.count(b'["rm",')
    return Catalog.from_bytes(stored) if versions < SCAN_ALL else versions


def count_versions(store: Store) -> int:
    """How many versions the catalog lists (adds less removals; 0 without a catalog), from its
    text, without parsing it."""
    try:
        stored = _stored(store)
        text = _decompress(stored)[0] if stored is not None else b""
    except ManifestError:
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
