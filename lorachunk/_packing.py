"""Packs (``lorachunk/2``): how module records are laid out in them, and how a reader plans the
byte ranges it asks a store for. Pure functions of sizes and names: no store is touched here."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from lorachunk._digest import digest
from lorachunk._entries import Module
from lorachunk._layout import natural_key

__all__ = [
    "DEFAULT_GAP",
    "DEFAULT_PACK_SIZE",
    "MAX_PACK_SIZE",
    "MAX_REQUEST",
    "MIN_PACK_SIZE",
    "WHOLE_MAX",
    "Pack",
    "PackBuilder",
    "Read",
    "Span",
    "layout_order",
    "plan_reads",
]

MIB: Final = 1024 * 1024
#: A LoRA smaller than this is one pack; larger ones are cut into packs of about this size.
DEFAULT_PACK_SIZE: Final = 16 * MIB
MIN_PACK_SIZE: Final = 1 * MIB
MAX_PACK_SIZE: Final = 128 * MIB
#: Two ranges of one pack at most this far apart are read as one request (the bytes between are
#: cheaper than a round trip on any link slower than ~20 Mbit/s at 100 ms).
DEFAULT_GAP: Final = 256 * 1024
#: No request asks for more: S3 and the Hub's CDN serve one range per request, and a failed
#: request is retried whole.
MAX_REQUEST: Final = 16 * MIB
#: A pack this small, or one at least half of which is needed, is read whole (and checked
#: against its name).
WHOLE_MAX: Final = 2 * MIB


@dataclass(frozen=True, slots=True)
class Span:
    """Bytes ``[start, start + length)`` a reader needs from one object."""

    start: int
    length: int


@dataclass(frozen=True, slots=True)
class Read:
    """One request: bytes ``[start, end)`` of the object ``key``; ``whole`` when that is all of it."""

    key: str
    start: int
    end: int
    whole: bool = False


def plan_reads(
    needs: Mapping[str, tuple[int, Iterable[Span]]], *, gap: int = DEFAULT_GAP, cap: int = MAX_REQUEST
) -> list[Read]:
    """The requests that fetch every needed span: ``needs`` maps an object's key to its size and
    the spans wanted from it.

    Spans of one object at most ``gap`` bytes apart are joined; no request is over ``cap``
    bytes (a longer span is read in pieces); an object of at most :data:`WHOLE_MAX` bytes, or
    one at least half of which is needed, is read whole. Nothing outside an object is asked for.
    """
    reads: list[Read] = []
    for key, (size, spans) in needs.items():
        merged = _merged(span for span in spans if span.length)
        needed = sum(end - start for start, end in merged)
        if not merged:
            continue
        if (size <= WHOLE_MAX or 2 * needed >= size) and size <= cap:
            reads.append(Read(key, 0, size, whole=True))
            continue
        join = size if 2 * needed >= size else gap  # mostly needed: the gaps cost less than requests
        reads.extend(_joined(key, merged, join, cap))
    return reads


def _merged(spans: Iterable[Span]) -> list[tuple[int, int]]:
    """Spans as sorted, disjoint ``(start, end)`` runs (overlapping or touching ones merged)."""
    runs: list[tuple[int, int]] = []
    for span in sorted(spans, key=lambda s: s.start):
        end = span.start + span.length
        if runs and span.start <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(runs[-1][1], end))
        else:
            runs.append((span.start, end))
    return runs


def _joined(key: str, runs: Sequence[tuple[int, int]], gap: int, cap: int) -> Iterator[Read]:
    start, end = runs[0]
    for next_start, next_end in runs[1:]:
        if next_start - end <= gap and next_end - start <= cap:
            end = next_end
            continue
        yield from _capped(key, start, end, cap)
        start, end = next_start, next_end
    yield from _capped(key, start, end, cap)


def _capped(key: str, start: int, end: int, cap: int) -> Iterator[Read]:
    for piece in range(start, end, cap):
        yield Read(key, piece, min(piece + cap, end))


def layout_order(names: Iterable[str], splits: Mapping[str, tuple[str, Iterable[str]]]) -> list[tuple[str, str]]:
    """Module names in the order their records go into packs, each with its group.

    Modules are ordered by component, then block (or layer), then name, so that every component,
    block and layer split is one contiguous run of bytes in each pack it touches. The group
    (component and block) is where a writer prefers to end a pack.
    """
    component: dict[str, str] = {}
    block: dict[str, str] = {}
    for split_name, (kind, members) in sorted(splits.items(), key=lambda item: natural_key(item[0])):
        into = component if kind == "component" else block if kind in ("block", "layer") else None
        if into is not None:
            for member in members:
                into.setdefault(member, split_name)

    def key(name: str) -> tuple[object, ...]:
        # Within a group, by name as the manifest lists modules: a record then mostly starts where
        # the one before it in the manifest ends, which the manifest need not say.
        comp, blk = component.get(name), block.get(name)
        return (comp is None, natural_key(comp or ""), blk is None, natural_key(blk or ""), name)

    return [(name, f"{component.get(name, '')}\x00{block.get(name, '')}") for name in sorted(names, key=key)]


@dataclass(frozen=True, slots=True)
class Pack:
    """A pack's records, in order; :meth:`assemble` makes its bytes, digest and placed modules
    (left to whoever writes it: joining and hashing tens of MB is worth a thread of its own)."""

    algorithm: str
    records: tuple[tuple[Module, bytes | memoryview], ...]

    @property
    def modules(self) -> tuple[Module, ...]:
        return tuple(module for module, _ in self.records)

    def assemble(self) -> tuple[str, bytes, tuple[Module, ...]]:
        """The pack's digest, its bytes, and its modules with their places in it."""
        data = b"".join(stored for _, stored in self.records)
        pack = digest(self.algorithm, data)
        placed, offset = [], 0
        for module, stored in self.records:
            placed.append(module.placed(pack, offset))
            offset += len(stored)
        return pack, data, tuple(placed)


