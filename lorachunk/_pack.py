"""pack, unpack and verify: a safetensors file to a store of shards and back."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import stat
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final, Literal, TypeVar

from lorachunk._codec import BytePlaneZstd, Codec, Segment, codec_from_config
from lorachunk._digest import DEFAULT_ALGORITHM, check, digest, new_hasher, split_digest
from lorachunk._exceptions import (
    FormatError,
    IntegrityError,
    LorachunkError,
    ManifestError,
    ShardNotFoundError,
    StoreError,
    UsageError,
)
from lorachunk._layout import as_names, auto_splits, matching, module_of, user_splits
from lorachunk._manifest import (
    FORMAT_ID,
    MAX_FILES_BYTES,
    MAX_MODULES,
    MAX_SHARD_RAW_BYTES,
    MAX_TENSORS,
    Manifest,
    Module,
    Source,
    TensorEntry,
    check_files,
    check_name,
    order_runs,
)
from lorachunk._repository import (
    LATEST,
    LATEST_MANIFEST,
    as_store,
    check_dest,
    latest_id,
    list_manifest_ids,
    no_lora_error,
    partial_ids,
    read_manifest,
    read_shard,
    read_stored_manifest,
    resolve,
    shard_key,
    write_manifest,
)
from lorachunk._safetensors import (
    SafetensorsLayout,
    TensorInfo,
    encode_header,
    header_json,
    padded,
    parse_header,
    read_header_length,
)
from lorachunk.storage import LocalStore, Store
from lorachunk.storage._local import create_temp, open_regular, write_atomic

__all__ = ["Progress", "VerifyReport", "pack", "unpack", "verify"]

#: ``progress(done, total)`` in bytes of the source (pack) or output (unpack).
Progress = Callable[[int, int], None]
_T = TypeVar("_T")
_R = TypeVar("_R")


#: Threads that write shards. Writing is mostly waiting for the disk (file creation, and the
#: fsync of each large shard), so a few help on any disk.
_IO_THREADS: Final = 4
#: Bytes of modules one task on a thread takes at least, and most shards one writing task takes.
_CHUNK_BYTES: Final = 1024 * 1024
_WRITE_GROUP: Final = 16


def cpu_threads() -> int:
    """Threads for encoding and decoding: ``LORACHUNK_THREADS`` or the CPU count, at most 8."""
    configured = os.environ.get("LORACHUNK_THREADS", "")
    # isascii: str.isdigit() takes "²", which int() refuses.
    if configured.isascii() and configured.isdigit():
        return max(1, min(int(configured), 256))
    return min(8, os.cpu_count() or 1)


def pack(
    src: str | os.PathLike[str],
    dest: str | os.PathLike[str] | Store,
    *,
    splits: Mapping[str, Iterable[str]] | None = None,
    level: int = BytePlaneZstd.DEFAULT_LEVEL,
    hash: str = DEFAULT_ALGORITHM,
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
        zstd level for the shards (1 to 22). Levels below 16 share one fast match finder tuned
        for byte planes, so they give nearly the same bytes; 16 and up use zstd's optimal parser,
        1-2% smaller on LoRAs of tiny tensors and tens of times slower (docs/format.md).
    hash:
        ``"xxh3-128"`` (fast, catches accidents) or ``"sha256"`` (resists tampering).

    Returns the :class:`Manifest`; ``refs/latest`` of the store points at it.

    Raises :class:`FormatError` for a file that is not valid safetensors or is past the limits
    of the format (docs/format.md), :class:`UsageError` for a split glob that matches nothing, a
    level outside 1..22 or an unknown hash, and :class:`StoreError` when ``dest`` cannot be
    written. On any error no manifest or ref is written; in a local folder nothing at all appears
    (a folder this call created is removed again), while in stores whose writes show at once
    (fsspec, memory) the shards written before the error stay, unreferenced, for the next pack
    to reuse: a writer never deletes an object that another writer may have committed too.

    Example: ``pack("lora.safetensors", "lora.lcs", splits={"attn": ["*attn*"]}).root``
    """
    try:  # options are checked before anything is read
        codec = BytePlaneZstd.for_level(level)
        new_hasher(hash)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    check_dest(dest)
    path, files = _adapter_folder(Path(src)) if Path(src).is_dir() else (Path(src), {})
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
                # One batch for shards, manifest and ref: in a local folder nothing appears unless
                # all of it does, and each shard is durable before the manifest names it.
                with store.batch():
                    modules = list(
                        _encode_all(data, layout, grouped, codec=codec, algorithm=hash, store=store, progress=progress)
                    )
                    source = _source(path, size, sha256.result(), layout, modules)
                    manifest = Manifest.build(
                        hash=hash,
                        codec=codec.get_config(),
                        source=source,
                        modules=modules,
                        splits=all_splits,
                        files=files,
                    )
                    write_manifest(store, manifest)
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


