"""Manifests, packs, records and refs in a store (the layout is :mod:`lorachunk._keys`): read, checked
and written through the :class:`~lorachunk.storage.Store` interface, whatever the store."""

from __future__ import annotations

import bisect
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import zstandard

from lorachunk._catalog import (
    Catalog,
    Version,
    lookup,
    ordered_versions,
    read_catalog,
    update_catalog,
    write_catalog,
)
from lorachunk._codec import Codec, codec_from_config
from lorachunk._digest import ALGORITHMS, check, digest, hex_of, split_digest
from lorachunk._exceptions import (
    IntegrityError,
    LorachunkError,
    ManifestError,
    ObjectNotFoundError,
    StoreError,
    UsageError,
)
from lorachunk._keys import (
    LATEST,
    LATEST_MANIFEST,
    MANIFESTS,
    MAX_REF_BYTES,
    MAX_STORED_MANIFEST_BYTES,
    PACKS,
    PARTIAL,
    SHARDS,
    flat_twin,
    is_object_key,
    manifest_id_of,
    manifest_key,
    pack_id_of,
    pack_key,
    shard_key,
)
from lorachunk._layout import natural_key
from lorachunk._manifest import MAX_MANIFEST_BYTES, Manifest, Module
from lorachunk._manifest_json import LORA_NAME
from lorachunk._packing import DEFAULT_GAP, Read, Span, plan_reads
from lorachunk._record import decode_checked
from lorachunk._threads import bounded_map
from lorachunk.storage import ByteRange, LocalStore, Store, open_store

__all__ = [
    "absent_records",
    "as_store",
    "canonical_key",
    "catalog_added",
    "check_dest",
    "decode_module",
    "fetch_records",
    "get_object",
    "list_manifest_ids",
    "manifest_objects",
    "mark_partial",
    "object_exists",
    "parse_manifest",
    "partial_copy_error",
    "partial_ids",
    "read_manifest",
    "read_record",
    "read_stored_manifest",
    "rebuild_catalog",
    "record_key",
    "split_source",
    "splits_held_whole",
    "write_manifest",
]


def get_object(store: Store, key: str, byte_range: ByteRange | None = None) -> bytes:
    """``store.get`` of a pack or manifest where this version puts it (fanned out), else where
    lorachunk 0.2 did (flat). A store once found flat is tried flat first from then on, so an old
    store over HTTP costs one extra request per store, not per object."""
    twin = flat_twin(key)
    if twin is None:
        return store.get(key, byte_range)
    first, second = (twin, key) if _FLAT.get(id(store)) is store else (key, twin)
    try:
        return store.get(first, byte_range)
    except ObjectNotFoundError:
        data = store.get(second, byte_range)
    if second == twin:
        with _FLAT_LOCK:
            _FLAT[id(store)] = store
            while len(_FLAT) > 64:
                _FLAT.pop(next(iter(_FLAT)))
    return data


def canonical_key(key: str) -> str:
    """Where this version puts the object ``key`` names (a flat 0.2 key → its fanned-out one)."""
    if key.startswith(PACKS):
        return pack_key(pack_id_of(key))
    if key.startswith(MANIFESTS):
        return manifest_key(manifest_id_of(key))
    return key


def object_exists(store: Store, key: str) -> bool:
    """Whether ``store`` holds the object ``key`` names, fanned out or (lorachunk 0.2) flat."""
    twin = flat_twin(key)
    return store.exists(key) or (twin is not None and store.exists(twin))


# Stores found to hold flat objects (lorachunk 0.2), by id, with the store itself (so a new
# object at a reused id is not taken for it).
_FLAT: dict[int, Store] = {}
_FLAT_LOCK = threading.Lock()


def manifest_objects(manifest: Manifest) -> list[tuple[str, bytes]]:
    """What storing ``manifest`` as a store's latest writes, in the order it must be written:
    the manifest, the latest's copy, then the ref (so the two refs name the same manifest once a
    write is done). Every writer (pack, compose, pull, push) writes these and only these.

    Raises :class:`ManifestError` for a manifest over what a reader accepts.
    """
    stored = manifest.to_bytes()
    if len(stored) > MAX_STORED_MANIFEST_BYTES or zstandard.frame_content_size(stored) > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"the manifest is over what a reader accepts ({MAX_STORED_MANIFEST_BYTES} bytes stored, "
            f"{MAX_MANIFEST_BYTES} decompressed)"
        )
    return [
        (manifest_key(manifest.id), stored),
        (LATEST_MANIFEST, stored),
        (LATEST, f"{manifest.id}\n".encode()),
    ]


