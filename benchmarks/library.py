"""A store as a library: 30,000 small LoRAs in one store (issue #25's targets).

    python benchmarks/library.py              # 30,000 LoRAs: about 10 minutes on 2 cores
    python benchmarks/library.py --n 3000     # a smaller library

The LoRAs are **synthetic**: each a different random kohya-style LoRA of 4 modules (rank 4 over
64-wide layers, F16: ~5 kB), named ``lora-00000`` … . What is measured:

1. **pack**: the first 20 and the last 20 packs into the store, each through ``lorachunk.pack``
   with the default (durable) local store; the median of each, and their ratio. The LoRAs between
   are packed into the same store with fsync off, to keep the run short: the store is the same.
2. **ls** of the whole store: local (``ls_dicts``), and over HTTP (the standard library's server on
   127.0.0.1) with its requests and bytes.
3. **info NAME** and **open(SOURCE#NAME).load()** of one LoRA in the 30,000-store against the same
   LoRA alone in a store of one, locally and over HTTP (median of 7), with the HTTP requests.
4. **layout**: the most entries any folder of the store holds; the files a Hub repo of the store
   would hold.
5. **the catalog**: its stored bytes and the time to read it (``read_catalog``, median of 7).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _timing import machine

import lorachunk
from lorachunk._catalog import read_catalog
from lorachunk._info import info_dict, ls_dicts
from lorachunk._keys import CATALOG
from lorachunk.storage import LocalStore
from lorachunk.testing import synth
from lorachunk.testing.http_server import serve

MODULES = ("lora_unet_down_0_attn_to_q", "lora_unet_down_0_attn_to_k", "lora_unet_up_0_ff", "lora_te_layer_0_q")


def tiny(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    tensors: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    for module in MODULES:
        down, up = synth.lora_pair(rng, 64, 64, 4, "F16")
        tensors[f"{module}.lora_down.weight"] = ("F16", (4, 64), down)
        tensors[f"{module}.lora_up.weight"] = ("F16", (64, 4), up)
        tensors[f"{module}.alpha"] = ("F16", (), synth.to_bytes(np.array(4.0), "F16"))
    return synth.write(path, tensors)


def timed_pack(src: Path, dest: Path | LocalStore, name: str) -> float:
    start = time.perf_counter()
    lorachunk.pack(src, dest, name=name)
    return time.perf_counter() - start


def median_time(fn: object, repeat: int = 7) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=30_000)
    args = parser.parse_args()
    n = args.n
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        www = work / "www"
        store = www / "library"
        src = work / "src.safetensors"
        fast = LocalStore(store, fsync=False)
        first, last = [], []
        started = time.perf_counter()
        for i in range(n):
            tiny(src, i)
            name = f"lora-{i:05d}"
            if i < 20:
                first.append(timed_pack(src, store, name))
            elif i >= n - 20:
                last.append(timed_pack(src, store, name))
            else:
                lorachunk.pack(src, fast, name=name)
        fill = time.perf_counter() - started
        probe = work / "probe.safetensors"
        tiny(probe, 12345)
        name = f"lora-{n // 2:05d}"
        tiny(probe, n // 2)
        alone = www / "alone"
        lorachunk.pack(probe, alone, name=name)

        print(f"# {machine()}; {n} synthetic LoRAs of ~5 kB packed in {fill:.0f} s")
        a, b = statistics.median(first), statistics.median(last)
        print(f"pack: first 20 median {a * 1e3:.1f} ms, last 20 median {b * 1e3:.1f} ms, ratio {b / a:.2f}x")

        ls_local = median_time(lambda: ls_dicts(str(store)), 3)
        rows = len(ls_dicts(str(store)))
        stored = (store / CATALOG).stat().st_size
        read = median_time(lambda: read_catalog(LocalStore(store)))
        shown = f"catalog: {stored / 1e6:.2f} MB stored, read in {read * 1e3:.0f} ms"
        print(f"{shown}; ls local {ls_local:.2f} s ({rows} rows)")

        biggest = max(len(os.listdir(folder)) for folder, _, _ in os.walk(store))
        files = sum(len(names) for _, _, names in os.walk(store))
        print(f"layout: at most {biggest} entries in a folder; {files} files in the store (a Hub repo holds these)")

        def local_pair() -> tuple[float, float, float, float]:
            big_info = median_time(lambda: info_dict(f"{store}#{name}", None))
            one_info = median_time(lambda: info_dict(str(alone), None))
            big_load = median_time(lambda: lorachunk.load(f"{store}#{name}", cache=False))
            one_load = median_time(lambda: lorachunk.load(alone, cache=False))
            return big_info, one_info, big_load, one_load

        bi, oi, bl, ol = local_pair()
        print(
            f"local: info NAME {bi * 1e3:.1f} ms vs {oi * 1e3:.1f} ms alone ({bi / oi:.2f}x); "
            f"load {bl * 1e3:.1f} ms vs {ol * 1e3:.1f} ms ({bl / ol:.2f}x)"
        )
        with serve(www) as server:
            server.log.clear()
            listed = ls_dicts(f"{server.url}/library")
            requests = len(server.log)
            sent = sum(r.sent for r in server.log)
            ls_http = median_time(lambda: ls_dicts(f"{server.url}/library"), 3)
            print(f"ls over HTTP: {len(listed)} rows, {requests} request(s), {sent / 1e6:.2f} MB, {ls_http:.2f} s")
            big = f"{server.url}/library#{name}"
            one = f"{server.url}/alone"
            server.log.clear()
            lorachunk.load(big, cache=False)
            big_requests = [r.path for r in server.log]
            server.log.clear()
            lorachunk.load(one, cache=False)
            one_requests = [r.path for r in server.log]
            bi = median_time(lambda: info_dict(big, None))
            oi = median_time(lambda: info_dict(one, None))
            bl = median_time(lambda: lorachunk.load(big, cache=False))
            ol = median_time(lambda: lorachunk.load(one, cache=False))
            print(
                f"HTTP: info NAME {bi * 1e3:.1f} ms vs {oi * 1e3:.1f} ms alone ({bi / oi:.2f}x); "
                f"load {bl * 1e3:.1f} ms vs {ol * 1e3:.1f} ms ({bl / ol:.2f}x); "
                f"requests {len(big_requests)} ({', '.join(p.split('/')[2] for p in big_requests)}) "
                f"vs {len(one_requests)} alone"
            )


if __name__ == "__main__":
    main()