ADAPTER_WEIGHTS: Final = "adapter_model.safetensors"
ADAPTER_CONFIG: Final = "adapter_config.json"


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
        layout = parse_header(header, data_length=size - 8 - length)
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
        if (size := sum(t.length for t in group)) > MAX_SHARD_RAW_BYTES:
            raise FormatError(
                f"{path}: module {name!r} holds {size} bytes; a {FORMAT_ID} shard holds at most {MAX_SHARD_RAW_BYTES}"
            )
    return grouped


def _encode_all(
    data: memoryview,
    layout: SafetensorsLayout,
    grouped: Mapping[str, list[TensorInfo]],
    *,
    codec: Codec,
    algorithm: str,
    store: Store,
    progress: Progress | None,
) -> Iterator[Module]:
    base = layout.data_start
    total = layout.data_length
    done = 0

    def encode(item: tuple[str, list[TensorInfo]]) -> tuple[Module, bytes]:
        name, tensors = item
        raw = _module_bytes(data, base, tensors)
        entries, position = [], 0
        for t in tensors:
            entries.append(TensorEntry(t.key, t.dtype, t.shape, position, t.length))
            position += t.length
        segments = tuple(Segment(e.offset, e.length, e.itemsize) for e in entries)
        stored, frames = codec.encode(raw, segments)
        module = Module(
            name, digest(algorithm, stored), digest(algorithm, raw), len(stored), len(raw), frames, tuple(entries)
        )
        return module, stored

    def write(shards: list[tuple[str, bytes]]) -> None:
        for key, stored in shards:
            if not store.exists(key):
                store.set(key, stored)

    # Shards are written on their own threads (into the caller's store batch: temp files now,
    # flushed and renamed at its end): waiting for the disk then overlaps with encoding the next
    # modules instead of adding to it. A key goes to them once, so identical modules are stored
    # once. Small shards go in groups, as modules go to the encoding threads (_ordered_map).
    with ThreadPoolExecutor(max_workers=_IO_THREADS, thread_name_prefix="lorachunk-io") as io:
        writes: deque[Future[None]] = deque()
        submitted: set[str] = set()
        group: list[tuple[str, bytes]] = []
        group_bytes = 0
        for module, stored in _ordered_map(encode, grouped.items(), size=lambda item: sum(t.length for t in item[1])):
            key = shard_key(module.shard)
            if key not in submitted:
                submitted.add(key)
                group.append((key, stored))
                group_bytes += len(stored)
            if len(group) >= _WRITE_GROUP or group_bytes >= _CHUNK_BYTES:
                writes.append(io.submit(write, group))
                group, group_bytes = [], 0
            while len(writes) > 4 * _IO_THREADS or (writes and writes[0].done()):
                writes.popleft().result()  # bounds memory; raises a write's error here
            done += module.raw_size
            if progress is not None:
                progress(done, total)
            yield module
        if group:
            writes.append(io.submit(write, group))
        while writes:
            writes.popleft().result()


def _module_bytes(data: memoryview, base: int, tensors: Sequence[TensorInfo]) -> memoryview:
    start = base + tensors[0].offset
    end = base + tensors[-1].offset + tensors[-1].length
    if end - start == sum(t.length for t in tensors):
        return data[start:end]  # contiguous in the file: no copy
    return memoryview(b"".join(data[base + t.offset : base + t.offset + t.length] for t in tensors))


