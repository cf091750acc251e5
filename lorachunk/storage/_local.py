"""A folder on the local file system: the embedded default store."""

from __future__ import annotations

import errno
import functools
import os
import secrets
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO, Final

from lorachunk._exceptions import ObjectNotFoundError, StoreError
from lorachunk.storage._base import ByteRange, Store, check_key

__all__ = ["LocalStore", "create_temp", "open_regular", "write_atomic"]

_BATCH_FSYNC_BYTES: Final = 64 * 1024
_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC: Final = getattr(os, "O_CLOEXEC", 0)
_BINARY: Final = getattr(os, "O_BINARY", 0)


def create_temp(path: Path, *, parents: bool = True, readable: bool = False) -> tuple[BinaryIO, Path]:
    """A new hidden file beside ``path``, open for writing: an unpredictable name created
    exclusively (``O_EXCL``, links not followed), so nothing planted there is written through and
    no two writers share one. Its mode is 0666 less the umask, as for any file a program creates
    (``mkstemp``'s 0600 would keep a web server running as another user from serving a store).
    list_prefix skips hidden names, so a reader never sees it.

    ``parents`` creates missing folders above it; a folder removed meanwhile by a writer tidying
    up its own empty folders is made again. ``readable`` opens it for reading too.
    """
    flags = (os.O_RDWR if readable else os.O_WRONLY) | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC | _BINARY
    for _ in range(16):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        if parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue  # 64 random bits taken already: only by someone guessing; draw again
        except FileNotFoundError:
            if parents:
                continue
            raise
        return os.fdopen(fd, "w+b" if readable else "wb"), tmp
    raise FileExistsError(errno.EEXIST, f"cannot create a temp file beside {path}")


def open_regular(path: Path, *, follow: bool = False) -> BinaryIO:
    """``path`` opened for reading only if it is a regular file, and (unless ``follow``) not
    through a link.

    Without these checks a FIFO planted under an object's name would block the reader forever,
    and a link could make a store read (and an error message echo) a file outside it.
    """
    fd, _ = _open_regular_fd(path, follow=follow)
    return os.fdopen(fd, "rb")


def _open_regular_fd(path: Path, *, follow: bool = False) -> tuple[int, int]:
    """:func:`open_regular` as a descriptor, and the file's size."""
    flags = os.O_RDONLY | _CLOEXEC | _BINARY | getattr(os, "O_NONBLOCK", 0) | (0 if follow else _NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "is a symbolic link, which lorachunk does not follow here") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "is not a regular file")
        return fd, info.st_size
    except BaseException:
        os.close(fd)
        raise


