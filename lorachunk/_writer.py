"""Writing a LoRA's records into a store as packs (``lorachunk/2``), reusing the records the
store already holds: what pack, compose, pull and repack share."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from typing import Final

from lorachunk._catalog import same_name_ids
from lorachunk._digest import check
from lorachunk._exceptions import IntegrityError, LorachunkError
from lorachunk._keys import PACKS, is_object_key, manifest_key, pack_id_of, pack_key
from lorachunk._manifest import FORMAT_ID, Manifest, Module, placements
from lorachunk._packing import DEFAULT_PACK_SIZE, MAX_PACK_SIZE, MIN_PACK_SIZE, Pack, PackBuilder
from lorachunk._repository import latest_id, list_manifest_ids, object_exists, read_stored_manifest
from lorachunk.storage import Store

__all__ = ["Held", "Writer", "check_pack_size", "held_records", "placed_manifest"]

#: A record where a store holds it: its pack, offset and size.
Placement = tuple[str, int, int]


@dataclass(frozen=True, slots=True)
class Held:
    """The records a store holds (digest → placement) and the sizes of the packs they lie in."""

    records: Mapping[str, Placement]
    packs: Mapping[str, int]


def check_pack_size(pack_size: int) -> int:
    """``pack_size`` in bytes if it is a whole number of MiB from 1 to 128; ValueError otherwise."""
    if not isinstance(pack_size, int) or isinstance(pack_size, bool) or not MIN_PACK_SIZE <= pack_size <= MAX_PACK_SIZE:
        raise ValueError(f"pack size must be 1 to 128 MiB, got {pack_size!r} bytes")
    return pack_size


def held_records(store: Store, *, algorithm: str, skip: Iterable[str] = (), name: str | None = None) -> Held:
    """Record digest → where ``store`` holds it, derived from its ``lorachunk/2`` manifests
    (``skip``: ids not to take, e.g. those about to be replaced).

    Derived each time, never stored: the manifests stay the only source of truth. A record
    counts only if its pack is in the store (a partial copy names packs it lacks) and the
    manifest uses ``algorithm`` (a record is reused only under the digest it was named by).
    Each manifest is checked against its id and read for its placements only (what it costs
    grows with the number of versions in a store: ~5 ms each for a LoRA of ~900 modules, a
    seventh of a full read; benchmarks/packs.py), once per process.

    With ``name`` (pack), in a store whose catalog lists many LoRAs, only the records of that
    name's versions and of the latest LoRA count: reading every manifest made packing the
    30,000th LoRA of a library cost 30,000 reads (docs/library.md).
    """
    if not store.supports_listing:
        return Held({}, {})
    scoped = same_name_ids(store, name) if name is not None else None
    present: dict[str, bool] = {}
    if scoped is None:
        ids = list_manifest_ids(store)
        present = dict.fromkeys((pack_id_of(key) for key in store.list_prefix(PACKS) if is_object_key(key)), True)
    else:
        ids = sorted({*scoped, *_latest(store)})

    def there(pack: str) -> bool:
        if scoped is not None and pack not in present:  # a few packs: asked for, not listed
            present[pack] = object_exists(store, pack_key(pack))
        return present.get(pack, False)

    skipped = set(skip)
    index: dict[str, Placement] = {}
    sizes: dict[str, int] = {}
    for manifest_id in ids:
        if manifest_id in skipped:
            continue
        found = _placements(store, manifest_id, algorithm)
        if found is None:
            continue  # damaged, or another format or algorithm: its records are not reused
        packs, records = found
        for record, pack, offset, size in records:
            if there(pack):
                index.setdefault(record, (pack, offset, size))
                sizes[pack] = packs[pack]
    return Held(index, sizes)


def _latest(store: Store) -> list[str]:
    try:
        return [latest_id(store)]
    except LorachunkError:
        return []


def _placements(
    store: Store, manifest_id: str, algorithm: str
) -> tuple[dict[str, int], list[tuple[str, str, int, int]]] | None:
    key = (manifest_id, algorithm)
    with _PLACEMENTS_LOCK:
        if key in _PLACEMENTS:
            return _PLACEMENTS[key]
    try:
        stored = read_stored_manifest(store, manifest_key(manifest_id))
        check(manifest_id, stored, what=manifest_key(manifest_id))
        found: tuple[dict[str, int], list[tuple[str, str, int, int]]] | None = placements(stored, algorithm=algorithm)
    except LorachunkError:
        found = None
    with _PLACEMENTS_LOCK:
        _PLACEMENTS[key] = found
        while len(_PLACEMENTS) > _PLACEMENTS_MAX:
            _PLACEMENTS.pop(next(iter(_PLACEMENTS)))
    return found


#: Threads writing packs, and the bytes of packs handed to them and not yet written, at most.
_WRITE_THREADS: Final = 4
_WRITE_BYTES: Final = 64 * 1024 * 1024
# Manifests are immutable and named by their digest: what one places never changes.
_PLACEMENTS: dict[tuple[str, str], tuple[dict[str, int], list[tuple[str, str, int, int]]] | None] = {}
_PLACEMENTS_LOCK = threading.Lock()
_PLACEMENTS_MAX: Final = 4096


class Writer:
    """Places one LoRA's records: those ``held`` names stay where they are, the others go, in
    the order given, into new packs of about ``pack_size`` bytes written to ``store`` (inside
    the caller's batch). :meth:`finish` gives every module placed and the packs they lie in.

    Packs are written on threads of their own, so that the caller goes on encoding while the disk
    takes the last packs (writing and flushing them in the caller's thread made packing a 355 MB
    LoRA take half as long again; a disk flushes several files at once faster than one after the
    other). At most 64 MiB of packs wait (two packs at least). Use it as a context manager:
    leaving the block waits for every write, also when it raises.
    """

    def __init__(
        self,
        store: Store,
        *,
        algorithm: str,
        pack_size: int = DEFAULT_PACK_SIZE,
        held: Held | None = None,
        damaged: Iterable[str] = (),
    ) -> None:
        self.store = store
        #: Packs found not to hash to their names: written again if a pack of that name is made.
        self.damaged = set(damaged)
        self.index = dict(held.records) if held is not None else {}
        self._sizes = dict(held.packs) if held is not None else {}
        self._builder = PackBuilder(target=pack_size, algorithm=algorithm)
        self._placed: dict[str, Module] = {}
        self._packs: dict[str, int] = {}
        self._waiting: dict[str, list[Module]] = {}  # records in the pack being built, by digest
        #: Packs written and their bytes.
        self.written = 0
        self.written_bytes = 0
        self._in_flight = max(2, _WRITE_BYTES // pack_size)
        self._io = ThreadPoolExecutor(
            max_workers=min(_WRITE_THREADS, self._in_flight), thread_name_prefix="lorachunk-pack"
        )
        self._writes: deque[Future[tuple[str, int, tuple[Module, ...], bool]]] = deque()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            for future in self._writes:  # none may outlive the caller's batch
                with suppress(Exception):
                    future.result()
        finally:
            self._io.shutdown(wait=True)

    def add(self, module: Module, stored: bytes | memoryview, group: str = "") -> None:
        """Take ``module`` and its stored record (already checked against ``module.record``)."""
        held = self.index.get(module.record)
        if held is not None:
            self._place(module, held)
        elif module.record in self._waiting:
            self._waiting[module.record].append(module)  # the same record under another name
        else:
            self._waiting[module.record] = [module]
            for pack in self._builder.add(module, stored, group):
                self._write(pack)

    def finish(self) -> tuple[list[Module], dict[str, int]]:
        """Every module placed, and the packs they lie in (digest → size), once every pack is
        written (a failed write raises here)."""
        for pack in self._builder.finish():
            self._write(pack)
        while self._writes:
            self._written(self._writes.popleft().result())
        return list(self._placed.values()), dict(self._packs)

    def held(self) -> Held:
        """What the store holds once this writer's packs are in: for the next writer of a batch."""
        return Held(dict(self.index), dict(self._sizes))

    def _write(self, pack: Pack) -> None:
        """Hand ``pack`` to a writing thread (which joins, hashes and stores it); its records
        stay waiting (a record met again joins them) until it is written."""
        while len(self._writes) >= self._in_flight:  # bounds the memory packs waiting take
            self._written(self._writes.popleft().result())
        self._writes.append(self._io.submit(self._store, pack))

    def _store(self, pack: Pack) -> tuple[str, int, tuple[Module, ...], bool]:
        pack_id, data, placed = pack.assemble()
        key = pack_key(pack_id)
        # Named by its digest: the same bytes are there, unless it is known to be damaged.
        new = pack_id in self.damaged or not object_exists(self.store, key)
        if new:
            self.store.set(key, data)
        return pack_id, len(data), placed, new

    def _written(self, done: tuple[str, int, tuple[Module, ...], bool]) -> None:
        pack_id, size, placed_modules, new = done
        if new:
            self.written += 1
            self.written_bytes += size
        self._sizes[pack_id] = size
        for placed in placed_modules:
            placement = (pack_id, placed.offset, placed.stored_size)
            self.index[placed.record] = placement
            for module in self._waiting.pop(placed.record):
                self._place(placed if module.name == placed.name else module, placement)

    def _place(self, module: Module, placement: Placement) -> None:
        pack, offset, size = placement
        if size != module.stored_size:
            raise IntegrityError(f"record {module.record} is {size} bytes in pack {pack}, not {module.stored_size}")
        self._placed[module.name] = (
            module if (module.pack, module.offset) == (pack, offset) else module.placed(pack, offset)
        )
        self._packs.setdefault(pack, self._sizes[pack])


def placed_manifest(template: Manifest, modules: Iterable[Module], packs: Mapping[str, int]) -> Manifest:
    """``template`` (same content, splits, source) with its records where ``modules`` say: the
    template itself when they are where it says (its bytes, and so its id, unchanged)."""
    modules = list(modules)
    where = {m.name: (m.pack, m.offset) for m in template.modules}
    if (
        template.format == FORMAT_ID
        and len(modules) == len(template.modules)
        and template.packs == dict(packs)
        and all(where.get(m.name) == (m.pack, m.offset) for m in modules)
    ):
        return template
    return Manifest.build(
        hash=template.hash,
        codec=template.codec,
        source=template.source,
        modules=modules,
        splits={s.name: (s.kind, s.modules) for s in template.splits},
        files=template.files,
        packs=packs,
        v1_root=template.root if template.format != FORMAT_ID else template.v1_root,
        name=template.given_name,
    )