def _ordered_map(fn: Callable[[_T], _R], items: Iterable[_T], *, size: Callable[[_T], int]) -> Iterator[_R]:
    """``map`` on a thread pool, in order.

    zstd and the hashes release the GIL, so threads give real parallelism. Items travel to the
    threads in chunks of at least ``_CHUNK_BYTES`` by ``size``: handing one over costs more than
    the work on a LyCORIS module of a few hundred bytes. At most two chunks per thread are in
    flight, which bounds memory to a few modules rather than the whole LoRA.
    """
    workers = cpu_threads()

    def run(chunk: list[_T]) -> list[_R]:
        return [fn(item) for item in chunk]

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lorachunk") as pool:
        pending: deque[Future[list[_R]]] = deque()
        for chunk in _chunks(items, size):
            pending.append(pool.submit(run, chunk))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def _chunks(items: Iterable[_T], size: Callable[[_T], int]) -> Iterator[list[_T]]:
    """Consecutive items in groups of at least ``_CHUNK_BYTES`` by ``size`` (the last may be smaller)."""
    chunk: list[_T] = []
    total = 0
    for item in items:
        chunk.append(item)
        total += size(item)
        if total >= _CHUNK_BYTES:
            yield chunk
            chunk, total = [], 0
    if chunk:
        yield chunk


def decode_module(store: Store, manifest: Manifest, module: Module, codec: Codec | None = None) -> bytearray:
    """Fetch, verify (stored digest, then raw digest) and decode one module's raw bytes."""
    stored = read_shard(store, module)
    out = bytearray(module.raw_size)
    (codec or codec_from_config(manifest.codec)).decode(
        memoryview(stored), module.segments, module.frames, memoryview(out)
    )
    check(module.raw, out, what=f"module {module.name!r} after decoding")
    return out


def select_modules(manifest: Manifest, *, splits: Iterable[str] = (), modules: Iterable[str] = ()) -> list[Module]:
    """Modules named by splits and module globs; all modules when both are empty."""
    split_names, globs = as_names(splits), as_names(modules)
    if not split_names and not globs:
        return list(manifest.modules)
    wanted = {name for s in split_names for name in manifest.split(s).modules}
    for glob in globs:
        matched = set(matching((m.name for m in manifest.modules), glob))
        if not matched:
            raise UsageError(f"module pattern {glob!r} matches no module")
        wanted |= matched
    return [m for m in manifest.modules if m.name in wanted]


def unpack(
    dest: str | os.PathLike[str] | Store,
    out: str | os.PathLike[str],
    *,
    splits: Iterable[str] = (),
    modules: Iterable[str] = (),
    manifest: str | None = None,
    format: Literal["safetensors", "peft"] = "safetensors",
    progress: Progress | None = None,
) -> Path:
    """Write a safetensors file from a packed LoRA.

    With no ``splits`` or ``modules`` the result is the original file byte for byte (checked
    against its recorded sha256). Otherwise it holds the tensors of the selected modules, in
    their original order, with the original ``__metadata__``. ``manifest`` selects a manifest
    by id or hex prefix (default: the store's latest). The file appears only once complete.

    ``format="peft"``: ``out`` is a folder that gets ``adapter_model.safetensors`` and the files
    packed with it (``adapter_config.json``, …), which ``PeftModel.from_pretrained`` loads.

    Raises :class:`IntegrityError` if any byte does not match the manifest.
    """
    if format not in ("safetensors", "peft"):
        raise UsageError(f"format must be 'safetensors' or 'peft', got {format!r}")
    with as_store(dest) as store:
        if format == "safetensors":
            return _unpack(store, Path(out), splits=splits, modules=modules, manifest=manifest, progress=progress)
        folder = Path(out)
        loaded = read_manifest(store, manifest)
        if ADAPTER_CONFIG not in loaded.files:
            raise UsageError("this LoRA was not packed from a PEFT folder (it has no adapter_config.json)")
        try:
            folder.mkdir(exist_ok=True)  # the folder itself, never those above it
        except FileNotFoundError:
            raise UsageError(f"{folder.parent} does not exist; unpack makes no folders above its output") from None
        except OSError as exc:
            raise StoreError(f"cannot make {folder}: {exc.strerror or exc}") from exc
        if folder.is_symlink() or not folder.is_dir():
            raise UsageError(f"{folder} is not a folder; --format peft writes a folder")
        _unpack(store, folder / ADAPTER_WEIGHTS, splits=splits, modules=modules, manifest=loaded.id, progress=progress)
        for name, text in loaded.files.items():
            try:
                write_atomic(folder / name, text.encode())
            except OSError as exc:
                raise StoreError(f"cannot write {folder / name}: {exc.strerror or exc}") from exc
        return folder


