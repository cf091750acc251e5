"""What every benchmark script shares: best-of-N timing and the line that names the machine."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence


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