def write_manifest(store: Store, manifest: Manifest) -> str:
    """Store ``manifest`` and make it the store's latest; return its id."""
    for index, (key, value) in enumerate(manifest_objects(manifest)):
        if index == 0 and object_exists(store, key):
            continue  # named by its digest: the same bytes are there
        store.set(key, value)
    return manifest.id


def catalog_added(store: Store, manifest: Manifest, *, new_bytes: int, removed: Iterable[str] = ()) -> None:
    """Add ``manifest`` (just written, with ``new_bytes`` of new packs) to the store's catalog,
    and drop the manifest ids ``removed``, under the store's mutex. A store without a readable
    catalog (one written before 0.3) gets it written whole from its manifests."""
    if not store.supports_writes:
        return
    version = Version.of(manifest, new_bytes=new_bytes)
    with store.serialized():
        if update_catalog(store, [version], removed):
            return
        # A new store holds this manifest alone: no need to list and read it back.
        alone = store.supports_listing and list_manifest_ids(store) == [manifest.id]
        rebuild_catalog(store, manifests=[manifest] if alone else None)


def rebuild_catalog(
    store: Store, renamed: Mapping[str, str] | None = None, manifests: Iterable[Manifest] | None = None
) -> Catalog:
    """Write the catalog again from ``manifests`` (default: every manifest of the store), in the
    order the old one had them (if it reads; ``renamed`` maps a repack's old ids to new ones),
    others after; return it. Partial copies are listed as the LoRAs they copy."""
    try:
        previous = read_catalog(store)
    except LorachunkError:
        previous = None
    if manifests is None:
        ids = list_manifest_ids(store) if store.supports_listing else [latest_id(store)]
        found = []
        for manifest_id in ids:
            try:
                found.append(_read_manifest(store, manifest_id, None))
            except LorachunkError:
                continue  # damaged: verify says so; it is no LoRA to list
        manifests = found
    catalog = Catalog(tuple(ordered_versions(manifests, previous, renamed)))
    write_catalog(store, catalog)
    return catalog


def partial_ids(store: Store) -> set[str]:
    """Ids of the manifests whose records this store holds only some of (a ``pull --split`` copy)."""
    try:
        text = store.get(PARTIAL, ByteRange(0, 1024 * 1024))
    except ObjectNotFoundError:
        return set()
    ids = set()
    for line in text.decode("ascii", errors="replace").split():
        try:
            split_digest(line)
        except ManifestError:
            continue
        ids.add(line)
    return ids


def mark_partial(store: Store, manifest: Manifest | str, *, partial: bool) -> None:
    """Record whether ``store`` holds all the records of ``manifest`` (or the manifest of that
    id); a pull of some splits does not."""
    manifest_id = manifest if isinstance(manifest, str) else manifest.id
    ids = partial_ids(store)
    updated = ids | {manifest_id} if partial else ids - {manifest_id}
    if updated == ids:
        return
    if updated:
        store.set(PARTIAL, "".join(f"{i}\n" for i in sorted(updated)).encode())
    else:
        store.delete(PARTIAL)


def absent_records(store: Store, manifest: Manifest) -> set[str]:
    """The objects (packs, ``lorachunk/1`` shards) of ``manifest`` that ``store`` lacks: those a
    partial copy was never given. One existence check per object."""
    return {key for key in {record_key(m) for m in manifest.modules if m.stored_size} if not object_exists(store, key)}


def splits_held_whole(manifest: Manifest, absent: set[str]) -> list[str]:
    """The splits of ``manifest`` none of whose records lie in an ``absent`` object, in natural
    order: what a partial copy can load, unpack and pull from. One rule for verify, info, unpack
    and load."""
    held = (
        s.name
        for s in manifest.splits
        if s.modules and not any(record_key(manifest.module(n)) in absent for n in s.modules)
    )
    return sorted(held, key=natural_key)


