"""Stores: where packed LoRAs live. Bytes by key; nothing here knows about tensors."""

from __future__ import annotations

from lorachunk.storage._base import ByteRange, Store
from lorachunk.storage._local import LocalStore
from lorachunk.storage._memory import MemoryStore

__all__ = ["ByteRange", "LocalStore", "MemoryStore", "Store"]
