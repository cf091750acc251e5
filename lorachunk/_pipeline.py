"""The load pipeline: plan → fetch (from the cache or the store) → verify → decode → place.

:class:`CachePolicy` decides once, when a LoRA is opened, what its loads take from and keep in
the cache; :class:`Pipeline` runs the steps for one LoRA. torch is met only through the placer
(:mod:`lorachunk._torch`), which the caller makes.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lorachunk._cache import Cache
from lorachunk._digest import check
from lorachunk._exceptions import IntegrityError
from lorachunk._manifest import Manifest, Module
from lorachunk._packing import DEFAULT_GAP
from lorachunk._repository import fetch_records
from lorachunk._threads import Progress, cpu_threads, overlapped
from lorachunk.storage import Store
from lorachunk.storage._url import is_remote

if TYPE_CHECKING:
    from lorachunk import _torch

__all__ = ["INLINE_MAX_THREADS", "RUN_BYTES", "CachePolicy", "Pipeline"]

#: Decoded bytes of the records decoded as one run on the CPU (whole records: a larger one is a
#: run of its own): one streamed zstd call a megabyte, not one a plane. Record by record, a 60 MB
#: cold decode took 2.98-3.17x load_file + touch, in runs 2.61-2.66x (docs/benchmarks.md #27).
RUN_BYTES = 1024 * 1024
#: Up to this many CPU threads, runs are decoded by the consuming thread rather than a pool.
INLINE_MAX_THREADS = 2


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """What loads of one LoRA take from and keep in the cache.

    ``records``: fetched records are kept (for remote stores: a local folder is already as close
    as the cache). ``decoded``: decoded modules are kept and served, per module after a partial
    load and as one bundle per LoRA after a full one. Writes are best effort (a cache that cannot
    be written warns once and is left alone) except where the caller requires them.
    """

    cache: Cache | None
    records: bool
    decoded: bool

    @classmethod
    def of(cls, cache: Cache | None, *, remote: bool) -> CachePolicy:
        return cls(cache, cache is not None and remote, cache is not None and cache.decoded)

    def decoded_cache(self, placer: _torch.Placer) -> Cache | None:
        """The cache of decoded modules, when this placer's buffers are host bytes it can keep."""
        return self.cache if self.decoded and placer.keeps_host_bytes else None

    def bundle_size(self, manifest: Manifest, chosen: Sequence[Module]) -> int | None:
        """The size of the bundle a load of ``chosen`` would write (a full load whose bundle fits
        the cache's size limit), else None."""
        size = manifest.raw_size
        limit = self.cache.max_size if self.cache is not None else None
        full = len(chosen) == len(manifest.modules)
        return size if full and (limit is None or size <= limit) else None

    def after_load(self) -> None:
        """Prune to the cache's size limit, if it has one."""
        cache = self.cache
        if cache is not None:
            cache.keep(cache.enforce_limit)


