"""The Hugging Face Hub: read packed LoRAs from a repo, push them to one. The only module importing huggingface_hub.

A repo holds the same layout as a local folder (``refs/latest``, ``manifests/``, ``shards/``), at
its root or under a path, so a clone is a valid :class:`~lorachunk.storage.LocalStore` and several
LoRAs or versions share one repo's shards.

Reading resolves the revision to a commit once, then fetches every object of that commit through
:class:`~lorachunk.storage.HTTPStore` (concurrent, resumable, verified by the loader) from the
Hub's ``resolve`` URLs. Pushing is one ``create_commit`` holding the manifest and the shards the
repo lacks; huggingface_hub does the upload.
"""

from __future__ import annotations

import os
import re
import tempfile
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
    RepositoryNotFoundError,
    ShardNotFoundError,
    StoreError,
    StoreUnavailableError,
    UsageError,
)
from lorachunk._keys import ADAPTER_WEIGHTS, LATEST, LATEST_MANIFEST, MAX_STORED_MANIFEST_BYTES, manifest_key, shard_key
from lorachunk._manifest import Manifest
from lorachunk._repository import read_manifest, read_shard
from lorachunk.storage._base import ByteRange, Store, check_key
from lorachunk.storage._http import HTTPStore, is_network_error
from lorachunk.storage._local import LocalStore

__all__ = ["HubStore", "PushResult", "parse_hf_url", "push"]

_REPO_ID: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_REPO_TYPES: Final = ("model", "dataset")
#: The first object read (the latest manifest's copy, else the ref) is read up to one byte past
#: the manifest limit: enough for the reader to refuse an oversized one, and no more.
_FIRST_LIMIT: Final = MAX_STORED_MANIFEST_BYTES + 1
CARD: Final = "README.md"


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
    if not _REPO_ID.match(repo_id) or ".." in repo_id:
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
        raise ShardNotFoundError(f"{what}: not found") from exc
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
                data, answer = http.fetch(f"{http.url}/{key}", ByteRange(0, _FIRST_LIMIT))
            except ShardNotFoundError:
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

    def get(self, key: str, byte_range: ByteRange | None = None) -> bytes:
        http = self._online()
        first = self._first
        if first is not None and key == first[0]:
            data = first[1]
            start, end = (0, None) if byte_range is None else (byte_range.start, byte_range.end)
            if len(data) < _FIRST_LIMIT or (end is not None and end <= len(data)):
                return data[start:end]
        if key == LATEST_MANIFEST and self._first is not None and self._first[0] == LATEST:
            raise ShardNotFoundError(f"{self!r}: no {LATEST_MANIFEST} (a repo pushed before it existed)")
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


# -- push ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PushResult:
    """What :func:`push` did. ``uploaded`` counts the shards sent; ``skipped`` those the repo had."""

    repo_id: str
    commit: str
    commit_url: str
    pr_url: str | None
    manifest_id: str
    root: str
    uploaded: int
    uploaded_bytes: int
    skipped: int
    card_written: bool


@contextmanager
def _packed(src: str | os.PathLike[str], pack_options: dict[str, Any]) -> Iterator[LocalStore]:
    """``src`` as a packed folder: as is, or packed into a temporary one if it is a file or a
    PEFT adapter folder."""
    path = Path(src)
    if path.is_dir() and not (path / ADAPTER_WEIGHTS).is_file():
        if pack_options:
            raise UsageError(f"{src} is already packed; pack options apply to .safetensors files only")
        yield LocalStore(path)
        return
    if not path.exists():
        raise UsageError(f"{src}: no such file or folder")
    from lorachunk._pack import pack

    with tempfile.TemporaryDirectory(prefix="lorachunk-push-") as tmp:
        pack(path, tmp, **pack_options)
        yield LocalStore(tmp)


