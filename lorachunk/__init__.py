"""lorachunk: chunked, verified storage and distribution of LoRA adapters.

Pack a LoRA into content-addressed, compressed per-module shards with a Merkle manifest, then
fetch, verify and load only the parts you need::

    >>> import lorachunk
    >>> manifest = lorachunk.pack("my_lora.safetensors", "my_lora.lcs")   # doctest: +SKIP
    >>> lorachunk.unpack("my_lora.lcs", "unet.safetensors", splits=["unet"])  # doctest: +SKIP

``import lorachunk`` imports neither torch nor any network client; they load when first used.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from lorachunk._cache import Cache, CacheInfo
from lorachunk._exceptions import (
    FormatError,
    IntegrityError,
    LorachunkError,
    ManifestError,
    ShardNotFoundError,
    StoreError,
    StoreUnavailableError,
    UsageError,
)
from lorachunk._loader import LoRA, PullReport, load, open, pull
from lorachunk._manifest import FORMAT_ID, Manifest, Module, Source, Split, TensorEntry
from lorachunk._pack import VerifyReport, pack, unpack, verify
from lorachunk._repository import read_manifest

try:
    __version__ = version("lorachunk")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "FORMAT_ID",
    "Cache",
    "CacheInfo",
    "FormatError",
    "IntegrityError",
    "LoRA",
    "LorachunkError",
    "Manifest",
    "ManifestError",
    "Module",
    "PullReport",
    "ShardNotFoundError",
    "Source",
    "Split",
    "StoreError",
    "StoreUnavailableError",
    "TensorEntry",
    "UsageError",
    "VerifyReport",
    "__version__",
    "load",
    "open",
    "pack",
    "pull",
    "read_manifest",
    "unpack",
    "verify",
]
