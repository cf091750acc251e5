"""A real HTTP server on 127.0.0.1 that serves a folder with Range support and misbehaves on cue.

Used by the HTTP store tests and by ``benchmarks/link.py`` (which sets ``bandwidth``, ``delay``
and ``drop_rate`` to emulate a constrained link). Standard library only.
"""

from __future__ import annotations

import random
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass
class Fault:
    """What to do instead of a correct answer, for requests whose path matches ``pattern``.

    kind: ``drop`` (send half the body, then close), ``reset`` (close before answering),
    ``status`` (answer ``status`` with optional ``retry_after``), ``ignore_range`` (answer 200
    with the whole object), ``bad_range`` (answer 206 with the wrong start), ``corrupt`` (flip
    one byte), ``stall`` (wait ``seconds`` first), ``endless`` (answer 200 declaring a terabyte
    and send zeros until the client hangs up, or ``limit`` bytes), ``redirect`` (answer 302 to
    ``location`` + the path), ``trickle`` (send the body a byte every ``seconds``, at most
    ``limit`` bytes, then close), ``trickle_headers`` (send a header line a byte every
    ``seconds``, never ending it), ``slow_body`` (declare the whole object, then send a byte
    every ``seconds``), ``short`` (answer a range with 206 for its first half only, as a
    server may).
    """

    pattern: str
    kind: str
    times: int | None = 1
    status: int = 503
    retry_after: str | None = None
    seconds: float = 0.0
    limit: int = 256 * 1024 * 1024
    location: str = ""


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    sent: int = 0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Link:
    """Emulated link: ``bandwidth`` bytes/s shared by all connections, ``delay`` s per request."""

    bandwidth: float | None = None
    delay: float = 0.0
    drop_rate: float = 0.0
    _next: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _random: random.Random = field(default_factory=lambda: random.Random(1234))

    def take(self, n: int) -> None:
        if not self.bandwidth:
            return
        with self._lock:
            now = time.monotonic()
            self._next = max(self._next, now) + n / self.bandwidth
            wait = self._next - now
        time.sleep(wait)

    def should_drop(self) -> bool:
        with self._lock:
            return self._random.random() < self.drop_rate