class Pipeline:
    """Fetch, verify, decode and place the modules of one manifest from one store."""

    def __init__(
        self, store: Store, manifest: Manifest, cache: Cache | None, *, concurrency: int, max_gap: int = DEFAULT_GAP
    ) -> None:
        self.store = store
        self.manifest = manifest
        self.remote = is_remote(store)
        self.policy = CachePolicy.of(cache, remote=self.remote)
        self.concurrency = concurrency
        self._offsets = manifest.raw_offsets  # each module's place in a cache bundle
        self._lock = threading.Lock()
        self.gap = max_gap
        #: Records fetched from the store (not the cache), and their bytes.
        self.fetched = 0
        self.fetched_bytes = 0
        #: Requests sent to the store, and the bytes they carried (records, and the gaps between).
        self.requests = 0
        self.transferred = 0

    def records(
        self, modules: Sequence[Module], *, required: bool = False, into_cache: bool = True
    ) -> Iterator[tuple[Module, bytes | memoryview]]:
        """The verified stored records of ``modules``, from the cache or the store, as they arrive.

        Records not in the cache are fetched a few requests at a time (many records per request,
        planned from ``Manifest.packs``). ``required`` keeps what is fetched in the cache whatever
        the store, and makes a cache that cannot be written an error (``prefetch``); otherwise the
        policy decides, best effort. ``into_cache=False`` reads the cache but adds nothing to it
        (a pull, whose destination is a verified store of its own)."""
        cache = self.policy.cache
        keep = cache is not None and (required or self.policy.records)
        missing = []
        for module in modules:
            cached = cache.get(module.record, size=module.stored_size) if cache is not None and keep else None
            if cached is None:
                missing.append(module)
            else:
                yield module, cached
        seen: set[str] = set()
        for module, data in fetch_records(
            self.store,
            missing,
            self.manifest.packs,
            threads=self.concurrency,
            gap=self.gap,
            where=f" from {self.store!r}",
            on_read=self._count_read,
        ):
            if module.record not in seen:
                seen.add(module.record)
                with self._lock:
                    self.fetched += 1
                    self.fetched_bytes += len(data)
                if cache is not None and keep and into_cache:
                    if required:
                        cache.put(module.record, data)
                    else:
                        cache.keep(functools.partial(cache.put, module.record, data))
            yield module, data

    def _count_read(self, size: int) -> None:
        with self._lock:
            self.requests += 1
            self.transferred += size

    def copy(
        self,
        chosen: Sequence[Module],
        sink: Callable[[Module, bytes | memoryview], None],
        progress: Progress | None,
        *,
        required: bool,
        into_cache: bool = True,
    ) -> tuple[int, int]:
        """Fetch each distinct record of ``chosen`` and hand it to ``sink``; return (fetched, bytes)."""
        before = (self.fetched, self.fetched_bytes)
        chosen = list({m.record: m for m in chosen}.values())
        total = sum(m.stored_size for m in chosen)
        done = 0
        for module, data in self.records(chosen, required=required, into_cache=into_cache):
            sink(module, data)
            done += module.stored_size
            if progress is not None:
                progress(done, total)
        self.policy.after_load()
        return self.fetched - before[0], self.fetched_bytes - before[1]

    def staged(
        self, placer: _torch.Placer, chosen: Sequence[Module], wanted: frozenset[str] | None
    ) -> Iterator[_torch.Staged]:
        """Fetch and decode ``chosen``, yielding each module as it is ready.

        Threads pay off for network fetches and for large modules (zstd and big copies release
        the GIL); for the many tiny modules of a local LoRA they only fight over the GIL, so
        those are done in this thread. See docs/loading.md for the measurements.
        """
        decoded = self.policy.decoded_cache(placer)
        if decoded is None:
            yield from self._decoded(placer, chosen, wanted, None, None)
            return
        root, size = self.manifest.root, self.manifest.raw_size
        bundle = decoded.get_bundle(root, size)
        if bundle is not None:
            whole = memoryview(bundle)
            for index, module in enumerate(chosen):
                offset = self._offsets[module.name]
                view = whole[offset : offset + module.raw_size]
                try:
                    check(module.raw, view, what=f"module {module.name!r} in the cache's bundle")
                except IntegrityError:
                    decoded.drop_bundle(root)  # damaged on disk: decode the rest as if it never was
                    yield from self._decoded(placer, chosen[index:], wanted, decoded, None)
                    return
                yield placer.adopt(module, view, wanted)
            return
        bundle_size = self.policy.bundle_size(self.manifest, chosen)
        if bundle_size is None:
            yield from self._decoded(placer, chosen, wanted, decoded, None)
            return
        # A full load writes all decoded modules into one file, so later loads map it once. The
        # manifest goes into the cache too: it is what `cache verify` checks the bundle against.
        manifest = self.manifest
        decoded.keep(lambda: decoded.put(manifest.id, manifest.to_bytes(), kind="manifests"))
        with decoded.bundle_writer(root, bundle_size) as write:
            yield from self._decoded(placer, chosen, wanted, decoded, write)

    def _decoded(
        self,
        placer: _torch.Placer,
        chosen: Sequence[Module],
        wanted: frozenset[str] | None,
        decoded: Cache | None,
        write: Callable[[int, bytes | memoryview], None] | None,
    ) -> Iterator[_torch.Staged]:
        """:meth:`staged` without a bundle: each module from the per-module cache or decoded.
        With ``write``, decoded bytes go to the bundle being written instead of per-module files."""

        def remember(staged: _torch.Staged) -> _torch.Staged:
            if decoded is not None and write is None:
                decoded.keep(lambda: decoded.put_raw(staged.module.raw, staged.buffer.numpy().data))
            return staged

        def stage(item: tuple[Module, bytes | memoryview]) -> _torch.Staged:
            module, data = item
            return remember(placer.stage(module, data, wanted))

        def stage_run(run: list[tuple[Module, bytes | memoryview]]) -> list[_torch.Staged]:
            return [remember(s) for s in placer.stage_run([m for m, _ in run], _joined(run), wanted)]

        def kept(staged: _torch.Staged) -> _torch.Staged:
            if write is not None and staged.module.raw_size:
                write(self._offsets[staged.module.name], staged.buffer.numpy().data)
            return staged

        to_fetch = []
        for module in chosen:
            raw = decoded.get_raw(module.raw, module.raw_size) if decoded is not None else None
            if raw is None:
                to_fetch.append(module)
            else:  # a memory map and a hash: cheaper than a hand-off to a thread
                yield kept(placer.adopt(module, raw, wanted))

        if not to_fetch:
            return  # all from the cache: no pool to start (a warm split takes well under a millisecond)
        threads = min(self.concurrency, cpu_threads())
        if placer.stages_runs:
            # With two threads or fewer, the consuming thread decodes every run itself while the
            # requests' threads read and hash: on 2 cores that beat any pool of decoders, which
            # only queue for the GIL between runs (docs/benchmarks.md #27).
            inline = _always if threads <= INLINE_MAX_THREADS else _never
            for staged_run in overlapped(stage_run, _runs(self.records(to_fetch)), threads=threads, inline=inline):
                for staged in staged_run:
                    yield kept(staged)
            return
        # A device placer: the consuming thread does the device work, so every decode goes to the pool.
        for staged in overlapped(stage, self.records(to_fetch), threads=threads, inline=_never):
            yield kept(staged)


