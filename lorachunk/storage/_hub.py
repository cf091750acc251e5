"""The Hugging Face Hub: read packed LoRAs from a repo, write to one. The only module importing huggingface_hub.

A repo holds the same layout as a local folder (``refs/latest``, ``manifests/``, ``packs/``), at
its root or under a path, so a clone is a valid :class:`~lorachunk.storage.LocalStore` and several
LoRAs or versions share one repo's packs.

Reading resolves the revision to a commit once, then fetches every object of that commit through
:class:`~lorachunk.storage.HTTPStore` (concurrent, resumable, verified by the loader) from the
Hub's ``resolve`` URLs. :class:`HubRepo` is the write side, for ``lorachunk.push``: one
``create_commit`` holding the files given; huggingface_hub does the upload.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn
from urllib.parse import quote, unquote

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub import errors as hub_errors
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RevisionNotFoundError,
)
from huggingface_hub.errors import RepositoryNotFoundError as HubRepoNotFound
from huggingface_hub.hf_api import RepoFile

from lorachunk._exceptions import (
    AuthenticationError,
    ObjectNotFoundError,
    RepositoryNotFoundError,
    StoreError,
    StoreUnavailableError,
    UsageError,
)
from lorachunk._keys import LATEST, LATEST_MANIFEST, MAX_STORED_MANIFEST_BYTES
from lorachunk.storage._base import ByteRange, Store, check_key
from lorachunk.storage._http import HTTPStore, is_network_error

__all__ = ["REPO_ID", "Commit", "HubRepo", "HubStore", "parse_hf_url"]

REPO_ID: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_REPO_TYPES: Final = ("model", "dataset")
#: The first object read (the latest manifest's copy, else the ref) is read up to one byte past
#: the manifest limit: enough for the reader to refuse an oversized one, and no more.
_FIRST_LIMIT: Final = MAX_STORED_MANIFEST_BYTES + 1


#: huggingface_hub 1.x is built on httpx and 2.x on httpx2; the transport errors it lets through
#: (connection refused, timeouts, dropped connections) are those of whichever client it uses, and
#: its errors module takes that client's HTTPError, the root of them all.
_CLIENT_ERRORS: Final = tuple(c for c in (getattr(hub_errors, "HTTPError", None),) if isinstance(c, type))


def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; a program may set it later.
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _endpoint(endpoint: str | None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _check_repo(repo_id: str, repo_type: str) -> None:
    if not REPO_ID.match(repo_id) or ".." in repo_id:
        raise UsageError(f"invalid Hub repo id {repo_id!r}; expected 'namespace/name'")
    if repo_type not in _REPO_TYPES:
        raise UsageError(f"repo_type must be one of {_REPO_TYPES}, got {repo_type!r}")


def parse_hf_url(url: str) -> dict[str, str | None]:
    """``hf://[datasets/]NAMESPACE/NAME[@REVISION][/PATH]`` → ``repo_id``, ``repo_type``, ``revision``, ``path``.

    A revision with a slash (``refs/pr/1``) is written URL-encoded: ``@refs%2Fpr%2F1``.
    """
    rest = url.removeprefix("hf://")
    repo_type = "model"
    for prefix, kind in (("datasets/", "dataset"), ("models/", "model")):
        if rest.startswith(prefix):
            rest, repo_type = rest[len(prefix) :], kind
    parts = rest.split("/")
    if len(parts) < 2:
        raise UsageError(f"cannot read Hub URL {url!r}; expected hf://NAMESPACE/NAME[@REVISION][/PATH]")
    name, _, revision = parts[1].partition("@")
    path = "/".join(parts[2:]).strip("/")
    repo_id = f"{parts[0]}/{name}"
    _check_repo(repo_id, repo_type)
    if path:
        check_key(path)
    return {"repo_id": repo_id, "repo_type": repo_type, "revision": unquote(revision) or None, "path": path or None}


def _raise(exc: Exception, what: str) -> NoReturn:
    """Convert a huggingface_hub or httpx error into lorachunk's (its message never holds the token)."""
    if isinstance(exc, RevisionNotFoundError):
        raise RepositoryNotFoundError(f"{what}: revision not found") from exc
    if isinstance(exc, HubRepoNotFound):
        raise RepositoryNotFoundError(f"{what}: repository not found, or the token cannot see it") from exc
    if isinstance(exc, EntryNotFoundError):
        raise ObjectNotFoundError(f"{what}: not found") from exc
    if isinstance(exc, OfflineModeIsEnabled):
        raise StoreUnavailableError(f"{what}: HF_HUB_OFFLINE is set") from exc
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise AuthenticationError(f"{what}: the Hub refused the credentials (HTTP {status})") from exc
        if status is not None and (status == 429 or status >= 500):
            raise StoreUnavailableError(f"{what}: HTTP {status}") from exc
        raise StoreError(f"{what}: HTTP {status}") from exc
    if is_network_error(exc) or isinstance(exc, _CLIENT_ERRORS):
        raise StoreUnavailableError(f"{what}: {type(exc).__name__}: {exc}") from exc
    raise exc


