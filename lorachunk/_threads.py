"""The thread-pool maps lorachunk uses: bounded, in order or as completed.

zstd, the hashes and big copies release the GIL, so threads give real parallelism for encoding,
decoding and I/O. Every parallel loop (pack's encoding, unpack and verify's decoding, the
loader's requests) goes through :func:`bounded_map`; the loader's decoding, which does small
modules on the calling thread, through :func:`overlapped`. (Pack files are written by
``_writer.Writer`` on threads of its own: a write is one call, not a loop.)
"""

from __future__ import annotations

import os
import queue
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final, TypeVar

__all__ = ["CHUNK_BYTES", "Progress", "bounded_map", "cpu_threads", "overlapped"]

_T = TypeVar("_T")
_R = TypeVar("_R")

#: ``progress(done, total)``, in bytes: of the source (pack), the output (unpack) or the records
#: fetched (pull, prefetch).
Progress = Callable[[int, int], None]
#: Bytes of items one task takes at least, when items are grouped by size.
CHUNK_BYTES: Final = 1024 * 1024


def cpu_threads() -> int:
    """Threads for encoding and decoding: ``LORACHUNK_THREADS`` or the CPU count, at most 8."""
    configured = os.environ.get("LORACHUNK_THREADS", "")
    # isascii: str.isdigit() takes "²", which int() refuses.
    if configured.isascii() and configured.isdigit():
        return max(1, min(int(configured), 256))
    return min(8, os.cpu_count() or 1)


def bounded_map(
    fn: Callable[[_T], _R],
    items: Iterable[_T],
    *,
    threads: int,
    ordered: bool = True,
    size: Callable[[_T], int] | None = None,
) -> Iterator[_R]:
    """``fn`` over ``items`` on ``threads`` threads; results in order, or as they complete.

    At most two tasks per thread are in flight, which bounds memory to a few items rather than
    all of them; ``items`` is consumed only as fast as results are taken. With ``size``, items
    travel in groups of at least :data:`CHUNK_BYTES` by it: handing one over costs more than the
    work on a LyCORIS module of a few hundred bytes. The first error is raised where its result
    would have been, and tasks not yet started are cancelled.
    """
    tasks = _chunks(items, size) if size is not None else ([item] for item in items)
    completed: queue.SimpleQueue[Future[list[_R]]] = queue.SimpleQueue()

    def run(chunk: list[_T]) -> list[_R]:
        return [fn(item) for item in chunk]

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lorachunk") as pool:
        pending: deque[Future[list[_R]]] = deque()

        def take() -> list[_R]:
            if ordered:
                return pending.popleft().result()
            future = completed.get()
            pending.remove(future)
            return future.result()

        try:
            for chunk in tasks:
                future = pool.submit(run, chunk)
                pending.append(future)
                if not ordered:
                    future.add_done_callback(completed.put)
                if len(pending) >= 2 * threads:
                    yield from take()
            while pending:
                yield from take()
        finally:
            for future in pending:
                future.cancel()


def overlapped(
    fn: Callable[[_T], _R], items: Iterable[_T], *, threads: int, inline: Callable[[_T], bool]
) -> Iterator[_R]:
    """``fn`` over ``items`` as they come: those ``inline`` says in the calling thread, the
    rest on ``threads`` threads (at most two per thread in flight); results as they are ready,
    roughly in order. For work whose hand-off to a thread costs more than the work itself."""
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lorachunk") as pool:
        pending: deque[Future[_R]] = deque()
        try:
            for item in items:
                if inline(item):
                    yield fn(item)
                else:
                    pending.append(pool.submit(fn, item))
                while pending and (pending[0].done() or len(pending) >= 2 * threads):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _chunks(items: Iterable[_T], size: Callable[[_T], int]) -> Iterator[list[_T]]:
    """Consecutive items in groups of at least ``CHUNK_BYTES`` by ``size`` (the last may be smaller)."""
    chunk: list[_T] = []
    total = 0
    for item in items:
        chunk.append(item)
        total += size(item)
        if total >= CHUNK_BYTES:
            yield chunk
            chunk, total = [], 0
    if chunk:
        yield chunk