def _never(_: object) -> bool:
    return False


def _always(_: object) -> bool:
    return True


def _runs(records: Iterable[tuple[Module, bytes | memoryview]]) -> Iterator[list[tuple[Module, bytes | memoryview]]]:
    """Consecutive records in runs of about :data:`RUN_BYTES` decoded, each run stored back to
    back in one buffer (records of one request arrive in pack order, as views of its bytes)."""
    run: list[tuple[Module, bytes | memoryview]] = []
    size = 0
    for module, data in records:
        if run and not _adjacent(run[-1], (module, data)):
            yield run
            run, size = [], 0
        run.append((module, data))
        size += module.raw_size
        if size >= RUN_BYTES:
            yield run
            run, size = [], 0
    if run:
        yield run


def _adjacent(before: tuple[Module, bytes | memoryview], after: tuple[Module, bytes | memoryview]) -> bool:
    """Whether ``after``'s record follows ``before``'s in the pack and in one request's bytes."""
    (first, first_data), (second, second_data) = before, after
    return (
        isinstance(first_data, memoryview)
        and isinstance(second_data, memoryview)
        and first_data.obj is second_data.obj
        and first.pack is not None
        and first.pack == second.pack
        and first.offset + first.stored_size == second.offset
        and len(first_data) == first.stored_size
    )


def _joined(run: list[tuple[Module, bytes | memoryview]]) -> memoryview:
    """One view of a run's records, which :func:`_adjacent` found back to back in one buffer."""
    first = memoryview(run[0][1])
    if len(run) == 1:
        return first
    base = memoryview(first.obj).cast("B")
    start = _address(first) - _address(base)
    end = start + sum(len(data) for _, data in run)
    if not 0 <= start <= end <= len(base):  # not views of one buffer after all: a copy is right
        return memoryview(b"".join(data for _, data in run))
    return base[start:end]


def _address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if len(view) else 0
