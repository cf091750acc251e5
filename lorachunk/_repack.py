"""repack: a store rewritten so that each LoRA's records sit in as few packs as the target
allows, ``lorachunk/1`` stores converted, and (``prune``) what no manifest names deleted."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from lorachunk._exceptions import UsageError
from lorachunk._keys import PACKS, SHARDS, manifest_key
from lorachunk._manifest import FORMAT_ID, Manifest
from lorachunk._packs import DEFAULT_PACK_SIZE, layout_order
from lorachunk._repository import (
    as_store,
    fetch_records,
    latest_id,
    list_manifest_ids,
    manifest_objects,
    no_lora_error,
    partial_ids,
    read_manifest,
    record_key,
)
from lorachunk._threads import cpu_threads
from lorachunk._writer import Held, Writer, check_pack_size, placed_manifest
from lorachunk.storage import LocalStore, Store

__all__ = ["RepackReport", "repack"]


@dataclass(frozen=True, slots=True)
class RepackReport:
    """What :func:`repack` did: manifests rewritten (``converted`` of them from
    ``lorachunk/1``), packs written and their bytes, objects deleted by ``prune`` and (in a local
    folder; other stores do not say) their bytes."""

    manifests: int
    rewritten: int
    converted: int
    packs_written: int
    bytes_written: int
    deleted: int = 0
    deleted_bytes: int = 0


def repack(
    source: str | os.PathLike[str] | Store, *, pack_size: int = DEFAULT_PACK_SIZE, prune: bool = False
) -> RepackReport:
    """Rewrite the store ``source`` so that each LoRA's records lie in as few packs as
    ``pack_size`` allows, in split order; ``lorachunk/1`` manifests become ``lorachunk/2``.

    Roots do not change (they are over content), and a converted manifest keeps proving its
    ``lorachunk/1`` root (``v1_root``), so every pinned root still opens. The latest manifest is
    laid out first, so it gets the fewest packs; older ones reuse its records and get packs of
    their own for the rest. Partial copies are left as they are.

    Nothing is deleted unless ``prune``; then, only once the new packs, manifests and refs are
    durable, the manifests that were rewritten and every object no remaining manifest names go.
    A reader that opened an old manifest before that gets :class:`ShardNotFoundError` for its
    records and must open the store again. Run it when nothing else writes the store.
    """
    try:
        check_pack_size(pack_size)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    with as_store(source) as store:
        if not (store.supports_writes and store.supports_listing):
            raise UsageError(f"{store!r} cannot be repacked here: repack needs a store it can list and write")
        ids = list_manifest_ids(store)
        if not ids:
            raise no_lora_error(store)
        latest = latest_id(store)
        partial = partial_ids(store)
        # A damaged manifest stops the repack before anything is written: verify says what it is.
        manifests = {manifest_id: read_manifest(store, manifest_id) for manifest_id in ids}
        order = sorted(ids, key=lambda i: (i != latest, i))
        renamed: dict[str, str] = {}
        written = written_bytes = converted = 0
        held: dict[str, Held] = {}
        with store.batch():
            for manifest_id in order:
                manifest = manifests[manifest_id]
                if manifest_id in partial:
                    continue
                with Writer(
                    store, algorithm=manifest.hash, pack_size=pack_size, held=held.get(manifest.hash)
                ) as writer:
                    _rewrite(store, manifest, writer)
                    modules, packs = writer.finish()
                held[manifest.hash] = writer.held()
                new = placed_manifest(manifest, modules, packs)
                written, written_bytes = written + writer.written, written_bytes + writer.written_bytes
                converted += manifest.format != FORMAT_ID
                if new.id != manifest_id:
                    renamed[manifest_id] = new.id
                    if not store.exists(manifest_key(new.id)):
                        store.set(manifest_key(new.id), new.to_bytes())
                    manifests[new.id] = new
            if latest in renamed:  # the refs go last, after every manifest they could name
                for key, value in manifest_objects(manifests[renamed[latest]])[1:]:
                    store.set(key, value)
        report = RepackReport(len(ids), len(renamed), converted, written, written_bytes)
        if not prune:
            return report
        _sync(store)
        kept = {renamed.get(i, i) for i in ids}
        deleted = deleted_bytes = 0
        for old in renamed:  # manifests first: no manifest ever names an object already gone
            store.delete(manifest_key(old))
        named = {record_key(m) for i in kept for m in manifests[i].modules}
        for key in [*store.list_prefix(PACKS), *store.list_prefix(SHARDS)]:
            if key not in named:
                deleted_bytes += _size(store, key)
                store.delete(key)
                deleted += 1
        return RepackReport(len(ids), len(renamed), converted, written, written_bytes, deleted, deleted_bytes)


def _rewrite(store: Store, manifest: Manifest, writer: Writer) -> None:
    """Hand every record of ``manifest`` to ``writer`` in layout order (records the writer
    already places are not read)."""
    splits = {s.name: (s.kind, s.modules) for s in manifest.splits}
    order = layout_order((m.name for m in manifest.modules), splits)
    wanted = [m for m in manifest.modules if m.shard not in writer.index]
    records: Mapping[str, bytes | memoryview] = {
        module.shard: data
        for module, data in fetch_records(store, wanted, manifest.packs, threads=cpu_threads(), where=f" in {store!r}")
    }
    for name, group in order:
        module = manifest.module(name)
        writer.add(module, records.get(module.shard, b""), group)


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
