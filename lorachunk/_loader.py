"""The loader: plan → fetch only the needed shards, concurrently → verify each → decode → place.

torch is imported only by :mod:`lorachunk._torch`, and only when tensors are asked for:
opening a LoRA, listing its keys, prefetching and pulling never import it.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from lorachunk._cache import Cache
from lorachunk._codec import codec_from_config
from lorachunk._digest import check, split_digest
from lorachunk._exceptions import IntegrityError, LorachunkError, ManifestError, StoreUnavailableError, UsageError
from lorachunk._keys import manifest_key, shard_key
from lorachunk._layout import as_names, finite_scales, matching, scale_targets
from lorachunk._manifest import Manifest, Module, Split, select_modules
from lorachunk._pack import Progress
from lorachunk._repository import check_dest, mark_partial, parse_manifest, point_latest, read_manifest, read_shard
from lorachunk._threads import cpu_threads
from lorachunk.storage import LocalStore, Store, open_store
from lorachunk.storage._url import is_remote

if TYPE_CHECKING:
    import torch

    from lorachunk import _torch

__all__ = ["LoRA", "PullReport", "load", "open", "pull"]

CacheOption = Cache | str | os.PathLike[str] | bool | Literal["auto"] | None
Scales = Mapping[str, float]
_T = TypeVar("_T")
_R = TypeVar("_R")
#: Remote fetches are mostly waiting: at 100 ms per request and ~25 kB shards, 8 in flight leave a
#: 10 Mbit/s link idle between rounds (benchmarks/hub.py).
REMOTE_CONCURRENCY = 16
#: Modules at least this large are decoded on the thread pool; smaller ones where they are consumed.
PARALLEL_MIN_BYTES = 128 * 1024


def _cache_for(option: CacheOption) -> Cache | None:
    if isinstance(option, Cache):
        return option
    if option is True or option == "auto":
        return Cache()
    if option is False or option is None:
        return None
    return Cache(option)


@dataclass(frozen=True, slots=True)
class PullReport:
    """What a fetch did: shards wanted, how many came over the network, and their bytes."""

    shards: int
    fetched: int
    fetched_bytes: int
    cached: int


class LoRA(Mapping[str, "torch.Tensor"]):
    """A packed LoRA, opened: the manifest is read and checked; no shard has been fetched.

    Acts as a read-only mapping from tensor key to tensor (each access fetches just the owning
    shard); :meth:`load` and :meth:`iter_tensors` fetch many shards at once. Create with
    :func:`lorachunk.open`.
    """

    def __init__(
        self,
        store: Store,
        manifest: Manifest,
        *,
        cache: Cache | None,
        concurrency: int,
        owns_store: bool,
        pinned_by_root: bool = False,
    ) -> None:
        if concurrency < 1:
            raise UsageError(f"concurrency must be at least 1, got {concurrency}")
        self.store = store
        self.cache = cache
        # A local folder is already as close as the cache: only decoded modules are worth keeping.
        self._cache_shards = cache is not None and is_remote(store)
        self.concurrency = concurrency
        self._manifest = manifest
        self._owns_store = owns_store
        # Opened with root= and no manifest id: a split name may select only what the root pins.
        self._pinned_by_root = pinned_by_root
        self._codec = codec_from_config(manifest.codec)
        self._offsets = manifest.raw_offsets  # each module's place in a cache bundle
        self._by_key = manifest.owners
        self._lock = threading.Lock()
        self.fetched = 0
        self.fetched_bytes = 0

    # -- what is in it: no shard I/O ---------------------------------------------------------

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def root(self) -> str:
        """The Merkle root over all modules: the LoRA's identity."""
        return self._manifest.root

    @property
    def modules(self) -> Mapping[str, Module]:
        return MappingProxyType({m.name: m for m in self._manifest.modules})

    @property
    def splits(self) -> Mapping[str, Split]:
        return MappingProxyType({s.name: s for s in self._manifest.splits})

    @property
    def metadata(self) -> Mapping[str, str] | None:
        return self._manifest.metadata

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_key)

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._by_key:
            raise KeyError(key)
        return self.load(keys=[key])[key]

    # -- loading -------------------------------------------------------------------------------

    def _select(
        self, splits: Iterable[str] | None, modules: Iterable[str] | None, keys: Iterable[str] | None
    ) -> tuple[list[Module], frozenset[str] | None]:
        wanted_keys = None if keys is None else frozenset(as_names(keys))
        self._check_pinned(as_names(splits or ()))
        chosen = select_modules(self._manifest, splits=splits or (), modules=modules or ())
        if wanted_keys is None:
            return chosen, None
        missing = sorted(wanted_keys - self._by_key.keys())
        if missing:
            raise UsageError(f"no tensor {missing[0]!r} in this LoRA ({len(missing)} unknown key(s))")
        named = {self._by_key[k].name for k in wanted_keys}
        if splits is None and modules is None:
            chosen = [m for m in self._manifest.modules if m.name in named]
        else:
            chosen = [m for m in chosen if m.name in named]
        return chosen, wanted_keys

    def _check_pinned(self, names: Iterable[str]) -> None:
        """With only a root pinned, a split whose members the root does not pin (a rewritten one,
        or a user split of a manifest packed before the root covered them) is refused."""
        if not self._pinned_by_root:
            return
        for name in names:
            if name in self.splits and not self._manifest.split_pinned(name):
                raise IntegrityError(
                    f"split {name!r} of {self.store!r} is not what the pinned root says it is (or was packed "
                    "before roots pinned user splits); pin the manifest id (manifest=…) to use it, or select "
                    "modules by name"
                )

    def iter_tensors(
        self,
        *,
        splits: Iterable[str] | None = None,
        modules: Iterable[str] | None = None,
        keys: Iterable[str] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        scales: Scales | None = None,
    ) -> Generator[tuple[str, torch.Tensor], None, None]:
        """Yield ``(key, tensor)`` as shards arrive and decode, in no fixed order.

        Selection: ``splits`` (names), ``modules`` (globs over module names) and ``keys`` (tensor
        keys), each a list or one string, narrow what is loaded; with none of them, everything.
        ``keys`` intersects the other two when given with them.

        ``device`` is ``"cpu"``, ``"cuda[:N]"`` (shards go straight to the GPU) or any other
        device torch has, such as ``"mps"`` (decoded on the host, then copied).
        ``dtype`` casts floating-point tensors. ``scales`` maps split names or module globs to
        strength factors: each matching module's delta is multiplied by its factor (the last
        matching entry wins); docs/loading.md lists which tensor carries the delta per layout.

        Raises :class:`UsageError` for unknown names or a stored dtype this torch lacks,
        :class:`IntegrityError` for a shard that does not match the manifest, :class:`StoreError`
        subclasses when it cannot be fetched; the error names the shard, its module and the store.
        """
        from lorachunk import _torch

        chosen, wanted = self._select(splits, modules, keys)
        self._check_pinned(name for name in (scales or {}) if name in self.splits)
        _torch.require_dtypes(t.dtype for m in chosen for t in m.tensors if wanted is None or t.key in wanted)
        factors = _scale_factors(self._manifest, chosen, scales or {})
        placer = _torch.make_placer(self._codec, device, dtype)
        try:
            for item in self._staged(placer, chosen, wanted):
                for key, tensor in placer.finish(item):
                    factor = factors.get(key)
                    if factor is not None:
                        _torch.scale_(tensor, factor)
                    yield key, tensor
        finally:
            placer.close()
        if self.cache is not None:
            self.cache.keep(self.cache.enforce_limit)

    def load(
        self,
        *,
        splits: Iterable[str] | None = None,
        modules: Iterable[str] | None = None,
        keys: Iterable[str] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        scales: Scales | None = None,
    ) -> dict[str, torch.Tensor]:
        """A state dict of the selected tensors, in the source file's order.

        Same options as :meth:`iter_tensors`. Keys are the original ones, so diffusers' and
        PEFT's loaders take the result as is.

        Example: ``lorachunk.open("lora.lcs").load(splits=["unet"], scales={"unet": 0.8})``
        """
        got = dict(
            self.iter_tensors(splits=splits, modules=modules, keys=keys, device=device, dtype=dtype, scales=scales)
        )
        return {key: got[key] for key in self._by_key if key in got}

    def prefetch(
        self,
        *,
        splits: Iterable[str] | None = None,
        modules: Iterable[str] | None = None,
        keys: Iterable[str] | None = None,
        progress: Progress | None = None,
    ) -> PullReport:
        """Fetch and verify the selected shards into the cache without making tensors."""
        if self.cache is None:
            raise UsageError("prefetch needs a cache; open the LoRA with cache=True or a cache folder")
        chosen, _ = self._select(splits, modules, keys)
        return self._copy(chosen, lambda m, data: None, progress, keep=True)

    def _copy(
        self,
        chosen: Sequence[Module],
        sink: Callable[[Module, bytes], None],
        progress: Progress | None,
        *,
        keep: bool | None = None,
    ) -> PullReport:
        before = (self.fetched, self.fetched_bytes)
        total = sum(m.stored_size for m in chosen)
        done = 0
        unique = list({m.shard: m for m in chosen}.values())
        for module in self._map(lambda m: (m, self._fetch(m, keep=keep)), _plan(unique)):
            sink(*module)
            done += module[0].stored_size
            if progress is not None:
                progress(done, total)
        fetched = self.fetched - before[0]
        if self.cache is not None:
            self.cache.keep(self.cache.enforce_limit)
        return PullReport(len(unique), fetched, self.fetched_bytes - before[1], len(unique) - fetched)

    # -- the pipeline --------------------------------------------------------------------------

    def _staged(
        self, placer: _torch.Placer, chosen: Sequence[Module], wanted: frozenset[str] | None
    ) -> Iterator[_torch.Staged]:
        """Fetch and decode ``chosen``, yielding each module as it is ready.

        Threads pay off for network fetches and for large modules (zstd and big copies release
        the GIL); for the many tiny modules of a local LoRA they only fight over the GIL, so
        those are done in this thread. See docs/loading.md for the measurements.
        """
        decoded = self.cache if self.cache is not None and self.cache.decoded and placer.keeps_host_bytes else None
        if decoded is None:
            yield from self._decoded(placer, chosen, wanted, None, None)
            return
        root, size = self._manifest.root, self._manifest.raw_size
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
        if len(chosen) < len(self._manifest.modules) or (decoded.max_size is not None and size > decoded.max_size):
            yield from self._decoded(placer, chosen, wanted, decoded, None)
            return
        # A full load writes all decoded modules into one file, so later loads map it once. The
        # manifest goes into the cache too: it is what `cache verify` checks the bundle against.
        decoded.keep(lambda: decoded.put(self._manifest.id, self._manifest.to_bytes(), kind="manifests"))
        with decoded.bundle_writer(root, size) as write:
            yield from self._decoded(placer, chosen, wanted, decoded, write)

    def _decoded(
        self,
        placer: _torch.Placer,
        chosen: Sequence[Module],
        wanted: frozenset[str] | None,
        decoded: Cache | None,
        write: Callable[[int, bytes | memoryview], None] | None,
    ) -> Iterator[_torch.Staged]:
        """:meth:`_staged` without a bundle: each module from the per-module cache or decoded.
        With ``write``, decoded bytes go to the bundle being written instead of per-module files."""
        remote = is_remote(self.store)
        on_cpu = placer.device.type == "cpu"

        def pooled(module: Module) -> bool:
            if decoded is not None and decoded.contains(module.raw, kind="raw"):
                return False  # a memory map and a hash: cheaper than a hand-off to a thread
            # The consuming thread does the device work, so on a GPU every decode goes to the pool.
            return remote or not on_cpu or module.raw_size >= PARALLEL_MIN_BYTES

        def stage(module: Module, data: bytes) -> _torch.Staged:
            staged = placer.stage(module, data, wanted)
            if decoded is not None and write is None:
                decoded.keep(lambda: decoded.put_raw(module.raw, staged.buffer.numpy().data))
            return staged

        def kept(staged: _torch.Staged) -> _torch.Staged:
            if write is not None and staged.module.raw_size:
                write(self._offsets[staged.module.name], staged.buffer.numpy().data)
            return staged

        def work(module: Module) -> _torch.Staged | tuple[Module, bytes]:
            raw = decoded.get_raw(module.raw, module.raw_size) if decoded is not None else None
            if raw is not None:
                return placer.adopt(module, raw, wanted)
            data = self._fetch(module)
            if module.raw_size >= PARALLEL_MIN_BYTES or not on_cpu:
                return stage(module, data)
            return module, data

        plan = _plan(chosen)
        to_pool = [pooled(m) for m in plan]
        for module, in_pool in zip(plan, to_pool, strict=True):
            if not in_pool:
                result = work(module)
                yield kept(stage(*result) if isinstance(result, tuple) else result)
        for result in self._map(work, [m for m, in_pool in zip(plan, to_pool, strict=True) if in_pool]):
            yield kept(stage(*result) if isinstance(result, tuple) else result)

    def _fetch(self, module: Module, *, keep: bool | None = None) -> bytes:
        """The verified stored bytes of ``module``'s shard, from the cache or the store.

        ``keep`` (default: for remote stores, as far as the cache can be written) puts what was
        fetched into the cache; ``keep=True`` makes a cache that cannot be written an error."""
        best_effort = keep is None
        keep = self._cache_shards if best_effort else keep
        if self.cache is not None and keep:
            cached = self.cache.get(module.shard, size=module.stored_size)
            if cached is not None:
                return cached
        data = read_shard(self.store, module, where=f" from {self.store!r}")
        with self._lock:
            self.fetched += 1
            self.fetched_bytes += len(data)
        if self.cache is not None and keep:
            cache = self.cache
            if best_effort:
                cache.keep(lambda: cache.put(module.shard, data))
            else:
                cache.put(module.shard, data)
        return data

    def _map(self, fn: Callable[[_T], _R], items: Iterable[_T]) -> Iterator[_R]:
        """``fn`` over ``items`` on ``concurrency`` threads, yielding results as they complete.

        At most twice ``concurrency`` items are in flight, which bounds memory; the first error
        cancels what has not started and is raised.
        """
        source = iter(items)
        completed: queue.SimpleQueue[Future[_R]] = queue.SimpleQueue()
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="lorachunk-load") as pool:
            pending: set[Future[_R]] = set()

            def submit(item: _T) -> None:
                future = pool.submit(fn, item)
                pending.add(future)
                future.add_done_callback(completed.put)

            for item in islice(source, 2 * self.concurrency):
                submit(item)
            try:
                while pending:
                    future = completed.get()
                    pending.discard(future)
                    for item in islice(source, 1):
                        submit(item)
                    yield future.result()
            finally:
                for future in pending:
                    future.cancel()

    def close(self) -> None:
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> LoRA:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<LoRA {self._manifest.source.name!r} root={self.root} modules={len(self._manifest.modules)}>"


