"""info: what a packed LoRA holds (modules, splits, sizes, roots, what its store shares), or what
packing a file would store."""

from __future__ import annotations

from contextlib import suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

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
    read_stored_manifest,
    record_key,
    resolve,
    splits_held_whole,
)
from lorachunk._threads import Progress
from lorachunk.storage import LocalStore, MemoryStore, Store

__all__ = ["info_dict", "ls_dicts", "unpacked"]


def info_dict(dest: str, selector: str | None, *, progress: Progress | None = None) -> dict[str, Any]:
    """``info`` of a packed LoRA; of a .safetensors file or PEFT folder, what packing it would give
    (``progress`` follows that pack, which takes seconds for a file of gigabytes)."""
    if unpacked(dest):
        if selector is not None:
            raise UsageError(f"{dest} is not packed, so it has no manifests to choose from")
        memory = MemoryStore()
        pack(dest, memory, progress=progress)
        return _info(memory, None) | {"packed": False}
    with as_store(dest) as store:
        return _info(store, selector) | {"packed": True}


def unpacked(dest: str) -> bool:
    path = Path(dest)
    if path.is_file():
        return True
    return path.is_dir() and (path / ADAPTER_WEIGHTS).is_file() and not (path / LATEST).exists()


def _info(store: Store, selector: str | None) -> dict[str, Any]:
    manifest_id = resolve(store, selector)
    manifest = read_manifest(store, manifest_id)
    manifest_bytes = len(read_stored_manifest(store, manifest_key(manifest_id)))
    all_ids = list_manifest_ids(store) if store.supports_listing else [manifest_id]
    records: dict[str, int] = {}
    referenced = 0
    for other in all_ids:
        for module in read_manifest(store, other).modules if other != manifest_id else manifest.modules:
            records[module.record] = module.stored_size
            referenced += module.stored_size
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
        "store": {
            "manifests": len(all_ids),
            "referenced_stored_bytes": referenced,
            "unique_stored_bytes": sum(records.values()),
        },
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


def ls_dicts(dest: str) -> list[dict[str, Any]]:
    """Every LoRA (manifest) in a store: its source, root, sizes, the stored bytes it shares with
    the others, when it was written (local folders only) and whether it is the latest."""
    with as_store(dest) as store:
        latest = resolve(store, None)
        ids = list_manifest_ids(store) if store.supports_listing else [latest]
        manifests = [read_manifest(store, i) for i in ids]
        users: dict[str, int] = {}
        for manifest in manifests:
            for record in {m.record for m in manifest.modules}:
                users[record] = users.get(record, 0) + 1
        rows = []
        for manifest_id, manifest in zip(ids, manifests, strict=True):
            sizes = {m.record: m.stored_size for m in manifest.modules}
            written = None
            if isinstance(store, LocalStore):
                with suppress(OSError):
                    key = manifest_key(manifest_id)
                    path = store.root / (key if store.exists(key) else flat_twin(key) or key)
                    mtime = path.stat().st_mtime
                    written = datetime.fromtimestamp(mtime, tz=timezone.utc).isoformat(timespec="seconds")
            rows.append(
                {
                    "manifest": manifest_id,
                    "latest": manifest_id == latest,
                    "source": manifest.source.name,
                    "root": manifest.root,
                    "modules": len(manifest.modules),
                    "size": manifest.source.size,
                    "stored_bytes": sum(sizes.values()),
                    "shared_bytes": sum(size for record, size in sizes.items() if users[record] > 1),
                    "written": written,
                }
            )
    return sorted(rows, key=lambda row: (row["written"] or "", row["manifest"]))
