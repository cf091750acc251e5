"""The Store abstraction: bytes by key, nothing about tensors or LoRAs."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Final
from urllib.parse import urlsplit, urlunsplit

from lorachunk._exceptions import UsageError

__all__ = ["ByteRange", "Store", "check_key"]

# Keys are relative POSIX paths of plain names: no "..", no absolute paths, no backslashes, so a
# hostile manifest or ref cannot make a store touch anything outside its root.
_KEY: Final = re.compile(r"^[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*$")


def shown_url(url: str) -> str:
    """``url`` as messages show it: without user info or query, either of which may hold a secret."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"***@{host}" if "@" in parts.netloc else host
    return urlunsplit((parts.scheme, netloc, parts.path, "…" if parts.query else "", ""))


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe store key, else raise :class:`UsageError`."""
    if not _KEY.match(key) or any(part in {".", ".."} for part in key.split("/")):
        raise UsageError(f"invalid store key {key!r}")
    return key


@dataclass(frozen=True, slots=True)
class ByteRange:
    """Bytes ``[start, end)`` of an object; ``end=None`` means to the end."""

    start: int
    end: int | None = None

    def __post_init__(self) -> None:
        if self.start < 0 or (self.end is not None and self.end < self.start):
            raise ValueError(f"invalid byte range {self.start}..{self.end}")


class Store(ABC):
    """Objects by key. Writes are atomic; content-addressed writes are idempotent.

    Subclasses implement the five abstract methods; the capability properties say what a store
    can do, so callers can check before they try.
    """

    supports_writes: bool = True
    supports_listing: bool = True
    #: The store may not touch the network now (e.g. ``HF_HUB_OFFLINE=1``): readers use the cache alone.
    offline: bool = False

    @abstractmethod
    def get(self, key: str, byte_range: ByteRange | None = None) -> bytes:
        """Return the object (or the part ``byte_range`` names).

        A range reaching past the end gives the bytes there are, as a file read does: readers
        ask for one byte more than they expect, to bound what a hostile server can send.
        Raises :class:`~lorachunk.ObjectNotFoundError` if there is no such object.
        """

    @abstractmethod
    def set(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key`` atomically: readers see the old object or the new, never a part."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; removing a missing key is not an error."""

    @abstractmethod
    def list_prefix(self, prefix: str) -> Iterator[str]:
        """Yield every key that starts with ``prefix``, in no particular order."""

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Many writes follow: the store may make them visible together when the block ends.

        By default each write is visible at once. A store that defers them (:class:`LocalStore`)
        shows none of them if the block raises.
        """
        yield

    @contextmanager
    def deadline(self, seconds: float | None) -> Iterator[None]:
        """Every request in the block ends within ``seconds`` of its start (None: no limit),
        retries included; past it, :class:`~lorachunk.StoreUnavailableError`. Stores without a
        network (a folder) have nothing to bound."""
        yield

    @contextmanager
    def serialized(self) -> Iterator[None]:
        """A block that reads mutable objects (refs) and writes them back: no other program's
        such block on this store runs at the same time.

        By default nothing is held: stores without a way to hold a lock (object stores, the Hub)
        take one writer at a time for what they share (docs/security.md).
        """
        yield

    @property
    def identity(self) -> str:
        """Where this store's objects come from, stable across runs and free of secrets: what
        the cache keys its memory of the store by (the latest manifest seen, for offline use).

        The default is ``repr``; stores whose address has parts ``repr`` leaves out override it.
        """
        return repr(self)

    def close(self) -> None:  # noqa: B027 - optional hook, deliberately not abstract
        """Release connections or handles; the default has none."""

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