def _unpack(
    store: Store,
    target: Path,
    *,
    splits: Iterable[str],
    modules: Iterable[str],
    manifest: str | None,
    progress: Progress | None,
) -> Path:
    loaded = read_manifest(store, manifest)
    chosen = select_modules(loaded, splits=splits, modules=modules)
    whole = len(chosen) == len(loaded.modules)
    wanted = {t.key for m in chosen for t in m.tensors}
    order = [t for t in loaded.file_order() if t.key in wanted]
    header = loaded.header_bytes() if whole else encode_header(order, loaded.metadata)
    positions, position = {}, len(header)
    for tensor in order:
        positions[tensor.key] = position
        position += tensor.length
    first_seen = {t.key: i for i, t in enumerate(order)}
    chosen.sort(key=lambda m: min(first_seen[t.key] for t in m.tensors))
    codec = codec_from_config(loaded.codec)
    _check_pulled(store, loaded, chosen)
    _check_output(target)
    try:
        handle, tmp = create_temp(target, parents=False, readable=True)
    except FileNotFoundError:
        raise UsageError(f"{target.parent} does not exist; unpack makes no folders above its output") from None
    except OSError as exc:
        raise StoreError(f"cannot write {target}: {exc.strerror or exc}") from exc
    try:
        with handle:
            sha256 = _write_tensors(
                handle,
                header,
                positions=positions,
                total=position,
                modules=chosen,
                decode=lambda m: decode_module(store, loaded, m, codec),
                progress=progress,
            )
            if whole and sha256 != loaded.source.sha256:
                raise IntegrityError(f"unpacked file does not match the source's {loaded.source.sha256}")
        _check_output(target)  # still a file or nothing: what replace() will take the place of
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, LorachunkError):
            raise StoreError(f"cannot write {target}: {exc.strerror or exc}") from exc
        raise
    return target


def _check_pulled(store: Store, manifest: Manifest, chosen: Sequence[Module]) -> None:
    """In a partial copy, modules it was never given are a usage error that says how to get them."""
    if manifest.id not in partial_ids(store):
        return
    absent = {m.name for m in chosen if not store.exists(shard_key(m.shard))}
    if not absent:
        return
    held = [s.name for s in manifest.splits if not absent.intersection(s.modules) and s.modules]
    missing = [s.name for s in manifest.splits if absent.intersection(s.modules)]
    raise UsageError(
        f"{store!r} is a partial copy without {len(absent)} of the selected modules (in splits "
        f"{', '.join(missing[:8]) or '-'}); pull them into it first (`lorachunk pull SOURCE -o FOLDER --split NAME`). "
        f"Splits it holds whole: {', '.join(held[:20]) or 'none'}"
    )


