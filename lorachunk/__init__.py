"""lorachunk: chunked, verified storage and distribution of LoRA adapters.

Pack a LoRA into compressed per-module records in a few content-addressed pack objects, with a
Merkle manifest, then fetch, verify and load only the parts you need::

    >>> import lorachunk
    >>> manifest = lorachunk.pack("my_lora.safetensors", "my_lora.lcs")   # doctest: +SKIP
    >>> lorachunk.unpack("my_lora.lcs", "unet.safetensors", splits=["unet"])  # doctest: +SKIP

``import lorachunk`` imports neither torch nor any network client; they load when first used.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from lorachunk._adapter import adapter_path
from lorachunk._cache import Cache, CacheInfo
from lorachunk._compose import Take, compose
from lorachunk._exceptions import (
    AuthenticationError,
    BaseModelWarning,
    CacheWarning,
    FormatError,
    IntegrityError,
    LorachunkError,
    ManifestError,
    ObjectNotFoundError,
    RepositoryNotFoundError,
    ShardNotFoundError,
    StoreError,
    StoreLockedError,
    StoreUnavailableError,
    UsageError,
)
from lorachunk._info import ls_dicts as ls
from lorachunk._loader import LoRA, PullReport, load, open
from lorachunk._manifest import FORMAT_ID, Manifest, Module, Source, Split, TensorEntry
from lorachunk._pack import pack
from lorachunk._pull import pull
from lorachunk._remove import remove
from lorachunk._repack import RepackReport, repack
from lorachunk._repository import read_manifest
from lorachunk._unpack import unpack
from lorachunk._verify import VerifyReport, verify

if TYPE_CHECKING:
    from lorachunk._push import PushResult, push

try:
    __version__ = version("lorachunk")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "FORMAT_ID",
    "AuthenticationError",
    "BaseModelWarning",
    "Cache",
    "CacheInfo",
    "CacheWarning",
    "FormatError",
    "IntegrityError",
    "LoRA",
    "LorachunkError",
    "Manifest",
    "ManifestError",
    "Module",
    "ObjectNotFoundError",
    "PullReport",
    "PushResult",
    "RepackReport",
    "RepositoryNotFoundError",
    "ShardNotFoundError",
    "Source",
    "Split",
    "StoreError",
    "StoreLockedError",
    "StoreUnavailableError",
    "Take",
    "TensorEntry",
    "UsageError",
    "VerifyReport",
    "__version__",
    "adapter_path",
    "compose",
    "load",
    "ls",
    "open",
    "pack",
    "pull",
    "push",
    "read_manifest",
    "remove",
    "repack",
    "unpack",
    "verify",
]


def __getattr__(name: str) -> Any:
    # The Hub client loads on first use: ``import lorachunk`` stays light.
    if name in {"push", "PushResult"}:
        from lorachunk import _push

        return getattr(_push, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
