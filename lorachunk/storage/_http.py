"""Plain HTTP(S): any static server or CDN that serves a packed folder. The only module importing httpx."""

from __future__ import annotations

import calendar
import email.utils
import functools
import importlib.util
import math
import os
import random
import re
import ssl
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import httpcore
import httpx

from lorachunk._exceptions import (
    AuthenticationError,
    ObjectNotFoundError,
    StoreError,
    StoreUnavailableError,
    UsageError,
)
from lorachunk.storage._base import ByteRange, Store, check_key, shown_url

__all__ = ["HTTPStore", "RateLimiter", "is_network_error"]

_RETRY_STATUS: Final = frozenset({408, 425, 429, 500, 502, 503, 504})
_MAX_REDIRECTS: Final = 10
_CONTENT_RANGE: Final = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_UNSATISFIED: Final = re.compile(r"^bytes \*/(\d+)$")


class RateLimiter:
    """A token bucket shared by every request of a store: at most ``rate`` bytes per second."""

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise UsageError(f"max_bytes_per_s must be positive, got {rate}")
        self.rate = rate
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def take(self, n: int) -> float:
        """Wait until ``n`` more bytes fit in the rate; return the seconds waited."""
        with self._lock:
            now = time.monotonic()
            # One second of burst at most, so an idle pause does not turn into a spike.
            self._next = max(self._next, now - 1.0) + n / self.rate
            wait = self._next - now
        if wait > 0:
            time.sleep(wait)
        return max(0.0, wait)


# The deadline of the request this thread is making (time.monotonic()), read by every socket
# operation of httpx's transport: httpx's own timeouts bound each read, so a server trickling a
# header line every few seconds, or a body, could hold a request forever.
_REQUEST = threading.local()


def _left(timeout: float | None) -> float | None:
    """``timeout`` cut to what is left of this thread's request deadline; past it, a timeout."""
    until: float | None = getattr(_REQUEST, "until", None)
    if until is None:
        return timeout
    left = until - time.monotonic()
    if left <= 0:
        raise httpcore.ReadTimeout("the request's deadline passed")
    return left if timeout is None else min(timeout, left)


_READ_BYTES: Final = 1 << 20


class _DeadlineStream(httpcore.NetworkStream):
    """A socket stream whose every read, write and TLS handshake ends by the request's deadline."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        # httpcore asks for 64 KiB at a time; taking what the socket holds, up to 1 MiB, is the
        # same bytes in a sixteenth of the Python round trips (a full load over a fast link).
        return self._inner.read(max(max_bytes, _READ_BYTES), _left(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _left(timeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, _left(timeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_tcp(host, port, _left(timeout), local_address, socket_options))

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_unix_socket(path, _left(timeout), socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def _transport(*, limits: httpx.Limits, http2: bool) -> httpx.HTTPTransport:
    """httpx's transport, its sockets under the request deadlines (:func:`_left`)."""
    transport = httpx.HTTPTransport(
        verify=_ssl_context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")), http2=http2, limits=limits
    )
    # httpx has no option for the network backend; httpcore's pool keeps it here (httpcore >= 1.0,
    # which httpx >= 0.25 requires). The slow-server tests fail if that ever moves.
    pool = transport._pool
    pool._network_backend = _DeadlineBackend(pool._network_backend)
    return transport


