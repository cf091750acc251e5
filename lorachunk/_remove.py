"""remove: a LoRA (a name, or one version of it) taken out of a store's catalog and manifests;
``repack --prune`` then frees the records nothing else names."""

from __future__ import annotations

import os

from lorachunk._catalog import read_catalog, update_catalog
from lorachunk._exceptions import LorachunkError, UsageError
from lorachunk._keys import LATEST, LATEST_MANIFEST, flat_twin, manifest_key
from lorachunk._lock import locked
from lorachunk._repository import (
    as_store,
    latest_id,
    manifest_objects,
    mark_partial,
    read_manifest,
    rebuild_catalog,
    split_source,
)
from lorachunk.storage import Store

__all__ = ["remove"]


def remove(source: str | os.PathLike[str] | Store, *, manifest: str | None = None) -> list[str]:
    """Remove a LoRA from the store ``source``: ``SOURCE#NAME`` every version of the name,
    ``#NAME@N`` version N, ``#<manifest id or prefix>`` or ``#<root>`` those versions. Returns
    the manifest ids removed.

    Its manifests go and the catalog says so; if the store's latest was one of them, the latest
    becomes the newest version left. Its records stay until ``lorachunk repack --prune`` (which
    keeps whatever another LoRA still names). Readers that pinned a removed version's manifest id
    get :class:`ObjectNotFoundError`; other LoRAs are untouched.
    """
    source, selector = split_source(source, manifest)
    if selector is None:
        raise UsageError("name what to remove: SOURCE#NAME, SOURCE#NAME@N or SOURCE#<manifest id>")
    with as_store(source) as store:
        if not (store.supports_writes and store.supports_listing):
            raise UsageError(f"{store!r} cannot be changed here: remove needs a store it can list and write")
        with locked(store, exclusive=False, command="rm"), store.serialized():
            catalog = read_catalog(store) or rebuild_catalog(store)
            versions = catalog.find(selector)
            if not versions:
                raise UsageError(f"{selector!r} names no LoRA in {store!r} (see `lorachunk ls`)")
            removed = [v.manifest for v in versions]
            update_catalog(store, [], removed)
            left = catalog.removed(removed).versions
            try:
                latest = latest_id(store)
            except LorachunkError:
                latest = None
            if latest in removed:
                if left:
                    for key, value in manifest_objects(read_manifest(store, left[-1].manifest))[1:]:
                        store.set(key, value)
                else:
                    store.delete(LATEST_MANIFEST)
                    store.delete(LATEST)
            for manifest_id in removed:
                mark_partial(store, manifest_id, partial=False)
                key = manifest_key(manifest_id)
                store.delete(key)
                store.delete(flat_twin(key) or key)
    return removed