class PackBuilder:
    """Collects module records in layout order and cuts them into packs of about ``target``
    bytes: a pack ends before the record that would take it over ``target``, or at the last
    change of group if that leaves the pack at least 15/16 full, so splits stay whole where they
    can. A LoRA smaller than ``target`` is one pack; a record larger than it is a pack alone."""

    def __init__(self, *, target: int, algorithm: str) -> None:
        self.target = target
        self.algorithm = algorithm
        self._pending: list[tuple[Module, bytes | memoryview, str]] = []
        self._size = 0

    def add(self, module: Module, stored: bytes | memoryview, group: str) -> list[Pack]:
        """Take ``module``'s record; return the packs this completes."""
        done = []
        if self._pending and self._size + len(stored) > self.target:
            done.append(self._cut(self._boundary()))
            if self._pending and self._size + len(stored) > self.target:
                done.append(self._cut(len(self._pending)))
        self._pending.append((module, stored, group))
        self._size += len(stored)
        return done

    def finish(self) -> list[Pack]:
        return [self._cut(len(self._pending))] if self._pending else []

    def _boundary(self) -> int:
        """Where to end the pending pack: at its last change of group if that leaves it at least
        15/16 full, else after everything pending. Fuller packs keep the count of objects at
        ceil(stored / target) on every file measured (docs/benchmarks.md); a laxer rule keeps
        more splits whole but may end packs half full, up to twice as many."""
        position = self._size
        for index in range(len(self._pending) - 1, 0, -1):
            position -= len(self._pending[index][1])
            if 16 * position < 15 * self.target:
                break
            if self._pending[index][2] != self._pending[index - 1][2]:
                return index
        return len(self._pending)

    def _cut(self, count: int) -> Pack:
        taken, self._pending = self._pending[:count], self._pending[count:]
        self._size -= sum(len(stored) for _, stored, _ in taken)
        return Pack(self.algorithm, tuple((module, stored) for module, stored, _ in taken))