class HTTPStore(Store):
    """A read-only store over HTTP(S), reading ``<url>/<key>``.

    Parameters
    ----------
    url:
        The address of the packed folder, e.g. ``https://cdn.example.org/loras/my_lora``. A
        query (``?sig=…``, a signed URL's token) is sent with every object's URL; it and any
        ``user:password@`` are never shown in messages.
    headers:
        Sent with every request to the store's own origin (e.g. ``{"Authorization": "Bearer …"}``);
        never to another origin a redirect leads to (a CDN, or a host an attacker names), never
        logged or put in an error message.
    concurrency:
        Most connections open at once (keep-alive pool). HTTP/2 is used when the ``h2`` package is
        installed (``pip install lorachunk[http2]``).
    timeout:
        Seconds to wait for a connection or for the next bytes of a response.
    min_rate:
        Bytes per second below which an object counts as stalled. Each request has a deadline
        of ``timeout`` plus its size at this rate (for a body of unknown size, what arrived so
        far), so a server that trickles a byte every few seconds cannot hold a read forever;
        past it the attempt fails and is retried like a dropped connection.
    retries:
        Attempts after the first on connection errors, dropped or truncated bodies, 408, 425, 429
        and 5xx. Waits grow exponentially from ``backoff`` seconds (with full jitter, capped at
        ``max_backoff``) unless the server's ``Retry-After`` says otherwise.
    max_bytes_per_s:
        Cap on the total download rate of this store, for people sharing a link.

    A body that breaks off is resumed with ``Range: bytes=N-`` from where it stopped; the answer
    must be a 206 whose ``Content-Range`` starts at N (a server that answers 200 instead is read
    again from the start). Every failure ends in :class:`StoreUnavailableError` naming the URL,
    or :class:`ObjectNotFoundError` for a 404.
    """

    supports_writes = False
    supports_listing = False

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        concurrency: int = 8,
        timeout: float = 30.0,
        min_rate: float = 16 * 1024,
        retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_bytes_per_s: float | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"HTTPStore wants an http(s):// URL, got {shown_url(url)!r}")
        if concurrency < 1 or retries < 0 or not 0 < timeout < math.inf or not 0 < min_rate < math.inf:
            # Written so that NaN fails too: every comparison with it is false.
            raise UsageError("concurrency must be ≥ 1, retries ≥ 0, and timeout and min_rate finite and > 0")
        # A query (a signed-URL token) goes on every object's URL, after the object's path.
        parts = urlsplit(url)
        self.url = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        self._query = f"?{parts.query}" if parts.query else ""
        self.retries = retries
        self.timeout = timeout
        self.min_rate = min_rate
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.limiter = RateLimiter(max_bytes_per_s) if max_bytes_per_s else None
        # httpx speaks HTTP/2 when the optional h2 package is there (pip install lorachunk[http2]).
        http2 = transport is None and importlib.util.find_spec("h2") is not None
        self._headers = dict(headers or {})
        self._origin = _origin(httpx.URL(self.url))
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._until: float | None = None  # the deadline of the call in progress (deadline())
        # Where a GET was redirected (the Hub's resolve → its CDN), kept until the signed URL
        # expires, so loading many splits resolves each object once, not once per read.
        self._redirects: dict[str, tuple[httpx.URL, float]] = {}
        self._client = httpx.Client(
            # identity: byte offsets for resume and ranges must be those of the stored object.
            headers={"Accept-Encoding": "identity"},
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,  # followed by _send, which keeps the caller's headers at home
            transport=transport or _transport(limits=limits, http2=http2),
        )

    def get(self, key: str, byte_range: ByteRange | None = None) -> bytes:
        return self.fetch(self._object_url(key), byte_range)[0]

    def _object_url(self, key: str) -> str:
        return f"{self.url}/{check_key(key)}{self._query}"

    def fetch(self, url: str, byte_range: ByteRange | None = None) -> tuple[bytes, Mapping[str, str]]:
        """:meth:`get` for any URL on this store's client, with the headers of the responses on
        the way, redirects first and the final response last (the Hub sends ``X-Repo-Commit``
        on the redirect to its CDN). Same retries, resume and errors."""
        shown = shown_url(url)
        start = 0 if byte_range is None else byte_range.start
        end = None if byte_range is None else byte_range.end
        if end is not None and end == start:
            return b"", {}
        # Chunks as they came, joined once at the end: the body is copied once, not per chunk.
        received: list[bytes] = []
        last_error, hint = "", None
        headers_seen: Mapping[str, str] = {}
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self._delay(attempt, hint))
                hint = None
            self._check_deadline(shown, last_error)
            offset = start + sum(map(len, received))
            headers = {}
            if offset or end is not None:
                headers["Range"] = f"bytes={offset}-" + ("" if end is None else str(end - 1))
            try:
                with self._send("GET", url, headers) as response:
                    status = response.status_code
                    if status == 404:
                        raise ObjectNotFoundError(f"{shown}: not found (404)")
                    if status in (401, 403):
                        raise AuthenticationError(f"{shown}: credentials refused (HTTP {status})")
                    if status in _RETRY_STATUS:
                        last_error = f"HTTP {status}"
                        hint = _retry_after(response.headers.get("Retry-After"))
                        continue
                    if status == 200:
                        # The server sent the whole object (no range support, or it ignored ours).
                        received.clear()
                        skip, size = start, _int(response.headers.get("Content-Length"))
                    elif status == 206:
                        size = _check_content_range(response.headers.get("Content-Range"), offset, shown)
                        skip = 0
                    elif status == 416 and _unsatisfiable(response.headers.get("Content-Range"), offset, start, end):
                        end = offset if end is not None else None
                        break  # the range starts at or past the end of the object: nothing more to read
                    else:
                        raise StoreError(f"{shown}: unexpected HTTP {status}")
                    if end is not None and size is not None and size < end:
                        end = max(size, start)  # like a file, a range past the end yields what there is
                    headers_seen = httpx.Headers()
                    for hop in (*response.history, response):
                        headers_seen.update(hop.headers)
                    self._read_body(response, received, skip=skip, want=None if end is None else end - start)
                    if end is not None and sum(map(len, received)) < end - start:
                        # A body shorter than asked (a 206 that stops early): resumed, as a drop is.
                        last_error = f"the body ended at {start + sum(map(len, received))} of {end} bytes"
                        continue
                    break
            except httpx.TransportError as exc:
                last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                until = getattr(_REQUEST, "until", None)
                if isinstance(exc, httpx.TimeoutException) and until is not None and time.monotonic() >= until - 0.05:
                    last_error = f"{type(exc).__name__}: stalled, past the request's deadline (timeout + size/min_rate)"
                continue
            except _StalledError as exc:
                last_error = str(exc)
                continue
            except httpx.HTTPError as exc:
                raise StoreError(f"{shown}: {exc}") from exc
            finally:
                _REQUEST.until = None
        else:
            raise StoreUnavailableError(f"{shown}: gave up after {self.retries + 1} attempts (last: {last_error})")
        data = b"".join(received)
        if end is not None and len(data) != end - start:
            raise StoreError(f"{shown}: expected {end - start} bytes, got {len(data)}")
        return data, headers_seen

    @contextmanager
    def _send(self, method: str, url: str, headers: Mapping[str, str]) -> Iterator[httpx.Response]:
        """A streamed response, redirects followed here rather than by httpx: the caller's
        headers go only to the store's own origin (httpx drops only ``Authorization`` when a
        redirect leaves it, so an ``X-Api-Key`` or ``PRIVATE-TOKEN`` would follow).

        A GET that was redirected goes straight to where it led next time, until that location
        expires (its signed ``Expires``/``X-Amz-Expires``, else 5 minutes); a remembered location
        that answers 4xx is forgotten and the store's URL asked again."""
        history: list[httpx.Response] = []
        remembered = self._redirects.get(url) if method == "GET" else None
        if remembered is not None and remembered[1] <= time.monotonic():
            self._redirects.pop(url, None)
            remembered = None
        target = remembered[0] if remembered is not None else httpx.URL(url)
        for _ in range(_MAX_REDIRECTS + 2):
            sent = dict(headers) | (self._headers if _origin(target) == self._origin else {})
            # Connection and headers within `timeout` in all, however slowly a server trickles them.
            _REQUEST.until = self._bounded(time.monotonic() + self.timeout)
            response = self._client.send(self._client.build_request(method, target, headers=sent), stream=True)
            if remembered is not None and 400 <= response.status_code < 500:
                response.close()  # expired or revoked: back to the store's own URL
                self._redirects.pop(url, None)
                remembered, target = None, httpx.URL(url)
                continue
            location = response.headers.get("Location")
            if not (response.is_redirect and location):
                if history and method == "GET" and response.status_code < 400:
                    self._redirects[url] = (target, time.monotonic() + _redirect_ttl(target))
                response.history = history
                try:
                    yield response
                finally:
                    response.close()
                return
            response.close()
            history.append(response)
            target = target.join(location)
            if target.scheme not in ("http", "https"):
                raise StoreError(f"{shown_url(url)}: redirected to a {target.scheme}: URL")
        raise StoreError(f"{shown_url(url)}: more than {_MAX_REDIRECTS} redirects")

    def _read_body(self, response: httpx.Response, received: list[bytes], *, skip: int, want: int | None) -> None:
        """Append the body's chunks to ``received``, dropping ``skip`` leading bytes; stop at
        ``want`` bytes; :class:`_StalledError` past the deadline (``min_rate``)."""
        have = sum(map(len, received))
        # The deadline is set by what this response will carry: what it says, else what arrives
        # (readers ask for one byte past a limit, not for the object's size).
        sizes = [n for n in (want, _int(response.headers.get("Content-Length"))) if n is not None]
        expected = min(sizes) if sizes else 0
        started = time.monotonic()
        throttled = 0.0  # time our own max_bytes_per_s held the body back is not the server's
        # The whole body by this deadline (checked by every socket read, so also while no chunk
        # comes): its size at min_rate, or for a body of unknown size what arrived so far.
        _REQUEST.until = self._bounded(started + self.timeout + max(expected, have) / self.min_rate)
        for chunk in response.iter_raw():  # no chunk_size: it would hold back what arrived before a drop
            elapsed = time.monotonic() - started - throttled
            if elapsed > self.timeout + max(expected, have + len(chunk)) / self.min_rate:
                got = have + len(chunk)
                raise _StalledError(f"stalled: {got} bytes in {elapsed:.0f} s, under {self.min_rate:.0f} B/s")
            if self.limiter is not None:
                throttled += self.limiter.take(len(chunk))
            budget = started + throttled + self.timeout + max(expected, have + len(chunk)) / self.min_rate
            _REQUEST.until = self._bounded(budget)
            if skip:
                dropped = min(skip, len(chunk))
                skip -= dropped
                chunk = chunk[dropped:]  # noqa: PLW2901 - only when a 200 answers a ranged request
            if want is not None and have + len(chunk) >= want:
                received.append(chunk[: want - have])
                return
            received.append(chunk)
            have += len(chunk)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            delay = min(retry_after, self.max_backoff)
        else:
            delay = random.uniform(0, min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
        return delay if self._until is None else max(0.0, min(delay, self._until - time.monotonic()))

    @contextmanager
    def deadline(self, seconds: float | None) -> Iterator[None]:
        if seconds is None:
            yield
            return
        previous = self._until
        until = time.monotonic() + seconds
        self._until = until if previous is None else min(previous, until)
        try:
            yield
        finally:
            self._until = previous

    def _bounded(self, until: float) -> float:
        return until if self._until is None else min(until, self._until)

    def _check_deadline(self, shown: str, last_error: str) -> None:
        if self._until is not None and time.monotonic() >= self._until:
            last = f" (last: {last_error})" if last_error else ""
            raise StoreUnavailableError(f"{shown}: the call's deadline passed{last}")

    def set(self, key: str, value: bytes) -> None:
        raise UsageError(f"{self!r} is read-only; pack into a local folder and publish that")

    def delete(self, key: str) -> None:
        raise UsageError(f"{self!r} is read-only")

    def exists(self, key: str) -> bool:
        url = self._object_url(key)
        shown = shown_url(url)
        hint = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self._delay(attempt, hint))
                hint = None
            self._check_deadline(shown, "")
            try:
                with self._send("HEAD", url, {}) as response:
                    status = response.status_code
            except httpx.TransportError:
                continue
            finally:
                _REQUEST.until = None
            if status in _RETRY_STATUS:
                hint = _retry_after(response.headers.get("Retry-After"))
                continue
            if status in (404, 410):
                return False
            if status in (401, 403):
                raise AuthenticationError(f"{shown}: credentials refused (HTTP {status})")
            if status >= 300:
                raise StoreError(f"{shown}: unexpected HTTP {status}")
            return True
        raise StoreUnavailableError(f"{shown}: gave up after {self.retries + 1} attempts")

    def list_prefix(self, prefix: str) -> Iterator[str]:
        raise UsageError(f"{self!r} cannot list objects; name the manifest by its full id")

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"HTTPStore({shown_url(self.url + self._query)!r})"


