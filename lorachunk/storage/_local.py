"""A folder on the local file system: the embedded default store."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

from lorachunk._exceptions import ShardNotFoundError, StoreError
from lorachunk.storage._base import ByteRange, Store, check_key

__all__ = ["LocalStore", "write_atomic"]


def write_atomic(path: Path, value: bytes | memoryview, *, fsync: bool = True) -> None:
    """Write ``path`` by temp file + fsync + rename, so no reader ever sees part of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(value)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LocalStore(Store):
    """Objects as files under ``root``; keys map to relative paths.

    Parameters
    ----------
    root:
        The folder. It is created on the first write if missing.
    fsync:
        Flush each object to disk before it becomes visible (the default). Turning it off makes
        packing many tiny shards faster at the price of durability after a power cut.
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{self.root} exists and is not a folder")

    def path(self, key: str) -> Path:
        """The file that holds (or would hold) ``key``."""
        return self.root / check_key(key)

    def get(self, key: str, byte_range: ByteRange | None = None) -> bytes:
        path = self.path(key)
        try:
            with path.open("rb") as handle:
                if byte_range is None:
                    return handle.read()
                handle.seek(byte_range.start)
                return handle.read(-1 if byte_range.end is None else byte_range.end - byte_range.start)
        except FileNotFoundError:
            raise ShardNotFoundError(f"{path}: no such object") from None
        except OSError as exc:
            raise StoreError(f"{path}: {exc.strerror or exc}") from exc

    def set(self, key: str, value: bytes) -> None:
        path = self.path(key)
        try:
            write_atomic(path, value, fsync=self.fsync)
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        path = self.path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot delete {path}: {exc.strerror or exc}") from exc
        # Drop fan-out folders left empty, so a rolled-back write leaves no trace.
        with suppress(OSError):
            for parent in path.relative_to(self.root).parents[:-1]:
                (self.root / parent).rmdir()

    def list_prefix(self, prefix: str) -> Iterator[str]:
        if not self.root.is_dir():
            return
        for dirpath, _, filenames in os.walk(self.root):
            relative = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith("."):
                    continue  # temp files of writes in progress
                key = name if relative == "." else f"{relative}/{name}"
                if key.startswith(prefix):
                    yield key

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"
