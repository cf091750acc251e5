"""pack: a safetensors file (or a PEFT adapter folder) to a store of packs and a manifest."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from lorachunk._codec import BytePlaneZstd, Codec
from lorachunk._digest import DEFAULT_ALGORITHM, new_hasher
from lorachunk._entries import order_runs
from lorachunk._exceptions import FormatError, ManifestError, UsageError
from lorachunk._keys import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from lorachunk._layout import auto_splits, module_of, user_splits
from lorachunk._lock import locked
from lorachunk._manifest import (
    FORMAT_ID,
    MAX_FILES_BYTES,
    MAX_MODULE_RAW_BYTES,
    MAX_MODULES,
    MAX_TENSORS,
    Manifest,
    Module,
    Source,
    TensorEntry,
    check_files,
    check_name,
)
from lorachunk._manifest_json import check_lora_name, default_lora_name
from lorachunk._packing import DEFAULT_PACK_SIZE, layout_order
from lorachunk._record import encode_module
from lorachunk._repository import as_store, catalog_added, check_dest, write_manifest
from lorachunk._safetensors import (
    SafetensorsLayout,
    TensorInfo,
    header_json,
    padded,
    parse_header,
    read_header_length,
)
from lorachunk._threads import Progress, bounded_map, cpu_threads
from lorachunk._writer import Writer, check_pack_size, held_records
from lorachunk.storage import LocalStore, Store
from lorachunk.storage._local import open_regular

__all__ = ["pack"]


def pack(
    src: str | os.PathLike[str],
    dest: str | os.PathLike[str] | Store,
    *,
    splits: Mapping[str, Iterable[str]] | None = None,
    level: int = BytePlaneZstd.DEFAULT_LEVEL,
    hash: str = DEFAULT_ALGORITHM,
    pack_size: int = DEFAULT_PACK_SIZE,
    name: str | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Pack the safetensors file ``src`` into ``dest`` (a folder or a :class:`Store`).

    ``src`` may also be a PEFT adapter folder: its ``adapter_model.safetensors`` is packed and its
    other (small, text) files travel in the manifest, pinned by the root (``Manifest.files``).

    Parameters
    ----------
    splits:
        Extra named splits, ``{name: [glob, …]}`` (or ``{name: glob}``) over module names; they
        add to (and on a name clash replace) the automatic ones.
    level:
        zstd level for the records (1 to 22). Levels below 16 share one fast match finder tuned
        for byte planes, so they give nearly the same bytes; 16 and up use zstd's optimal parser,
        1-2% smaller on LoRAs of tiny tensors and tens of times slower (docs/format.md).
    hash:
        ``"xxh3-128"`` (fast, catches accidents) or ``"sha256"`` (resists tampering).
    name:
        The LoRA's name in the store (docs/library.md); default the file's stem, or the PEFT
        folder's name, made a valid name. Packing again under a name adds a version of it.
    pack_size:
        Bytes of module records per pack object (1 to 128 MiB; default 16 MiB). A LoRA smaller
        than this is one pack. Records ``dest`` already holds (an earlier version of the LoRA)
        are not written again: the new manifest names them where they are.

    Returns the :class:`Manifest`; ``refs/latest`` of the store points at it.

    Raises :class:`FormatError` for a file that is not valid safetensors or is past the limits
    of the format (docs/format.md), :class:`UsageError` for a split glob that matches nothing, a
    level outside 1..22 or an unknown hash, and :class:`StoreError` when ``dest`` cannot be
    written. On any error no manifest or ref is written; in a local folder nothing at all appears
    (a folder this call created is removed again), while in stores whose writes show at once
    (fsspec, memory) the packs written before the error stay, unreferenced, for the next pack
    to reuse: a writer never deletes an object that another writer may have committed too.

    Example: ``pack("lora.safetensors", "lora.lcs", splits={"attn": ["*attn*"]}).root``
    """
    try:  # options are checked before anything is read
        codec = BytePlaneZstd.for_level(level)
        new_hasher(hash)
        check_pack_size(pack_size)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if name is not None:
        check_lora_name(name, UsageError)
    check_dest(dest)
    path, files = _adapter_folder(Path(src)) if Path(src).is_dir() else (Path(src), {})
    if name is None and Path(src).is_dir():
        name = default_lora_name(Path(src).resolve().name)
    with ExitStack() as stack, _mapped_source(path) as (layout, data, size):
        grouped = _group(path, layout.tensors)
        names = list(grouped)
        all_splits = auto_splits(names) | user_splits(splits or {}, names)
        store = stack.enter_context(as_store(dest))
        created = store.root if isinstance(store, LocalStore) and not store.root.exists() else None
        try:
            # The source's sha256 (one core at ~1 GB/s) runs beside the encoding, not after it.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorachunk-sha256") as hashing:
                sha256 = hashing.submit(_sha256, data)
                # One batch for packs, manifest and ref: in a local folder nothing appears unless
                # all of it does, and each pack is durable before the manifest names it.
                with locked(store, exclusive=False, command="pack"):
                    with store.batch():
                        held = held_records(store, algorithm=hash, name=name or default_lora_name(path.stem))
                        with Writer(store, algorithm=hash, pack_size=pack_size, held=held) as writer:
                            order = layout_order(names, all_splits)
                            _encode_all(
                                data,
                                layout,
                                grouped,
                                order,
                                codec=codec,
                                algorithm=hash,
                                writer=writer,
                                progress=progress,
                            )
                            modules, packs = writer.finish()
                        source = _source(path, size, sha256.result(), layout, modules)
                        manifest = Manifest.build(
                            hash=hash,
                            codec=codec.get_config(),
                            source=source,
                            modules=modules,
                            splits=all_splits,
                            files=files,
                            packs=packs,
                            name=name,
                        )
                        write_manifest(store, manifest)
                    # After the batch: the catalog never names a manifest that is not in place.
                    catalog_added(store, manifest, new_bytes=writer.written_bytes)
        except BaseException:
            if created is not None:
                _remove_empty_folders(created)
            raise
    return manifest


