"""From a source string to a Store: local paths, ``http(s)://`` and any fsspec URL."""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from lorachunk._exceptions import UsageError
from lorachunk.storage._base import Store
from lorachunk.storage._local import LocalStore
from lorachunk.storage._memory import MemoryStore

__all__ = ["is_remote", "open_store"]

_SCHEME: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_remote(source: str | os.PathLike[str] | Store) -> bool:
    """True for sources whose reads cross a network (worth caching)."""
    if isinstance(source, Store):
        return not isinstance(source, (LocalStore, MemoryStore))
    match = _SCHEME.match(os.fspath(source))
    return match is not None and match[1].lower() not in {"file", "memory"}


def open_store(
    source: str | os.PathLike[str] | Store, *, pool: int | None = None, deadline: float | None = None, **options: Any
) -> Store:
    """The store ``source`` names: a :class:`Store` as is, ``http(s)://`` → :class:`HTTPStore`,
    ``hf://namespace/name[@revision][/path]`` → :class:`HubStore`,
    ``file://`` or a path → :class:`LocalStore`, any other ``scheme://`` → :class:`FsspecStore`.

    ``options`` go to the store's constructor (e.g. ``headers=`` or ``max_bytes_per_s=`` for
    HTTP, ``storage_options=`` for fsspec). ``pool`` sizes the connection pool of the stores
    that keep one (HTTP and the Hub); the others ignore it. ``deadline`` bounds what opening
    reads (the Hub's first request); the others read nothing when opened.
    """
    if isinstance(source, Store):
        if options:
            raise UsageError("store options apply only when the source is a path or URL")
        return source
    pooled: dict[str, Any] = {} if pool is None else {"concurrency": pool}
    text = os.fspath(source)
    match = _SCHEME.match(text)
    scheme = match[1].lower() if match else None
    if scheme in {"http", "https"}:
        from lorachunk.storage._http import HTTPStore

        return HTTPStore(text, **(pooled | options))  # the caller's concurrency= wins
    if scheme == "hf":
        from lorachunk.storage._hub import HubStore, parse_hf_url

        parsed = parse_hf_url(text)
        return HubStore(
            str(parsed["repo_id"]),
            revision=parsed["revision"],
            repo_type=str(parsed["repo_type"]),
            path=parsed["path"],
            deadline=deadline,
            **(pooled | options),
        )
    if scheme is None or scheme == "file":
        _check_options(LocalStore, options, text)
        return LocalStore(Path(text[len("file://") :] if scheme else text), **options)
    from lorachunk.storage._fsspec import FsspecStore

    _check_options(FsspecStore, options, text)
    return FsspecStore(text, **options)


def _check_options(cls: type[Store], options: Mapping[str, Any], source: str) -> None:
    """Options the store does not take are the caller's mistake (``retries=`` for a folder), said
    as such rather than as a TypeError from deep inside."""
    taken = inspect.signature(cls).parameters
    unknown = sorted(set(options) - set(taken))
    if unknown:
        kind = "a local folder" if cls is LocalStore else f"{cls.__name__}"
        raise UsageError(
            f"{', '.join(unknown)} {'does' if len(unknown) == 1 else 'do'} not apply to {kind} ({source}); "
            "headers, timeout, retries, min_rate and max_bytes_per_s are for http(s):// and hf:// sources"
        )
