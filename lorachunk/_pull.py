"""pull: a packed LoRA, or some splits of it, copied into a local folder, each record verified."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from lorachunk._digest import check
from lorachunk._exceptions import LorachunkError
from lorachunk._keys import manifest_key, pack_key, shard_key
from lorachunk._loader import PullReport, open
from lorachunk._manifest import FORMAT_V1, Manifest, Module
from lorachunk._packs import layout_order
from lorachunk._repository import (
    check_dest,
    list_manifest_ids,
    mark_partial,
    read_manifest,
    read_shard,
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
    """
    check_dest(dest)
    target = LocalStore(dest)
    with open(source, **open_options) as lora:
        manifest = lora.manifest
        unique = list({m.shard: m for m in lora.select(splits=splits, modules=modules, layers=layers)}.values())
        if manifest.format == FORMAT_V1 and len(unique) < len({m.shard for m in manifest.modules}):
            return _pull_v1(lambda *args: lora.copy(*args, required=False), manifest, unique, target, progress)
        held, damaged = _intact(target, held_records(target, algorithm=manifest.hash), unique)
        missing = [m for m in unique if m.shard not in held.records]
        records: dict[str, bytes | memoryview] = {}
        report = lora.copy(missing, lambda m, data: records.__setitem__(m.shard, data), progress, required=False)
        with target.batch():
            wanted = {m.shard for m in unique}
            splits_of = {s.name: (s.kind, s.modules) for s in manifest.splits}
            with Writer(target, algorithm=manifest.hash, held=held, damaged=damaged) as writer:
                for name, group in layout_order((m.name for m in manifest.modules), splits_of):
                    module = manifest.module(name)
                    if module.shard in wanted:
                        writer.add(module, records.get(module.shard, b""), group)
                placed, packs = writer.finish()
            names = {m.name for m in placed}
            # Records not pulled stay named where the source holds them: this copy lacks those packs.
            rest = [m for m in manifest.modules if m.name not in names]
            packs |= {m.pack: manifest.packs[m.pack] for m in rest if m.pack is not None}
            copy = placed_manifest(manifest, [*placed, *rest], packs)
            write_manifest(target, copy)
        whole = all(target.exists(record_key(m)) for m in copy.modules)
        mark_partial(target, copy, partial=not whole)
        _drop_superseded(target, copy)
    return PullReport(len(unique), report.fetched, report.fetched_bytes, len(unique) - report.fetched)


def _drop_superseded(target: LocalStore, copy: Manifest) -> None:
    """A pulled folder keeps one manifest per LoRA: the one written before for the same root
    (fewer splits, or a record since repaired) goes, and what only it named is left over for
    ``repack --prune``."""
    for manifest_id in list_manifest_ids(target):
        if manifest_id == copy.id:
            continue
        try:
            root = read_manifest(target, manifest_id).root
        except LorachunkError:
            continue
        if root == copy.root:
            mark_partial(target, manifest_id, partial=False)
            target.delete(manifest_key(manifest_id))


def _intact(store: Store, held: Held, wanted: Iterable[Module]) -> tuple[Held, set[str]]:
    """``held``, less the records in packs (of those ``wanted`` touches) that no longer hash to
    their names, and those packs: their records are fetched again, and a damaged pack is written
    again whole when the same pack is made."""
    touched = {held.records[m.shard][0] for m in wanted if m.shard in held.records}
    bad = set()
    for pack in touched:
        try:
            check(pack, store.get(pack_key(pack)), what=f"pack {pack_key(pack)}")
        except LorachunkError:
            bad.add(pack)
    return Held({d: p for d, p in held.records.items() if p[0] not in bad}, held.packs), bad


def _pull_v1(
    copy: _Copy, manifest: Manifest, unique: list[Module], target: LocalStore, progress: Progress | None
) -> PullReport:
    """Some splits of a ``lorachunk/1`` LoRA: copied as they are, shard by shard (a
    ``lorachunk/2`` manifest cannot name records that are in no pack)."""
    missing = [m for m in unique if not _shard_intact(target, m)]
    report = copy(missing, lambda m, data: target.set(shard_key(m.shard), bytes(data)), progress)
    with target.batch():
        write_manifest(target, manifest)
    whole = all(target.exists(shard_key(m.shard)) for m in manifest.modules)
    mark_partial(target, manifest, partial=not whole)
    return PullReport(len(unique), report.fetched, report.fetched_bytes, len(unique) - report.fetched)


def _shard_intact(store: Store, module: Module) -> bool:
    try:
        read_shard(store, module)
    except LorachunkError:
        return False
    return True
