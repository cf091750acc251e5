"""verify: every manifest, pack and record of a store checked again, a partial copy's included."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from lorachunk._catalog import catalog_problems, read_catalog
from lorachunk._codec import Codec, codec_from_config
from lorachunk._digest import check, digest, split_digest
from lorachunk._exceptions import IntegrityError, LorachunkError, ObjectNotFoundError
from lorachunk._keys import LATEST, LATEST_MANIFEST, MANIFESTS, PACKS, SHARDS, is_object_key, pack_id_of
from lorachunk._layout import natural_key
from lorachunk._manifest import Manifest, Module
from lorachunk._record import decode_checked
from lorachunk._repository import (
    as_store,
    canonical_key,
    get_object,
    latest_id,
    list_manifest_ids,
    no_lora_error,
    partial_ids,
    read_manifest,
    read_stored_manifest,
    record_key,
    resolve,
    split_source,
    splits_held_whole,
)
from lorachunk._threads import bounded_map, cpu_threads
from lorachunk.storage import ByteRange, LocalStore, Store

__all__ = ["VerifyReport", "verify"]


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What :func:`verify` checked: manifests, distinct records and their stored bytes.

    ``records`` counts the distinct module records checked. A partial copy (``lorachunk pull
    --split``) holds only some: ``missing`` counts those it was never given, and
    ``complete_splits`` names the splits it holds whole.

    ``unreferenced`` counts objects (packs, ``lorachunk/1`` shards) no manifest names,
    ``foreign`` names the files there that are not lorachunk's, and
    ``temp_files`` the hidden temp files of
    writes that never finished (a pack killed with ``kill -9``; a failed pack in a store whose
    writes show at once). Neither is damage: writers never delete what another may have committed,
    so such leftovers stay until removed on purpose (stores that can list only).
    """

    manifests: int
    records: int
    stored_bytes: int
    missing: int = 0
    complete_splits: tuple[str, ...] = ()
    unreferenced: int = 0
    temp_files: int = 0
    #: Files under ``manifests/``, ``packs/`` or ``shards/`` whose names are not lorachunk's
    #: (a ``README.md`` a user put there): listed, never read as objects, never deleted.
    foreign: tuple[str, ...] = ()


def verify(dest: str | os.PathLike[str] | Store) -> VerifyReport:
    """Re-check every manifest in ``dest`` and every record they name (only the latest manifest
    for stores that cannot list, such as plain HTTP).

    Each manifest is checked against its id and its Merkle roots are recomputed; each pack is
    read whole and hashed against its name; each record is
    hashed as stored, decoded, and hashed again as raw bytes (so a damaged pack is reported with
    every module it damages); the latest manifest's copy
    (``refs/latest.json.zst``) must be the manifest ``refs/latest`` names.

    ``dest#NAME`` (or a manifest id or root after ``#``) checks that LoRA alone. The store's
    catalog is checked against its manifests: every version it lists must be there, with its
    name, root and size.

    Raises :class:`IntegrityError` naming every bad object, one per line, if anything is wrong.
    """
    source, selector = split_source(dest, None)
    with as_store(source) as store:
        return _verify(store, None if selector is None else resolve(store, selector))


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
    except ObjectNotFoundError:
        return []  # a store written before the copy existed
    except LorachunkError as exc:
        return [str(exc)]
    if digest(split_digest(latest)[0], copy) != latest:
        return [f"{LATEST_MANIFEST} is not the manifest {LATEST} names ({latest})"]
    return []


def _check_catalog(store: Store, manifests: Sequence[Manifest]) -> list[str]:
    """The catalog (where there is one) against the manifests: every version it lists is a
    manifest of the store, with that name, root and size. (A manifest it does not list, one a
    repack replaced and did not prune, is no damage.)"""
    try:
        catalog = read_catalog(store)
    except LorachunkError as exc:
        return [str(exc)]
    if catalog is None:
        return []
    return catalog_problems(catalog, manifests) if store.supports_listing else []


