"""A full load over a fast link: lorachunk against downloading the file whole (issue #27).

    python benchmarks/wire.py           # synthetic SDXL-shaped F16 and BF16 LoRAs, ~240 MB each
    python benchmarks/wire.py --quick   # at 1/4 width

A real static server, nginx (Debian's ``nginx``; the standard library's server if nginx is not
installed, and the output says which), serves on 127.0.0.1 the packed store and the original
``.safetensors``. Side by side, in turns, best of five:

- **bytes only**: GET the ``.safetensors`` and drop it (how fast the wire is);
- **GET + load**: GET it into memory and ``safetensors.torch.load`` it (what a program does
  with a file it downloads);
- **lorachunk**: ``lorachunk.load(URL, cache=False)`` with 2, 4 and 16 requests in flight.

Then where lorachunk's time goes in one load: seconds spent, summed over threads, in the
requests (``HTTPStore.get``), hashing (``check``), zstd (``_plane``), the rest of decoding
(interleaving the byte planes), and placing (new memory for each module and its tensors),
beside the wall time.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch
from _timing import best_of_each, machine, stage_times
from safetensors.torch import load as load_bytes

import lorachunk
from lorachunk.testing import synth
from lorachunk.testing.http_server import serve

NGINX_CONF = """
daemon off; worker_processes 2; pid {work}/nginx.pid; error_log {work}/error.log;
events {{ worker_connections 256; }}
http {{
  access_log off; sendfile on; tcp_nopush on; tcp_nodelay on; keepalive_requests 100000;
  types {{ }} default_type application/octet-stream;
  client_body_temp_path {work}; proxy_temp_path {work}; fastcgi_temp_path {work};
  uwsgi_temp_path {work}; scgi_temp_path {work};
  server {{ listen 127.0.0.1:{port}; root {root}; }}
}}
"""


@contextmanager
def static_server(root: Path, work: Path) -> Iterator[tuple[str, str]]:
    """(base URL, what serves it): nginx when installed, else the standard library's server."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        with serve(root) as server:
            yield server.url, "the standard library's http.server (nginx not installed)"
        return
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conf = work / "nginx.conf"
    conf.write_text(NGINX_CONF.format(work=work, port=port, root=root))
    process = subprocess.Popen([nginx, "-c", str(conf), "-e", str(work / "error.log")])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.head(url + "/")
                break
            except httpx.TransportError:
                time.sleep(0.05)
        version = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=True).stderr.strip()
        yield url, version
    finally:
        process.terminate()
        process.wait()


def get_bytes(client: httpx.Client, url: str) -> bytes:
    response = client.get(url)
    response.raise_for_status()
    return response.content


def drop_bytes(client: httpx.Client, url: str) -> int:
    total = 0
    with client.stream("GET", url) as response:
        for chunk in response.iter_raw(1 << 20):
            total += len(chunk)
    return total


def run(path: Path, work: Path, repeat: int) -> list[str]:
    root = work / "www"
    root.mkdir()
    lorachunk.pack(path, root / "store")
    shutil.copy(path, root / path.name)
    size = path.stat().st_size
    rows = []
    with static_server(root, work) as (base, server), httpx.Client(timeout=120) as client:
        file_url, store_url = f"{base}/{path.name}", f"{base}/store"
        runs: list[Callable[[], object]] = [
            lambda: drop_bytes(client, file_url),
            lambda: load_bytes(get_bytes(client, file_url)),
            *(functools.partial(lorachunk.load, store_url, cache=False, concurrency=n) for n in (2, 4, 16)),
        ]
        t_bytes, t_get, *t_lc = best_of_each(runs, repeat)
        split = stage_times(lambda: lorachunk.load(store_url, cache=False, concurrency=4))
    rows.append(f"served by {server}")
    rows.append(
        f"| {path.name} ({size / 1e6:.0f} MB) | {t_bytes * 1e3:.0f} ms ({size / t_bytes / 1e9:.2f} GB/s) "
        f"| {t_get * 1e3:.0f} ms | "
        + " | ".join(
            f"{t * 1e3:.0f} ms ({t / t_get:.2f}x, {size / t / 1e9:.2f} GB/s = {t_bytes / t:.2f} of the wire)"
            for t in t_lc
        )
        + " |"
    )
    rows.append(
        "time in one load (4 in flight), summed over threads: "
        + ", ".join(f"{name} {seconds * 1e3:.0f} ms" for name, seconds in split.items())
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="synthetic LoRAs at 1/4 width")
    args = parser.parse_args()
    print(machine())
    print("| file | bytes only | GET + safetensors.torch.load | lorachunk, 2 in flight | 4 | 16 |")
    print("|---|---|---|---|---|---|")
    torch.set_num_threads(torch.get_num_threads())  # torch initialised before any timing
    for dtype in ("F16", "BF16"):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            path = synth.sdxl(
                work / f"synthetic_sdxl_{dtype.lower()}.safetensors",
                rank=64,
                scale=0.25 if args.quick else 1.0,
                dtype=dtype,
            )
            for line in run(path, work, 3 if args.quick else 5):
                print(line)


if __name__ == "__main__":
    main()
