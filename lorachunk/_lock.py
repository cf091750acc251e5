"""Writer locks: writers share a store, ``repack`` takes it alone.

restic's rule, for the same reason: ``repack --prune`` deletes what no manifest names, and a
``pack`` running beside it has packs in place that its manifest does not name yet. So every
writer (pack, compose, pull) holds a *shared* lock while it writes, and repack an *exclusive*
one; a writer waits for an exclusive lock to go, repack does not start beside a writer.

A lock is an object ``locks/<32 hex>`` holding JSON: ``{"exclusive", "host", "pid", "command",
"time"}``. A holder rewrites it every :data:`REFRESH` seconds. A lock is *stale*, and ignored (and
removed by whoever finds it), when its ``time`` is over :data:`STALE` seconds old, or when it was
taken on this host by a process that no longer runs (a writer killed with ``kill -9``). A lock
that does not parse is stale too: nothing this code writes is ever partial (writes are atomic).

Taking a lock is: write one's own, then list the others. Two writers that do so at once both see
each other (each wrote before it listed), so at worst both back off; never do both go on.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Final

from lorachunk._exceptions import LorachunkError, StoreError, StoreLockedError
from lorachunk._json import parse_json
from lorachunk._keys import LOCKS
from lorachunk.storage import ByteRange, LocalStore, Store
from lorachunk.storage._local import write_atomic

__all__ = ["REFRESH", "STALE", "WAIT", "LockInfo", "break_locks", "list_locks", "locked"]

#: Seconds between a holder's rewrites of its lock, and the age past which a lock is stale.
REFRESH: Final = 5 * 60.0
STALE: Final = 30 * 60.0
#: Seconds a writer waits for an exclusive lock (a repack) to go, by default.
WAIT: Final = 30 * 60.0
_POLL: Final = 0.2
_KEY: Final = re.compile(rf"{LOCKS}[0-9a-f]{{32}}")
_MAX_LOCK_BYTES: Final = 4096


@dataclass(frozen=True, slots=True)
class LockInfo:
    """One lock in a store: who holds it and since when (``time``: its last refresh, Unix)."""

    key: str
    exclusive: bool
    host: str
    pid: int
    command: str
    time: float

    def __str__(self) -> str:
        kind = "an exclusive" if self.exclusive else "a shared"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(max(0.0, min(self.time, 2.0**31))))
        return f"{kind} lock held by {self.command!r} (pid {self.pid} on {self.host!r}, refreshed {when}, {self.key})"

    @property
    def stale(self) -> bool:
        if time.time() - self.time > STALE:
            return True
        return self.host == socket.gethostname() and not _running(self.pid)


def list_locks(store: Store) -> list[LockInfo | str]:
    """Every lock in ``store``: a :class:`LockInfo`, or the key of one that does not parse."""
    if not store.supports_listing:
        return []
    found: list[LockInfo | str] = []
    for key in sorted(store.list_prefix(LOCKS)):
        if _KEY.fullmatch(key):
            found.append(_read(store, key) or key)
    return found


@contextmanager
def locked(store: Store, *, exclusive: bool, command: str, wait: float = WAIT) -> Iterator[None]:
    """Hold a lock on ``store`` for the block: shared (a writer) or ``exclusive`` (repack).

    Waits up to ``wait`` seconds for the locks in the way to go, then raises
    :class:`StoreLockedError` naming their holders. Stores that cannot be written or listed are
    not locked (nothing in them can be pruned).
    """
    if not (store.supports_writes and store.supports_listing):
        yield
        return
    key = f"{LOCKS}{secrets.token_hex(16)}"
    until = time.monotonic() + wait
    while True:
        _write(store, key, exclusive=exclusive, command=command)
        blocking = _blocking(store, key, exclusive=exclusive)
        if not blocking:
            break
        store.delete(key)
        if time.monotonic() >= until:
            holders = "; ".join(map(str, blocking))
            hint = (
                "run it again once that writer has finished"
                if exclusive
                else "wait for it to finish (or pass a longer wait)"
            )
            raise StoreLockedError(
                f"{store!r} is locked: {holders}. {hint}; if that program is gone for good, "
                "`lorachunk repack --force` breaks its lock"
            )
        time.sleep(_POLL)
    stop = threading.Event()
    refresher = threading.Thread(
        target=_refresh, args=(store, key, exclusive, command, stop), name="lorachunk-lock", daemon=True
    )
    refresher.start()
    try:
        yield
    finally:
        stop.set()
        refresher.join()
        with suppress(LorachunkError, OSError):
            store.delete(key)


def break_locks(store: Store) -> list[LockInfo | str]:
    """Remove every lock in ``store`` (``repack --force``); returns what was removed."""
    found = list_locks(store)
    for lock in found:
        store.delete(lock if isinstance(lock, str) else lock.key)
    return found


def _blocking(store: Store, own: str, *, exclusive: bool) -> list[LockInfo]:
    """The live locks that keep ``own`` from being held; stale ones found on the way are removed."""
    blocking = []
    for lock in list_locks(store):
        if isinstance(lock, str) or lock.stale:
            with suppress(LorachunkError, OSError):
                store.delete(lock if isinstance(lock, str) else lock.key)
            continue
        if lock.key != own and (exclusive or lock.exclusive):
            blocking.append(lock)
    return blocking


def _write(store: Store, key: str, *, exclusive: bool, command: str) -> None:
    body = {"command": command, "exclusive": exclusive, "host": socket.gethostname(), "pid": os.getpid()}
    data = json.dumps(body | {"time": time.time()}, sort_keys=True).encode()
    if isinstance(store, LocalStore):
        # Straight to its place, not into a batch the holder may have open: a lock (or its
        # refresh) that showed only when the batch ends would not keep a repack out meanwhile.
        try:
            write_atomic(store.path(key), data, fsync=False)
        except OSError as exc:
            raise StoreError(f"cannot write {store.path(key)}: {exc.strerror or exc}") from exc
    else:
        store.set(key, data)


def _refresh(store: Store, key: str, exclusive: bool, command: str, stop: threading.Event) -> None:
    while not stop.wait(REFRESH):
        with suppress(LorachunkError, OSError):  # the next refresh tries again; STALE is 6 refreshes away
            _write(store, key, exclusive=exclusive, command=command)


def _read(store: Store, key: str) -> LockInfo | None:
    try:
        raw = parse_json(
            store.get(key, ByteRange(0, _MAX_LOCK_BYTES)), error=StoreError, what=key, parse_constant=_no_constant
        )
        if not isinstance(raw, dict):
            return None
        exclusive, host, pid, command, when = (raw[k] for k in ("exclusive", "host", "pid", "command", "time"))
        if not (
            isinstance(exclusive, bool)
            and isinstance(host, str)
            and isinstance(command, str)
            and isinstance(pid, int)
            and not isinstance(pid, bool)
            and isinstance(when, (int, float))
            and not isinstance(when, bool)
        ):
            return None
        return LockInfo(key, exclusive, host[:256], pid, command[:256], float(when))
    except (LorachunkError, KeyError):
        return None


def _no_constant(name: str) -> float:
    raise StoreError(f"a lock holds {name}, which is not JSON")


def _running(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host. Windows has no signal 0 (``os.kill`` would
    end the process), so there a lock goes stale by age alone."""
    if sys.platform == "win32" or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True
