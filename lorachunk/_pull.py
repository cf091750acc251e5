"""pull: a packed LoRA, or some splits of it, copied into a local folder, each shard verified."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from lorachunk._exceptions import LorachunkError
from lorachunk._keys import shard_key
from lorachunk._loader import PullReport, open
from lorachunk._manifest import Module
from lorachunk._repository import check_dest, mark_partial, read_shard, write_manifest
from lorachunk._threads import Progress
from lorachunk.storage import LocalStore, Store

__all__ = ["pull"]


def pull(
    source: str | os.PathLike[str] | Store,
    dest: str | os.PathLike[str],
    *,
    splits: Iterable[str] | None = None,
    modules: Iterable[str] | None = None,
    layers: Iterable[int] | None = None,
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
        unique = list({m.shard: m for m in lora.select(splits=splits, modules=modules, layers=layers)}.values())
        missing = [m for m in unique if not _intact(target, m)]
        sink = lambda m, data: target.set(shard_key(m.shard), data)  # noqa: E731
        report = lora.copy(missing, sink, progress, required=False)
        manifest = lora.manifest
        with target.batch():
            write_manifest(target, manifest)
        whole = all(target.exists(shard_key(m.shard)) for m in manifest.modules)
        mark_partial(target, manifest, partial=not whole)
    return PullReport(len(unique), report.fetched, report.fetched_bytes, len(unique) - report.fetched)


def _intact(store: Store, module: Module) -> bool:
    try:
        read_shard(store, module)
    except LorachunkError:
        return False
    return True