def partial_copy_error(store: Store, manifest: Manifest, chosen: Iterable[Module]) -> UsageError | None:
    """For a partial copy lacking some of the ``chosen`` modules, the error that says which splits
    it lacks, which it holds, and how to get the rest; None otherwise."""
    if manifest.id not in partial_ids(store):
        return None
    absent = absent_records(store, manifest)
    missing_modules = {m.name for m in chosen if record_key(m) in absent}
    if not missing_modules:
        return None
    missing = [s.name for s in manifest.splits if missing_modules.intersection(s.modules)]
    held = splits_held_whole(manifest, absent)
    return UsageError(
        f"{store!r} is a partial copy without {len(missing_modules)} of the selected modules (in splits "
        f"{', '.join(missing[:8]) or '-'}); pull them into it first (`lorachunk pull SOURCE -o FOLDER --split NAME`). "
        f"Splits it holds whole: {', '.join(held[:20]) or 'none'}"
    )


def list_manifest_ids(store: Store) -> list[str]:
    """Every manifest id in the store (sorted), as ``"<algorithm>:<hex>"``."""
    return sorted(manifest_id_of(key) for key in store.list_prefix(MANIFESTS) if is_object_key(key))


def no_lora_error(store: Store) -> StoreError | UsageError:
    """The error for a store with nothing packed in it. A local folder is a usage error whether it
    is missing or holds no store (a mistyped path is the usual cause); one holding only what
    killed writers left is named as such."""
    if not isinstance(store, LocalStore):
        return StoreError(f"{store!r} holds no packed LoRA (no {LATEST}); pack one with `lorachunk pack`")
    if not store.root.exists():
        return UsageError(f"{store.root} does not exist, so it holds no packed LoRA")
    temp = store.temp_files()
    if temp:
        return UsageError(
            f"{store.root} holds no packed LoRA, only {temp} temp file{'s' if temp != 1 else ''} of writes that "
            "never finished (a writer was killed); `lorachunk repack --prune` removes them"
        )
    return UsageError(f"{store.root} holds no packed LoRA (no {LATEST}); pack one with `lorachunk pack`")


def latest_id(store: Store) -> str:
    try:
        text = store.get(LATEST, ByteRange(0, MAX_REF_BYTES + 1))
    except ObjectNotFoundError:
        raise no_lora_error(store) from None
    if len(text) > MAX_REF_BYTES:
        raise ManifestError(f"{LATEST} in {store!r} is over {MAX_REF_BYTES} bytes, so it is not a manifest id")
    value = text.decode("ascii", errors="replace").strip()
    try:
        split_digest(value)
    except ManifestError as exc:
        raise ManifestError(f"{LATEST} in {store!r} does not hold a manifest id: {exc}") from None
    return value


def resolve(store: Store, selector: str | None, *, root: str | None = None) -> str:
    """The manifest id ``selector`` names: None (the store's latest; with ``root``, the LoRA of
    that root if the catalog lists one), a LoRA's name (its latest version), ``NAME@N``, a root,
    a full manifest id, or a unique hex prefix of one (docs/loading.md)."""
    if selector is None and root is None:
        return latest_id(store)
    try:
        hits = lookup(store, selector, root=root)
    except ManifestError:
        if selector is not None and _is_name(selector):
            raise
        hits = None  # damaged: ids and roots still resolve without it (verify says what is wrong)
    catalogued = hits is not None
    if hits is not None:
        named = selector is not None and all(v.name == selector.partition("@")[0] for v in hits)
        if len({v.manifest for v in hits}) > 1 and not named:  # a name's versions: its latest
            raise UsageError(f"{selector!r} is ambiguous in {store!r} ({len(hits)} versions); name one by its full id")
        if hits:
            return hits[-1].manifest
    if selector is None:
        return latest_id(store)
    if _is_name(selector):
        return _by_name(store, selector, catalogued)
    if not store.supports_listing:
        try:
            split_digest(selector)
        except ManifestError:
            raise UsageError(f"{store!r} cannot list manifests; name one by its full id (algorithm:hex)") from None
        return selector
    hexpart = selector.partition(":")[2] or selector
    matches = [i for i in list_manifest_ids(store) if hex_of(i).startswith(hexpart.lower())]
    if len(matches) != 1:
        problem = "matches no manifest" if not matches else f"is ambiguous ({len(matches)} manifests)"
        raise UsageError(f"manifest {selector!r} {problem} in {store!r}")
    return matches[0]


def _is_name(selector: str | None) -> bool:
    """Whether ``selector`` reads as a LoRA name (``NAME`` or ``NAME@N``) rather than a digest."""
    if selector is None or ":" in selector:
        return False
    name = selector.partition("@")[0]
    return LORA_NAME.fullmatch(name) is not None and (len(name) < 6 or bool(name.strip("0123456789abcdef")))