def _redirect_ttl(location: httpx.URL) -> float:
    """Seconds a redirect's location may be reused: until a minute before its signature expires
    (CloudFront's ``Expires``, S3's ``X-Amz-Date`` + ``X-Amz-Expires``), else 5 minutes."""
    params = location.params
    try:
        if "Expires" in params:
            return max(0.0, min(3600.0, float(params["Expires"]) - time.time() - 60))
        if "X-Amz-Expires" in params and "X-Amz-Date" in params:
            signed = calendar.timegm(time.strptime(params["X-Amz-Date"], "%Y%m%dT%H%M%SZ"))
            return max(0.0, min(3600.0, signed + float(params["X-Amz-Expires"]) - time.time() - 60))
    except (ValueError, OverflowError):
        return 0.0  # a signature this cannot read: not reused
    return 300.0


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port


class _StalledError(Exception):
    """A response slower than the store's ``min_rate``: an attempt that failed, as a drop is."""


def is_network_error(exc: BaseException) -> bool:
    """Whether ``exc`` is httpx's word for a failed connection or exchange (for callers of
    libraries built on httpx, such as huggingface_hub, which must not import httpx themselves)."""
    return isinstance(exc, httpx.HTTPError)


def _check_content_range(value: str | None, offset: int, url: str) -> int | None:
    """The object's size from a 206's ``Content-Range`` (None when the server does not say)."""
    match = _CONTENT_RANGE.match(value or "")
    if match is None or int(match[1]) != offset:
        raise StoreError(f"{url}: asked for bytes from {offset}, server answered 206 with Content-Range {value!r}")
    return _int(match[3])


def _unsatisfiable(value: str | None, offset: int, start: int, end: int | None) -> bool:
    """Whether a 416 means the object ends at or before ``offset``: its ``Content-Range: bytes */N``
    says so, or (servers that leave the header out) a resume of an open range asked past the end."""
    match = _UNSATISFIED.match(value or "")
    if match is not None:
        return int(match[1]) <= offset
    return offset > start and end is None


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    if re.fullmatch(r"[0-9]{1,9}", value.strip()):  # ASCII digits: str.isdigit() takes "²"
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@functools.lru_cache(maxsize=4)
def _ssl_context(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    """One verifying context per CA setting, shared by every store: loading the CA bundle takes
    ~50 ms, which opening a LoRA over a fast link would otherwise pay every time. ``cert_file``
    and ``cert_dir`` are the environment variables httpx reads; they key the cache."""
    del cert_file, cert_dir  # read again by httpx; here only the cache key
    return httpx.create_ssl_context()
