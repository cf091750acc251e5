"""Where things live in a store (docs/format.md), and the limits on them.

::

    refs/latest                       text: the manifest id last packed into this store
    refs/latest.json.zst              a copy of that manifest, so a remote reader needs one request
    refs/catalog.json.zst             the catalog: every LoRA by name (:mod:`lorachunk._catalog`)
    refs/partial                      text: ids of manifests this copy holds only some modules of
                                      (written by ``lorachunk pull --split``), one per line
    manifests/<2 hex>/<hex>.json.zst  a manifest, named by the digest of its stored bytes
    packs/<2 hex>/<hex>               module records back to back, named by the digest of the
                                      pack's bytes (lorachunk 0.2 wrote both folders flat:
                                      ``manifests/<hex>.json.zst``, ``packs/<hex>``; still read)
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
    "CATALOG",
    "LATEST",
    "LATEST_MANIFEST",
    "LOCKS",
    "MANIFESTS",
    "MAX_REF_BYTES",
    "MAX_STORED_MANIFEST_BYTES",
    "PACKS",
    "PARTIAL",
    "SHARDS",
    "flat_twin",
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
CATALOG: Final = "refs/catalog.json.zst"
PARTIAL: Final = "refs/partial"
MANIFESTS: Final = "manifests/"
SHARDS: Final = "shards/"
PACKS: Final = "packs/"
LOCKS: Final = "locks/"
_HEX: Final = "(?:[0-9a-f]{32}|[0-9a-f]{64})"
# Fanned out by the first two hex digits (256 folders), so no folder of a store of 30,000 LoRAs
# holds more than ~10,000 entries (the Hub's guidance per folder); flat, as written before 0.3.
_FANNED: Final = "(?P<{0}>[0-9a-f]{{2}})/(?P={0})(?:[0-9a-f]{{30}}|[0-9a-f]{{62}})"
_OBJECT: Final = re.compile(
    rf"(?:{MANIFESTS}(?:{_HEX}|{_FANNED.format('m')})\.json\.zst|{PACKS}(?:{_HEX}|{_FANNED.format('p')})"
    rf"|{SHARDS}{_FANNED.format('s')})"
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
    """Where a manifest is written: ``manifests/<2 hex>/<hex>.json.zst``."""
    hexpart = hex_of(manifest_id)
    return f"{MANIFESTS}{hexpart[:2]}/{hexpart}{_MANIFEST_SUFFIX}"


def manifest_id_of(key: str) -> str:
    """The manifest id a key under ``manifests/`` names (fanned out or flat)."""
    return from_hex(key[len(MANIFESTS) :].removesuffix(_MANIFEST_SUFFIX).rpartition("/")[2])


def pack_key(digest: str) -> str:
    """Where a pack is written: ``packs/<2 hex>/<hex>``."""
    hexpart = hex_of(digest)
    return f"{PACKS}{hexpart[:2]}/{hexpart}"


def pack_id_of(key: str) -> str:
    """The pack digest a key under ``packs/`` names (fanned out or flat)."""
    return from_hex(key[len(PACKS) :].rpartition("/")[2])


def flat_twin(key: str) -> str | None:
    """For a fanned-out pack or manifest key, where lorachunk 0.2 put the same object (the flat
    folder); None for any other key. Readers look there when an object is not where 0.3 puts it."""
    for prefix in (PACKS, MANIFESTS):
        head, sep, tail = key.removeprefix(prefix).partition("/")
        if key.startswith(prefix) and sep and len(head) == 2 and tail.startswith(head):
            return prefix + tail
    return None