def _by_name(store: Store, selector: str, catalogued: bool) -> str:
    """A name in a store without a catalog (written before 0.3), by reading its manifests."""
    name = selector.partition("@")[0]
    if catalogued or not store.supports_listing:
        where = "its catalog lists" if catalogued else "it has no catalog and cannot list manifests"
        raise UsageError(f"no LoRA named {name!r} in {store!r} ({where})")
    found = [i for i in list_manifest_ids(store) if _read_manifest(store, i, None).name == name]
    if not found:
        raise UsageError(f"no LoRA named {name!r} in {store!r}")
    if len(found) > 1 and "@" not in selector:
        raise UsageError(f"{len(found)} versions of {name!r} in {store!r} and no catalog to order them: repack it")
    return found[0]


def split_source(
    source: str | os.PathLike[str] | Store, selector: str | None
) -> tuple[str | os.PathLike[str] | Store, str | None]:
    """``SOURCE#SELECTOR`` split in two (the fragment is never sent to a server); a local folder
    whose own name holds ``#`` is left whole. Naming a LoRA both ways is a :class:`UsageError`."""
    if isinstance(source, Store) or "#" not in os.fspath(source) or _exists(Path(source)):
        return source, selector
    text, _, fragment = os.fspath(source).rpartition("#")
    if not fragment:
        raise UsageError(f"{os.fspath(source)!r}: nothing after '#'; name a LoRA, a manifest id or a root")
    if selector is not None and selector != fragment:
        raise UsageError(f"{os.fspath(source)!r} names a LoRA and manifest= names {selector!r}: name it once")
    return text, fragment


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long for a path, a NUL in it: not a folder
        return False


def check_dest(dest: str | os.PathLike[str] | Store) -> None:
    """A folder ``dest`` names must be one that can be a store: not empty text (which would pack
    into the current folder), not a file, not under one."""
    if isinstance(dest, Store):
        return
    text = os.fspath(dest)
    if not text.strip():
        raise UsageError("the destination is empty; name the folder to pack into")
    if "://" in text:
        return
    for folder in (Path(text), *Path(text).parents):
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                what = "is a file" if folder == Path(text) else f"lies under the file {folder}"
                raise UsageError(
                    f"{text} {what}; pack into a folder (a packed LoRA is a folder of packs and manifests)"
                )
            return


@contextmanager
def as_store(dest: str | os.PathLike[str] | Store) -> Iterator[Store]:
    """A store from a folder, a URL (``http(s)://``, fsspec) or a :class:`Store`; closed after
    use only if this opened it."""
    if isinstance(dest, Store):
        yield dest
        return
    with open_store(dest) as store:
        yield store


def read_manifest(
    source: str | os.PathLike[str] | Store, selector: str | None = None, *, root: str | None = None
) -> Manifest:
    """Read and fully validate a manifest (the latest unless ``selector`` names one) of
    ``source``, a folder, a URL or a :class:`Store`; with ``root``, :class:`IntegrityError`
    unless it has that root, found before any of its tables is built.

    The latest is read from its copy in ``refs/latest.json.zst``: one request instead of two
    (the ref, then the manifest), which on a link with long round trips is a good part of a
    small load. Stores written before the copy existed fall back to the ref.
    """
    source, selector = split_source(source, selector)
    with as_store(source) as store:
        return _read_manifest(store, selector, root)


def _read_manifest(store: Store, selector: str | None, root: str | None) -> Manifest:
    if selector is None:
        try:
            stored = read_stored_manifest(store, LATEST_MANIFEST)
        except ObjectNotFoundError:
            pass
        else:
            latest = parse_manifest(None, stored, what=f"{LATEST_MANIFEST} in {store!r}")
            if root is None or root in latest.roots:
                return latest
            # A root pinned in a store of many LoRAs selects: the catalog says which has it.
    manifest_id = resolve(store, selector, root=root)
    key = manifest_key(manifest_id)
    try:
        stored = read_stored_manifest(store, key)
    except ObjectNotFoundError:
        if selector is not None or root is None:
            raise
        # The catalog named a manifest of that root that is gone: no LoRA here has the root.
        raise IntegrityError(f"{store!r}: no LoRA has root {root} (the catalog's is missing)") from None
    check(manifest_id, stored, what=key)
    manifest = parse_manifest(manifest_id, stored, what=f"{key} in {store!r}", root=root)
    name = selector.partition("@")[0] if selector is not None and _is_name(selector) else None
    if name is not None and manifest.name != name:
        # The catalog only points; the manifest it points at must be the LoRA asked for.
        raise IntegrityError(f"{store!r}: the catalog names {manifest_id} for {name!r}; it is {manifest.name!r}")
    return manifest


