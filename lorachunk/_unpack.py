"""unpack: a packed LoRA (or some splits of it) back to a safetensors file."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, Literal

from lorachunk._codec import Codec, codec_from_config
from lorachunk._exceptions import IntegrityError, LorachunkError, StoreError, UsageError
from lorachunk._keys import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from lorachunk._loader import REMOTE_CONCURRENCY
from lorachunk._manifest import Manifest, Module
from lorachunk._record import decode_checked
from lorachunk._repository import (
    as_store,
    decode_module,
    fetch_records,
    partial_copy_error,
    read_manifest,
    split_source,
)
from lorachunk._safetensors import encode_header
from lorachunk._select import select_modules
from lorachunk._threads import Progress, bounded_map, cpu_threads
from lorachunk.storage import Store
from lorachunk.storage._local import create_temp, write_atomic
from lorachunk.storage._url import is_remote

__all__ = ["unpack"]


def unpack(
    dest: str | os.PathLike[str] | Store,
    out: str | os.PathLike[str],
    *,
    splits: Iterable[str] = (),
    modules: Iterable[str] = (),
    layers: Iterable[int] | None = None,
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
    dest, manifest = split_source(dest, manifest)
    with as_store(dest) as store:
        if format == "safetensors":
            return _unpack(
                store, Path(out), splits=splits, modules=modules, layers=layers, manifest=manifest, progress=progress
            )
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
        _unpack(
            store,
            folder / ADAPTER_WEIGHTS,
            splits=splits,
            modules=modules,
            layers=layers,
            manifest=loaded.id,
            progress=progress,
        )
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
    layers: Iterable[int] | None,
    manifest: str | None,
    progress: Progress | None,
) -> Path:
    loaded = read_manifest(store, manifest)
    chosen = select_modules(loaded, splits=splits, modules=modules, layers=layers)
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
                decode=_decoder(store, loaded, chosen, codec),
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


def _decoder(store: Store, manifest: Manifest, chosen: Sequence[Module], codec: Codec) -> Callable[[Module], bytearray]:
    """How each module's raw bytes are had: from a local folder one record at a time (a ``pread``
    each, so memory stays at a few modules); from a remote store all records first, in the
    planned requests (a few per pack, not one per module), held until decoded."""
    if not is_remote(store):
        return lambda module: decode_module(store, manifest, module, codec)
    records = {m.record: r for m, r in fetch_records(store, chosen, manifest.packs, threads=REMOTE_CONCURRENCY)}

    def decode(module: Module) -> bytearray:
        out = bytearray(module.raw_size)
        decode_checked(codec, module, records[module.record], memoryview(out))
        return out

    return decode


def _check_pulled(store: Store, manifest: Manifest, chosen: Sequence[Module]) -> None:
    """In a partial copy, modules it was never given are a usage error that says how to get them."""
    error = partial_copy_error(store, manifest, chosen)
    if error is not None:
        raise error


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
    decoded = bounded_map(decode, modules, threads=cpu_threads(), size=lambda m: m.raw_size)
    for module, raw in zip(modules, decoded, strict=False):
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
