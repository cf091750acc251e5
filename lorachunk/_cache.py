"""The shared content-addressed cache: verified objects by digest, for every LoRA and source.

Layout under the cache root (itself a valid store of shards)::

    shards/<first 2 hex>/<hex>        stored shard bytes, named by their digest
    manifests/<hex>.json.zst          manifests, named by their id
    raw/<first 2 hex>/<hex>           decoded module bytes, named by the module's raw digest
    bundles/<hex of a root>           every decoded module of one LoRA, back to back in manifest
                                      order (written by a full load; readers check each module)
    refs/<sha256 of a source>         the manifest id last read from a remote source (for offline use)

Only bytes that hash to their name enter (``put`` checks), every write is temp file + fsync +
rename (so processes sharing the cache never see a partial object), and every read is checked
again, so a cache corrupted on disk costs a re-fetch, never a wrong tensor. A hit refreshes the
file's modification time, which is what least-recently-used pruning orders by.

A cache is an optimisation, so one that cannot be written (read-only, full, a file in its place)
never fails a load: writes that only save work later go through :meth:`Cache.keep`, which warns
once (:class:`~lorachunk.CacheWarning`) and then stops trying; hits are still served.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

from lorachunk._digest import check, from_hex, hex_of, split_digest
from lorachunk._exceptions import CacheWarning, IntegrityError, LorachunkError, StoreError, UsageError
from lorachunk._keys import MAX_STORED_MANIFEST_BYTES
from lorachunk._manifest import MAX_SHARD_RAW_BYTES, Manifest
from lorachunk.storage._local import create_temp, open_regular, write_atomic

__all__ = ["Cache", "CacheInfo", "default_cache_dir", "parse_size"]

_KINDS: Final = ("shards", "manifests", "raw", "bundles")
#: Temp files older than this belong to a writer that died; pruning removes them.
_STALE_TMP_S: Final = 3600.0


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


def parse_size(text: str) -> int:
    """``"500MB"``, ``"2GiB"``, ``"10k"`` or plain bytes → bytes."""
    units = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30}
    value = text.strip().lower().removesuffix("b")
    number = value.rstrip("kmgti")
    unit = value[len(number) :]
    try:
        size = float(number) * units[unit]
    except (KeyError, ValueError):
        size = math.nan
    if not 0 <= size < math.inf:
        raise UsageError(f"cannot read size {text!r}; use e.g. 500MB or 2GiB (0 or more)")
    return int(size)


@dataclass(frozen=True, slots=True)
class CacheInfo:
    """What a cache holds."""

    root: Path
    shards: int
    manifests: int
    decoded: int
    bytes: int
    #: LoRAs whose decoded modules are kept as one file (see :meth:`Cache.get_bundle`).
    bundles: int = 0


class Cache:
    """A content-addressed cache folder.

    Parameters
    ----------
    root:
        The folder; :func:`default_cache_dir` when omitted.
    max_size:
        If set, :meth:`enforce_limit` (called by the loader after each load) evicts the least
        recently used objects until the cache holds at most this many bytes.
    decoded:
        Also keep each module's decoded bytes (``raw/``), so a warm CPU load is a memory map plus
        one xxh3 pass instead of a decode. Costs about the LoRA's uncompressed size on disk.
        ``LORACHUNK_CACHE_DECODED=0`` turns it off for the default.
    """

    def __init__(
        self, root: str | os.PathLike[str] | None = None, *, max_size: int | None = None, decoded: bool | None = None
    ) -> None:
        if max_size is not None and max_size < 0:
            raise UsageError(f"max_size must be 0 or more bytes, got {max_size}")
        self.root = Path(root) if root is not None else default_cache_dir()
        self.max_size = max_size
        self.decoded = decoded if decoded is not None else os.environ.get("LORACHUNK_CACHE_DECODED", "1") != "0"
        self._unwritable = False

    def keep(self, write: Callable[[], object]) -> None:
        """Run ``write``, a write to this cache that only saves work later (a fetched shard, a
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
        data = self._read(path, size, MAX_STORED_MANIFEST_BYTES if kind == "manifests" else MAX_SHARD_RAW_BYTES)
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

    def get_raw(self, digest: str, size: int) -> mmap.mmap | bytes | None:
        """A module's decoded bytes (``size`` of them) as a private (copy-on-write) memory map,
        checked; None on a miss.

        Tensors can be views of the map: no copy, and writing to them never touches the file
        (but see docs/security.md: the cache folder must be writable by you alone).
        """
        path = self._path("raw", digest)
        try:
            with open_regular(path) as handle:
                if os.fstat(handle.fileno()).st_size != size:
                    return None
                data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) if size else b""
        except OSError:
            return None
        try:
            check(digest, memoryview(data), what=str(path))
        except IntegrityError:
            with suppress(OSError):  # a read-only cache keeps it, and every read checks it again
                path.unlink(missing_ok=True)
            return None
        with suppress(OSError):
            os.utime(path)
        return data

    def put_raw(self, digest: str, data: bytes | memoryview) -> None:
        """Keep decoded bytes the caller has just checked against ``digest``.

        Written without fsync: every read re-checks the digest, so a file damaged by a crash is
        found and replaced, and the decode it saves is cheaper than a sync per module.
        """
        path = self._path("raw", digest)
        if path.is_file():
            return
        try:
            write_atomic(path, data, fsync=False)
        except OSError as exc:
            raise StoreError(f"cannot write to the cache {self.root}: {exc.strerror or exc}") from exc

    def get_bundle(self, root: str, size: int) -> mmap.mmap | None:
        """Every decoded module of the LoRA with Merkle root ``root``, back to back in manifest
        order, as one private memory map; None unless the file exists and has ``size`` bytes.

        Not checked as a whole (that would read all of it for a partial load): callers check each
        module's slice against its raw digest, and :meth:`drop_bundle` one that does not match.
        One map instead of one per module is what makes a warm load of a LoRA of many small
        modules cheap.
        """
        path = self._bundle_path(root)
        try:
            with open_regular(path) as handle:
                if size == 0 or os.fstat(handle.fileno()).st_size != size:
                    return None
                data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        except OSError:
            return None
        with suppress(OSError):
            os.utime(path)
        return data

    def drop_bundle(self, root: str) -> None:
        with suppress(OSError):  # a read-only cache keeps it; readers check every module they take
            self._bundle_path(root).unlink(missing_ok=True)

    @contextmanager
    def bundle_writer(self, root: str, size: int) -> Iterator[Callable[[int, bytes | memoryview], None]]:
        """Write a bundle for ``root`` piece by piece (``write(offset, data)``); it appears, whole,
        only if the ``with`` block ends without an error. No fsync: readers check every module.

        Best effort, as :meth:`keep` is: if the cache cannot be written, the bundle is dropped
        with one warning and ``write`` does nothing, so the load that feeds it goes on.
        """
        path = self._bundle_path(root)
        handle: BinaryIO | None = None
        tmp: Path | None = None

        def give_up(exc: OSError) -> None:
            nonlocal handle
            self._give_up(StoreError(f"cannot write to the cache {self.root}: {exc.strerror or exc}"))
            if handle is not None:
                with suppress(OSError):
                    handle.close()
            handle = None

        if not self._unwritable:
            try:
                handle, tmp = create_temp(path)
                handle.truncate(size)
            except OSError as exc:
                give_up(exc)

        def write(offset: int, data: bytes | memoryview) -> None:
            if handle is not None:
                try:
                    handle.seek(offset)
                    handle.write(data)
                except OSError as exc:
                    give_up(exc)

        complete = False
        try:
            yield write
            complete = True
        finally:
            if handle is not None:
                try:
                    handle.close()
                    if complete:
                        assert tmp is not None  # made with the handle
                        os.replace(tmp, path)
                        tmp = None
                except OSError as exc:
                    give_up(exc)
            if tmp is not None:
                with suppress(OSError):
                    tmp.unlink()

    def _bundle_path(self, root: str) -> Path:
        split_digest(root)
        return self.root / "bundles" / hex_of(root)

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
        for kind in _KINDS:
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

    def info(self) -> CacheInfo:
        counts = dict.fromkeys(_KINDS, 0)
        total = 0
        for kind, path, stat in self._entries():
            if not path.name.startswith("."):
                counts[kind] += 1
                total += stat.st_size
        return CacheInfo(self.root, counts["shards"], counts["manifests"], counts["raw"], total, counts["bundles"])

    def verify(self) -> list[Path]:
        """Re-hash every entry; remove and return those that do not match their names.

        A bundle is checked module by module against a manifest with its root held in the cache
        (every full load puts it there); a bundle without one is left alone: readers check each
        module they take from it anyway.
        """
        bad = []
        bundles = []
        for kind, path, _ in self._entries():
            if path.name.startswith("."):
                continue
            if kind == "bundles":
                bundles.append(path)
                continue
            try:
                check(from_hex(path.name.removesuffix(".json.zst")), _hashable(path), what=str(path))
            except (IntegrityError, ValueError, OSError):
                self._remove(path)
                bad.append(path)
        if bundles:
            manifests = self._manifests_by_root()
            for path in bundles:
                manifest = manifests.get(path.name)
                if manifest is not None and not _bundle_matches(path, manifest):
                    self._remove(path)
                    bad.append(path)
        return bad

    def _manifests_by_root(self) -> dict[str, Manifest]:
        """Every readable manifest in the cache, by the hex of its root."""
        found = {}
        for kind, path, _ in self._entries():
            if kind != "manifests" or path.name.startswith("."):
                continue
            try:
                with open_regular(path) as handle:
                    manifest = Manifest.from_bytes(handle.read(MAX_STORED_MANIFEST_BYTES + 1))
            except (LorachunkError, OSError):
                continue  # a damaged one was removed above, or is being written
            found[hex_of(manifest.root)] = manifest
        return found

    def prune(self, max_size: int) -> int:
        """Evict least recently used objects until at most ``max_size`` bytes remain; return bytes freed.

        Also removes temp files left by writers that died more than an hour ago.
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
        total = sum(size for _, size, _ in live)
        for _, size, path in sorted(live):
            if total <= max_size:
                break
            self._remove(path)
            total -= size
            freed += size
        return freed

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
        return freed

    def __repr__(self) -> str:
        return f"Cache({str(self.root)!r})"


def _hashable(path: Path) -> memoryview:
    """A cache entry's bytes to hash: a regular file's (not through a link, never a FIFO), mapped
    rather than read, so a huge file costs no memory."""
    with open_regular(path) as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return memoryview(b"")
        return memoryview(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))


def _bundle_matches(path: Path, manifest: Manifest) -> bool:
    try:
        with open_regular(path) as handle:
            if os.fstat(handle.fileno()).st_size != manifest.raw_size:
                return False
            for module in manifest.modules:
                check(module.raw, handle.read(module.raw_size), what=str(path))
    except (IntegrityError, OSError):
        return False
    return True
