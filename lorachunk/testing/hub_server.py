"""A small Hugging Face Hub on 127.0.0.1, enough for the real ``huggingface_hub`` client.

It speaks the endpoints huggingface_hub 1.x/2.x uses to create a repo, read its info, plan an
upload (preupload), upload LFS objects (batch API, ``basic`` transfer), commit (NDJSON), list
trees, read paths-info and resolve files (with ``Range``). Several commits per repo, branches and
``refs/pr/N``; a bearer token that is checked; a request log the tests assert on. Emulated link
(bandwidth, delay) from :mod:`http_server`. Standard library only.

Set ``HF_HUB_DISABLE_XET=1`` before huggingface_hub is imported, so uploads take the plain LFS path.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from lorachunk.testing.http_server import Link, LoopbackServer, running

_API = re.compile(
    r"^/api/(models|datasets)/([^/]+/[^/]+?)(?:/(revision|preupload|commit|tree|paths-info|branch)(?:/([^/]+)(.*))?)?$"
)
_RESOLVE = re.compile(r"^/(?:(datasets)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_LFS_BATCH = re.compile(r"^/(?:(datasets)/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch$")
_LFS_PUT = re.compile(r"^/lfs-upload/([0-9a-f]{64})$")
_CDN = re.compile(r"^/cdn/([0-9a-f]{64})$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Entry:
    """A file in a commit: inline bytes (regular) or a pointer to an LFS object."""

    size: int
    blob: str  # git blob id
    sha256: str | None = None  # set for LFS files
    data: bytes | None = None  # set for regular files


@dataclass
class Repo:
    repo_id: str
    kind: str  # "model" or "dataset"
    private: bool
    commits: dict[str, dict[str, Entry]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N → commit sha


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None
    received: int = 0
    sent: int = 0


class HubServer(LoopbackServer):
    def __init__(
        self, *, token: str | None = None, link: Link | None = None, page_size: int = 1000, cdn: bool = False
    ) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.token = token
        #: Answer resolves of LFS files with a 302 to another origin (``localhost`` instead of
        #: ``127.0.0.1``), as the Hub sends them to its CDN.
        self.cdn = cdn
        #: Seconds the CDN's URLs are signed for (``?Expires=``, refused with 403 after), or None.
        self.cdn_ttl: float | None = None
        #: The CDN's signing key: changing it makes every URL signed before refused (403).
        self.cdn_key = 1
        self.link = link or Link()
        self.page_size = page_size
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.log: list[Request] = []
        self.lock = threading.Lock()
        self._counter = itertools.count()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def requests(self, method: str | None = None, contains: str = "") -> list[Request]:
        with self.lock:
            return [r for r in self.log if (method is None or r.method == method) and contains in r.path]

    def resolved(self) -> list[str]:
        """Paths of the files GET through ``resolve`` (what a reader downloaded), in order."""
        return [r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in self.requests("GET", "/resolve/")]

    def corrupt(self, repo_id: str, path: str, *, kind: str = "model", revision: str = "main") -> None:
        """Flip one byte of a stored file, as a broken disk or a hostile mirror would."""
        repo = self.repos[(kind, repo_id)]
        entry = repo.commits[repo.refs[revision]][path]
        if entry.sha256 is not None:
            data = self.lfs[entry.sha256]
            self.lfs[entry.sha256] = bytes([data[0] ^ 1]) + data[1:]
        else:
            assert entry.data is not None
            repo.commits[repo.refs[revision]][path] = Entry(
                entry.size, entry.blob, data=bytes([entry.data[0] ^ 1]) + entry.data[1:]
            )

    def place(self, repo_id: str, path: str, data: bytes, *, kind: str = "model", revision: str = "main") -> None:
        """Put a file into the commit ``revision`` points at, without a new commit: how the
        shared store tests place objects behind a store that is pinned to one commit."""
        with self.lock:
            repo = self.repos[(kind, repo_id)]
            files = repo.commits[repo.refs[revision]]
            if _is_text(data[:512]):
                files[path] = Entry(len(data), git_blob_sha1(data), data=data)
            else:
                oid = hashlib.sha256(data).hexdigest()
                self.lfs[oid] = data
                files[path] = Entry(len(data), git_blob_sha1(oid.encode()), sha256=oid)

    def remove(self, repo_id: str, path: str, *, kind: str = "model", revision: str = "main") -> None:
        """Drop a file from the commit ``revision`` points at (a pack gone missing on the server)."""
        with self.lock:
            repo = self.repos[(kind, repo_id)]
            del repo.commits[repo.refs[revision]][path]

    def commit(
        self, repo: Repo, revision: str, operations: list[dict[str, Any]], *, create_pr: bool
    ) -> tuple[str, str | None]:
        with self.lock:
            parent = repo.refs.get(revision)
            if parent is None:
                raise LookupError(revision)
            files = dict(repo.commits[parent])
            for op in operations:
                key, value = op["key"], op["value"]
                path = value["path"]
                if key == "file":
                    data = base64.b64decode(value["content"])
                    files[path] = Entry(len(data), git_blob_sha1(data), data=data)
                elif key == "lfsFile":
                    oid = value["oid"]
                    if oid not in self.lfs:
                        raise ValueError(f"LFS object {oid} was never uploaded")
                    pointer = (
                        f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(self.lfs[oid])}\n"
                    )
                    files[path] = Entry(len(self.lfs[oid]), git_blob_sha1(pointer.encode()), sha256=oid)
                elif key == "deletedFile":
                    files.pop(path, None)
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    files = {p: e for p, e in files.items() if not p.startswith(prefix)}
            sha = hashlib.sha1(f"{parent}:{next(self._counter)}:{time.time_ns()}".encode()).hexdigest()
            repo.commits[sha] = files
            pr_url = None
            if create_pr:
                number = 1 + sum(ref.startswith("refs/pr/") for ref in repo.refs)
                repo.refs[f"refs/pr/{number}"] = sha
                pr_url = f"{self.url}/{repo.repo_id}/discussions/{number}"
            else:
                repo.refs[revision] = sha
            return sha, pr_url


class _Handler(BaseHTTPRequestHandler):
    server: HubServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # see http_server.py

    def log_message(self, format: str, *args: object) -> None:
        pass

    # -- plumbing ------------------------------------------------------------------------------

    def _begin(self) -> tuple[Request, bytes]:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        request = Request(self.command, self.path, self.headers.get("Authorization"), received=len(body))
        with self.server.lock:
            self.server.log.append(request)
        if self.server.link.delay:
            time.sleep(self.server.link.delay)
        return request, body

    def _send(
        self,
        request: Request,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        *,
        content: bool = True,
    ) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not content:
            return
        try:
            for offset in range(0, len(body), 16 * 1024):
                chunk = body[offset : offset + 16 * 1024]
                self.server.link.take(len(chunk))
                self.wfile.write(chunk)
                request.sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _json(self, request: Request, value: object, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(request, status, json.dumps(value).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, request: Request, status: int, code: str | None, message: str, *, content: bool = True) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(request, status, json.dumps({"error": message}).encode(), headers, content=content)

    def _authorized(self, request: Request, *, write: bool) -> bool:
        """Bearer token: a wrong one is always refused; none is enough only to read."""
        token = self.server.token
        if token is None:
            return True
        given = request.authorization
        if given == f"Bearer {token}" or (given is None and not write):
            return True
        self._error(request, 401, None, "Invalid credentials in Authorization header")
        return False

    def _repo(self, request: Request, kind: str, repo_id: str, *, content: bool = True) -> Repo | None:
        repo = self.server.repos.get((kind, repo_id))
        if repo is None or (repo.private and request.authorization is None):
            self._error(
                request,
                404 if repo is None else 401,
                "RepoNotFound",
                f"Repository {repo_id} not found",
                content=content,
            )
            return None
        return repo

    def _commit(
        self, request: Request, repo: Repo, revision: str, *, content: bool = True
    ) -> tuple[str, dict[str, Entry]] | None:
        sha = repo.refs.get(revision) or (revision if revision in repo.commits else None)
        if sha is None:
            self._error(request, 404, "RevisionNotFound", f"Invalid rev id: {revision}", content=content)
            return None
        return sha, repo.commits[sha]

    # -- verbs ---------------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        self._get(content=False)

    def do_GET(self) -> None:
        self._get(content=True)

    def _get(self, *, content: bool) -> None:
        request, _ = self._begin()
        url = urlsplit(self.path)
        if match := _CDN.match(url.path):
            data = self.server.lfs.get(match[1])
            query = parse_qs(url.query)
            expires, key = query.get("Expires", [""])[0], query.get("Key-Pair-Id", [""])[0]
            if expires and (int(expires) < time.time() or key != str(self.server.cdn_key)):
                self._error(request, 403, None, "Request has expired")  # as a CDN answers a stale signature
            elif data is None:
                self._error(request, 404, None, "no such object")
            else:
                self._ranged(request, data, {"ETag": f'"{match[1]}"', "Accept-Ranges": "bytes"}, content=content)
            return
        if not self._authorized(request, write=False):
            return
        if match := _RESOLVE.match(url.path):
            self._resolve(
                request,
                "dataset" if match[1] else "model",
                match[2],
                unquote(match[3]),
                unquote(match[4]),
                content=content,
            )
            return
        match = _API.match(url.path)
        if match is None or match[3] not in (None, "revision", "tree"):
            self._error(request, 404, None, "no such endpoint")
            return
        kind = match[1].removesuffix("s")
        repo = self._repo(request, kind, match[2])
        if repo is None:
            return
        revision = unquote(match[4]) if match[4] else "main"
        found = self._commit(request, repo, revision)
        if found is None:
            return
        sha, files = found
        if match[3] == "tree":
            self._tree(request, url.query, files, unquote(match[5] or "").strip("/"))
            return
        self._json(
            request,
            {
                "id": repo.repo_id,
                "sha": sha,
                "private": repo.private,
                "siblings": [{"rfilename": path} for path in sorted(files)],
            },
        )

    def _tree(self, request: Request, query: str, files: dict[str, Entry], path: str) -> None:
        params = parse_qs(query)
        recursive = params.get("recursive", ["false"])[0].lower() in {"1", "true"}
        prefix = f"{path}/" if path else ""
        if path and not any(p.startswith(prefix) for p in files):
            self._error(request, 404, "EntryNotFound", f"{path} does not exist")
            return
        entries: dict[str, dict[str, Any]] = {}
        for name, entry in sorted(files.items()):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :].split("/")
            folders = rest[:-1] if recursive else rest[:1][: len(rest) - 1]
            for depth in range(len(folders)):
                folder = prefix + "/".join(rest[: depth + 1])
                entries.setdefault(
                    folder, {"type": "directory", "oid": git_blob_sha1(folder.encode()), "size": 0, "path": folder}
                )
            if recursive or len(rest) == 1:
                entries[name] = _file_info(name, entry)
        listed = sorted(entries.values(), key=lambda e: e["path"])
        cursor = int(params.get("cursor", ["0"])[0])
        page = listed[cursor : cursor + self.server.page_size]
        headers = {}
        if cursor + self.server.page_size < len(listed):
            base = f"{self.server.url}{urlsplit(self.path).path}"
            headers["Link"] = (
                f'<{base}?recursive={str(recursive).lower()}&cursor={cursor + self.server.page_size}>; rel="next"'
            )
        self._json(request, page, headers=headers)

    def _resolve(self, request: Request, kind: str, repo_id: str, revision: str, path: str, *, content: bool) -> None:
        repo = self._repo(request, kind, repo_id, content=content)
        if repo is None:
            return
        found = self._commit(request, repo, revision, content=content)
        if found is None:
            return
        sha, files = found
        entry = files.get(path)
        if entry is None:
            self._error(request, 404, "EntryNotFound", f"{path} does not exist", content=content)
            return
        data = self.server.lfs[entry.sha256] if entry.sha256 is not None else entry.data
        assert data is not None
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry.sha256 or entry.blob}"', "Accept-Ranges": "bytes"}
        if entry.sha256 is not None:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
            if self.server.cdn:
                port = self.server.server_address[1]
                expires = int(time.time() + (self.server.cdn_ttl or 0))
                signed = f"?Expires={expires}&Key-Pair-Id={self.server.cdn_key}" if self.server.cdn_ttl else ""
                headers["Location"] = f"http://localhost:{port}/cdn/{entry.sha256}{signed}"
                self._send(request, 302, b"", headers, content=content)
                return
        self._ranged(request, data, headers, content=content)

    def _ranged(self, request: Request, data: bytes, headers: dict[str, str], *, content: bool) -> None:
        status = 200
        match = _RANGE.match(self.headers.get("Range") or "")
        if match:
            start = int(match[1])
            end = min(len(data), int(match[2]) + 1) if match[2] else len(data)
            if start >= len(data):  # as RFC 9110 says, even for an empty object
                self._send(request, 416, b"", {"Content-Range": f"bytes */{len(data)}"})
                return
            headers["Content-Range"] = f"bytes {start}-{max(start, end - 1)}/{len(data)}"
            data, status = data[start:end], 206
        self._send(request, status, data, headers, content=content)

    def do_PUT(self) -> None:
        request, body = self._begin()
        match = _LFS_PUT.match(urlsplit(self.path).path)
        if match is None:
            self._error(request, 404, None, "no such endpoint")
            return
        if hashlib.sha256(body).hexdigest() != match[1]:
            self._error(request, 400, None, "uploaded bytes do not match the object id")
            return
        with self.server.lock:
            self.server.lfs[match[1]] = body
        self._send(request, 200)

    def do_POST(self) -> None:
        request, body = self._begin()
        url = urlsplit(self.path)
        if not self._authorized(request, write=True):
            return
        if url.path == "/api/repos/create":
            self._create(request, json.loads(body))
            return
        if url.path == "/api/validate-yaml":
            # The client checks a README's front matter before committing it; ours must close.
            content = json.loads(body)["content"]
            closed = not content.startswith("---") or "\n---\n" in content[3:]
            errors = [] if closed else [{"message": "front matter is not closed"}]
            self._json(request, {"errors": errors, "warnings": []}, 200 if closed else 400)
            return
        if match := _LFS_BATCH.match(url.path):
            repo = self._repo(request, "dataset" if match[1] else "model", match[2])
            if repo is not None:
                self._batch(request, json.loads(body))
            return
        match = _API.match(url.path)
        if match is None or match[3] not in ("preupload", "commit", "paths-info", "branch"):
            self._error(request, 404, None, "no such endpoint")
            return
        repo = self._repo(request, match[1].removesuffix("s"), match[2])
        if repo is None:
            return
        revision = unquote(match[4] or "main")
        if match[3] == "branch":
            with self.server.lock:
                if revision in repo.refs:
                    self._error(request, 409, None, f"branch {revision} already exists")
                    return
                start = (json.loads(body) if body else {}).get("startingPoint") or "main"
                repo.refs[revision] = repo.refs.get(start, start)
            self._json(request, {})
            return
        create_pr = parse_qs(url.query).get("create_pr", ["0"])[0] == "1"
        if match[3] == "commit":
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            try:
                sha, pr_url = self.server.commit(repo, revision, lines[1:], create_pr=create_pr)
            except LookupError:
                self._error(request, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return
            except ValueError as exc:
                self._error(request, 422, None, str(exc))
                return
            prefix = "" if repo.kind == "model" else "datasets/"
            self._json(
                request,
                {
                    "commitOid": sha,
                    "commitUrl": f"{self.server.url}/{prefix}{repo.repo_id}/commit/{sha}",
                    "pullRequestUrl": pr_url,
                },
            )
            return
        found = self._commit(request, repo, revision)
        if found is None:
            return
        files = found[1]
        if match[3] == "paths-info":
            form = parse_qs(body.decode())
            paths = form.get("paths", [])
            self._json(request, [_file_info(p, files[p]) for p in paths if p in files])
            return
        answers = []
        for item in json.loads(body)["files"]:
            sample = base64.b64decode(item["sample"])
            lfs = item["size"] > 10 * 1024 * 1024 or not _is_text(sample)
            entry = files.get(item["path"])
            oid = None if entry is None else (entry.sha256 if lfs else entry.blob)
            answers.append(
                {"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        self._json(request, {"files": answers, "commitOid": found[0]})

    def _create(self, request: Request, payload: dict[str, Any]) -> None:
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        kind = payload.get("type") or "model"
        prefix = "" if kind == "model" else f"{kind}s/"
        answer = {"url": f"{self.server.url}/{prefix}{repo_id}", "name": repo_id}
        with self.server.lock:
            if (kind, repo_id) in self.server.repos:
                self._json(request, {**answer, "error": "You already created this repo"}, 409)
                return
            repo = Repo(repo_id, kind, payload.get("visibility") == "private" or bool(payload.get("private")))
            initial = {".gitattributes": Entry(0, git_blob_sha1(b""), data=b"")}
            sha = hashlib.sha1(f"init:{repo_id}".encode()).hexdigest()
            repo.commits[sha] = initial
            repo.refs["main"] = sha
            self.server.repos[(kind, repo_id)] = repo
        self._json(request, answer)

    def _batch(self, request: Request, payload: dict[str, Any]) -> None:
        objects = []
        for obj in payload["objects"]:
            answer: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.server.lfs:
                answer["actions"] = {"upload": {"href": f"{self.server.url}/lfs-upload/{obj['oid']}", "header": {}}}
            objects.append(answer)
        self._json(request, {"transfer": "basic", "objects": objects})


def _is_text(sample: bytes) -> bool:
    """The Hub's rule of thumb: binary files (and anything over 10 MB) go to LFS."""
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\0" not in sample


def _file_info(path: str, entry: Entry) -> dict[str, Any]:
    info: dict[str, Any] = {"type": "file", "oid": entry.blob, "size": entry.size, "path": path}
    if entry.sha256 is not None:
        info["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": 130}
    return info


def serve_hub(
    *, token: str | None = None, link: Link | None = None, page_size: int = 1000, cdn: bool = False
) -> AbstractContextManager[HubServer]:
    return running(HubServer(token=token, link=link, page_size=page_size, cdn=cdn))