def _plan(modules: Sequence[Module]) -> list[Module]:
    """Largest shards first, so the long transfers start early and the tail is short."""
    return sorted(modules, key=lambda m: -m.stored_size)


def _scale_factors(manifest: Manifest, chosen: Sequence[Module], scales: Scales) -> dict[str, float]:
    """Tensor key → factor. Modules with no delta (textual-inversion tokens) are left alone; a
    pattern whose modules carry no delta at all is an error, as is one that matches nothing."""
    split_names = {s.name for s in manifest.splits}
    factors: dict[str, float] = {}
    for pattern, factor in finite_scales(scales).items():
        if pattern in split_names:
            matched = set(manifest.split(pattern).modules)
        else:
            matched = set(matching((m.name for m in manifest.modules), pattern))
            if not matched:
                raise UsageError(f"scale {pattern!r} names no split and matches no module")
        targets = {m.name: scale_targets(t.key for t in m.tensors) for m in manifest.modules if m.name in matched}
        if not any(targets.values()):
            raise UsageError(f"scale {pattern!r}: none of its modules has a tensor of a known layout to scale")
        for module in chosen:
            factors.update(dict.fromkeys(targets.get(module.name, ()), factor))
    return factors


def _read_manifest(store: Store, selector: str | None, cache: Cache | None, root: str | None) -> Manifest:
    if not is_remote(store):
        cache = None
    if cache is not None and selector is not None and ":" in selector:
        stored = cache.get(selector, kind="manifests")
        if stored is not None:
            return parse_manifest(selector, stored, what=f"cached manifest {selector}", root=root)
    if store.offline:
        # No request at all: the manifest the cache last saw for this source (or the one named).
        manifest_id = selector if selector is not None and ":" in selector else None
        if cache is not None and selector is None:
            manifest_id = cache.get_ref(store.identity)
        stored = cache.get(manifest_id, kind="manifests") if cache is not None and manifest_id else None
        if stored is None or manifest_id is None:
            raise StoreUnavailableError(f"{store!r} is offline and the cache has no manifest for it")
        return parse_manifest(manifest_id, stored, what=f"cached manifest {manifest_id}", root=root)
    manifest = read_manifest(store, selector, root=root)
    if cache is not None:
        cache.keep(lambda: cache.put(manifest.id, manifest.to_bytes(), kind="manifests"))
        if selector is None:
            cache.set_ref(store.identity, manifest.id)
    return manifest


