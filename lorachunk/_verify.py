"""verify: every manifest and shard of a store checked again, a partial copy's included."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from lorachunk._digest import digest, split_digest
from lorachunk._exceptions import IntegrityError, LorachunkError, ShardNotFoundError
from lorachunk._keys import LATEST, LATEST_MANIFEST, SHARDS, shard_key
from lorachunk._layout import natural_key
from lorachunk._manifest import Manifest, Module
from lorachunk._repository import (
    as_store,
    decode_module,
    latest_id,
    list_manifest_ids,
    no_lora_error,
    partial_ids,
    read_manifest,
    read_stored_manifest,
    resolve,
)
from lorachunk._threads import bounded_map, cpu_threads
from lorachunk.storage import LocalStore, Store

__all__ = ["VerifyReport", "verify"]


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What :func:`verify` checked: manifests, distinct shards and their stored bytes.

    A partial copy (``lorachunk pull --split``) holds only some shards: ``missing`` counts those
    it was never given, and ``complete_splits`` names the splits it holds whole.

    ``unreferenced`` counts shards no manifest names and ``temp_files`` the hidden temp files of
    writes that never finished (a pack killed with ``kill -9``; a failed pack in a store whose
    writes show at once). Neither is damage: writers never delete what another may have committed,
    so such leftovers stay until removed on purpose (stores that can list only).
    """

    manifests: int
    shards: int
    stored_bytes: int
    missing: int = 0
    complete_splits: tuple[str, ...] = ()
    unreferenced: int = 0
    temp_files: int = 0


def verify(dest: str | os.PathLike[str] | Store) -> VerifyReport:
    """Re-check every manifest in ``dest`` and every shard they name (only the latest manifest for
    stores that cannot list, such as plain HTTP).

    Each manifest is checked against its id and its Merkle roots are recomputed; each shard is
    hashed as stored, decoded, and hashed again as raw bytes; the latest manifest's copy
    (``refs/latest.json.zst``) must be the manifest ``refs/latest`` names.

    Raises :class:`IntegrityError` naming every bad object, one per line, if anything is wrong.
    """
    with as_store(dest) as store:
        return _verify(store)


def _check_latest(store: Store, ids: Sequence[str]) -> list[str]:
    """``refs/latest`` must name a manifest the store holds, and the latest's copy must be it."""
    try:
        latest = latest_id(store)
    except LorachunkError as exc:
        return [str(exc)]
    if store.supports_listing and latest not in ids:
        return [f"{LATEST} names {latest}, which is not in the store"]
    try:
        copy = read_stored_manifest(store, LATEST_MANIFEST)
    except ShardNotFoundError:
        return []  # a store written before the copy existed
    except LorachunkError as exc:
        return [str(exc)]
    if digest(split_digest(latest)[0], copy) != latest:
        return [f"{LATEST_MANIFEST} is not the manifest {LATEST} names ({latest})"]
    return []


def _verify(store: Store) -> VerifyReport:
    problems: list[str] = []
    manifests: list[Manifest] = []
    ids = list_manifest_ids(store) if store.supports_listing else [resolve(store, None)]
    if not ids:
        raise no_lora_error(store)
    for manifest_id in ids:
        try:
            manifests.append(read_manifest(store, manifest_id))
        except LorachunkError as exc:
            problems.append(str(exc))
    problems.extend(_check_latest(store, ids))
    unique = {m.shard: (manifest, m) for manifest in manifests for m in manifest.modules}
    # Shards that only partial copies name may be absent; any other absence is damage.
    partial = partial_ids(store)
    whole = {m.shard for manifest in manifests if manifest.id not in partial for m in manifest.modules}

    def check_one(item: tuple[Manifest, Module]) -> str | None:
        manifest, module = item
        try:
            decode_module(store, manifest, module)
        except ShardNotFoundError as exc:
            return None if module.shard not in whole else str(exc)
        except LorachunkError as exc:
            return str(exc)
        return ""

    checked = list(bounded_map(check_one, unique.values(), threads=cpu_threads(), size=lambda item: item[1].raw_size))
    problems.extend(p for p in checked if p)
    if problems:
        raise IntegrityError(f"{len(problems)} problem(s) in {store!r}:\n" + "\n".join(problems))
    absent = {shard for shard, result in zip(unique, checked, strict=True) if result is None}
    complete = sorted(
        {
            split.name
            for manifest in manifests
            if manifest.id in partial
            for split in manifest.splits
            if not any(manifest.module(n).shard in absent for n in split.modules)
        },
        key=natural_key,
    )
    present = [m for shard, (_, m) in unique.items() if shard not in absent]
    return VerifyReport(
        len(manifests),
        len(present),
        sum(m.stored_size for m in present),
        len(absent),
        tuple(complete),
        _unreferenced(store, {shard_key(shard) for shard in unique}),
        store.temp_files() if isinstance(store, LocalStore) else 0,
    )


def _unreferenced(store: Store, named: set[str]) -> int:
    if not store.supports_listing:
        return 0
    return sum(1 for key in store.list_prefix(SHARDS) if key not in named)