def _pread(fd: int, length: int, offset: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(fd, length, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # Windows has no pread; the descriptor is this call's alone
    return os.read(fd, length)


def _read_range(path: Path, byte_range: ByteRange | None) -> bytes:
    """The bytes of a regular file ``path`` in ``byte_range`` (clipped to the file, as a read is:
    a range from a hostile manifest, 2**62 bytes, allocates nothing), by ``pread`` on a descriptor:
    a record read is one open, one stat and one read, which for a LoRA of hundreds of small
    modules is a good part of a cold load."""
    fd, size = _open_regular_fd(path)
    try:
        start = 0 if byte_range is None else byte_range.start
        end = size if byte_range is None or byte_range.end is None else min(byte_range.end, size)
        pieces = []
        while start < end:
            piece = _pread(fd, end - start, start)
            if not piece:
                break  # shrunk meanwhile: what there is
            pieces.append(piece)
            start += len(piece)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)
    finally:
        os.close(fd)


def write_atomic(path: Path, value: bytes | memoryview, *, fsync: bool = True) -> None:
    """Write ``path`` by temp file + fsync + rename, so no reader ever sees part of it."""
    tmp = _write_temp(path, value, fsync=fsync)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_temp(path: Path, value: bytes | memoryview, *, fsync: bool) -> Path:
    """A hidden temp file beside ``path`` holding ``value``."""
    handle, tmp = create_temp(path)
    try:
        with handle:
            handle.write(value)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


@functools.cache
def _syncfs() -> Callable[[int], None] | None:
    """Linux's syncfs(2), which flushes one whole file system; None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None

    def syncfs(fd: int) -> None:
        if function(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))

    return syncfs


class LocalStore(Store):
    """Objects as files under ``root``; keys map to relative paths.

    Parameters
    ----------
    root:
        The folder. It is created on the first write if missing.
    fsync:
        Flush each object to disk before it becomes visible (the default). Turning it off saves
        the flushes at the price of durability after a power cut; :meth:`batch` keeps the
        durability and saves most of them.
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(
                f"{self.root} exists and is not a folder (a packed LoRA is the folder `lorachunk pack` writes)"
            )
        self._pending: list[tuple[Path, Path]] | None = None
        self._lock = threading.Lock()
        self._serial = threading.local()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Writes in the block go to temp files, renamed into place, in the order written, only
        when the block ends; if it raises, none of its writes appear and its temp files go.

        With ``fsync``, one ``syncfs`` before the renames makes them all durable: one flush of the
        file system instead of an fsync per object, which takes a sixth to nearly half off writing
        the packs of the small real fixtures (docs/benchmarks.md). Where syncfs is missing
        (not Linux) each temp file is flushed as it is written. A crash leaves at worst hidden
        temp files, never a partial object under its name. Writes from several threads are fine.

        syncfs flushes everything unwritten on that file system, other programs' files too: next
        to a program writing gigabytes to the same disk, the flush waits for those as well.
        """
        if self._pending is not None:
            yield
            return
        pending: list[tuple[Path, Path]] = []
        self._pending = pending
        try:
            yield
            self._pending = None
            if pending:
                self._commit(pending)
        finally:
            self._pending = None
            for tmp, _ in pending:  # only those never renamed are still there
                with suppress(OSError):
                    tmp.unlink(missing_ok=True)
                    self._drop_empty_folders(tmp)

    @contextmanager
    def serialized(self) -> Iterator[None]:
        """Held with ``flock`` on the hidden file ``locks/.serial``: the kernel lets it go when
        its process ends however it ends, so a writer killed with ``kill -9`` never leaves it
        held. (Where there is no ``fcntl``, as on Windows, nothing is held.)"""
        try:
            import fcntl
        except ImportError:
            yield
            return
        if getattr(self._serial, "held", False):  # this thread holds it already (flock is per open file)
            yield
            return
        path = self.root / "locks" / ".serial"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o666)
        except OSError as exc:
            raise StoreError(f"cannot lock {self.root}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._serial.held = True
            yield
        finally:
            self._serial.held = False
            os.close(fd)  # closing lets the lock go

    def sync(self) -> None:
        """Make every write so far durable, renames included (before deleting what they replace)."""
        if not self.fsync or not self.root.is_dir():
            return
        try:
            fd = os.open(self.root, os.O_RDONLY)
            try:
                syncfs = _syncfs()
                if syncfs is not None:
                    syncfs(fd)
                else:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StoreError(f"cannot flush {self.root}: {exc.strerror or exc}") from exc

    def _commit(self, pending: list[tuple[Path, Path]]) -> None:
        syncfs = _syncfs() if self.fsync else None
        try:
            if syncfs is not None:
                fd = os.open(self.root, os.O_RDONLY)
                try:
                    syncfs(fd)
                finally:
                    os.close(fd)
            for tmp, path in pending:
                os.replace(tmp, path)
        except OSError as exc:
            raise StoreError(f"cannot write {self.root}: {exc.strerror or exc}") from exc

    def path(self, key: str) -> Path:
        """The file that holds (or would hold) ``key``."""
        return self.root / check_key(key)

    def get(self, key: str, byte_range: ByteRange | None = None) -> bytes:
        path = self.path(key)
        try:
            return _read_range(path, byte_range)
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{path}: no such object") from None
        except OSError as exc:
            raise StoreError(f"{path}: {exc.strerror or exc}") from exc

    def set(self, key: str, value: bytes) -> None:
        path = self.path(key)
        try:
            pending = self._pending
            if pending is None:
                write_atomic(path, value, fsync=self.fsync)
                return
            # A large object is flushed now, on the writer's thread, so the flush at the end of
            # the batch does not wait for it; fsync's fixed cost only dominates for small ones.
            flush_now = self.fsync and (len(value) >= _BATCH_FSYNC_BYTES or _syncfs() is None)
            tmp = _write_temp(path, value, fsync=flush_now)
            with self._lock:
                pending.append((tmp, path))
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc

    def exists(self, key: str) -> bool:
        try:
            return stat.S_ISREG(os.lstat(self.path(key)).st_mode)
        except OSError:
            return False

    def delete(self, key: str) -> None:
        path = self.path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot delete {path}: {exc.strerror or exc}") from exc
        self._drop_empty_folders(path)

    def _drop_empty_folders(self, path: Path) -> None:
        """Remove the folders above ``path`` (up to the root) that are empty, so a rolled-back
        write leaves no trace; rmdir never removes a folder that holds anything."""
        with suppress(OSError):
            for parent in path.relative_to(self.root).parents[:-1]:
                (self.root / parent).rmdir()

    def list_prefix(self, prefix: str) -> Iterator[str]:
        # Walk only the folder the prefix lies in: listing locks/ in a store of 30,000 LoRAs
        # must not visit 60,000 files.
        folder = prefix.rpartition("/")[0]
        top = self.root / folder if folder and check_key(folder) else self.root
        if not top.is_dir() or top.is_symlink():
            return
        for dirpath, _, filenames in os.walk(top):
            relative = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith("."):
                    continue  # temp files of writes in progress
                key = name if relative == "." else f"{relative}/{name}"
                if key.startswith(prefix):
                    yield key

    def temp_files(self) -> int:
        """How many hidden temp files of writes that never finished (a writer killed with
        ``kill -9``) the folder holds; :meth:`list_prefix` skips them, so no reader sees them."""
        return len(list(self._temp_paths()))

    def remove_temp_files(self, *, older_than: float) -> tuple[int, int]:
        """Remove the temp files last written over ``older_than`` seconds ago (a write in
        progress touches its file as it goes); return how many went and how many stayed."""
        removed = kept = 0
        now = time.time()
        for path in self._temp_paths():
            try:
                if now - path.lstat().st_mtime < older_than:
                    kept += 1
                    continue
                path.unlink()
                removed += 1
            except FileNotFoundError:
                continue  # renamed into place or removed by its writer meanwhile
            except OSError as exc:
                raise StoreError(f"cannot delete {path}: {exc.strerror or exc}") from exc
        return removed, kept

    def _temp_paths(self) -> Iterator[Path]:
        if not self.root.is_dir():
            return
        for folder, _, names in os.walk(self.root):
            for name in names:
                if name.startswith(".") and name.endswith(".tmp"):
                    yield Path(folder, name)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"