def read_stored_manifest(store: Store, key: str) -> bytes:
    """A manifest's stored bytes, unchecked; never more than the limit is read, however much a
    server would send."""
    stored = get_object(store, key, ByteRange(0, MAX_STORED_MANIFEST_BYTES + 1))
    if len(stored) > MAX_STORED_MANIFEST_BYTES:
        raise ManifestError(f"{key}: over the {MAX_STORED_MANIFEST_BYTES}-byte limit for a stored manifest")
    return stored


def parse_manifest(manifest_id: str | None, stored: bytes, *, what: str, root: str | None = None) -> Manifest:
    """``Manifest.from_bytes`` of bytes already checked against ``manifest_id``, remembered.

    Manifests are immutable and named by the digest of their bytes, so one parsed before is the
    same manifest: opening a LoRA again (a program that loads one split after another) skips the
    parse, which costs ~100 ms for a LoRA of ~900 modules. Without ``manifest_id`` (bytes that
    come with no name, as the latest's copy) the id is the digest under either algorithm.
    """
    candidates = [manifest_id] if manifest_id is not None else [digest(a, stored) for a in ALGORITHMS]
    with _PARSED_LOCK:
        for candidate in candidates:
            cached = _PARSED.get(candidate)
            if cached is not None:
                _PARSED.move_to_end(candidate)
                if root is not None and root not in cached.roots:
                    raise IntegrityError(f"{what}: manifest root is {cached.root}, expected {root}")
                return cached
    try:
        manifest = Manifest.from_bytes(stored, root=root)
    except (ManifestError, IntegrityError) as exc:
        raise type(exc)(f"{what}: {exc}") from exc
    with _PARSED_LOCK:
        _PARSED[manifest_id or manifest.id] = manifest
        while len(_PARSED) > _PARSED_MAX:
            _PARSED.popitem(last=False)
    return manifest


_PARSED: OrderedDict[str, Manifest] = OrderedDict()
_PARSED_LOCK = threading.Lock()
_PARSED_MAX: Final = 32


def record_key(module: Module) -> str:
    """The object holding ``module``'s record: its pack, or (``lorachunk/1``) its own shard."""
    return pack_key(module.pack) if module.pack is not None else shard_key(module.record)


def read_record(store: Store, module: Module, *, where: str = "") -> bytes:
    """The stored bytes of ``module``'s record, checked against its digest before any decoding.

    A record in a pack is one range of it; a ``lorachunk/1`` shard is read to at most one byte
    more than the manifest declares, so an object that keeps coming (a hostile or broken server)
    costs no more memory than the right one.
    """
    record = next(fetch_records(store, [module], {}, threads=1, where=where, whole=False))[1]
    return record if isinstance(record, bytes) else bytes(record)


