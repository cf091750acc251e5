"""Compose a new LoRA from splits of others: a new manifest over the records that already exist.

The composed LoRA is a LoRA like any other: it verifies, loads, unpacks to a valid safetensors
file (whose sha256 the manifest records) and pushes. Records are named by their digests, so a part
taken as it is costs nothing where its records already live (a shared folder, a Hub repo holding
the sources); elsewhere its stored bytes are copied, verified, never re-encoded. A part with a
strength other than 1 gets new records: its delta tensors are multiplied (in float32, like
``LoRA.load(scales=…)``) and re-encoded.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import BinaryIO, Final

from lorachunk._codec import BytePlaneZstd
from lorachunk._entries import order_runs
from lorachunk._exceptions import BaseModelWarning, StoreError, UsageError
from lorachunk._layout import as_names, auto_splits, finite_scales, scale_targets
from lorachunk._lock import locked
from lorachunk._manifest import Manifest, Module, Source, TensorEntry
from lorachunk._packing import layout_order
from lorachunk._record import decode_checked, encode_module
from lorachunk._repository import as_store, catalog_added, check_dest, fetch_records, read_manifest, write_manifest
from lorachunk._safetensors import TensorInfo, encode_header
from lorachunk._threads import cpu_threads
from lorachunk._writer import Writer, held_records
from lorachunk.storage import Store

__all__ = ["Take", "compose", "parse_take"]

#: Recorded in the composed file's ``__metadata__``: which parts it was made of.
METADATA_KEY: Final = "lorachunk.composed_from"


@dataclass(frozen=True, slots=True)
class Take:
    """One part of a composed LoRA: the split ``split`` (or all) of the packed LoRA at ``source``,
    its latest or the manifest ``manifest`` (an id or unique hex prefix)."""

    name: str
    source: str | os.PathLike[str] | Store
    split: str | None = None
    manifest: str | None = None


_TAKE_MANIFEST: Final = re.compile(r"^((?:[a-z0-9-]+:)?[0-9a-f]+)(?::(.+))?$")


def parse_take(text: str) -> Take:
    """``NAME=SOURCE[#MANIFEST][:SPLIT]`` → :class:`Take`. A URL's own colons are not taken for
    the split; ``#`` (not ``@``, which ``hf://`` URLs use for the revision) names a manifest."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise UsageError(f"--take wants NAME=SOURCE[#MANIFEST][:SPLIT], got {text!r}")
    source, hash_sign, tail = rest.partition("#")
    if hash_sign:
        match = _TAKE_MANIFEST.match(tail)
        if not source or match is None:
            raise UsageError(
                f"--take wants NAME=SOURCE#MANIFEST[:SPLIT] with a manifest id or hex prefix, got {text!r}"
            )
        return Take(name, source, match[2], match[1])
    source, colon, split = rest.rpartition(":")
    if not colon or not source or "/" in split:  # "/" after the last colon: a URL, no split
        return Take(name, rest)
    return Take(name, source, split or None)


@dataclass
class _Part:
    take: Take
    store: Store
    manifest: Manifest
    modules: list[Module]


def compose(
    dest: str | os.PathLike[str] | Store,
    takes: Sequence[Take],
    *,
    scales: Mapping[str, float] | None = None,
    prefer: Sequence[str] = (),
    name: str = "composed.safetensors",
) -> Manifest:
    """Write into ``dest`` a LoRA made of ``takes``; return its manifest (``refs/latest`` points at it).

    ``scales`` maps take names to strengths baked into the new LoRA. Two takes claiming the same
    module is a :class:`UsageError` unless one of them is in ``prefer`` (earlier wins). Every take
    becomes a split of the result (``kind: part``) next to the automatic ones. ``name`` is the
    result's source file name, as ``info`` shows it.

    Example: ``compose("mix.lcs", [Take("style", "a.lcs", "style"), Take("content", "b.lcs", "content")])``
    """
    if not takes:
        raise UsageError("compose needs at least one --take")
    if not all(isinstance(t, Take) for t in takes):
        raise UsageError("compose takes a list of Take(name, source, split)")
    prefer = as_names(prefer)
    names = [t.name for t in takes]
    if len(set(names)) != len(names):
        raise UsageError(f"take names must be unique, got {names}")
    scales = finite_scales(scales or {})
    unknown = sorted(set(scales) - set(names)) + sorted(set(prefer) - set(names))
    if unknown:
        raise UsageError(f"--scale/--prefer name no take: {unknown}")
    with ExitStack() as stack:
        parts = [_open(stack, take) for take in takes]
        algorithm = parts[0].manifest.hash
        for part in parts:
            if part.manifest.hash != algorithm or part.manifest.codec.get("id") != BytePlaneZstd.codec_id:
                used = f"hash {part.manifest.hash} and codec {part.manifest.codec.get('id')}"
                raise UsageError(
                    f"take {part.take.name!r} uses {used}; composing needs one hash ({algorithm}) "
                    f"and the {BytePlaneZstd.codec_id} codec"
                )
        _warn_if_bases_differ(parts)
        owner = _claim(parts, prefer)
        check_dest(dest)
        out = stack.enter_context(as_store(dest))
        codec = BytePlaneZstd.for_level()
        modules: dict[str, Module] = {}
        # Decoded modules wait on disk, not in memory, until the composed file's sha256 is taken
        # in its own tensor order. The records (compressed) are held until they go into packs in
        # split order: composing holds about the result's stored size in RAM.
        raws = _Spool()
        stack.callback(raws.close)
        file_order: list[TensorEntry] = []
        records: dict[str, bytes | memoryview] = {}
        for part in parts:
            factor = scales.get(part.take.name)
            owned = [m for m in part.modules if owner[m.name] is part]
            for module, stored in fetch_records(part.store, owned, part.manifest.packs, threads=cpu_threads()):
                # Checked once, then decoded (the composed file's sha256 needs the raw bytes).
                raw = bytearray(module.raw_size)
                decode_checked(codec, module, stored, memoryview(raw), what=f" of take {part.take.name!r}")
                if factor is not None and factor != 1.0:
                    _scale(raw, module, factor)
                    # The scaled module replaces the taken one.
                    module, stored = encode_module(  # noqa: PLW2901
                        module.name, raw, module.tensors, codec=codec, algorithm=algorithm
                    )
                modules[module.name] = module
                records[module.name] = stored
                raws.add(module.name, raw)
            by_key = {t.key: t for m in owned for t in m.tensors}
            file_order += [by_key[t.key] for t in part.manifest.file_order() if t.key in by_key]
        metadata = {
            METADATA_KEY: json.dumps(
                [
                    {
                        "name": p.take.name,
                        "root": p.manifest.root,
                        "split": p.take.split,
                        "scale": scales.get(p.take.name),
                    }
                    for p in parts
                ],
                sort_keys=True,
            )
        }
        source = _source(name, modules, raws, file_order, metadata)
        splits: dict[str, tuple[str, list[str]]] = dict(auto_splits(modules))
        for part in parts:
            splits[part.take.name] = ("part", [m.name for m in part.modules if owner[m.name] is part])
        # Records ``dest`` holds (a take from the same store, an earlier compose) stay where they
        # are: composing over them writes a manifest only.
        # One flush for all new packs, before the manifest names them.
        with locked(out, exclusive=False, command="compose"), out.batch():
            with Writer(out, algorithm=algorithm, held=held_records(out, algorithm=algorithm)) as writer:
                for module_name, group in layout_order(modules, splits):
                    writer.add(modules[module_name], records[module_name], group)
                placed, packs = writer.finish()
            manifest = Manifest.build(
                hash=algorithm, codec=codec.get_config(), source=source, modules=placed, splits=splits, packs=packs
            )
            write_manifest(out, manifest)
        catalog_added(out, manifest, new_bytes=writer.written_bytes)
    return manifest


def _open(stack: ExitStack, take: Take) -> _Part:
    store = stack.enter_context(as_store(take.source))
    manifest = read_manifest(store, take.manifest)
    chosen = manifest.split(take.split).modules if take.split else [m.name for m in manifest.modules]
    return _Part(take, store, manifest, [manifest.module(n) for n in chosen])


def _warn_if_bases_differ(parts: Sequence[_Part]) -> None:
    """Takes trained for different base models (an SD 1.5 LoRA and an SD 2 one) compose into a
    file no pipeline loads as meant; said, naming both, but not refused (the hint may be wrong)."""
    known = [(part.take.name, part.manifest.base_model) for part in parts if part.manifest.base_model]
    for (name, base), (other, other_base) in itertools.pairwise(known):
        if base != other_base:
            warnings.warn(
                f"take {name!r} is for {base} and take {other!r} for {other_base}: the composed LoRA mixes base models",
                BaseModelWarning,
                stacklevel=3,
            )
            return


def _claim(parts: Sequence[_Part], prefer: Sequence[str]) -> dict[str, _Part]:
    """Module name → the part it comes from; two claims need ``prefer`` to settle them."""
    rank = {name: i for i, name in enumerate(prefer)}
    owner: dict[str, _Part] = {}
    for part in parts:
        for module in part.modules:
            other = owner.get(module.name)
            if other is None:
                owner[module.name] = part
                continue
            ranks = (rank.get(other.take.name), rank.get(part.take.name))
            if ranks == (None, None):
                raise UsageError(
                    f"takes {other.take.name!r} and {part.take.name!r} both hold module {module.name!r}; "
                    "say which wins with --prefer NAME"
                )
            if ranks[0] is None or (ranks[1] is not None and ranks[1] < ranks[0]):
                owner[module.name] = part
    return owner


def _scale(raw: bytearray, module: Module, factor: float) -> None:
    """Multiply ``module``'s delta tensors in ``raw`` (its decoded bytes) by ``factor``, in place."""
    targets = set(scale_targets(t.key for t in module.tensors))
    if not targets:
        return
    from lorachunk import _torch  # only composing with strengths needs torch

    for entry in module.tensors:
        if entry.key in targets and not _torch.scale_bytes(raw, entry, factor):
            raise UsageError(
                f"scale {factor:g} overflows {entry.dtype} in tensor {entry.key!r} (module {module.name!r}); "
                "use a smaller scale"
            )


def _source(
    name: str,
    modules: Mapping[str, Module],
    raws: _Spool,
    file_order: Sequence[TensorEntry],
    metadata: Mapping[str, str],
) -> Source:
    """The file the composed LoRA unpacks to: header as the safetensors library writes it, then
    the tensors part after part, each part in its source file's order."""
    owner = {t.key: m for m in modules.values() for t in m.tensors}
    infos, position = [], 0
    for entry in file_order:
        infos.append(TensorInfo(entry.key, entry.dtype, entry.shape, position, entry.length))
        position += entry.length
    header = encode_header(infos, metadata)
    hasher = hashlib.sha256(header)
    for chunk in _tensor_bytes(file_order, owner, raws):
        hasher.update(chunk)
    ordered = sorted(modules.values(), key=lambda m: m.name)
    flat = [t.key for m in ordered for t in m.tensors]
    order = order_runs(flat, [t.key for t in file_order])
    return Source(name, len(header) + position, f"sha256:{hasher.hexdigest()}", dict(metadata), order, 8, None)


def _tensor_bytes(file_order: Sequence[TensorEntry], owner: Mapping[str, Module], raws: _Spool) -> Iterator[bytes]:
    for entry in file_order:
        yield raws.read(owner[entry.key].name, entry.offset, entry.length)


class _Spool:
    """Modules' raw bytes in an anonymous temporary file, read back by slice."""

    def __init__(self) -> None:
        try:
            self._handle: BinaryIO = tempfile.TemporaryFile(prefix="lorachunk-compose-")  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise StoreError(f"cannot make a temporary file for decoded modules: {exc.strerror or exc}") from exc
        self._starts: dict[str, int] = {}
        self._end = 0
        self._dirty = False

    def add(self, name: str, raw: bytes | bytearray) -> None:
        try:
            self._handle.write(raw)
        except OSError as exc:
            raise StoreError(f"cannot hold decoded modules in a temporary file: {exc.strerror or exc}") from exc
        self._starts[name] = self._end
        self._end += len(raw)
        self._dirty = True

    def read(self, name: str, offset: int, length: int) -> bytes:
        start, parts = self._starts[name] + offset, []
        try:
            if self._dirty:
                self._handle.flush()
                self._dirty = False
            while length:  # pread may return less than asked for (e.g. over 2 GB at once)
                part = os.pread(self._handle.fileno(), length, start)
                if not part:
                    raise OSError(f"it ended {length} bytes early")
                parts.append(part)
                start, length = start + len(part), length - len(part)
        except OSError as exc:
            raise StoreError(f"cannot read back decoded modules: {exc.strerror or exc}") from exc
        return b"".join(parts)

    def close(self) -> None:
        self._handle.close()
