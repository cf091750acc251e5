"""adapter_path: a verified adapter folder on local disk, on demand, for engines that read a path
(vLLM, SGLang, LoRAX, NVIDIA Dynamo, A1111/Forge).

The folder is ``<cache>/adapters/<key>/`` where the key hashes the LoRA's root, the manifest id
and the selection: the same request is the same folder, found by one ``stat``. It is written in
a hidden temp folder and renamed into place whole, so no engine ever sees part of one, under a
lock per key, so eight workers asking at once make one fetch and all get the same folder.
Folders in the shared cache count toward its size cap; one in use is never evicted
(:meth:`lorachunk.Cache.prune`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Iterable
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any, Literal

import xxhash

from lorachunk._cache import Cache
from lorachunk._exceptions import StoreError, UsageError
from lorachunk._keys import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from lorachunk._layout import as_names
from lorachunk._loader import open
from lorachunk._select import select_modules
from lorachunk._unpack import unpack
from lorachunk.storage._objects import default_cache_dir, key_lock

__all__ = ["adapter_path"]

#: Temp folders of a materialization older than this were left by a killed worker.
_STALE_S = 3600.0

#: Folders this process holds in use (``hold=True``): shared locks kept until it exits.
_HELD = ExitStack()
_HELD_KEYS: set[Path] = set()


def adapter_path(
    source: str | os.PathLike[str],
    *,
    splits: Iterable[str] = (),
    modules: Iterable[str] = (),
    layers: Iterable[int] | None = None,
    format: Literal["peft", "safetensors"] | None = None,
    root: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    hold: bool = False,
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
    call is a lookup. It is never changed once in place.

    In the shared cache, folders count toward its size cap (``LORACHUNK_CACHE_MAX_SIZE``) and the
    least recently asked for go first, but never one in use: asked for in the last 10 minutes,
    or held. ``hold=True`` holds the folder until this process ends (a shared lock): for an
    engine that may read the path again much later (vLLM reloads an adapter it evicted from
    memory from its path). Folders under ``cache_dir`` are yours to remove.
    """
    if format not in (None, "peft", "safetensors"):
        raise UsageError(f"format must be 'peft' or 'safetensors', got {format!r}")
    # The folder is named by what was asked and the root that pins what it holds, so a call with
    # root= finds a folder made before with one stat and no request to the store.
    splits, modules = as_names(splits), as_names(modules)  # iterated twice below: not iterators
    layers = None if layers is None else list(layers)
    asked: list[object] = [os.fspath(source), sorted(splits), sorted(modules), format]
    if layers is not None:
        asked.append(sorted(layers))
    adapters = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "adapters"
    if root is not None:
        final = adapters / _key(root, asked)
        if final.is_dir() and _used(final, hold=hold):
            return final
    with open(source, root=root, cache=False, **open_options) as lora:
        manifest = lora.manifest
        chosen = select_modules(manifest, splits=splits or (), modules=modules or (), layers=layers)
        if format is None:
            format = "peft" if ADAPTER_CONFIG in manifest.files else "safetensors"
        if format == "peft" and ADAPTER_CONFIG not in manifest.files:
            raise UsageError(f"{manifest.name!r} was not packed from a PEFT folder: ask for format='safetensors'")
        whole = len(chosen) == len(manifest.modules)
        key = _key(manifest.root, asked)
        final = adapters / key
        if final.is_dir() and _used(final, hold=hold):
            return final
        with key_lock(adapters, key):
            if final.is_dir() and _used(final, hold=hold):  # another worker made it meanwhile
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
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                if final.is_dir():  # without flock (Windows) another worker's rename won: the same folder
                    return final
                raise StoreError(f"cannot write the adapter folder {final}: {exc.strerror or exc}") from exc
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        if hold:
            _hold(final)
    if cache_dir is None:
        cache = Cache()
        cache.keep(cache.enforce_limit)  # this folder was just used: the grace keeps it
    return final


def _key(root: str, asked: list[object]) -> str:
    return xxhash.xxh3_128_hexdigest(json.dumps([root, *asked]).encode())


def _used(folder: Path, *, hold: bool) -> bool:
    """Mark ``folder`` as just used (what the size cap keeps), and hold it if asked. False if it
    was evicted meanwhile."""
    try:
        os.utime(folder)
    except FileNotFoundError:
        return False
    if hold:
        _hold(folder)
    return folder.is_dir()


def _hold(folder: Path) -> None:
    if folder not in _HELD_KEYS and _HELD.enter_context(key_lock(folder.parent, folder.name, shared=True)) is not None:
        _HELD_KEYS.add(folder)


def _clean_stale(adapters: Path) -> None:
    """Remove temp folders of workers killed while materializing (over an hour old)."""
    now = time.time()
    for entry in adapters.glob(".*.tmp"):
        with suppress(OSError):
            if now - entry.lstat().st_mtime > _STALE_S and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
