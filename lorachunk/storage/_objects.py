"""The digest-addressed object cache: verified records and manifests by digest, for every source.

Layout under the cache root (itself a valid store of records)::

    shards/<first 2 hex>/<hex>        verified records, named by their digest (the folder keeps 0.1's name)
    manifests/<hex>.json.zst          manifests, named by their id
    refs/<sha256 of a source>         the manifest id last read from a remote store (for offline use)

Only bytes that hash to their name enter (``put`` checks), every write is temp file + rename (so
processes sharing the cache never see a partial object), and every read is checked again, so a
cache corrupted on disk costs a re-fetch, never a wrong byte. An entry is read only if it is a
regular file of the size its reader expects. A hit refreshes the file's modification time, which
is what least-recently-used pruning orders by.

A cache is an optimisation, so one that cannot be written (read-only, full, a file in its place)
never fails a load: writes that only save work later go through :meth:`ObjectCache.keep`, which
warns once (:class:`~lorachunk.CacheWarning`) and then stops trying; hits are still served.
:class:`lorachunk.Cache` adds decoded modules to this.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import secrets
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import ClassVar, Final, Literal

from lorachunk._digest import check, from_hex, hex_of, split_digest
from lorachunk._exceptions import CacheWarning, IntegrityError, StoreError, UsageError
from lorachunk._keys import MAX_STORED_MANIFEST_BYTES
from lorachunk._manifest import MAX_MODULE_RAW_BYTES
from lorachunk._units import parse_size
from lorachunk.storage._local import open_regular, write_atomic

__all__ = ["ObjectCache", "default_cache_dir", "key_lock"]

#: Temp files older than this belong to a writer that died; pruning removes them.
_STALE_TMP_S: Final = 3600.0

#: An adapter folder (lorachunk.adapter_path) asked for within this long is never evicted: the
#: engine that asked may not have opened it yet.
ADAPTER_GRACE_S: Final = 600.0


#: The cache's size cap unless ``LORACHUNK_CACHE_MAX_SIZE`` or ``max_size=`` says otherwise.
DEFAULT_MAX_SIZE: Final = 10 * 10**9


def default_max_size() -> int | None:
    """``$LORACHUNK_CACHE_MAX_SIZE`` (``20GB``, ``500MiB``; ``none`` for no cap), else 10 GB."""
    configured = os.environ.get("LORACHUNK_CACHE_MAX_SIZE", "").strip()
    if not configured:
        return DEFAULT_MAX_SIZE
    if configured.lower() in {"none", "unlimited"}:
        return None
    try:
        return parse_size(configured)
    except UsageError as exc:
        raise UsageError(f"LORACHUNK_CACHE_MAX_SIZE: {exc}") from None


def default_cache_dir() -> Path:
    """``$LORACHUNK_CACHE``, else the platform's user cache folder + ``lorachunk``."""
    configured = os.environ.get("LORACHUNK_CACHE")
    if configured:
        return Path(configured).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lorachunk"