def fetch_records(
    store: Store,
    modules: Iterable[Module],
    packs: Mapping[str, int],
    *,
    threads: int,
    gap: int = DEFAULT_GAP,
    where: str = "",
    whole: bool = True,
    on_read: Callable[[int], None] | None = None,
) -> Iterator[tuple[Module, bytes | memoryview]]:
    """The verified records of ``modules`` (every one, whether or not another shares its
    record), as the requests that carry them complete.

    The requests are planned by :func:`~lorachunk._packing.plan_reads` from ``packs`` (each
    pack's size): one request carries many records, and a pack read whole is checked against
    its name. Every record is checked against its digest before it is yielded, as a view of the
    request's bytes (no copy: a full load of a large LoRA would copy every byte once more).
    ``whole=False`` reads only the records' own bytes. ``on_read(size)`` is told of each
    request that completes.
    """
    by_record: dict[str, list[Module]] = {}
    for module in modules:
        if module.stored_size == 0:  # a module of empty tensors: nothing to read
            check(module.record, b"", what=f"module {module.name!r}")
            yield module, b""
            continue
        by_record.setdefault(module.record, []).append(module)
    if not by_record:
        return
    needs: dict[str, tuple[int, list[Span]]] = {}
    placed: dict[str, list[tuple[int, Module]]] = {}
    keys: dict[str, str] = {}  # pack -> its key: a thousand modules share a few packs
    for sharing in by_record.values():
        module = sharing[0]
        key = keys.get(module.pack) if module.pack is not None else None
        if key is None:
            key = record_key(module)
            if module.pack is not None:
                keys[module.pack] = key
        if key not in needs:
            needs[key] = (module.stored_size if module.pack is None or not whole else packs[module.pack], [])
            placed[key] = []
        needs[key][1].append(Span(module.offset, module.stored_size))
        placed[key].append((module.offset, module))
    for entries in placed.values():
        entries.sort(key=lambda entry: entry[0])
    if whole:
        reads = plan_reads(needs, gap=gap)
    else:
        reads = [
            Read(key, s.start, s.start + s.length, key.startswith(SHARDS))
            for key, (_, spans) in needs.items()
            for s in spans
        ]
    partial: dict[str, tuple[bytearray, list[int]]] = {}

    def described(read: Read) -> str:
        inside = _inside(placed[read.key], read)
        names = ", ".join(repr(m.name) for m in inside[:2]) + (", …" if len(inside) > 2 else "")
        kind = "shard" if inside and inside[0].pack is None else "pack"
        return f"{kind} {read.key} (module{'s' if len(inside) > 1 else ''} {names}){where}"

    def checked(module: Module, record: memoryview, key: str) -> memoryview:
        what = f"{'shard' if module.pack is None else 'record in pack ' + key} (module {module.name!r}){where}"
        check(module.record, record, what=what)
        return record

    def fetch(read: Read) -> tuple[Read, bytes, list[tuple[Module, memoryview]]]:
        """One request, on a worker thread: its bytes, the pack's name and every record wholly
        inside it checked there (hashing in parallel), the rest left to put together."""
        v1 = read.key.startswith(SHARDS)
        # One byte more than an object read whole should hold: a longer one is refused, not read on.
        extra = 1 if read.whole else 0
        try:
            data = get_object(store, read.key, ByteRange(read.start, read.end + extra))
        except StoreError as exc:
            raise type(exc)(f"{described(read)}: {exc}") from exc
        want = read.end - read.start
        if len(data) != want:
            got = f"over {want}" if len(data) > want else str(len(data))
            problem = (
                "bytes where the manifest declares" if v1 else "bytes (truncated or wrong) where the manifest declares"
            )
            raise IntegrityError(f"{described(read)}: {got} {problem} {want}")
        if read.whole and not v1:
            check(pack_id_of(read.key), data, what=f"pack {read.key}{where}")
        if on_read is not None:
            on_read(len(data))
        whole_records = []
        view = memoryview(data)
        for module in _inside(placed[read.key], read):
            start, end = module.offset, module.offset + module.stored_size
            if read.start <= start and end <= read.end:  # a view: no copy
                whole_records.append((module, checked(module, view[start - read.start : end - read.start], read.key)))
        return read, data, whole_records

    # One request (a single record: read_record, unpack and verify of a local folder) needs no pool.
    done = map(fetch, reads) if len(reads) == 1 else bounded_map(fetch, reads, threads=threads, ordered=False)
    for read, data, whole_records in done:
        for module, record in whole_records:
            for same in by_record[module.record]:
                yield same, record
        for module in _inside(placed[read.key], read):
            start, end = module.offset, module.offset + module.stored_size
            if read.start <= start and end <= read.end:
                continue
            # A record longer than one request: put together from its pieces.
            buffer, got = partial.setdefault(module.record, (bytearray(module.stored_size), [0]))
            lo, hi = max(start, read.start), min(end, read.end)
            buffer[lo - start : hi - start] = data[lo - read.start : hi - read.start]
            got[0] += hi - lo
            if got[0] == module.stored_size:
                record = checked(module, memoryview(partial.pop(module.record)[0]), read.key)
                for same in by_record[module.record]:
                    yield same, record


def _inside(entries: Sequence[tuple[int, Module]], read: Read) -> list[Module]:
    """The modules (by record offset) whose records overlap ``read``; records do not overlap."""
    first = bisect.bisect_left(entries, read.start, key=lambda entry: entry[0])
    if first and entries[first - 1][0] + entries[first - 1][1].stored_size > read.start:
        first -= 1
    found = []
    for offset, module in entries[first:]:
        if offset >= read.end:
            break
        found.append(module)
    return found


def decode_module(store: Store, manifest: Manifest, module: Module, codec: Codec | None = None) -> bytearray:
    """Fetch, verify (stored digest, then raw digest) and decode one module's raw bytes."""
    out = bytearray(module.raw_size)
    decode_checked(codec or codec_from_config(manifest.codec), module, read_record(store, module), memoryview(out))
    return out
