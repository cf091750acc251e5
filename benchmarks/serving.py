"""Serving: how soon an engine can use an adapter it asks for, and 100 adapters asked for by 8
workers at once (issue #26).

    python benchmarks/serving.py           # about 3 minutes
    python benchmarks/serving.py --quick   # the fast link only, 3 cold starts each

The adapter is a synthetic PEFT folder shaped like a Llama-7B rank-16 adapter on q, k, v, o of 32
layers (BF16, 33.6 MB; synthetic because no real adapter of that size is in tests/data). The
test server (lorachunk/testing/http_server.py) serves on 127.0.0.1 both the lorachunk store and
the original folder, through the same emulated link. Side by side, median of the runs:

- **whole folder**: GET every file of the PEFT folder and write it to a new folder: what vLLM's
  Hub resolver (``snapshot_download``) does, less its API calls;
- **lorachunk**: ``lorachunk.adapter_path(URL#NAME)`` into an empty folder: manifest, records as
  byte ranges, verify, decode, write ``adapter_model.safetensors`` and ``adapter_config.json``;
- **one stage of 4**: the same for layers 0-7 only (``layers=range(8)``);
- **warm**: the folder is there already: by name (the store is asked which version is latest) and
  pinned by root (one ``stat``, no request).

Then 100 distinct small adapters in one store, each asked for by 8 worker processes at once in
shuffled orders, while a watcher lists the adapters folder every millisecond: how many times each
adapter's pack was fetched, whether any visible folder was ever incomplete, and whether every
tensor is the original's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import torch
from _timing import machine
from safetensors.torch import load_file

import lorachunk
from lorachunk.testing import synth
from lorachunk.testing.http_server import Link, serve

LINKS = {"loopback": Link(), "200 Mbit/s, 10 ms": Link(bandwidth=200e6 / 8, delay=0.01)}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
FRESH = itertools.count()  # a new folder name for every run


def peft_folder(folder: Path, *, layers: int, hidden: int, rank: int, seed: int) -> Path:
    """A PEFT LoRA folder for a Llama-shaped model (lora_A ~ N(0, 0.02), lora_B ~ N(0, 0.002))."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    for layer in range(layers):
        for proj in PROJECTIONS:
            key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            a = (rng.standard_normal((rank, hidden)) * 0.02).astype(np.float32)
            b = (rng.standard_normal((hidden, rank)) * 0.002).astype(np.float32)
            tensors[f"{key}.lora_A.weight"] = ("BF16", (rank, hidden), synth.to_bytes(a, "BF16"))
            tensors[f"{key}.lora_B.weight"] = ("BF16", (hidden, rank), synth.to_bytes(b, "BF16"))
    folder.mkdir(parents=True)
    synth.write(folder / "adapter_model.safetensors", tensors)
    config = {
        "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(PROJECTIONS),
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def whole_folder(url: str, dest: Path) -> None:
    dest.mkdir(parents=True)
    with httpx.Client(timeout=120) as client:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            with client.stream("GET", f"{url}/{name}") as response, (dest / name).open("wb") as out:
                response.raise_for_status()
                for chunk in response.iter_bytes(1 << 20):
                    out.write(chunk)


def median_time(fn: Callable[[int], object], runs: int) -> float:
    times = []
    for run in range(runs):
        start = time.perf_counter()
        fn(run)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def one_link(work: Path, base: str, root: str, runs: int) -> tuple[float, float, float, float, float]:
    """Seconds: whole folder, lorachunk cold, one stage cold, warm by name, warm pinned."""
    url, fresh = f"{base}/store#ink", FRESH
    t_whole = median_time(lambda _: whole_folder(f"{base}/llama-ink", work / f"w{next(fresh)}"), runs)
    t_full = median_time(lambda _: lorachunk.adapter_path(url, cache_dir=work / f"a{next(fresh)}"), runs)
    t_stage = median_time(
        lambda _: lorachunk.adapter_path(url, layers=range(8), cache_dir=work / f"a{next(fresh)}"), runs
    )
    warm = work / f"warm{next(fresh)}"
    lorachunk.adapter_path(url, cache_dir=warm)
    t_by_name = median_time(lambda _: lorachunk.adapter_path(url, cache_dir=warm), 50)
    t_pinned = median_time(lambda _: lorachunk.adapter_path(url, root=root, cache_dir=warm), 50)
    return t_whole, t_full, t_stage, t_by_name, t_pinned


def cold_starts(work: Path, runs: int, links: dict[str, Link]) -> list[str]:
    src = peft_folder(work / "www" / "llama-ink", layers=32, hidden=4096, rank=16, seed=0)
    manifest = lorachunk.pack(src, work / "www" / "store", name="ink")
    size = (src / "adapter_model.safetensors").stat().st_size
    rows = [
        f"Adapter: {size / 1e6:.1f} MB BF16 (32 layers x q,k,v,o, rank 16), "
        f"stored {manifest.stored_size / 1e6:.1f} MB.",
        "",
        "| link | whole folder | lorachunk cold | one stage of 4 (layers 0-7) | warm, by name | warm, pinned root |",
        "|---|---|---|---|---|---|",
    ]
    for name, link in links.items():
        with serve(work / "www", link) as server:
            whole, full, stage, by_name, pinned = one_link(work, server.url, manifest.root, runs)
        rows.append(
            f"| {name} | {whole * 1e3:.0f} ms | {full * 1e3:.0f} ms ({full / whole:.2f}x) "
            f"| {stage * 1e3:.0f} ms ({stage / whole:.2f}x) | {by_name * 1e3:.1f} ms | {pinned * 1e3:.2f} ms |"
        )
    return rows


def _worker(url: str, names: list[str], cache_dir: str, seed: int, start: float) -> dict[str, str]:
    random.Random(seed).shuffle(names)
    time.sleep(max(0.0, start - time.time()))
    return {n: str(lorachunk.adapter_path(f"{url}#{n}", cache_dir=cache_dir)) for n in names}


def many_adapters(work: Path, count: int = 100, workers: int = 8) -> list[str]:
    store, originals = work / "www" / "many", {}
    for i in range(count):
        src = peft_folder(work / "src" / f"a{i:03d}", layers=4, hidden=512, rank=8, seed=1000 + i)
        lorachunk.pack(src, store, name=f"a{i:03d}")
        originals[f"a{i:03d}"] = src
    adapters = work / "adapters"
    adapters.mkdir()
    seen_partial: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # what an engine listing the folder could see at any moment
        while not stop.is_set():
            for folder in adapters.iterdir():
                if folder.name.startswith("."):
                    continue
                files = {p.name for p in folder.iterdir()}
                if files != {"adapter_config.json", "adapter_model.safetensors"}:
                    seen_partial.append(f"{folder.name}: {sorted(files)}")
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    with serve(work / "www") as server:
        server.log.clear()
        watcher.start()
        names = sorted(originals)
        start = time.time() + 1.0
        began = time.perf_counter()
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            answers = pool.starmap(
                _worker, [(f"{server.url}/many", list(names), str(adapters), seed, start) for seed in range(workers)]
            )
        elapsed = time.perf_counter() - began - 1.0
        stop.set()
        watcher.join()
        pack_gets: dict[str, int] = {}
        for request in server.log:
            if "/packs/" in request.path:
                pack_gets[request.path] = pack_gets.get(request.path, 0) + 1
    folders = {answer[n] for answer in answers for n in names}
    same = all(len({answer[n] for answer in answers}) == 1 for n in names)
    wrong = 0
    for name, src in originals.items():
        got = load_file(str(Path(answers[0][name]) / "adapter_model.safetensors"))
        want = load_file(str(src / "adapter_model.safetensors"))
        wrong += sum(not torch.equal(got[k], want[k]) for k in want) + len(set(got) ^ set(want))
    fetched = sorted(pack_gets.values())
    return [
        f"{count} adapters x {workers} worker processes (each asks for all {count}, shuffled), "
        f"{elapsed:.1f} s in all: {len(folders)} folders; every worker got the same folder per adapter: {same}; "
        f"packs fetched {len(fetched)} (GETs per pack: min {fetched[0]}, max {fetched[-1]}); "
        f"wrong tensors: {wrong}; incomplete folders seen by the watcher: {len(seen_partial)}"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    links = {"loopback": LINKS["loopback"]} if args.quick else LINKS
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        for line in cold_starts(Path(tmp), 3 if args.quick else 5, links):
            print(line)
    print()
    with tempfile.TemporaryDirectory() as tmp:
        for line in many_adapters(Path(tmp)):
            print(line)


if __name__ == "__main__":
    main()