class ObjectCache:
    """A folder of verified objects by digest. ``max_size``: :meth:`enforce_limit` (called after
    each load) evicts the least recently used objects until it holds at most this many bytes."""

    #: The folders of objects, and those whose entries are named by the digest of their bytes.
    KINDS: ClassVar[tuple[str, ...]] = ("shards", "manifests")
    DIGEST_NAMED: ClassVar[tuple[str, ...]] = ("shards", "manifests")

    def __init__(
        self, root: str | os.PathLike[str] | None = None, *, max_size: int | Literal["auto"] | None = "auto"
    ) -> None:
        if max_size == "auto":
            max_size = default_max_size()
        if not (max_size is None or isinstance(max_size, int)) or isinstance(max_size, bool) or (max_size or 0) < 0:
            raise UsageError(f"max_size must be 0 or more bytes, None or 'auto', got {max_size!r}")
        self.root = Path(root) if root is not None else default_cache_dir()
        self.max_size = max_size
        self._unwritable = False

    def keep(self, write: Callable[[], object]) -> None:
        """Run ``write``, a write to this cache that only saves work later (a fetched record, a
        decoded module, a manifest, pruning to ``max_size``).

        If the cache cannot be written, the first failure warns (:class:`~lorachunk.CacheWarning`)
        and later calls do nothing, so the caller's load goes on without the cache. Writes that
        are the point of the call (``prefetch``, ``lorachunk cache prune``) call the method itself
        and get its :class:`StoreError`.
        """
        if self._unwritable:
            return
        try:
            write()
        except StoreError as exc:
            self._give_up(exc)

    def _give_up(self, exc: Exception) -> None:
        self._unwritable = True
        warnings.warn(f"{exc}; going on without writing to the cache", CacheWarning, stacklevel=4)

    def _remove(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot remove {path} from the cache: {exc.strerror or exc}") from exc

    def _path(self, kind: str, digest: str) -> Path:
        split_digest(digest)
        hexpart = hex_of(digest)
        if kind == "manifests":
            return self.root / kind / f"{hexpart}.json.zst"
        return self.root / kind / hexpart[:2] / hexpart

    def _read(self, path: Path, size: int | None, limit: int) -> bytes | None:
        """The entry at ``path`` if it is a regular file (not a link, not a FIFO) of ``size``
        bytes (at most ``limit``), else None; a wrong one is removed. Nothing is read before
        its size is known to be right, so a huge or sparse file costs nothing."""
        try:
            with open_regular(path) as handle:
                actual = os.fstat(handle.fileno()).st_size
                if (size is not None and actual != size) or actual > limit:
                    raise IntegrityError(f"{path}: {actual} bytes")
                return handle.read()
        except FileNotFoundError:
            return None
        except (OSError, IntegrityError):
            with suppress(OSError):  # a read-only cache keeps it, and every read checks it again
                path.unlink(missing_ok=True)
            return None

    def get(self, digest: str, *, kind: str = "shards", size: int | None = None) -> bytes | None:
        """The object named ``digest`` (of ``size`` bytes, when the caller knows), checked
        again; None on a miss or a wrong entry (removed)."""
        path = self._path(kind, digest)
        data = self._read(path, size, MAX_STORED_MANIFEST_BYTES if kind == "manifests" else MAX_MODULE_RAW_BYTES)
        if data is None:
            return None
        try:
            check(digest, data, what=str(path))
        except IntegrityError:
            with suppress(OSError):  # a read-only cache keeps it, and every read checks it again
                path.unlink(missing_ok=True)
            return None
        with suppress(OSError):  # a read-only cache still serves hits; it just cannot order them for pruning
            os.utime(path)
        return data

    def put(self, digest: str, data: bytes | memoryview, *, kind: str = "shards") -> None:
        """Store ``data`` under ``digest``; :class:`IntegrityError` if it does not hash to it."""
        check(digest, data, what=f"object for the cache {digest}")
        path = self._path(kind, digest)
        if path.is_file():
            return
        try:
            write_atomic(path, data)
        except OSError as exc:
            raise StoreError(f"cannot write to the cache {self.root}: {exc.strerror or exc}") from exc

    def get_ref(self, source: str) -> str | None:
        """The manifest id last read from ``source`` (a remote store's identity), or None."""
        data = self._read(self._ref_path(source), None, 1024)
        try:
            value = (data or b"").decode("ascii").strip()
            split_digest(value)
        except ValueError:
            return None
        return value

    def set_ref(self, source: str, manifest_id: str) -> None:
        """Remember ``manifest_id`` as what ``source`` pointed at, so it opens offline later."""
        split_digest(manifest_id)
        path = self._ref_path(source)
        with suppress(OSError):  # a ref only saves a round trip later; a read-only cache still works
            if self.get_ref(source) != manifest_id:
                write_atomic(path, f"{manifest_id}\n".encode(), fsync=False)

    def _ref_path(self, source: str) -> Path:
        return self.root / "refs" / hashlib.sha256(source.encode()).hexdigest()

    def contains(self, digest: str, *, kind: str = "shards") -> bool:
        return self._path(kind, digest).is_file()

    def _entries(self) -> Iterator[tuple[str, Path, os.stat_result]]:
        for kind in self.KINDS:
            base = self.root / kind
            if not base.is_dir():
                continue
            for dirpath, _, filenames in os.walk(base):
                for name in filenames:
                    path = Path(dirpath) / name
                    try:
                        yield kind, path, path.lstat()
                    except FileNotFoundError:
                        continue  # removed by another process meanwhile

    def verify(self) -> list[Path]:
        """Re-hash every digest-named entry; remove and return those that do not match their names."""
        bad = []
        for kind, path, _ in self._entries():
            if path.name.startswith(".") or kind not in self.DIGEST_NAMED:
                continue
            try:
                check(from_hex(path.name.removesuffix(".json.zst")), _hashable(path), what=str(path))
            except (IntegrityError, ValueError, OSError):
                self._remove(path)
                bad.append(path)
        return bad

    def prune(self, max_size: int) -> int:
        """Evict least recently used objects and adapter folders until at most ``max_size`` bytes
        remain; return bytes freed.

        An adapter folder in use is never evicted: one asked for in the last 10 minutes, or one a
        process holds (``adapter_path(hold=True)``, as the vLLM plug-in asks), or one being
        written. Also removes temp files left by writers that died more than an hour ago.
        """
        now = time.time()
        live: list[tuple[float, int, Path]] = []
        freed = 0
        for _, path, stat in self._entries():
            if path.name.startswith("."):
                if now - stat.st_mtime > _STALE_TMP_S:
                    self._remove(path)
                    freed += stat.st_size
                continue
            live.append((stat.st_mtime, stat.st_size, path))
        live.extend(self._adapter_folders())
        total = sum(size for _, size, _ in live)
        for used, size, path in sorted(live):
            if total <= max_size:
                break
            if path.is_dir():
                if now - used < ADAPTER_GRACE_S or not _evict_folder(path):
                    continue  # in use: kept, over the cap if need be
            else:
                self._remove(path)
            total -= size
            freed += size
        return freed

    def _adapter_folders(self) -> Iterator[tuple[float, int, Path]]:
        """(last used, bytes, path) of each adapter folder, each made whole and never changed."""
        adapters = self.root / "adapters"
        if not adapters.is_dir() or adapters.is_symlink():
            return
        for folder in adapters.iterdir():
            with suppress(OSError):
                stat = folder.lstat()
                if folder.name.startswith(".") or not folder.is_dir() or folder.is_symlink():
                    continue
                yield stat.st_mtime, sum(f.lstat().st_size for f in folder.iterdir()), folder

    def enforce_limit(self) -> int:
        return self.prune(self.max_size) if self.max_size is not None else 0

    def clear(self) -> int:
        """Remove everything; return the bytes freed."""
        freed = 0
        for _, path, stat in list(self._entries()):
            self._remove(path)
            freed += stat.st_size
        refs = self.root / "refs"
        for path in refs.iterdir() if refs.is_dir() else ():
            self._remove(path)
        # Adapter folders (lorachunk.adapter_path): removed whole, unless a process holds one.
        for _, size, folder in list(self._adapter_folders()):
            if _evict_folder(folder):
                freed += size
        return freed

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"


@contextmanager
def key_lock(folder: Path, key: str, *, shared: bool = False, wait: bool = True) -> Iterator[int | None]:
    """``flock`` on ``folder/.<key>.lock``: exclusive to make or evict what ``key`` names,
    shared to hold it in use. Yields the descriptor, or None when ``wait=False`` and another
    process holds it. Released by the kernel however its holder ends. Without flock (Windows)
    nothing is locked: each writer writes its own temp folder and one rename wins."""
    try:
        import fcntl
    except ImportError:
        yield -1
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / f".{key}.lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as exc:
        raise StoreError(f"cannot write {folder}: {exc.strerror or exc}") from exc
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield None
            return
        yield fd
    finally:
        os.close(fd)


def _evict_folder(folder: Path) -> bool:
    """Remove an adapter folder unless a process holds or is writing it. It is renamed away
    first, so an engine never sees part of one."""
    with key_lock(folder.parent, folder.name, wait=False) as fd:
        if fd is None:
            return False
        gone = folder.with_name(f".{folder.name}.{secrets.token_hex(8)}.tmp")  # a killed eviction: stale tmp
        try:
            os.rename(folder, gone)
        except OSError:
            return False
        shutil.rmtree(gone, ignore_errors=True)
        return True


def _hashable(path: Path) -> memoryview:
    """A cache entry's bytes to hash: a regular file's (not through a link, never a FIFO), mapped
    rather than read, so a huge file costs no memory."""
    with open_regular(path) as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return memoryview(b"")
        return memoryview(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))
