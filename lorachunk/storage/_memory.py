"""A store in a dict: for tests and for composing in memory."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from lorachunk._exceptions import ObjectNotFoundError
from lorachunk.storage._base import ByteRange, Store, check_key

__all__ = ["MemoryStore"]


class MemoryStore(Store):
    """Objects held in memory; safe to share between threads."""

    def __init__(self) -> None:
        self._objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def get(self, key: str, byte_range: ByteRange | None = None) -> bytes:
        with self._lock:
            try:
                value = self._objects[check_key(key)]
            except KeyError:
                raise ObjectNotFoundError(f"memory store has no object {key!r}") from None
        if byte_range is None:
            return value
        return value[byte_range.start : byte_range.end]

    def set(self, key: str, value: bytes) -> None:
        with self._lock:
            self._objects[check_key(key)] = bytes(value)

    def exists(self, key: str) -> bool:
        with self._lock:
            return check_key(key) in self._objects

    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(check_key(key), None)

    def list_prefix(self, prefix: str) -> Iterator[str]:
        with self._lock:
            keys = [k for k in self._objects if k.startswith(prefix)]
        yield from keys

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._objects)} objects)"