def open(
    source: str | os.PathLike[str] | Store,
    *,
    root: str | None = None,
    manifest: str | None = None,
    cache: CacheOption = "auto",
    concurrency: int | None = None,
    **store_options: Any,
) -> LoRA:
    """Open a packed LoRA: read and check its manifest, fetch nothing else.

    Parameters
    ----------
    source:
        A packed folder, an ``http(s)://`` URL of one, an fsspec URL (``s3://…``,
        ``memory://…``), or a :class:`~lorachunk.storage.Store`.
    root:
        The Merkle root you expect; :class:`IntegrityError` before any shard is fetched if the
        manifest's root differs. Pin it to be sure you load exactly the LoRA you vetted.
    manifest:
        A manifest id or unique hex prefix; default the store's latest.
    cache:
        ``"auto"`` or ``True``: the shared cache (:func:`~lorachunk.Cache` default folder).
        Remote shards are kept there once verified; for a local folder only decoded modules
        are kept, which makes warm loads a memory map plus a hash. ``False`` or ``None``: no
        cache. A folder, or a :class:`~lorachunk.Cache`.
    concurrency:
        Shards fetched and decoded at once: default the CPU count (at most 8, or
        ``LORACHUNK_THREADS``) for local folders, 16 for remote sources
        (so that on a slow link with long round trips the link never waits for a request). For
        ``http(s)://`` and ``hf://`` sources it also sizes the connection pool.
    store_options:
        Passed to the store (``headers=``, ``max_bytes_per_s=``, ``timeout=``, ``retries=`` for
        HTTP; ``storage_options=`` for fsspec).

    Example::

        with lorachunk.open("https://example.org/loras/ink", root="xxh3-128:…") as lora:
            state_dict = lora.load(splits=["unet"])
    """
    if not isinstance(source, Store) and Path(source).is_file():
        raise UsageError(f"{source} is a file; lorachunk reads packed folders (run `lorachunk pack` first)")
    if root is not None:
        try:
            split_digest(root)
        except ManifestError:
            raise UsageError(f"root {root!r} is not a digest (as `lorachunk info` prints it: xxh3-128:…)") from None
    remote = is_remote(source)
    # A local load is decoding, which wants no more threads than cores: on 2 cores, decoding a
    # 239 MB LoRA took 10-13x load_file on 8 threads and 7-9x on 2 (docs/benchmarks.md).
    threads = concurrency if concurrency is not None else (REMOTE_CONCURRENCY if remote else cpu_threads())
    store = open_store(source, pool=threads, **store_options)
    owns = not isinstance(source, Store)
    try:
        cache_obj = _cache_for(cache)
        loaded = _read_manifest(store, manifest, cache_obj, root)
        if root is not None and loaded.root != root:
            raise IntegrityError(f"{store!r}: manifest root is {loaded.root}, expected {root}")
        # Only a full id pins the manifest's bytes; a hex prefix is resolved by the store.
        pinned = root is not None and not (manifest is not None and _is_digest(manifest))
        return LoRA(store, loaded, cache=cache_obj, concurrency=threads, owns_store=owns, pinned_by_root=pinned)
    except BaseException:
        if owns:
            store.close()
        raise


