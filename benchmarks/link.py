"""One split over an emulated constrained link: lorachunk vs the whole file vs HTTP range requests.

    python benchmarks/link.py           # about 4 minutes
    python benchmarks/link.py --quick   # the fast link only

The test server (lorachunk/testing/http_server.py) serves, on 127.0.0.1, the packed folder and the original
``.safetensors`` through one shared token bucket (the link's bandwidth) and delays every
response by the round-trip time; the slow link also drops 1% of responses part way. For the
split nearest 10% of the modules of each file, side by side:

- **lorachunk**: ``lorachunk.load(url, splits=[…], cache=False)``: the latest manifest, then the
  split's records as byte ranges of its packs (1 + packs touched requests), each verified, with
  retries and resume, with 4 and with 16 requests allowed in flight; median of three runs;
- **whole file**: one GET of the ``.safetensors`` (what people do today), then pick the tensors;
- **ranges**: a GET of the first 1 MB for the header (a second one if it is longer), then the
  split's tensors as byte ranges of the original, adjacent ones merged, 8 at a time (what a
  careful reader of the original file could do, with no verification); median of three runs.

"ideal" is (bytes lorachunk must move: manifest + the split's records) / bandwidth + 2 RTT.
"""

from __future__ import annotations

import argparse
import json
import struct
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import httpx
import torch  # noqa: F401 - imported before any timing, so the first lorachunk run does not pay for it
from _timing import machine

import lorachunk
from lorachunk._keys import LATEST_MANIFEST
from lorachunk.testing import synth
from lorachunk.testing.http_server import FolderServer, Link, serve

ROOT = Path(__file__).resolve().parent.parent

LINKS = {
    "10 Mbit/s, 100 ms": Link(bandwidth=10e6 / 8, delay=0.1),
    "2 Mbit/s, 300 ms, 1% drops": Link(bandwidth=2e6 / 8, delay=0.3, drop_rate=0.01),
}


def split_near_tenth(manifest: lorachunk.Manifest) -> lorachunk.Split:
    splits = [s for s in manifest.splits if len(s.modules) < len(manifest.modules)]
    return min(splits, key=lambda s: abs(len(s.modules) / len(manifest.modules) - 0.1))


def with_retries(client: httpx.Client, url: str, headers: dict[str, str]) -> bytes:
    """The baselines get retries too (a whole retry, no resume), so drops do not fail them."""
    for _ in range(10):
        try:
            response = client.get(url, headers=headers)
            response.raise_for_status()
            return response.content
        except httpx.TransportError:
            continue
    raise RuntimeError(f"{url}: gave up")


def ranges_baseline(url: str, keys: set[str]) -> int:
    with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=8)) as client:
        head = with_retries(client, url, {"Range": "bytes=0-1048575"})
        (length,) = struct.unpack("<Q", head[:8])
        if length + 8 > len(head):
            head += with_retries(client, url, {"Range": f"bytes={len(head)}-{length + 7}"})
        header = json.loads(head[8 : 8 + length])
        spans = sorted(tuple(header[k]["data_offsets"]) for k in keys)
        merged: list[list[int]] = []
        for start, end in spans:
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        base = 8 + length
        with ThreadPoolExecutor(8) as pool:
            parts = list(
                pool.map(
                    lambda span: with_retries(client, url, {"Range": f"bytes={base + span[0]}-{base + span[1] - 1}"}),
                    merged,
                )
            )
        return len(parts)


def measure(server: FolderServer, fn: Callable[[], object], *, runs: int = 1) -> tuple[float, int, int]:
    """Seconds, bytes sent and requests of ``fn``: the run of median time out of ``runs``."""
    results = []
    for _ in range(runs):
        server.log.clear()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        results.append((elapsed, sum(r.sent for r in server.log), len(server.log)))
    return sorted(results)[len(results) // 2]


def run(path: Path, work: Path, links: dict[str, Link]) -> list[str]:
    folder = work / "www" / path.stem
    manifest = lorachunk.pack(path, folder)
    (work / "www" / path.name).write_bytes(path.read_bytes())
    split = split_near_tenth(manifest)
    keys = {t.key for n in split.modules for t in manifest.module(n).tensors}
    records = sum({manifest.module(n).record: manifest.module(n).stored_size for n in split.modules}.values())
    must = len((folder / LATEST_MANIFEST).read_bytes()) + records
    rows = []
    for name, link in links.items():
        with serve(work / "www", link) as server:
            t_whole, b_whole, r_whole = measure(
                server, lambda: with_retries(httpx.Client(timeout=120), f"{server.url}/{path.name}", {})
            )
            t_rng, b_rng, r_rng = measure(server, lambda: ranges_baseline(f"{server.url}/{path.name}", keys), runs=3)
            for flight in (4, 16):
                load = partial(
                    lorachunk.load,
                    f"{server.url}/{path.stem}",
                    splits=[split.name],
                    cache=False,
                    backoff=0.2,
                    timeout=30,
                    concurrency=flight,
                )
                # Median of three: the first call in a process also pays one-time set-up (the TLS
                # context, thread pools) that a program loading its second LoRA does not.
                t_lc, b_lc, r_lc = measure(server, load, runs=3)
                assert link.bandwidth is not None
                ideal = must / link.bandwidth + 2 * link.delay
                rows.append(
                    f"| {path.name} | {name} | {split.name} ({len(split.modules)}/{len(manifest.modules)}) | {flight} "
                    f"| {b_lc / 1e3:.0f} kB ({b_lc / must:.3f}x), {r_lc} req, {t_lc:.2f} s "
                    f"({t_lc / ideal:.2f}x ideal, {t_lc / t_whole:.3f}x whole) "
                    f"| {b_whole / 1e3:.0f} kB, {r_whole} req, {t_whole:.2f} s "
                    f"| {b_rng / 1e3:.0f} kB, {r_rng} req, {t_rng:.2f} s |"
                )
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the 10 Mbit/s link")
    args = parser.parse_args()
    links = dict(list(LINKS.items())[:1]) if args.quick else LINKS
    print(f"{machine()}, lorachunk {lorachunk.__version__}\n")
    print("| file | link | split (modules) | in flight | lorachunk | whole file | ranges of the original |")
    print("|---|---|---|---:|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run(ROOT / "tests" / "data" / "loras" / "diffusers_sd15_attnproc.safetensors", work, links)
        synthetic = synth.sdxl(work / "synthetic_sdxl_small.safetensors", rank=16, scale=0.25, text_encoders=True)
        run(synthetic, work, links)


if __name__ == "__main__":
    main()