def push(
    src: str | os.PathLike[str],
    repo_id: str,
    *,
    revision: str | None = None,
    repo_type: str = "model",
    path: str | None = None,
    manifest: str | None = None,
    private: bool | None = None,
    create_pr: bool = False,
    message: str | None = None,
    update_card: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    **pack_options: Any,
) -> PushResult:
    """Publish a packed LoRA (or a ``.safetensors`` file, packed on the fly) to a Hub repo.

    The repo (and the branch ``revision``) is created if missing. One commit adds the manifest,
    ``refs/latest`` and only the shards the repo does not hold yet (their names are their
    digests, so the repo's listing says which), and a model card when the repo has none (or
    with ``update_card``).

    ``manifest`` picks one of several manifests in a packed folder (default: its latest);
    ``pack_options`` (``splits=``, ``level=``, ``hash=``) apply when ``src`` is a file.

    Raises :class:`AuthenticationError` when the token may not write, :class:`RepositoryNotFoundError`
    for a missing revision, :class:`IntegrityError` when a local shard does not match the manifest.
    """
    if _offline():
        raise StoreUnavailableError("cannot push with HF_HUB_OFFLINE set")
    _check_repo(repo_id, repo_type)
    prefix = f"{check_key(path.strip('/'))}/" if path and path.strip("/") else ""
    revision = revision or constants.DEFAULT_REVISION
    api = HfApi(endpoint=_endpoint(endpoint), token=token)
    what = f"hf://{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}@{revision}"
    with _packed(src, pack_options) as store:
        packed = read_manifest(store, manifest)
        try:
            api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
            if revision != constants.DEFAULT_REVISION:
                api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
            present = {
                entry.path
                for entry in api.list_repo_tree(repo_id, recursive=True, revision=revision, repo_type=repo_type)
                if isinstance(entry, RepoFile)
            }
        except Exception as exc:
            _raise(exc, what)
        operations, uploaded_bytes, skipped = [], 0, 0
        for module in {m.shard: m for m in packed.modules}.values():
            key = shard_key(module.shard)
            if prefix + key in present:
                skipped += 1
                continue
            read_shard(store, module)  # checked against the manifest before it leaves
            # Uploaded from the file, not from memory: a LoRA of any size pushes in ~1 shard of RAM.
            operations.append(CommitOperationAdd(prefix + key, store.path(key)))
            uploaded_bytes += module.stored_size
        uploaded = len(operations)
        first: list[CommitOperationAdd] = []
        if prefix + manifest_key(packed.id) not in present:
            first.append(CommitOperationAdd(prefix + manifest_key(packed.id), packed.to_bytes()))
            operations += first
            uploaded_bytes += len(packed.to_bytes())
        # The latest's copy is the manifest's bytes again. huggingface_hub would upload an object
        # twice when two files of one commit hold it, so the manifest goes up first (below); the
        # copy then finds its LFS object on the Hub and sends nothing.
        operations.append(CommitOperationAdd(prefix + LATEST_MANIFEST, packed.to_bytes()))
        operations.append(CommitOperationAdd(prefix + LATEST, f"{packed.id}\n".encode()))
        card = CARD not in present or update_card
        if card:
            operations.append(CommitOperationAdd(CARD, model_card(packed, repo_id, path=prefix.rstrip("/")).encode()))
        summary = message or f"lorachunk: push {packed.source.name} ({uploaded} new shards)"
        try:
            if first:
                api.preupload_lfs_files(repo_id, first, revision=revision, create_pr=create_pr, repo_type=repo_type)
            info = api.create_commit(
                repo_id, operations, commit_message=summary, revision=revision, create_pr=create_pr, repo_type=repo_type
            )
        except Exception as exc:
            _raise(exc, what)
    return PushResult(
        repo_id=repo_id,
        commit=info.oid,
        commit_url=str(info.commit_url),
        pr_url=info.pr_url,
        manifest_id=packed.id,
        root=packed.root,
        uploaded=uploaded,
        uploaded_bytes=uploaded_bytes,
        skipped=skipped,
        card_written=card,
    )


_BASE_MODEL_KEYS: Final = ("base_model", "base_model_name_or_path", "modelspec.base_model", "ss_sd_model_name")


def model_card(manifest: Manifest, repo_id: str, *, path: str = "") -> str:
    """A model card: front matter with the ``lorachunk`` tag (and the base model when the
    file's metadata names a Hub repo), the splits with their sizes, the root, and how to load."""
    metadata = manifest.source.metadata or {}
    base = next((v for k in _BASE_MODEL_KEYS if _REPO_ID.match(v := metadata.get(k, ""))), None)
    front = ["---", "tags:", "- lorachunk", "- lora"] + ([f"base_model: {base}"] if base else []) + ["---"]
    sizes = {m.name: m.stored_size for m in manifest.modules}
    rows = [
        f"| `{s.name}` | {s.kind} | {len(s.modules)} | {sum(sizes[n] for n in s.modules) / 1e6:.2f} MB |"
        for s in manifest.splits
    ]
    source = f"hf://{repo_id}" + (f"/{path}" if path else "")
    example = next((s.name for s in manifest.splits if s.kind != "all"), None)
    load = f'lora.load(splits=["{example}"])' if example else "lora.load()"
    return "\n".join(
        [
            *front,
            "",
            f"# {manifest.source.name}",
            "",
            "Packed with [lorachunk](https://pypi.org/project/lorachunk/): per-module shards, each",
            "verified against a Merkle manifest, so you can fetch and load only the part you need.",
            "",
            f"Root: `{manifest.root}` ({len(manifest.modules)} modules, {manifest.source.size / 1e6:.2f} MB unpacked)",
            "",
            "| split | kind | modules | stored |",
            "|---|---|---:|---:|",
            *rows,
            "",
            "```python",
            "import lorachunk",
            f'lora = lorachunk.open("{source}", root="{manifest.root}")',
            f"state_dict = {load}",
            "```",
            "",
        ]
    )
