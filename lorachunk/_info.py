"""info: what a packed LoRA holds (modules, splits, sizes, roots, what its store shares), or what
packing a file would store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorachunk._catalog import Catalog, ordered_versions, read_catalog, summary
from lorachunk._exceptions import UsageError
from lorachunk._keys import ADAPTER_WEIGHTS, LATEST, flat_twin, manifest_key
from lorachunk._layout import is_adapter
from lorachunk._manifest import Manifest
from lorachunk._pack import pack
from lorachunk._repository import (
    absent_records,
    as_store,
    list_manifest_ids,
    partial_ids,
    read_manifest,
    record_key,
    resolve,
    split_source,
    splits_held_whole,
)
from lorachunk._threads import Progress
from lorachunk.storage import LocalStore, MemoryStore, Store

__all__ = ["info_dict", "ls_dicts", "unpacked"]


def info_dict(dest: str, selector: str | None, *, progress: Progress | None = None) -> dict[str, Any]:
    """``info`` of a packed LoRA (``dest`` may name one: ``SOURCE#NAME``); of a .safetensors file
    or PEFT folder, what packing it would give (``progress`` follows that pack, which takes
    seconds for a file of gigabytes)."""
    if unpacked(dest):
        if selector is not None:
            raise UsageError(f"{dest} is not packed, so it has no manifests to choose from")
        memory = MemoryStore()
        pack(dest, memory, progress=progress)
        return _info(memory, None) | {"packed": False}
    source, selector = split_source(dest, selector)
    with as_store(source) as store:
        return _info(store, selector) | {"packed": True}


def unpacked(dest: str) -> bool:
    path = Path(dest)
    if path.is_file():
        return True
    return path.is_dir() and (path / ADAPTER_WEIGHTS).is_file() and not (path / LATEST).exists()


def _info(store: Store, selector: str | None) -> dict[str, Any]:
    manifest = read_manifest(store, selector)
    manifest_id = manifest.id
    manifest_bytes = len(manifest.to_bytes())
    # The store's totals from its catalog (one read), else its manifests; a library of many
    # LoRAs says only how many (its totals are `ls`'s job): info of one stays O(1) manifests.
    found = summary(store)
    catalog = Catalog(tuple(ordered_versions(_manifests(store), None))) if found is None else found
    if isinstance(catalog, Catalog):
        totals: dict[str, int | None] = {
            "manifests": len(catalog.versions),
            "names": len(catalog.names()),
            "referenced_stored_bytes": sum(v.stored_size for v in catalog.versions),
            "unique_stored_bytes": sum(min(v.new_bytes, v.stored_size) for v in catalog.versions),
        }
    else:
        totals = dict.fromkeys(("names", "referenced_stored_bytes", "unique_stored_bytes")) | {"manifests": catalog}
    return {
        "source": {"name": manifest.source.name, "size": manifest.source.size, "sha256": manifest.source.sha256},
        "root": manifest.root,
        "manifest": manifest_id,
        "format": manifest.format,
        "packs": len(manifest.packs),
        "hash": manifest.hash,
        "codec": dict(manifest.codec),
        "modules": len(manifest.modules),
        "tensors": sum(len(m.tensors) for m in manifest.modules),
        "raw_bytes": manifest.raw_size,
        "stored_bytes": manifest.stored_size,
        "manifest_bytes": manifest_bytes,
        "ratio": round(manifest.source.size / max(1, manifest.stored_size + manifest_bytes), 4),
        "metadata_keys": len(manifest.metadata or {}),
        "adapter": is_adapter(manifest.owners),
        "files": sorted(manifest.files),
        "splits": [
            {
                "name": split.name,
                "kind": split.kind,
                "modules": len(split.modules),
                "stored_bytes": sum(manifest.module(n).stored_size for n in split.modules),
                "raw_bytes": sum(manifest.module(n).raw_size for n in split.modules),
                "root": split.root,
            }
            for split in manifest.splits
        ],
        "partial": _partial(store, manifest),
        # A module no split names is loaded only whole or by name: said, so no one drops it unaware.
        "in_no_split": sorted({m.name for m in manifest.modules} - {n for s in manifest.splits for n in s.modules}),
        "name": manifest.name,
        "base_model": manifest.base_model,
        "store": totals,
    }


def _partial(store: Store, manifest: Manifest) -> dict[str, Any] | None:
    """What a partial copy (``pull --split``) holds of the LoRA; None for a whole one."""
    if manifest.id not in partial_ids(store):
        return None
    absent = absent_records(store, manifest)
    held = [m for m in manifest.modules if record_key(m) not in absent]
    return {
        "modules": len(held),
        "stored_bytes": sum(m.stored_size for m in {m.record: m for m in held}.values()),
        "splits_held_whole": splits_held_whole(manifest, absent),
    }


def ls_dicts(dest: str, *, all_versions: bool = False) -> list[dict[str, Any]]:
    """The LoRAs of a store, by name: each name's latest version (every version with
    ``all_versions``), from the catalog in one read; a store written before 0.3 (no catalog) by
    reading its manifests. ``shared_bytes``: stored bytes of records a version reuses from those
    added before it (its other ``stored_bytes`` it added)."""
    source, selector = split_source(dest, None)
    if selector is not None:
        raise UsageError("ls lists every LoRA of a store; give the store without #…")
    with as_store(source) as store:
        catalog = read_catalog(store)
        if catalog is None:
            catalog = Catalog(tuple(ordered_versions(_manifests(store), None)))
        rows = []
        last = catalog.versions[-1].manifest if catalog.versions else None
        for name, versions in catalog.names().items():
            shown = versions if all_versions else versions[-1:]
            for version in shown:
                rows.append(
                    {
                        "name": name,
                        "version": versions.index(version) + 1,
                        "versions": len(versions),
                        "manifest": version.manifest,
                        "root": version.root,
                        "stored_bytes": version.stored_size,
                        "raw_bytes": version.raw_size,
                        "shared_bytes": version.stored_size - min(version.new_bytes, version.stored_size),
                        "base_model": version.base_model,
                        "added": version.added,
                        "latest": version.manifest == last,
                    }
                )
    return rows


def _manifests(store: Store) -> list[Manifest]:
    """Every manifest of a store without a catalog (the latest alone where it cannot list)."""
    ids = list_manifest_ids(store) if store.supports_listing else [resolve(store, None)]
    found = [read_manifest(store, i) for i in ids]
    if isinstance(store, LocalStore):  # written order, as the catalog would have had it
        found.sort(key=lambda m: _written(store, m.id))
    return found


def _written(store: LocalStore, manifest_id: str) -> float:
    key = manifest_key(manifest_id)
    try:
        return (store.root / (key if store.exists(key) else flat_twin(key) or key)).stat().st_mtime
    except OSError:
        return 0.0