def _is_digest(value: str) -> bool:
    try:
        split_digest(value)
    except ManifestError:
        return False
    return True


def load(
    source: str | os.PathLike[str] | Store,
    *,
    splits: Iterable[str] | None = None,
    modules: Iterable[str] | None = None,
    keys: Iterable[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    scales: Scales | None = None,
    **open_options: Any,
) -> dict[str, torch.Tensor]:
    """``open(source, **open_options).load(...)`` in one call; see :meth:`LoRA.load`."""
    with open(source, **open_options) as lora:
        return lora.load(splits=splits, modules=modules, keys=keys, device=device, dtype=dtype, scales=scales)


def pull(
    source: str | os.PathLike[str] | Store,
    dest: str | os.PathLike[str],
    *,
    splits: Iterable[str] | None = None,
    modules: Iterable[str] | None = None,
    progress: Progress | None = None,
    **open_options: Any,
) -> PullReport:
    """Copy a packed LoRA (or only some splits or modules of it) into the local folder ``dest``.

    The copy holds the manifest and the selected shards, each verified before it is written, so
    ``dest`` opens and loads offline. Shards already in ``dest`` (checked against their digests:
    a damaged one is fetched again and replaced) or in the cache are not fetched. A copy of only
    some splits is recorded as partial (``refs/partial``), so :func:`verify` checks what it holds
    and does not count the rest as lost.
    """
    check_dest(dest)
    target = LocalStore(dest)
    with open(source, **open_options) as lora:
        chosen, _ = lora._select(splits, modules, None)
        unique = list({m.shard: m for m in chosen}.values())
        missing = [m for m in unique if not _intact(target, m)]
        report = lora._copy(missing, lambda m, data: target.set(shard_key(m.shard), data), progress)
        manifest = lora.manifest
        with target.batch():
            target.set(manifest_key(manifest.id), manifest.to_bytes())
            point_latest(target, manifest)
        whole = all(target.exists(shard_key(m.shard)) for m in manifest.modules)
        mark_partial(target, manifest, partial=not whole)
    return PullReport(len(unique), report.fetched, report.fetched_bytes, len(unique) - report.fetched)


def _intact(store: Store, module: Module) -> bool:
    try:
        read_shard(store, module)
    except LorachunkError:
        return False
    return True