class HubStore(Store):
    """A read-only store over one commit of a Hugging Face Hub repo.

    Parameters
    ----------
    repo_id:
        ``"namespace/name"``.
    revision:
        Branch, tag or commit (default ``main``); resolved to a commit once, when the store is made,
        so a push during a long pull cannot mix two versions.
    repo_type:
        ``"model"`` (default) or ``"dataset"``.
    path:
        Folder inside the repo that holds the packed LoRA (default: the repo root).
    token:
        Default: huggingface_hub's (``HF_TOKEN``, then ``hf auth login``). Sent to the Hub only.
    endpoint:
        Default: ``HF_ENDPOINT``, else https://huggingface.co.
    http_options:
        For the :class:`~lorachunk.storage.HTTPStore` that fetches objects (``concurrency``,
        ``timeout``, ``retries``, ``max_bytes_per_s``, ``headers``).

    With ``HF_HUB_OFFLINE=1`` nothing is requested: :attr:`offline` is true and readers serve
    what the cache holds.
    """

    supports_writes = False

    def __init__(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        repo_type: str = "model",
        path: str | None = None,
        token: str | None = None,
        endpoint: str | None = None,
        deadline: float | None = None,
        **http_options: Any,
    ) -> None:
        _check_repo(repo_id, repo_type)
        self.repo_id = repo_id
        self.repo_type = repo_type
        self.revision = revision or constants.DEFAULT_REVISION
        self.path = check_key(path.strip("/")) if path and path.strip("/") else ""
        self.endpoint = _endpoint(endpoint)
        self.offline = _offline()
        self.commit: str | None = None
        self._http: HTTPStore | None = None
        self._first: tuple[str, bytes] | None = None  # the first object read, kept for get()
        self._api = HfApi(endpoint=self.endpoint, token=token)
        if self.offline:
            return
        token = token or get_token()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        headers.update(http_options.pop("headers", None) or {})
        kind = "" if repo_type == "model" else f"{repo_type}s/"
        folder = f"/{quote(self.path)}" if self.path else ""
        resolve = f"{self.endpoint}/{kind}{repo_id}/resolve"
        http = HTTPStore(f"{resolve}/{quote(self.revision, safe='')}{folder}", headers=headers, **http_options)
        # One round trip for both: the latest manifest at the revision, and (in X-Repo-Commit)
        # the commit it resolved to, as hf_hub_download does. Everything else is read at that
        # commit. Repos pushed before the latest's copy existed have only refs/latest.
        for key in (LATEST_MANIFEST, LATEST):
            try:
                with http.deadline(deadline):
                    data, answer = http.fetch(f"{http.url}/{key}", ByteRange(0, _FIRST_LIMIT))
            except ObjectNotFoundError:
                continue  # not there, or no such repo or revision: the API says which below
            except BaseException:
                http.close()
                raise
            self._first, self.commit = (key, data), answer.get("X-Repo-Commit")
            break
        if self.commit is None:
            self._first = None
            try:
                self.commit = self._api.repo_info(repo_id, revision=self.revision, repo_type=repo_type).sha
            except Exception as exc:  # converted by _raise
                http.close()
                _raise(exc, repr(self))
        if not self.commit or not re.fullmatch(r"[0-9a-f]{40}", self.commit):
            http.close()
            raise StoreError(f"{self!r}: the Hub did not say which commit {self.revision!r} is")
        http.url = f"{resolve}/{self.commit}{folder}"  # the same pool, now pinned to the commit
        self._http = http

    @property
    def source(self) -> str:
        """The ``hf://`` URL this store reads, with the revision as given (not the commit)."""
        kind = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        path = f"/{self.path}" if self.path else ""
        return f"hf://{kind}{self.repo_id}@{quote(self.revision, safe='')}{path}"

    def _online(self) -> HTTPStore:
        if self._http is None:
            raise StoreUnavailableError(f"{self!r}: HF_HUB_OFFLINE is set and this object is not in the cache")
        return self._http

    @contextmanager
    def deadline(self, seconds: float | None) -> Iterator[None]:
        if self._http is None:
            yield
            return
        with self._http.deadline(seconds):
            yield

    def get(self, key: str, byte_range: ByteRange | None = None) -> bytes:
        http = self._online()
        first = self._first
        if first is not None and key == first[0]:
            data = first[1]
            start, end = (0, None) if byte_range is None else (byte_range.start, byte_range.end)
            if len(data) < _FIRST_LIMIT or (end is not None and end <= len(data)):
                return data[start:end]
        if key == LATEST_MANIFEST and self._first is not None and self._first[0] == LATEST:
            raise ObjectNotFoundError(f"{self!r}: no {LATEST_MANIFEST} (a repo pushed before it existed)")
        return http.get(key, byte_range)

    def exists(self, key: str) -> bool:
        return self._online().exists(key)

    def list_prefix(self, prefix: str) -> Iterator[str]:
        self._online()
        folder = "/".join(part for part in (self.path, prefix.rpartition("/")[0]) if part)
        strip = f"{self.path}/" if self.path else ""
        try:
            kind = self.repo_type
            tree = self._api.list_repo_tree(
                self.repo_id, path_in_repo=folder or None, recursive=True, revision=self.commit, repo_type=kind
            )
            entries = list(tree)
        except EntryNotFoundError:
            return
        except Exception as exc:
            _raise(exc, repr(self))
        for entry in entries:
            if isinstance(entry, RepoFile) and entry.path.startswith(strip):
                key = entry.path[len(strip) :]
                if key.startswith(prefix):
                    yield key

    def set(self, key: str, value: bytes) -> None:
        raise UsageError(f"{self!r} is read-only; publish with lorachunk.push")

    def delete(self, key: str) -> None:
        raise UsageError(f"{self!r} is read-only")

    def close(self) -> None:
        if self._http is not None:
            self._http.close()

    @property
    def identity(self) -> str:
        # The endpoint too: a mirror's repo of the same name is not the Hub's.
        return f"{self.endpoint}|{self.source}"

    def __repr__(self) -> str:
        return f"HubStore({self.source!r})"


