"""adapter_path: a verified adapter folder on local disk, on demand, for engines that read a path
(vLLM, SGLang, LoRAX, NVIDIA Dynamo, A1111/Forge).

The folder is ``<cache>/adapters/<key>/`` where the key hashes the LoRA's root, the manifest id
and the selection: the same request is the same folder, found by one ``stat``. It is written in
a hidden temp folder and renamed into place whole, so no engine ever sees part of one, under a
lock per key, so eight workers asking at once make one fetch and all get the same folder.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Literal

import xxhash

from lorachunk._exceptions import StoreError, UsageError
from lorachunk._keys import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from lorachunk._loader import open
from lorachunk._select import select_modules
from lorachunk._unpack import unpack
from lorachunk.storage._objects import default_cache_dir

__all__ = ["adapter_path"]

#: Temp folders of a materialization older than this were left by a killed worker.
_STALE_S = 3600.0


def adapter_path(
    source: str | os.PathLike[str],
    *,
    splits: Iterable[str] = (),
    modules: Iterable[str] = (),
    layers: Iterable[int] | None = None,
    format: Literal["peft", "safetensors"] | None = None,
    root: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    **open_options: Any,
) -> Path:
    """A local folder holding the LoRA ``source`` names (``SOURCE#NAME`` picks one of a store), or
    only the selected splits, modules or layers (a pipeline stage), in the layout an engine reads:

    - ``format="peft"`` (the default for a LoRA packed from a PEFT folder): ``adapter_model.safetensors``
      and ``adapter_config.json`` (and the other files packed with it), what vLLM, SGLang, LoRAX
      and ``PeftModel.from_pretrained`` take;
    - ``format="safetensors"`` (the default otherwise): ``<name>.safetensors``, for kohya-style
      consumers (A1111/Forge's Lora folder, ComfyUI).

    Every byte is checked on the way (records against their digests, tensors against the raw
    digests; a whole file against its sha256), and with ``root`` the LoRA must have it
    (:class:`IntegrityError` before anything is written). The folder is cached under
    ``cache_dir/adapters/`` (default: the shared cache folder) by root and selection: a second
    call is a lookup. It is never changed once in place; remove it with ``lorachunk cache clear``.
    """
    with open(source, root=root, cache=False, **open_options) as lora:
        manifest = lora.manifest
        chosen = select_modules(manifest, splits=splits or (), modules=modules or (), layers=layers)
        if format is None:
            format = "peft" if ADAPTER_CONFIG in manifest.files else "safetensors"
        if format not in ("peft", "safetensors"):
            raise UsageError(f"format must be 'peft' or 'safetensors', got {format!r}")
        if format == "peft" and ADAPTER_CONFIG not in manifest.files:
            raise UsageError(f"{manifest.name!r} was not packed from a PEFT folder: ask for format='safetensors'")
        whole = len(chosen) == len(manifest.modules)
        selection = [] if whole else sorted(m.name for m in chosen)
        key = xxhash.xxh3_128_hexdigest(json.dumps([manifest.root, manifest.id, format, selection]).encode())
        adapters = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "adapters"
        final = adapters / key
        if final.is_dir():
            os.utime(final)  # recently used: what a size cap would keep
            return final
        with _key_lock(adapters, key):
            if final.is_dir():  # another worker made it while this one waited
                return final
            _clean_stale(adapters)
            tmp = adapters / f".{key}.{secrets.token_hex(8)}.tmp"
            tmp.mkdir(parents=True)
            try:
                target = tmp / (ADAPTER_WEIGHTS if format == "peft" else f"{manifest.name}.safetensors")
                names = [m.name for m in chosen]
                unpack(lora.store, target, modules=[] if whole else names, manifest=manifest.id)
                if format == "peft":
                    for name, text in manifest.files.items():
                        (tmp / name).write_text(text)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return final


@contextmanager
def _key_lock(adapters: Path, key: str) -> Iterator[None]:
    """One materialization of ``key`` at a time across processes (``flock``; released by the
    kernel however its holder ends)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): each worker writes its own temp folder; one rename wins
        yield
        return
    try:
        adapters.mkdir(parents=True, exist_ok=True)
        fd = os.open(adapters / f".{key}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise StoreError(f"cannot write {adapters}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _clean_stale(adapters: Path) -> None:
    """Remove temp folders of workers killed while materializing (over an hour old)."""
    now = time.time()
    for entry in adapters.glob(".*.tmp"):
        with suppress(OSError):
            if now - entry.lstat().st_mtime > _STALE_S and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