def _check_output(target: Path) -> None:
    """An output path unpack may replace: a regular file, or nothing yet (not a link, a folder,
    a device or a FIFO, which a rename would silently put aside)."""
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreError(f"cannot write {target}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(mode):
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise UsageError(f"{target} is {kind}; unpack writes a new file or replaces a regular one")


def _write_tensors(
    handle: BinaryIO,
    header: bytes,
    *,
    positions: Mapping[str, int],
    total: int,
    modules: Sequence[Module],
    decode: Callable[[Module], bytearray],
    progress: Progress | None,
) -> str:
    """Write ``header`` and each module's tensors at their positions, decoding in parallel.

    Returns the sha256 of the file. Modules are usually contiguous runs in the file, so this
    writes sequentially and hashes as it goes; a file whose modules interleave (safetensors sorts
    by dtype first) is written with seeks and hashed by reading it back once.
    """
    handle.write(header)
    hasher = hashlib.sha256(header)
    sequential = True
    done = len(header)
    for module, raw in zip(modules, _ordered_map(decode, modules, size=lambda m: m.raw_size), strict=False):
        view = memoryview(raw)
        for tensor in module.tensors:
            position = positions[tensor.key]
            piece = view[tensor.offset : tensor.offset + tensor.length]
            if handle.tell() != position:
                handle.seek(position)
                sequential = False
            handle.write(piece)
            if sequential:
                hasher.update(piece)
        done += module.raw_size
        if progress is not None:
            progress(done, total)
    if sequential:
        return f"sha256:{hasher.hexdigest()}"
    handle.flush()
    handle.seek(0)
    hasher = hashlib.sha256()
    while chunk := handle.read(16 * 1024 * 1024):
        hasher.update(chunk)
    return f"sha256:{hasher.hexdigest()}"


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What :func:`verify` checked: manifests, distinct shards and their stored bytes.

    A partial copy (``lorachunk pull --split``) holds only some shards: ``missing`` counts those
    it was never given, and ``complete_splits`` names the splits it holds whole.
    """

    manifests: int
    shards: int
    stored_bytes: int
    missing: int = 0
    complete_splits: tuple[str, ...] = ()


def verify(dest: str | os.PathLike[str] | Store) -> VerifyReport:
    """Re-check every manifest in ``dest`` and every shard they name (only the latest manifest for
    stores that cannot list, such as plain HTTP).

    Each manifest is checked against its id and its Merkle roots are recomputed; each shard is
    hashed as stored, decoded, and hashed again as raw bytes; the latest manifest's copy
    (``refs/latest.json.zst``) must be the manifest ``refs/latest`` names.

    Raises :class:`IntegrityError` naming every bad object, one per line, if anything is wrong.
    """
    with as_store(dest) as store:
        return _verify(store)


def _check_latest(store: Store, ids: Sequence[str]) -> list[str]:
    """``refs/latest`` must name a manifest the store holds, and the latest's copy must be it."""
    try:
        latest = latest_id(store)
    except LorachunkError as exc:
        return [str(exc)]
    if store.supports_listing and latest not in ids:
        return [f"{LATEST} names {latest}, which is not in the store"]
    try:
        copy = read_stored_manifest(store, LATEST_MANIFEST)
    except ShardNotFoundError:
        return []  # a store written before the copy existed
    except LorachunkError as exc:
        return [str(exc)]
    if digest(split_digest(latest)[0], copy) != latest:
        return [f"{LATEST_MANIFEST} is not the manifest {LATEST} names ({latest})"]
    return []


def _verify(store: Store) -> VerifyReport:
    problems: list[str] = []
    manifests: list[Manifest] = []
    ids = list_manifest_ids(store) if store.supports_listing else [resolve(store, None)]
    if not ids:
        raise no_lora_error(store)
    for manifest_id in ids:
        try:
            manifests.append(read_manifest(store, manifest_id))
        except LorachunkError as exc:
            problems.append(str(exc))
    problems.extend(_check_latest(store, ids))
    unique = {m.shard: (manifest, m) for manifest in manifests for m in manifest.modules}
    # Shards that only partial copies name may be absent; any other absence is damage.
    partial = partial_ids(store)
    whole = {m.shard for manifest in manifests if manifest.id not in partial for m in manifest.modules}

    def check_one(item: tuple[Manifest, Module]) -> str | None:
        manifest, module = item
        try:
            decode_module(store, manifest, module)
        except ShardNotFoundError as exc:
            return None if module.shard not in whole else str(exc)
        except LorachunkError as exc:
            return str(exc)
        return ""

    checked = list(_ordered_map(check_one, unique.values(), size=lambda item: item[1].raw_size))
    problems.extend(p for p in checked if p)
    if problems:
        raise IntegrityError(f"{len(problems)} problem(s) in {store!r}:\n" + "\n".join(problems))
    absent = {shard for shard, result in zip(unique, checked, strict=True) if result is None}
    complete = sorted(
        {
            split.name
            for manifest in manifests
            if manifest.id in partial
            for split in manifest.splits
            if not any(manifest.module(n).shard in absent for n in split.modules)
        }
    )
    present = [m for shard, (_, m) in unique.items() if shard not in absent]
    return VerifyReport(len(manifests), len(present), sum(m.stored_size for m in present), len(absent), tuple(complete))