def _remove_empty_folders(root: Path) -> None:
    """Undo the folders a failed pack made, bottom up. Files are never removed and rmdir refuses
    a folder that holds anything, so what another writer has put there meanwhile stays."""
    for folder, _, _ in sorted(os.walk(root), key=lambda entry: -len(entry[0])):
        with suppress(OSError):
            os.rmdir(folder)


def _adapter_folder(folder: Path) -> tuple[Path, dict[str, str]]:
    """A PEFT adapter folder: its weights file, and every other file in it as text to carry along."""
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FormatError(f"{folder} is a folder without {ADAPTER_WEIGHTS}; pack a .safetensors file or a PEFT folder")
    files: dict[str, str | None] = {}
    refused = []
    for path in sorted(folder.iterdir()):
        if path == weights or path.name.startswith("."):
            continue
        if path.is_symlink():
            # Carried files are published as they are: a link could carry a secret (a key file)
            # from outside the folder into a manifest and onto the Hub.
            raise FormatError(
                f"{path} is a symbolic link; the files packed with a PEFT adapter must be regular files "
                "in its folder (copy the folder with real files, e.g. snapshot_download(local_dir=…))"
            )
        try:
            with open_regular(path) as handle:
                files[path.name] = handle.read(MAX_FILES_BYTES + 1).decode("utf-8")
        except (UnicodeDecodeError, OSError):
            files[path.name] = None
        if files[path.name] is None:
            refused.append(path.name)
    if refused:
        raise UsageError(f"{folder}: only small text files travel with the tensors; cannot carry {refused}")
    carried = {name: text for name, text in files.items() if text is not None}
    try:
        check_files(carried)
    except ManifestError as exc:
        raise UsageError(f"{folder}: {exc}") from None
    config = carried.get(ADAPTER_CONFIG)
    if config is not None:
        # Caught here, not when somebody loads the adapter from a store pinned with it.
        try:
            is_object = isinstance(json.loads(config), dict)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise FormatError(f"{folder / ADAPTER_CONFIG} is not JSON: {exc}") from None
        if not is_object:
            raise FormatError(f"{folder / ADAPTER_CONFIG} is not a JSON object")
    return weights, carried


def _source(path: Path, size: int, sha256: str, layout: SafetensorsLayout, modules: Sequence[Module]) -> Source:
    flat = [t.key for m in sorted(modules, key=lambda m: m.name) for t in m.tensors]
    order = order_runs(flat, [t.key for t in layout.tensors])
    by_key = {t.key: t for t in layout.tensors}
    file_order = [by_key[flat[i]] for first, count in order for i in range(first, first + count)]
    text = header_json(file_order, layout.metadata)
    for align in (8, 1):
        if padded(text, align) == layout.header:
            return Source(path.name, size, f"sha256:{sha256}", layout.metadata, order, align, None)
    # Written by something other than the safetensors library: keep the header text verbatim.
    return Source(path.name, size, f"sha256:{sha256}", layout.metadata, order, 8, layout.header.decode())