def _verify(store: Store, only: str | None = None) -> VerifyReport:
    problems: list[str] = []
    manifests: list[Manifest] = []
    ids = [only] if only else list_manifest_ids(store) if store.supports_listing else [resolve(store, None)]
    if not ids:
        raise no_lora_error(store)
    for manifest_id in ids:
        try:
            manifests.append(read_manifest(store, manifest_id))
        except LorachunkError as exc:
            problems.append(str(exc))
    if only is None:
        problems.extend(_check_latest(store, ids))
        problems.extend(_check_catalog(store, manifests))
    # Each object (pack, or lorachunk/1 shard) once, with the records any manifest places in it.
    objects: dict[str, dict[str, tuple[Manifest, Module]]] = {}
    for manifest in manifests:
        for module in manifest.modules:
            objects.setdefault(record_key(module), {}).setdefault(module.record, (manifest, module))
    # Objects that only partial copies name may be absent; any other absence is damage.
    partial = partial_ids(store)
    whole = {record_key(m) for manifest in manifests if manifest.id not in partial for m in manifest.modules}
    codecs: dict[int, Codec] = {}  # by manifest object: one codec per manifest, not per record

    def codec_of(manifest: Manifest) -> Codec:
        if id(manifest) not in codecs:
            codecs[id(manifest)] = codec_from_config(manifest.codec)  # an unknown codec: a problem below
        return codecs[id(manifest)]

    def check_one(key: str) -> tuple[str, list[str] | None]:
        """The object read whole: a pack against its name, then every record in it against its
        digest, decoded, and the raw bytes against theirs. None: absent (and allowed to be)."""
        held = list(objects[key].values())
        v1 = held[0][1].pack is None
        size = held[0][1].stored_size if v1 else held[0][0].packs[held[0][1].pack]  # type: ignore[index]
        kind = "shard" if v1 else "pack"
        try:
            data = get_object(store, key, ByteRange(0, size + 1))
        except ObjectNotFoundError as exc:
            return key, None if key not in whole else [str(exc)]
        except LorachunkError as exc:
            return key, [str(exc)]
        found = []
        if len(data) != size:
            found.append(f"{kind} {key}: {len(data)} bytes where the manifest declares {size}")
        elif not v1 and digest(split_digest(pack_id_of(key))[0], data) != pack_id_of(key):
            found.append(f"pack {key}: digest mismatch (its bytes do not hash to its name)")
        for manifest, module in held:
            record = data[module.offset : module.offset + module.stored_size]
            try:
                if len(record) != module.stored_size:
                    raise IntegrityError(f"{kind} {key}: module {module.name!r} lies past its end")
                check(module.record, record, what=f"{kind} {key} (module {module.name!r})")
                out = bytearray(module.raw_size)
                decode_checked(codec_of(manifest), module, record, memoryview(out))
            except LorachunkError as exc:
                found.append(str(exc))
        return key, found

    size = lambda key: sum(m.raw_size for _, m in objects[key].values())  # noqa: E731
    checked = dict(bounded_map(check_one, list(objects), threads=cpu_threads(), size=size))
    problems.extend(p for found in checked.values() for p in found or ())
    if problems:
        raise IntegrityError(f"{len(problems)} problem(s) in {store!r}:\n" + "\n".join(problems))
    absent = {key for key, result in checked.items() if result is None}
    complete = sorted(
        {name for manifest in manifests if manifest.id in partial for name in splits_held_whole(manifest, absent)},
        key=natural_key,
    )
    present = [m for key, held in objects.items() if key not in absent for _, m in held.values()]
    return VerifyReport(
        len(manifests),
        len(present),
        sum(m.stored_size for m in present),
        sum(len(held) for key, held in objects.items() if key in absent),
        tuple(complete),
        _unreferenced(store, set(objects)),
        store.temp_files() if isinstance(store, LocalStore) else 0,
        foreign_files(store),
    )


def _unreferenced(store: Store, named: set[str]) -> int:
    if not store.supports_listing:
        return 0
    listed = (key for prefix in (PACKS, SHARDS) for key in store.list_prefix(prefix) if is_object_key(key))
    return sum(1 for key in listed if canonical_key(key) not in named)


def foreign_files(store: Store) -> tuple[str, ...]:
    """Keys under lorachunk's folders whose names are not of its grammar, sorted."""
    if not store.supports_listing:
        return ()
    found = (k for prefix in (MANIFESTS, PACKS, SHARDS) for k in store.list_prefix(prefix) if not is_object_key(k))
    return tuple(sorted(found))
