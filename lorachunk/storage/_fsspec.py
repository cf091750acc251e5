"""Any fsspec file system (``s3://``, ``gcs://``, ``memory://`` …). The only module importing fsspec."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from contextlib import suppress
from typing import Any

from lorachunk._exceptions import ObjectNotFoundError, StoreError, StoreUnavailableError, UsageError
from lorachunk.storage._base import ByteRange, Store, check_key, shown_url

__all__ = ["FsspecStore"]


class FsspecStore(Store):
    """Objects under an fsspec URL, e.g. ``s3://bucket/loras/my_lora``.

    Needs the ``fsspec`` extra (``pip install lorachunk[fsspec]``) plus the file system's own
    package (``s3fs``, ``gcsfs`` …). ``storage_options`` go to the file system unchanged
    (credentials, ``endpoint_url`` …).

    Writes go to a temporary name first and are then moved into place. On object stores a move is
    copy + delete, so readers never see a partial object; a write that dies half way leaves at
    most an orphaned temporary object named ``.<key>.<random>.tmp``, which listing ignores.
    """

    def __init__(self, url: str, *, storage_options: Mapping[str, Any] | None = None) -> None:
        try:
            import fsspec
        except ImportError:
            raise UsageError(f"{shown_url(url)!r} needs fsspec: pip install 'lorachunk[fsspec]'") from None
        try:
            self.fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        except (ImportError, ValueError) as exc:
            raise UsageError(f"cannot open {shown_url(url)!r} with fsspec: {exc}") from exc
        except OSError as exc:  # file systems that connect at once (ftp, sftp): refused, unreachable
            raise StoreUnavailableError(f"cannot open {shown_url(url)!r}: {exc.strerror or exc}") from exc
        #: As messages show it: credentials in a URL (``ftp://me:pw@host/x``) never appear.
        self.url = shown_url(url)
        self.path = str(path).rstrip("/")

    def _path(self, key: str) -> str:
        return f"{self.path}/{check_key(key)}"

    def get(self, key: str, byte_range: ByteRange | None = None) -> bytes:
        path = self._path(key)
        try:
            if byte_range is None:
                data = self.fs.cat_file(path)
            elif byte_range.end == byte_range.start:
                data = b""  # some file systems read end=start as "to the end"
            else:
                data = self.fs.cat_file(path, start=byte_range.start, end=byte_range.end)
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{self.url}/{key}: no such object") from None
        except OSError as exc:
            if byte_range is not None and self._starts_past_end(path, byte_range.start):
                return b""  # S3 refuses such a range (InvalidRange); a file read gives nothing
            raise StoreError(f"{self.url}/{key}: {exc}") from exc
        return bytes(data)

    def _starts_past_end(self, path: str, start: int) -> bool:
        try:
            return int(self.fs.size(path)) <= start
        except (OSError, TypeError):
            return False

    def set(self, key: str, value: bytes) -> None:
        path = self._path(key)
        parent, _, name = path.rpartition("/")
        tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
        try:
            self.fs.makedirs(parent, exist_ok=True)
            self.fs.pipe_file(tmp, bytes(value))
            self.fs.mv(tmp, path)
        except OSError as exc:
            self._remove(tmp)
            raise StoreError(f"cannot write {self.url}/{key}: {exc}") from exc

    def _remove(self, path: str) -> None:
        with suppress(OSError):
            self.fs.rm_file(path)

    def exists(self, key: str) -> bool:
        try:
            return bool(self.fs.isfile(self._path(key)))
        except OSError as exc:
            raise StoreError(f"{self.url}/{key}: {exc}") from exc

    def delete(self, key: str) -> None:
        try:
            self.fs.rm_file(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreError(f"cannot delete {self.url}/{key}: {exc}") from exc

    def list_prefix(self, prefix: str) -> Iterator[str]:
        try:
            self.fs.invalidate_cache(self.path)  # other writers may have added objects since
            found = self.fs.find(self.path) if self.fs.exists(self.path) else []
        except OSError as exc:
            raise StoreError(f"cannot list {self.url}: {exc}") from exc
        root = self.fs._strip_protocol(self.path).rstrip("/") + "/"
        for full in found:
            key = str(self.fs._strip_protocol(full))[len(root) :] if str(full).startswith(root) else str(full)
            if key.startswith(prefix) and not key.rpartition("/")[2].startswith("."):
                yield key

    def __repr__(self) -> str:
        return f"FsspecStore({self.url!r})"
