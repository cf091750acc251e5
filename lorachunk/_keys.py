"""Where things live in a store (docs/format.md), and the limits on them.

::

    refs/latest                       text: the manifest id last packed into this store
    refs/latest.json.zst              a copy of that manifest, so a remote reader needs one request
    refs/partial                      text: ids of manifests this copy holds only some modules of
                                      (written by ``lorachunk pull --split``), one per line
    manifests/<hex>.json.zst          a manifest, named by the digest of its stored bytes
    packs/<hex>                       lorachunk/2: module records back to back, named by the
                                      digest of the pack's bytes
    shards/<first 2 hex>/<hex>        lorachunk/1: one module's record, named by its digest
    locks/<32 hex>                    a writer's lock (:mod:`lorachunk._lock`)

Only names of this grammar are lorachunk's (:func:`is_object_key`): a ``README.md`` a user puts
in ``packs/`` is listed as not lorachunk's and never read as an object, nor deleted.

Names only: no store is touched here.
"""

from __future__ import annotations

import re
from typing import Final

from lorachunk._digest import from_hex, hex_of

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "LATEST",
    "LATEST_MANIFEST",
    "LOCKS",
    "MANIFESTS",
    "MAX_REF_BYTES",
    "MAX_STORED_MANIFEST_BYTES",
    "PACKS",
    "PARTIAL",
    "SHARDS",
    "is_object_key",
    "manifest_id_of",
    "manifest_key",
    "pack_id_of",
    "pack_key",
    "shard_key",
]

#: A PEFT adapter folder: its weights, and the config that travels in the manifest with them.
ADAPTER_WEIGHTS: Final = "adapter_model.safetensors"
ADAPTER_CONFIG: Final = "adapter_config.json"

LATEST: Final = "refs/latest"
LATEST_MANIFEST: Final = "refs/latest.json.zst"
PARTIAL: Final = "refs/partial"
MANIFESTS: Final = "manifests/"
SHARDS: Final = "shards/"
PACKS: Final = "packs/"
LOCKS: Final = "locks/"
_HEX: Final = "(?:[0-9a-f]{32}|[0-9a-f]{64})"
_OBJECT: Final = re.compile(
    rf"(?:{MANIFESTS}{_HEX}\.json\.zst|{PACKS}{_HEX}|{SHARDS}(?P<fan>[0-9a-f]{{2}})/(?P=fan)(?:[0-9a-f]{{30}}|[0-9a-f]{{62}}))"
)
_MANIFEST_SUFFIX: Final = ".json.zst"
#: A manifest's stored (compressed) bytes may not exceed this; checked before decompressing.
MAX_STORED_MANIFEST_BYTES: Final = 64 * 1024 * 1024
#: ``refs/latest`` holds one manifest id: anything longer is not one.
MAX_REF_BYTES: Final = 1024


def is_object_key(key: str) -> bool:
    """Whether ``key`` names a manifest, pack or ``lorachunk/1`` shard (not a user's file)."""
    return _OBJECT.fullmatch(key) is not None


def shard_key(digest: str) -> str:
    hexpart = hex_of(digest)
    return f"{SHARDS}{hexpart[:2]}/{hexpart}"


def manifest_key(manifest_id: str) -> str:
    return f"{MANIFESTS}{hex_of(manifest_id)}{_MANIFEST_SUFFIX}"


def manifest_id_of(key: str) -> str:
    """The manifest id a key under ``manifests/`` names."""
    return from_hex(key[len(MANIFESTS) :].removesuffix(_MANIFEST_SUFFIX))


def pack_key(digest: str) -> str:
    return f"{PACKS}{hex_of(digest)}"


def pack_id_of(key: str) -> str:
    """The pack digest a key under ``packs/`` names."""
    return from_hex(key[len(PACKS) :])
