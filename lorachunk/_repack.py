"""repack: a store rewritten so that each LoRA's records sit in as few packs as the target
allows, ``lorachunk/1`` stores converted, and (``prune``) what no manifest names deleted."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from lorachunk._exceptions import UsageError
from lorachunk._keys import MANIFESTS, PACKS, SHARDS, is_object_key, manifest_id_of, manifest_key
from lorachunk._lock import STALE, break_locks, locked
from lorachunk._manifest import FORMAT_ID, Manifest
from lorachunk._packing import DEFAULT_PACK_SIZE, layout_order
from lorachunk._repository import (
    as_store,
    canonical_key,
    fetch_records,
    latest_id,
    list_manifest_ids,
    manifest_objects,
    no_lora_error,
    partial_ids,
    read_manifest,
    rebuild_catalog,
    record_key,
)
from lorachunk._threads import cpu_threads
from lorachunk._writer import Held, Writer, check_pack_size, placed_manifest
from lorachunk.storage import LocalStore, Store

__all__ = ["RepackReport", "repack"]


@dataclass(frozen=True, slots=True)
class RepackReport:
    """What :func:`repack` did: manifests rewritten (``converted`` of them from
    ``lorachunk/1``), packs written and their bytes; with ``prune``, objects deleted and (in a
    local folder; other stores do not say) their bytes, temp files of killed writers removed
    (``temp_files_kept``: younger than the grace period, left), and the locks of other writers
    ``force`` broke."""

    manifests: int
    rewritten: int
    converted: int
    packs_written: int
    bytes_written: int
    deleted: int = 0
    deleted_bytes: int = 0
    temp_files_removed: int = 0
    temp_files_kept: int = 0
    locks_broken: int = 0
    #: Packs and manifests moved from lorachunk 0.2's flat folders to the fanned-out layout.
    moved: int = 0


#: Temp files at least this old are a killed writer's: no writer of this version runs beside a
#: repack (it holds the store alone), so the grace is for writers older than the lock.
GRACE = STALE


def repack(
    source: str | os.PathLike[str] | Store,
    *,
    pack_size: int = DEFAULT_PACK_SIZE,
    prune: bool = False,
    force: bool = False,
    grace: float = GRACE,
) -> RepackReport:
    """Rewrite the store ``source`` so that each LoRA's records lie in as few packs as
    ``pack_size`` allows, in split order; ``lorachunk/1`` manifests become ``lorachunk/2``.

    Roots do not change (they are over content), and a converted manifest keeps proving its
    ``lorachunk/1`` root (``v1_root``), so every pinned root still opens. The latest manifest is
    laid out first, so it gets the fewest packs; older ones reuse its records and get packs of
    their own for the rest. Partial copies are left as they are.

    Repack holds the store alone (an exclusive lock, docs/security.md): it does not start while
    another program writes it (:class:`StoreLockedError` naming the holder; ``force`` breaks the
    other locks, for a holder known to be gone), and writers wait until it is done.

    Nothing is deleted unless ``prune``; then, only once the new packs, manifests and refs are
    durable, the manifests that were rewritten and every object no remaining manifest names go,
    and hidden temp files older than ``grace`` seconds (left by writers killed mid-write). Only
    names of lorachunk's grammar are touched: a file a user put in ``packs/`` stays. A reader that
    opened an old manifest before that gets :class:`ObjectNotFoundError` naming the missing pack,
    and must open the store again.
    """
    try:
        check_pack_size(pack_size)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not 0 <= grace < math.inf:
        raise UsageError(f"grace must be 0 or more seconds, got {grace!r}")
    with as_store(source) as store:
        if not (store.supports_writes and store.supports_listing):
            raise UsageError(f"{store!r} cannot be repacked here: repack needs a store it can list and write")
        broken = len(break_locks(store)) if force else 0
        with locked(store, exclusive=True, command="repack" + (" --prune" if prune else ""), wait=0):
            ids = list_manifest_ids(store)
            if not ids and not (prune and _leftovers(store)):
                raise no_lora_error(store)
            report, kept, renamed = _repack(store, ids, pack_size)
            moved = _fan_out(store)
            if ids:
                # The catalog follows the manifests, in its order, before any it named goes.
                rebuild_catalog(store, renamed, kept.values())
            report = dataclasses.replace(report, locks_broken=broken, moved=moved)
            return _prune(store, report, kept, grace) if prune else report


def _repack(store: Store, ids: list[str], pack_size: int) -> tuple[RepackReport, dict[str, Manifest], dict[str, str]]:
    """Rewrite every manifest of ``ids``; the report and the manifests the store now holds, by id."""
    if not ids:
        return RepackReport(0, 0, 0, 0, 0), {}, {}
    latest = latest_id(store)
    partial = partial_ids(store)
    # A damaged manifest stops the repack before anything is written: verify says what it is.
    manifests = {manifest_id: read_manifest(store, manifest_id) for manifest_id in ids}
    order = sorted(ids, key=lambda i: (i != latest, i))
    kept: dict[str, Manifest] = {}
    replaced = {manifest_id: manifest_id for manifest_id in ids}  # old id → new
    written = written_bytes = converted = 0
    held: dict[str, Held] = {}
    with store.batch():
        for manifest_id in order:
            manifest = manifests[manifest_id]
            if manifest_id in partial:
                kept[manifest_id] = manifest
                continue
            with Writer(store, algorithm=manifest.hash, pack_size=pack_size, held=held.get(manifest.hash)) as writer:
                _rewrite(store, manifest, writer)
                modules, packs = writer.finish()
            held[manifest.hash] = writer.held()
            new = placed_manifest(manifest, modules, packs)
            written, written_bytes = written + writer.written, written_bytes + writer.written_bytes
            converted += manifest.format != FORMAT_ID
            kept[new.id], replaced[manifest_id] = new, new.id
            if new.id != manifest_id and not store.exists(manifest_key(new.id)):
                store.set(manifest_key(new.id), new.to_bytes())
        if replaced[latest] != latest:  # the refs go last, after every manifest they could name
            for key, value in manifest_objects(kept[replaced[latest]])[1:]:
                store.set(key, value)
    rewritten = sum(1 for old, new in replaced.items() if old != new)
    return RepackReport(len(ids), rewritten, converted, written, written_bytes), kept, replaced


def _prune(store: Store, report: RepackReport, kept: dict[str, Manifest], grace: float) -> RepackReport:
    """Delete, once the repack is durable, the manifests it replaced (first: no manifest ever
    names an object already gone), then every object no kept manifest names, then temp files
    older than ``grace``. Names outside lorachunk's grammar are never touched."""
    _sync(store)
    deleted = deleted_bytes = 0
    for key in list(store.list_prefix(MANIFESTS)):
        if is_object_key(key) and manifest_id_of(key) not in kept:
            store.delete(key)
    named = {record_key(m) for manifest in kept.values() for m in manifest.modules}
    for key in [*store.list_prefix(PACKS), *store.list_prefix(SHARDS)]:
        if is_object_key(key) and canonical_key(key) not in named:
            deleted_bytes += _size(store, key)
            store.delete(key)
            deleted += 1
    removed, left = store.remove_temp_files(older_than=grace) if isinstance(store, LocalStore) else (0, 0)
    return dataclasses.replace(
        report, deleted=deleted, deleted_bytes=deleted_bytes, temp_files_removed=removed, temp_files_kept=left
    )