class LoopbackServer(ThreadingHTTPServer):
    """What the test servers share: threads that do not outlive the tests, a real backlog, and
    quiet about clients that hang up (the tests do, on purpose)."""

    daemon_threads = True
    # socketserver's default backlog of 5 drops the SYNs of a client opening 16 connections at
    # once, and each dropped SYN costs the kernel's 1 s retransmit; real servers listen with 511.
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FolderServer(LoopbackServer):
    def __init__(self, root: Path, link: Link | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.link = link or Link()
        self.faults: list[Fault] = []
        self.log: list[Request] = []
        self.required_header: tuple[str, str] | None = None
        #: A query every request must carry (a signed-URL token); 403 without it.
        self.required_query: str | None = None
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def inject(self, pattern: str, kind: str, **options: object) -> Fault:
        fault = Fault(pattern, kind, **options)  # type: ignore[arg-type]
        with self.lock:
            self.faults.append(fault)
        return fault

    def take_fault(self, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fnmatchcase(path, fault.pattern):
                    if fault.times is not None:
                        fault.times -= 1
                        if fault.times <= 0:
                            self.faults.remove(fault)
                    return fault
        return None

    def gets(self, prefix: str = "/") -> list[Request]:
        return [r for r in self.log if r.method == "GET" and r.path.startswith(prefix)]


class _Handler(BaseHTTPRequestHandler):
    server: FolderServer
    protocol_version = "HTTP/1.1"
    # As real servers do (nginx's tcp_nodelay): otherwise a response written as headers, then
    # body, waits ~40 ms for the client's delayed ACK, which would dominate small requests.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, *, body: bool) -> None:
        request = Request(self.command, self.path, self.headers.get("Range"), headers=dict(self.headers.items()))
        with self.server.lock:
            self.server.log.append(request)
        link = self.server.link
        if link.delay:
            time.sleep(link.delay)
        required = self.server.required_header
        if required is not None and self.headers.get(required[0]) != required[1]:
            self._status(401)
            return
        target, _, query = self.path.partition("?")
        if self.server.required_query is not None and query != self.server.required_query:
            self._status(403)
            return
        fault = self.server.take_fault(target)
        if fault is not None and fault.kind == "stall":
            time.sleep(fault.seconds)
        if fault is not None and fault.kind == "reset":
            self.close_connection = True
            self.connection.close()
            return
        if fault is not None and fault.kind == "trickle_headers":
            self._trickle(b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * fault.limit, fault.seconds)
            return
        if fault is not None and fault.kind == "status":
            extra = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            self._status(fault.status, extra)
            return
        if fault is not None and fault.kind == "endless":
            self._endless(request, fault.limit)
            return
        if fault is not None and fault.kind == "redirect":
            self._status(302, {"Location": fault.location + self.path})
            return
        path = (self.server.root / target.lstrip("/")).resolve()
        if self.server.root.resolve() not in path.parents or not path.is_file():
            self._status(404)
            return
        data = path.read_bytes()
        if fault is not None and fault.kind == "corrupt" and data:
            data = bytes([data[0] ^ 0x01]) + data[1:]
        start, end, status = 0, len(data), 200
        match = _RANGE.match(request.range or "")
        if match and (fault is None or fault.kind != "ignore_range"):
            first, last = match.groups()
            if first:
                start, end = int(first), min(len(data), int(last) + 1) if last else len(data)
            else:
                start, end = max(0, len(data) - int(last)), len(data)
            if start >= len(data):  # as RFC 9110 says, even for an empty object
                self._status(416, {"Content-Range": f"bytes */{len(data)}"})
                return
            status = 206
            if fault is not None and fault.kind == "short" and end - start > 1:
                end = start + (end - start) // 2
        self.send_response(status)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            shown = 0 if fault is not None and fault.kind == "bad_range" else start
            self.send_header("Content-Range", f"bytes {shown}-{max(shown, end - 1)}/{len(data)}")
        self.end_headers()
        if not body:
            return
        payload = memoryview(data)[start:end]
        cut = len(payload) // 2 if fault is not None and fault.kind == "drop" else None
        if cut is None and link.drop_rate and len(payload) > 1 and link.should_drop():
            cut = link._random.randrange(1, len(payload))
        limit = len(payload) if cut is None else cut
        step = 1 if fault is not None and fault.kind in ("trickle", "slow_body") else 16 * 1024
        if step == 1 and fault is not None and fault.limit < limit:
            limit, cut = fault.limit, fault.limit
        try:
            for offset in range(0, limit, step):
                chunk = payload[offset : min(limit, offset + step)]
                if step == 1 and fault is not None:
                    time.sleep(fault.seconds)
                link.take(len(chunk))
                self.wfile.write(chunk)
                request.sent += len(chunk)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        if cut is not None:
            self.close_connection = True
            self.connection.shutdown(2)

    def _trickle(self, data: bytes, seconds: float) -> None:
        self.close_connection = True
        try:
            for byte in data:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(seconds)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _endless(self, request: Request, limit: int) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(2**40))
        self.end_headers()
        self.close_connection = True
        chunk = bytes(64 * 1024)
        try:
            while request.sent < limit:
                self.wfile.write(chunk)
                request.sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _status(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()


_Server = TypeVar("_Server", bound=ThreadingHTTPServer)


@contextmanager
def running(server: _Server) -> Iterator[_Server]:
    """``server`` answering on a thread for the duration of the block, then closed."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def serve(root: Path, link: Link | None = None) -> AbstractContextManager[FolderServer]:
    return running(FolderServer(root, link))