@contextmanager
def _mapped_source(path: Path) -> Iterator[tuple[SafetensorsLayout, memoryview, int]]:
    """The validated layout of ``path`` and a read-only memory map of the whole file."""
    try:
        handle = open_regular(path, follow=True)  # links are fine (the Hub's cache is made of them); FIFOs are not
        size = os.fstat(handle.fileno()).st_size
    except OSError as exc:
        if path.is_dir():
            raise FormatError(f"{path} is a folder, not a safetensors file") from None
        raise FormatError(f"cannot read {path}: {exc.strerror or exc}") from exc
    with handle:
        layout = _read_layout(handle, size, path)
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        try:
            yield layout, memoryview(mapping) if mapping is not None else memoryview(b""), size
        finally:
            if mapping is not None:
                with suppress(BufferError):  # a slice is still alive; the map goes with it
                    mapping.close()


def _read_layout(handle: BinaryIO, size: int, path: Path) -> SafetensorsLayout:
    try:
        length = read_header_length(handle.read(8), file_size=size)
        header = handle.read(length)
        header.decode()
        layout = parse_header(header, data_length=size - 8 - length, max_tensors=MAX_TENSORS)
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path}: header is not UTF-8") from exc
    except FormatError as exc:
        raise FormatError(f"{path}: {exc}") from exc
    for tensor in layout.tensors:
        try:
            tensor.key.encode()
        except UnicodeEncodeError:
            raise FormatError(f"{path}: tensor key {tensor.key!r} is not valid Unicode") from None
    return layout


def _sha256(data: memoryview) -> str:
    hasher = hashlib.sha256()
    step = 64 * 1024 * 1024
    for start in range(0, len(data), step):
        hasher.update(data[start : start + step])
    return hasher.hexdigest()


def _group(path: Path, tensors: Sequence[TensorInfo]) -> dict[str, list[TensorInfo]]:
    """Tensors by module, within the limits every reader enforces (docs/format.md), so that a
    pack never writes what no reader would read."""
    if len(tensors) > MAX_TENSORS:
        raise FormatError(f"{path}: {len(tensors)} tensors; a {FORMAT_ID} manifest holds at most {MAX_TENSORS}")
    grouped: dict[str, list[TensorInfo]] = {}
    try:
        for tensor in tensors:
            grouped.setdefault(check_name(module_of(check_name(tensor.key, "tensor key")), "module name"), []).append(
                tensor
            )
    except ManifestError as exc:
        raise FormatError(f"{path}: {exc}") from None
    if len(grouped) > MAX_MODULES:
        raise FormatError(f"{path}: {len(grouped)} modules; a {FORMAT_ID} manifest holds at most {MAX_MODULES}")
    for name, group in grouped.items():
        if (size := sum(t.length for t in group)) > MAX_MODULE_RAW_BYTES:
            raise FormatError(
                f"{path}: module {name!r} holds {size} bytes; a {FORMAT_ID} module holds at most {MAX_MODULE_RAW_BYTES}"
            )
    return grouped


def _encode_all(
    data: memoryview,
    layout: SafetensorsLayout,
    grouped: Mapping[str, list[TensorInfo]],
    order: Sequence[tuple[str, str]],
    *,
    codec: Codec,
    algorithm: str,
    writer: Writer,
    progress: Progress | None,
) -> None:
    """Encode every module on the CPU threads and hand the records to ``writer`` in ``order``
    (so that each split is one run of bytes in its pack)."""
    base = layout.data_start
    groups = dict(order)

    def encode(name: str) -> tuple[Module, bytes]:
        entries, position = [], 0
        for t in grouped[name]:
            entries.append(TensorEntry(t.key, t.dtype, t.shape, position, t.length))
            position += t.length
        return encode_module(name, _module_bytes(data, base, grouped[name]), entries, codec=codec, algorithm=algorithm)

    done = 0
    size = lambda name: sum(t.length for t in grouped[name])  # noqa: E731
    for module, stored in bounded_map(encode, [name for name, _ in order], threads=cpu_threads(), size=size):
        writer.add(module, stored, groups[module.name])
        done += module.raw_size
        if progress is not None:
            progress(done, layout.data_length)


def _module_bytes(data: memoryview, base: int, tensors: Sequence[TensorInfo]) -> memoryview:
    start = base + tensors[0].offset
    end = base + tensors[-1].offset + tensors[-1].length
    if end - start == sum(t.length for t in tensors):
        return data[start:end]  # contiguous in the file: no copy
    return memoryview(b"".join(data[base + t.offset : base + t.offset + t.length] for t in tensors))