@dataclass(frozen=True, slots=True)
class Commit:
    """A commit made on the Hub: its id and where to see it (the pull request, if it opened one)."""

    oid: str
    url: str
    pr_url: str | None


class HubRepo:
    """A Hub repo (one branch, optionally a folder in it) to write into: the write side of
    :class:`HubStore`. Every huggingface_hub error becomes a lorachunk one."""

    def __init__(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        repo_type: str = "model",
        token: str | None = None,
        endpoint: str | None = None,
    ) -> None:
        if _offline():
            raise StoreUnavailableError("cannot write to the Hub with HF_HUB_OFFLINE set")
        _check_repo(repo_id, repo_type)
        self.repo_id = repo_id
        self.repo_type = repo_type
        self.revision = revision or constants.DEFAULT_REVISION
        self._api = HfApi(endpoint=_endpoint(endpoint), token=token)
        kind = "" if repo_type == "model" else f"{repo_type}s/"
        self.name = f"hf://{kind}{repo_id}@{self.revision}"

    def files(self, *, private: bool | None = None) -> set[str]:
        """Make the repo (and the branch) if missing; return the paths of the files it holds."""
        api, repo_id, kind = self._api, self.repo_id, self.repo_type
        try:
            api.create_repo(repo_id, repo_type=kind, private=private, exist_ok=True)
            if self.revision != constants.DEFAULT_REVISION:
                api.create_branch(repo_id, branch=self.revision, repo_type=kind, exist_ok=True)
            tree = api.list_repo_tree(repo_id, recursive=True, revision=self.revision, repo_type=kind)
            return {entry.path for entry in tree if isinstance(entry, RepoFile)}
        except Exception as exc:
            _raise(exc, self.name)

    def commit(
        self,
        files: list[tuple[str, bytes | Path]],
        *,
        message: str,
        create_pr: bool = False,
        upload_first: int = 0,
    ) -> Commit:
        """One commit adding ``files`` (repo path, then bytes or a local file to upload from).

        The first ``upload_first`` are uploaded before the commit: huggingface_hub uploads an
        object twice when two files of one commit hold it, so a file whose bytes another one
        repeats goes first, and the other then finds its object on the Hub and sends nothing.
        """
        operations = [CommitOperationAdd(path, content) for path, content in files]
        api, repo_id, kind = self._api, self.repo_id, self.repo_type
        try:
            if upload_first:
                first = operations[:upload_first]
                api.preupload_lfs_files(repo_id, first, revision=self.revision, create_pr=create_pr, repo_type=kind)
            info = api.create_commit(
                repo_id, operations, commit_message=message, revision=self.revision, create_pr=create_pr, repo_type=kind
            )
        except Exception as exc:
            _raise(exc, self.name)
        return Commit(info.oid, str(info.commit_url), info.pr_url)
