"""Stores: where packed LoRAs live. Bytes by key; nothing here knows about tensors.

:class:`HTTPStore`, :class:`HubStore` and :class:`FsspecStore` load on first use, so importing this
package pulls in neither httpx, huggingface_hub nor fsspec.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorachunk.storage._base import ByteRange, Store
from lorachunk.storage._local import LocalStore
from lorachunk.storage._memory import MemoryStore
from lorachunk.storage._url import open_store

if TYPE_CHECKING:
    from lorachunk.storage._fsspec import FsspecStore
    from lorachunk.storage._http import HTTPStore
    from lorachunk.storage._hub import HubStore

__all__ = ["ByteRange", "FsspecStore", "HTTPStore", "HubStore", "LocalStore", "MemoryStore", "Store", "open_store"]


def __getattr__(name: str) -> Any:
    if name == "HTTPStore":
        from lorachunk.storage._http import HTTPStore

        return HTTPStore
    if name == "HubStore":
        from lorachunk.storage._hub import HubStore

        return HubStore
    if name == "FsspecStore":
        from lorachunk.storage._fsspec import FsspecStore

        return FsspecStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
