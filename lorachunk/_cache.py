"""The cache a load uses: verified objects by digest (:class:`~lorachunk.storage._objects.ObjectCache`)
plus decoded modules, so a warm load is a memory map and a hash instead of a decode.

Layout, besides the object cache's ``shards/``, ``manifests/`` and ``refs/``::

    raw/<first 2 hex>/<hex>           decoded module bytes, named by the module's raw digest
    bundles/<hex of a root>           every decoded module of one LoRA, back to back in manifest
                                      order (written by a full load; readers check each module)
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, ClassVar, Literal

from lorachunk._digest import check, hex_of, split_digest
from lorachunk._exceptions import IntegrityError, LorachunkError, StoreError
from lorachunk._keys import MAX_STORED_MANIFEST_BYTES
from lorachunk._manifest import Manifest
from lorachunk.storage._local import create_temp, open_regular, write_atomic
from lorachunk.storage._objects import ObjectCache, default_cache_dir

__all__ = ["Cache", "CacheInfo", "default_cache_dir"]


@dataclass(frozen=True, slots=True)
class CacheInfo:
    """What a cache holds."""

    root: Path
    records: int
    manifests: int
    decoded: int
    bytes: int
    #: LoRAs whose decoded modules are kept as one file (see :meth:`Cache.get_bundle`).
    bundles: int = 0
    #: Adapter folders (:func:`lorachunk.adapter_path`); their bytes are in ``bytes``.
    adapters: int = 0


class Cache(ObjectCache):
    """A content-addressed cache folder, shared by every LoRA and source.

    Parameters
    ----------
    root:
        The folder; :func:`default_cache_dir` when omitted.
    max_size:
        :meth:`enforce_limit` (called by the loader after each load) evicts the least recently
        used objects until the cache holds at most this many bytes. ``"auto"`` (the default):
        ``$LORACHUNK_CACHE_MAX_SIZE`` (e.g. ``20GB``; ``none`` for no cap), else 10 GB.
        ``None``: no cap.
    decoded:
        Also keep each module's decoded bytes (``raw/``), so a warm CPU load is a memory map plus
        one xxh3 pass instead of a decode. Costs about the LoRA's uncompressed size on disk.
        ``LORACHUNK_CACHE_DECODED=0`` turns it off for the default.
    """

    KINDS: ClassVar[tuple[str, ...]] = ("shards", "manifests", "raw", "bundles")
    DIGEST_NAMED: ClassVar[tuple[str, ...]] = ("shards", "manifests", "raw")

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        max_size: int | Literal["auto"] | None = "auto",
        decoded: bool | None = None,
    ) -> None:
        super().__init__(root, max_size=max_size)
        self.decoded = decoded if decoded is not None else os.environ.get("LORACHUNK_CACHE_DECODED", "1") != "0"

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

    def info(self) -> CacheInfo:
        counts = dict.fromkeys(self.KINDS, 0)
        total = 0
        for kind, path, stat in self._entries():
            if not path.name.startswith("."):
                counts[kind] += 1
                total += stat.st_size
        folders = list(self._adapter_folders())
        total += sum(size for _, size, _ in folders)
        return CacheInfo(
            self.root, counts["shards"], counts["manifests"], counts["raw"], total, counts["bundles"], len(folders)
        )

    def verify(self) -> list[Path]:
        """Re-hash every entry; remove and return those that do not match their names.

        A bundle is checked module by module against a manifest with its root held in the cache
        (every full load puts it there); a bundle without one is left alone: readers check each
        module they take from it anyway.
        """
        bad = super().verify()
        bundles = [path for kind, path, _ in self._entries() if kind == "bundles" and not path.name.startswith(".")]
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
