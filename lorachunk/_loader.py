"""The loader: plan → fetch only the needed records, concurrently → verify each → decode → place.

torch is imported only by :mod:`lorachunk._torch`, and only when tensors are asked for:
opening a LoRA, listing its keys, prefetching and pulling never import it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

from lorachunk._cache import Cache
from lorachunk._catalog import count_versions
from lorachunk._codec import codec_from_config
from lorachunk._digest import split_digest
from lorachunk._exceptions import IntegrityError, ManifestError, ObjectNotFoundError, StoreUnavailableError, UsageError
from lorachunk._layout import as_names
from lorachunk._manifest import Manifest, Module, Split
from lorachunk._packing import DEFAULT_GAP
from lorachunk._pipeline import Pipeline
from lorachunk._repository import parse_manifest, partial_copy_error, read_manifest, split_source
from lorachunk._select import layer_splits, scale_factors, select_modules
from lorachunk._threads import Progress, cpu_threads
from lorachunk.storage import Store, open_store
from lorachunk.storage._url import is_remote

if TYPE_CHECKING:
    import torch


__all__ = ["LoRA", "PullReport", "load", "open"]

CacheOption = Cache | str | os.PathLike[str] | bool | Literal["auto"] | None
Scales = Mapping[str, float]
_T = TypeVar("_T")
_R = TypeVar("_R")
#: Remote fetches are mostly waiting: at 100 ms per request and ~25 kB records, 8 in flight leave a
#: 10 Mbit/s link idle between rounds (benchmarks/hub.py).
REMOTE_CONCURRENCY = 16


def _cache_for(option: CacheOption, *, remote: bool) -> Cache | None:
    if isinstance(option, Cache):
        return option
    if option == "auto":
        # A local folder is read where it is: a cache copy would only double the disk it takes.
        return Cache() if remote else None
    if option is True:
        return Cache()
    if option is False or option is None:
        return None
    return Cache(option)


@dataclass(frozen=True, slots=True)
class PullReport:
    """What a fetch did: records wanted, how many came over the network, and their bytes."""

    records: int
    fetched: int
    fetched_bytes: int
    cached: int


class LoRA(Mapping[str, "torch.Tensor"]):
    """A packed LoRA, opened: the manifest is read and checked; no record has been fetched.

    Acts as a read-only mapping from tensor key to tensor (each access fetches just the owning
    record); :meth:`load` and :meth:`iter_tensors` fetch many records at once. Create with
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
        pinned_root: str | None = None,
        max_gap: int = DEFAULT_GAP,
    ) -> None:
        self.store = store
        self.cache = cache
        self.concurrency = concurrency
        self._manifest = manifest
        self._owns_store = owns_store
        # Opened with root= and no manifest id: a split name may select only what that root pins.
        self._pinned_root = pinned_root
        self._codec = codec_from_config(manifest.codec)
        self._by_key = manifest.owners
        self._pipeline = Pipeline(store, manifest, cache, concurrency=concurrency, max_gap=max_gap)

    @property
    def fetched(self) -> int:
        """Records fetched from the store (not the cache) since this LoRA was opened."""
        return self._pipeline.fetched

    @property
    def fetched_bytes(self) -> int:
        """Their stored bytes."""
        return self._pipeline.fetched_bytes

    # -- what is in it: no record I/O --------------------------------------------------------

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

    def select(
        self,
        *,
        splits: Iterable[str] | None = None,
        modules: Iterable[str] | None = None,
        layers: Iterable[int] | None = None,
        keys: Iterable[str] | None = None,
    ) -> list[Module]:
        """The modules a selection names, in manifest order: what :meth:`load` with the same
        options fetches. Nothing is fetched."""
        return self._select(splits, modules, layers, keys)[0]

    def _select(
        self,
        splits: Iterable[str] | None,
        modules: Iterable[str] | None,
        layers: Iterable[int] | None,
        keys: Iterable[str] | None,
    ) -> tuple[list[Module], frozenset[str] | None]:
        layers = None if layers is None else list(layers)
        by_layer = layer_splits(self._manifest, layers) if layers is not None else []
        self._check_pinned([*as_names(splits or ()), *by_layer])
        chosen = select_modules(self._manifest, splits=splits or (), modules=modules or (), layers=layers, keys=keys)
        return chosen, None if keys is None else frozenset(as_names(keys))

    def _check_pinned(self, names: Iterable[str]) -> None:
        """With only a root pinned, a split whose members the root does not pin (a rewritten one,
        or a user split of a manifest packed before the root covered them) is refused."""
        if self._pinned_root is None:
            return
        for name in names:
            if name in self.splits and not self._manifest.split_pinned(name, root=self._pinned_root):
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
        layers: Iterable[int] | None = None,
        keys: Iterable[str] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        scales: Scales | None = None,
        deadline: float | None = None,
    ) -> Generator[tuple[str, torch.Tensor], None, None]:
        """Yield ``(key, tensor)`` as records arrive and decode, in no fixed order.

        Selection: ``splits`` (names), ``modules`` (globs over module names), ``layers`` (layer
        indices of a transformer adapter, e.g. ``range(0, 16)`` for a pipeline stage) and ``keys``
        (tensor keys), each a list or one string. Names within an option add up; options narrow
        each other; with none of them, everything. An option that keeps nothing is a
        :class:`UsageError` naming it (docs/loading.md).

        ``device`` is ``"cpu"``, ``"cuda[:N]"`` (records go straight to the GPU) or any other
        device torch has, such as ``"mps"`` (decoded on the host, then copied).
        ``dtype`` casts floating-point tensors. ``scales`` maps split names or module globs to
        strength factors: each matching module's delta is multiplied by its factor (the last
        matching entry wins); docs/loading.md lists which tensor carries the delta per layout.

        ``deadline``: seconds the whole load may take, requests and retries included, after which
        :class:`StoreUnavailableError` (remote stores); default 5 minutes plus the bytes to fetch at
        64 kB/s: generous, but finite however a server stalls.

        Raises :class:`UsageError` for unknown names or a stored dtype this torch lacks,
        :class:`IntegrityError` for a record that does not match the manifest, :class:`StoreError`
        subclasses when it cannot be fetched; the error names the pack, its module and the store.
        """
        from lorachunk import _torch

        seconds = check_deadline(deadline)
        chosen, wanted = self._select(splits, modules, layers, keys)
        self._check_pinned(name for name in (scales or {}) if name in self.splits)
        if seconds is None:
            seconds = default_deadline(sum(m.stored_size for m in chosen))
        _torch.require_dtypes(t.dtype for m in chosen for t in m.tensors if wanted is None or t.key in wanted)
        factors = scale_factors(self._manifest, chosen, scales or {})
        # A root pins the raw bytes, not the records: with only a root pinned, every module is
        # checked against it after decoding, on a GPU too.
        placer = _torch.make_placer(self._codec, device, dtype, check_raw=self._pinned_root is not None)
        try:
            with self.store.deadline(seconds):
                for item in self._pipeline.staged(placer, chosen, wanted):
                    for key, tensor in placer.finish(item):
                        factor = factors.get(key)
                        if factor is not None:
                            _torch.scale_(tensor, factor)
                        yield key, tensor
        except ObjectNotFoundError as exc:
            # A pack a partial copy was never given: say so, and how to get it, as unpack does.
            error = partial_copy_error(self.store, self._manifest, chosen)
            if error is None:
                raise
            raise error from exc
        finally:
            placer.close()
        self._pipeline.policy.after_load()

    def load(
        self,
        *,
        splits: Iterable[str] | None = None,
        modules: Iterable[str] | None = None,
        layers: Iterable[int] | None = None,
        keys: Iterable[str] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        scales: Scales | None = None,
        deadline: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """A state dict of the selected tensors, in the source file's order.

        Same options as :meth:`iter_tensors`. Keys are the original ones, so diffusers' and
        PEFT's loaders take the result as is.

        Example: ``lorachunk.open("lora.lcs").load(splits=["unet"], scales={"unet": 0.8})``
        """
        got = dict(
            self.iter_tensors(
                splits=splits,
                modules=modules,
                layers=layers,
                keys=keys,
                device=device,
                dtype=dtype,
                scales=scales,
                deadline=deadline,
            )
        )
        return {key: got[key] for key in self._by_key if key in got}

    def prefetch(
        self,
        *,
        splits: Iterable[str] | None = None,
        modules: Iterable[str] | None = None,
        layers: Iterable[int] | None = None,
        keys: Iterable[str] | None = None,
        progress: Progress | None = None,
    ) -> PullReport:
        """Fetch and verify the selected records into the cache without making tensors."""
        if self.cache is None:
            raise UsageError("prefetch needs a cache; open the LoRA with cache=True or a cache folder")
        chosen = self.select(splits=splits, modules=modules, layers=layers, keys=keys)
        return self.copy(chosen, lambda m, data: None, progress)

    def copy(
        self,
        chosen: Sequence[Module],
        sink: Callable[[Module, bytes | memoryview], None],
        progress: Progress | None = None,
        *,
        required: bool | None = None,
        deadline: float | None = None,
        into_cache: bool = True,
    ) -> PullReport:
        """Fetch and verify the distinct records of ``chosen`` and hand each to ``sink(module,
        stored_bytes)`` (a view: copy it to keep it past the call if need be). ``required``
        (default: when this LoRA has a cache, as prefetch wants) keeps every record in the cache
        and makes one that cannot be written an error; ``into_cache=False`` adds nothing to the
        cache (what it holds is still used)."""
        unique = len({m.record for m in chosen})
        keep = self.cache is not None if required is None else required
        seconds = check_deadline(deadline)
        if seconds is None:
            seconds = default_deadline(sum(m.stored_size for m in chosen))
        with self.store.deadline(seconds):
            fetched, fetched_bytes = self._pipeline.copy(chosen, sink, progress, required=keep, into_cache=into_cache)
        return PullReport(unique, fetched, fetched_bytes, unique - fetched)

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


#: Seconds :func:`open` may take by default; a load's default is :func:`default_deadline`.
OPEN_DEADLINE: Final = 300.0


def default_deadline(stored_bytes: int) -> float:
    """A load's default deadline: 5 minutes plus its bytes at 64 kB/s (a link slower than that
    is told to pass ``deadline=`` itself; each request is bounded by ``min_rate`` anyway)."""
    return OPEN_DEADLINE + stored_bytes / 65536


def check_deadline(value: object) -> float | None:
    """``value`` if it is None or a number of seconds > 0 and finite; :class:`UsageError` otherwise."""
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
        raise UsageError(f"deadline must be a number of seconds > 0 (or None), got {value!r}")
    return float(value)


def open(
    source: str | os.PathLike[str] | Store,
    *,
    root: str | None = None,
    manifest: str | None = None,
    cache: CacheOption = "auto",
    concurrency: int | None = None,
    max_gap: int = DEFAULT_GAP,
    deadline: float | None = OPEN_DEADLINE,
    **store_options: Any,
) -> LoRA:
    """Open a packed LoRA: read and check its manifest, fetch nothing else.

    Parameters
    ----------
    source:
        A packed folder, an ``http(s)://`` URL of one, an fsspec URL (``s3://…``,
        ``memory://…``), or a :class:`~lorachunk.storage.Store`.
    root:
        The Merkle root you expect; :class:`IntegrityError` before any record is fetched if the
        manifest's root differs. Pin it to be sure you load exactly the LoRA you vetted.
    manifest:
        Which LoRA of the store (also ``SOURCE#…``): a name (its latest version), ``NAME@N``,
        a root, a manifest id or unique hex prefix of one; default the store's latest. A
        ``root`` alone also selects: the LoRA of that root, where the catalog lists one.
    cache:
        ``"auto"`` (the default): the shared cache (:class:`~lorachunk.Cache`'s default folder,
        capped at 10 GB) for remote sources, where verified records and decoded modules are
        kept; none for a local folder, which is read where it is. ``True``: the shared cache
        for a local folder too (decoded modules are kept, so a warm load is a memory map plus a
        hash, at the cost of the LoRA's uncompressed size on disk). ``False`` or ``None``: no
        cache. A folder, or a :class:`~lorachunk.Cache`.
    concurrency:
        Requests in flight and modules decoded at once: default the CPU count (at most 8, or
        ``LORACHUNK_THREADS``) for local folders, 16 for remote sources
        (so that on a slow link with long round trips the link never waits for a request). For
        ``http(s)://`` and ``hf://`` sources it also sizes the connection pool.
    max_gap:
        Ranges of one pack at most this many bytes apart are fetched in one request, the bytes
        between them read and dropped (default 256 KiB: less than a round trip costs on links
        slower than ~20 Mbit/s at 100 ms; 0 asks for exactly the records needed).
    deadline:
        Seconds opening may take in all (the manifest's requests and their retries), after
        which :class:`StoreUnavailableError`; default 5 minutes, None for no limit. Loads
        have a deadline of their own (:meth:`LoRA.load`).
    store_options:
        Passed to the store (``headers=``, ``max_bytes_per_s=``, ``timeout=``, ``retries=`` for
        HTTP; ``storage_options=`` for fsspec).

    Example::

        with lorachunk.open("https://example.org/loras/ink", root="xxh3-128:…") as lora:
            state_dict = lora.load(splits=["unet"])
    """
    source, manifest = split_source(source, manifest)
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
    if not _is_int(max_gap) or max_gap < 0:
        raise UsageError(f"max_gap must be a whole number of bytes, 0 or more, got {max_gap!r}")
    if concurrency is not None and (not _is_int(concurrency) or concurrency < 1):
        raise UsageError(f"concurrency must be a whole number, at least 1, got {concurrency!r}")
    threads = concurrency if concurrency is not None else (REMOTE_CONCURRENCY if remote else cpu_threads())
    seconds = check_deadline(deadline)
    store = open_store(source, pool=threads, **({"deadline": seconds} if is_remote(source) else {}), **store_options)
    owns = not isinstance(source, Store)
    try:
        cache_obj = _cache_for(cache, remote=remote)
        with store.deadline(seconds):
            loaded = _read_manifest(store, manifest, cache_obj, root)
        if manifest is None and root is None and not remote:
            _note_implicit(store, loaded)
        if root is not None and root not in loaded.roots:
            raise IntegrityError(f"{store!r}: manifest root is {loaded.root}, expected {root}")
        # Only a full id pins the manifest's bytes; a hex prefix is resolved by the store.
        pinned = root if not (manifest is not None and _is_digest(manifest)) else None
        return LoRA(
            store, loaded, cache=cache_obj, concurrency=threads, owns_store=owns, pinned_root=pinned, max_gap=max_gap
        )
    except BaseException:
        if owns:
            store.close()
        raise


def _note_implicit(store: Store, manifest: Manifest) -> None:
    """Say (once per store and LoRA, at INFO: the CLI shows it as a note) which LoRA of a store of
    several an open without a name took. Local folders only: over a network it would cost a request."""
    key = (store.identity, manifest.id)
    if key in _NOTED:
        return
    versions = count_versions(store)
    if versions > 1:
        _NOTED.add(key)
        LOG.info(
            "%r holds %d LoRA versions; this is %r, the latest packed (name one: SOURCE#NAME)",
            store,
            versions,
            manifest.name,
        )


_NOTED: set[tuple[str, str]] = set()
LOG = logging.getLogger("lorachunk")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
    layers: Iterable[int] | None = None,
    keys: Iterable[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    scales: Scales | None = None,
    deadline: float | None = None,
    **open_options: Any,
) -> dict[str, torch.Tensor]:
    """``open(source, **open_options).load(...)`` in one call; see :meth:`LoRA.load`.
    ``deadline`` bounds the whole call, opening included (default: each step's own)."""
    seconds = check_deadline(deadline)
    started = time.monotonic()
    if seconds is not None:
        open_options["deadline"] = seconds
    with open(source, **open_options) as lora:
        left = None if seconds is None else max(1e-3, seconds - (time.monotonic() - started))
        return lora.load(
            splits=splits,
            modules=modules,
            layers=layers,
            keys=keys,
            device=device,
            dtype=dtype,
            scales=scales,
            deadline=left,
        )
