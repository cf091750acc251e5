"""What every benchmark script shares: best-of-N timing and the line that names the machine."""

from __future__ import annotations

import functools
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any


def best(
    fn: Callable[[], object], repeat: int, *, warmup: bool = False, sync: Callable[[], None] | None = None
) -> float:
    """The fastest of ``repeat`` runs of ``fn``, in seconds; ``sync`` ends each run (e.g. a CUDA sync)."""
    if warmup:
        fn()
        if sync is not None:
            sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - start)
    return min(times)


def best_of_each(fns: Sequence[Callable[[], object]], repeat: int) -> list[float]:
    """The fastest of ``repeat`` runs of each of ``fns``, run in turns (a, b, a, b, …).

    Comparing two things measured one after the other on a shared machine compares two moments;
    taking turns lets a slow spell hit both, so their ratio is steadier.
    """
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, taken in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            taken.append(time.perf_counter() - start)
    return [min(taken) for taken in times]


def machine() -> str:
    return (
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()} {platform.processor() or ''}".rstrip()
        + f", {os.cpu_count()} cores, Python {platform.python_version()}"
    )


def stage_times(fn: Callable[[], object]) -> dict[str, float]:
    """Seconds ``fn`` (a lorachunk load) spends in each stage, summed over the threads that ran
    it, and its wall time: requests, hashing the records, zstd, the rest of decoding (joining the
    byte planes), hashing the decoded bytes, and placing (new memory for each module, tensors)."""
    import lorachunk._codec
    import lorachunk._record
    import lorachunk._repository
    import lorachunk._torch

    spent: dict[str, float] = {}
    patches: list[tuple[Any, str, Any]] = []
    inside = threading.local()  # the labels this thread is timing: a stage calling itself counts once

    def wrap(owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            active: set[str] = inside.__dict__.setdefault("labels", set())
            if label in active:  # e.g. decode_run of one record calls decode
                return original(*args, **kwargs)
            active.add(label)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                active.discard(label)
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - start

        patches.append((owner, name, original))
        setattr(owner, name, timed)

    wrap(lorachunk._repository, "get_object", "requests")
    wrap(lorachunk._repository, "check", "hash (records)")
    wrap(lorachunk._codec, "_plane", "zstd")
    wrap(lorachunk._codec, "_stream", "zstd")
    wrap(lorachunk._codec.BytePlaneZstd, "decode", "decode")
    wrap(lorachunk._codec.BytePlaneZstd, "decode_run", "decode")
    wrap(lorachunk._record, "check", "hash (decoded)")
    wrap(lorachunk._torch.CPUPlacer, "stage", "place")
    wrap(lorachunk._torch.CPUPlacer, "stage_run", "place")
    try:
        start = time.perf_counter()
        fn()
        spent["wall"] = time.perf_counter() - start
    finally:
        for owner, name, original in patches:
            setattr(owner, name, original)
    # Each stage nests the next: what is left of each is its own share.
    spent["place"] = spent.get("place", 0.0) - spent.get("decode", 0.0) - spent.get("hash (decoded)", 0.0)
    spent["decode"] = spent.get("decode", 0.0) - spent.get("zstd", 0.0)
    return spent
