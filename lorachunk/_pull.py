"""pull: a packed LoRA, or some splits of it, copied into a local folder, each record verified."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from lorachunk._digest import check
from lorachunk._exceptions import LorachunkError
from lorachunk._keys import flat_twin, manifest_key, pack_key, shard_key
from lorachunk._loader import PullReport, check_deadline, open
from lorachunk._lock import locked
from lorachunk._manifest import FORMAT_V1, Manifest, Module
from lorachunk._packing import layout_order
from lorachunk._repository import (
    catalog_added,
    check_dest,
    get_object,
    list_manifest_ids,
    mark_partial,
    object_exists,
    read_manifest,
    read_record,
    record_key,
    write_manifest,
)
from lorachunk._threads import Progress
from lorachunk._writer import Held, Writer, held_records, placed_manifest
from lorachunk.storage import LocalStore, Store

__all__ = ["pull"]

_Copy = Callable[[list[Module], Callable[[Module, bytes | memoryview], None], Progress | None], PullReport]


def pull(
    source: str | os.PathLike[str] | Store,
    dest: str | os.PathLike[str],
    *,
    splits: Iterable[str] | None = None,
    modules: Iterable[str] | None = None,
    layers: Iterable[int] | None = None,
    progress: Progress | None = None,
    deadline: float | None = None,
    **open_options: Any,
) -> PullReport:
    """Copy a packed LoRA (or only some splits or modules of it) into the local folder ``dest``.

    The copy holds a manifest with the LoRA's root and the selected records, each verified
    before it is written, so ``dest`` opens and loads offline. Records already in ``dest``
    (checked against their digests: a damaged one is fetched again) or in the cache are not
    fetched; the rest are written into new packs. A copy of only some splits is recorded as
    partial (``refs/partial``): its manifest names the source's packs for the records it lacks,
    so :func:`verify` checks what it holds and does not count the rest as lost.

    The records fetched are held in memory until they are written (about the stored size of
    what is pulled), so that they go into packs in split order.

    ``deadline``: seconds the whole pull may take, opening included (default: opening's and
    the fetch's own, :meth:`LoRA.load`). Several pulls (and packs) may write ``dest`` at once;
    each adds to what it holds (docs/security.md).
    """
    seconds = check_deadline(deadline)
    started = time.monotonic()
    if seconds is not None:
        open_options["deadline"] = seconds
    check_dest(dest)
    target = LocalStore(dest)
    with open(source, **open_options) as lora, locked(target, exclusive=False, command="pull"):
        manifest = lora.manifest
        unique = list({m.record: m for m in lora.select(splits=splits, modules=modules, layers=layers)}.values())
        if manifest.format == FORMAT_V1 and len(unique) < len({m.record for m in manifest.modules}):
            return _pull_v1(
                lambda *args: lora.copy(*args, required=False, into_cache=False), manifest, unique, target, progress
            )
        held, damaged = _intact(target, held_records(target, algorithm=manifest.hash), unique)
        missing = [m for m in unique if m.record not in held.records]
        records: dict[str, bytes | memoryview] = {}
        left = None if seconds is None else max(1e-3, seconds - (time.monotonic() - started))
        report = lora.copy(
            missing,
            lambda m, data: records.__setitem__(m.record, data),
            progress,
            required=False,
            deadline=left,
            into_cache=False,  # dest is a verified store already: a second copy would double the disk
        )
        with target.batch():
            wanted = {m.record for m in unique}
            splits_of = {s.name: (s.kind, s.modules) for s in manifest.splits}
            with Writer(target, algorithm=manifest.hash, held=held, damaged=damaged) as writer:
                for name, group in layout_order((m.name for m in manifest.modules), splits_of):
                    module = manifest.module(name)
                    if module.record in wanted:
                        writer.add(module, records.get(module.record, b""), group)
                placed, packs = writer.finish()
        # The packs are in place; the manifest is a read-modify-write of what the folder holds of
        # this LoRA, which another pull may have added to meanwhile: done under the store's mutex.
        with target.serialized():
            copy = _copy_manifest(target, manifest, placed, packs)
            with target.batch():
                write_manifest(target, copy)
            whole = all(object_exists(target, record_key(m)) for m in copy.modules)
            mark_partial(target, copy, partial=not whole)
            dropped = _drop_superseded(target, copy)
            catalog_added(target, copy, new_bytes=writer.written_bytes, removed=dropped)
    return PullReport(len(unique), report.fetched, report.fetched_bytes, len(unique) - report.fetched)


def _copy_manifest(target: LocalStore, manifest: Manifest, placed: list[Module], packs: dict[str, int]) -> Manifest:
    """The manifest of what ``target`` holds of ``manifest``'s LoRA: the records just ``placed``,
    those earlier pulls (or packs) put there, and for the rest the source's packs, which this
    copy lacks (a pulled folder is a growing partial copy: each pull adds to it)."""
    held = held_records(target, algorithm=manifest.hash)
    by_name = {m.name: m for m in placed}
    modules = []
    for module in manifest.modules:
        where = held.records.get(module.record)
        if module.name in by_name:
            module = by_name[module.name]  # noqa: PLW2901
        elif where is not None and where[2] == module.stored_size:
            module = module.placed(where[0], where[1])  # noqa: PLW2901
            packs[where[0]] = held.packs[where[0]]
        elif module.pack is not None:
            packs[module.pack] = manifest.packs[module.pack]  # not held here: named where the source holds it
        modules.append(module)
    return placed_manifest(manifest, modules, packs)


def _drop_superseded(target: LocalStore, copy: Manifest) -> list[str]:
    """A pulled folder keeps one manifest per LoRA: the one written before for the same root
    (fewer splits, or a record since repaired) goes, and what only it named is left over for
    ``repack --prune``."""
    dropped = []
    for manifest_id in list_manifest_ids(target):
        if manifest_id == copy.id:
            continue
        try:
            root = read_manifest(target, manifest_id).root
        except LorachunkError:
            continue
        if root == copy.root:
            mark_partial(target, manifest_id, partial=False)
            for key in (manifest_key(manifest_id), flat_twin(manifest_key(manifest_id))):
                if key is not None:
                    target.delete(key)
            dropped.append(manifest_id)
    return dropped


def _intact(store: Store, held: Held, wanted: Iterable[Module]) -> tuple[Held, set[str]]:
    """``held``, less the records in packs (of those ``wanted`` touches) that no longer hash to
    their names, and those packs: their records are fetched again, and a damaged pack is written
    again whole when the same pack is made."""
    touched = {held.records[m.record][0] for m in wanted if m.record in held.records}
    bad = set()
    for pack in touched:
        try:
            check(pack, get_object(store, pack_key(pack)), what=f"pack {pack_key(pack)}")
        except LorachunkError:
            bad.add(pack)
    return Held({d: p for d, p in held.records.items() if p[0] not in bad}, held.packs), bad


def _pull_v1(
    copy: _Copy, manifest: Manifest, unique: list[Module], target: LocalStore, progress: Progress | None
) -> PullReport:
    """Some splits of a ``lorachunk/1`` LoRA: copied as they are, shard by shard (a
    ``lorachunk/2`` manifest cannot name records that are in no pack)."""
    missing = [m for m in unique if not _record_intact(target, m)]
    report = copy(missing, lambda m, data: target.set(shard_key(m.record), bytes(data)), progress)
    with target.serialized():
        with target.batch():
            write_manifest(target, manifest)
        whole = all(target.exists(shard_key(m.record)) for m in manifest.modules)
        mark_partial(target, manifest, partial=not whole)
        catalog_added(target, manifest, new_bytes=report.fetched_bytes)
    return PullReport(len(unique), report.fetched, report.fetched_bytes, len(unique) - report.fetched)


def _record_intact(store: Store, module: Module) -> bool:
    try:
        read_record(store, module)
    except LorachunkError:
        return False
    return True