def _fan_out(store: Store) -> int:
    """Move the packs and manifests lorachunk 0.2 kept in flat folders to where this version
    keeps them (``packs/<2 hex>/<hex>``); return how many moved. Each is written at its new key
    and made durable before the old one goes, so a reader finds it at one of the two."""
    flat = [k for p in (PACKS, MANIFESTS) for k in store.list_prefix(p) if is_object_key(k) and canonical_key(k) != k]
    if not flat:
        return 0
    with store.batch():
        for key in flat:
            if not store.exists(canonical_key(key)):
                store.set(canonical_key(key), store.get(key))
    _sync(store)
    for key in flat:
        store.delete(key)
    return len(flat)


def _leftovers(store: Store) -> bool:
    """Whether a store with no manifest holds what a prune removes (objects, temp files)."""
    objects = any(is_object_key(k) for prefix in (PACKS, SHARDS) for k in store.list_prefix(prefix))
    return objects or (isinstance(store, LocalStore) and store.temp_files() > 0)


def _rewrite(store: Store, manifest: Manifest, writer: Writer) -> None:
    """Hand every record of ``manifest`` to ``writer`` in layout order (records the writer
    already places are not read)."""
    splits = {s.name: (s.kind, s.modules) for s in manifest.splits}
    order = layout_order((m.name for m in manifest.modules), splits)
    wanted = [m for m in manifest.modules if m.record not in writer.index]
    records: Mapping[str, bytes | memoryview] = {
        module.record: data
        for module, data in fetch_records(store, wanted, manifest.packs, threads=cpu_threads(), where=f" in {store!r}")
    }
    for name, group in order:
        module = manifest.module(name)
        writer.add(module, records.get(module.record, b""), group)


def _sync(store: Store) -> None:
    """Make the renames of the batch durable before anything is deleted."""
    if isinstance(store, LocalStore):
        store.sync()


def _size(store: Store, key: str) -> int:
    if isinstance(store, LocalStore):
        try:
            return store.path(key).lstat().st_size
        except OSError:
            return 0
    return 0
