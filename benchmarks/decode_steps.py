"""The steps of a CPU decode, alone: what a second thread gives each, and the choices made.

    python benchmarks/decode_steps.py   # about 20 seconds

1. Each step a decoder repeats per module or per run, done twice in a row on one thread and
   then once on each of two threads at the same time: xxh3 of a 96 kB module, numpy's join of
   two 48 k-element byte planes into 16-bit words, one streamed zstd call over a 1 MiB run's
   frames, and a run's whole decode (``BytePlaneZstd.decode_run`` with its raw digests) over the records of a
   synthetic F16 LoRA. A speed-up near 2 means the step leaves the GIL to the other thread;
   near 1, the threads take turns (docs/loading.md, "Who decodes").
2. Making a tensor over a module's buffer: slice, view and reshape, against one ``as_strided``
   of the buffer viewed once per dtype (what ``_torch._tensor`` does).
3. Joining the four byte planes of F32 elements: four byte columns against two 16-bit halves
   and then words (what ``_codec._unplane`` does), at three sizes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import xxhash
from _timing import machine

from lorachunk._codec import BytePlaneZstd, Segment, _stream

_POOL = ThreadPoolExecutor(2)


def speedup(fn: Callable[[], object]) -> tuple[float, float]:
    """(ms for one call of ``fn``, the speed-up of two threads doing one each over one doing two)."""
    fn()
    one, two = [], []
    for _ in range(15):  # in turns, so that a slow spell of a shared machine hits both
        one.append(_timed(lambda: (fn(), fn())))
        two.append(_timed(lambda: [f.result() for f in (_POOL.submit(fn), _POOL.submit(fn))]))
    return min(one) / 2 * 1000, min(one) / min(two)


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def per_call(fn: Callable[[], object], calls: int) -> float:
    """Microseconds per call, the fastest of five batches."""
    fn()
    return min(_timed(lambda: [fn() for _ in range(calls)]) for _ in range(5)) / calls * 1e6


def steps() -> None:
    rng = np.random.default_rng(0)
    module = rng.integers(0, 255, 96 * 1024, dtype=np.uint8)
    low, high = module[: 48 * 1024], module[48 * 1024 :]
    words = np.empty(48 * 1024, dtype=np.uint16)
    codec = BytePlaneZstd.for_level()
    weights = (rng.standard_normal(48 * 1024 * 11) * 0.02).astype(np.float16).tobytes()
    size = 96 * 1024
    records = [
        codec.encode(memoryview(weights)[i : i + size], (Segment(0, size, 2),)) for i in range(0, len(weights), size)
    ]
    run = memoryview(b"".join(stored for stored, _ in records))
    outs = [bytearray(size) for _ in records]

    def join() -> None:
        for _ in range(100):
            np.left_shift(high, 8, out=words, dtype=np.uint16)
            words.__ior__(low)

    def hash_modules() -> None:
        for _ in range(100):
            xxhash.xxh3_128(module.data).digest()

    total = sum(len(out) for out in outs)

    def stream() -> None:
        scratch = np.empty(total, dtype=np.uint8)
        for _ in range(10):
            _stream(run, scratch.data)

    def decode_run() -> None:
        for _ in range(10):
            codec.decode_run(
                run,
                [
                    ((Segment(0, size, 2),), frames, memoryview(out))
                    for (_, frames), out in zip(records, outs, strict=True)
                ],
            )
            for out in outs:
                xxhash.xxh3_128(out).digest()

    print("| step | ms per batch (100 calls; 10 runs) | two threads over one |\n|---|---:|---:|")
    for name, fn in (
        ("xxh3 of a 96 kB module", hash_modules),
        ("join of two 48 k-element planes into words", join),
        ("zstd alone: one streamed call over a 1 MiB run's frames", stream),
        ("decode_run of a 1 MiB run of 11 records, raw digests checked", decode_run),
    ):
        ms, gain = speedup(fn)
        print(f"| {name} | {ms:.2f} | {gain:.2f}x |")


def tensors() -> None:
    buffer = torch.empty(40960, dtype=torch.uint8)
    typed = buffer.view(torch.float16)
    sliced = per_call(lambda: buffer[0:40960].view(torch.float16).reshape(64, 320), 20000)
    strided = per_call(lambda: typed.as_strided((64, 320), (320, 1), 0), 20000)
    print(f"\na tensor over a module's buffer: slice + view + reshape {sliced:.2f} us, as_strided {strided:.2f} us")


def f32_joins() -> None:
    print("\n| F32 elements | four byte columns us | 16-bit halves, then words us |\n|---:|---:|---:|")
    for count in (24_576, 150_000, 1_000_000):
        values = np.random.default_rng(0).standard_normal(count).astype(np.float32)
        planes = [np.ascontiguousarray(values.view(np.uint8).reshape(count, 4)[:, k]) for k in range(4)]
        out = np.empty(4 * count, dtype=np.uint8)

        def columns(out: np.ndarray = out, planes: list[np.ndarray] = planes, count: int = count) -> None:
            view = out.reshape(count, 4)
            for k in range(4):
                view[:, k] = planes[k]

        def halves(out: np.ndarray = out, planes: list[np.ndarray] = planes, count: int = count) -> None:
            lo, hi = np.empty(count, dtype=np.uint16), np.empty(count, dtype=np.uint16)
            np.left_shift(planes[1], 8, out=lo, dtype=np.uint16)
            lo |= planes[0]
            np.left_shift(planes[3], 8, out=hi, dtype=np.uint16)
            hi |= planes[2]
            whole = out.view(np.uint32)
            np.left_shift(hi, 16, out=whole, dtype=np.uint32)
            whole |= lo

        calls = max(20, 3_000_000 // count)
        a, b = per_call(columns, calls), per_call(halves, calls)
        assert np.array_equal(out.view(np.float32), values)
        print(f"| {count} | {a:.1f} | {b:.1f} |")


def main() -> None:
    print(f"{machine()}, numpy {np.__version__}, torch {torch.__version__}\n")
    steps()
    tensors()
    f32_joins()


if __name__ == "__main__":
    main()
