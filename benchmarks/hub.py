"""Hub push and pull against the test Hub (lorachunk/testing/hub_server.py) driven by the real huggingface_hub client.

    python benchmarks/hub.py            # about 3 minutes

1. **Upload bytes for a new version.** A synthetic SDXL-shaped LoRA (F16, rank 16, 630 modules) is
   pushed, then versions with 1%, 10% and 50% of its modules changed are each pushed on top. We
   count every byte the client sent (LFS uploads, commit, preupload and batch requests) and
   compare with the changed modules' records + manifest (the floor) and with re-uploading the
   whole file, and count the files the one commit touches (target: 3 + packs uploaded).
2. **One split over a slow link.** The Hub serves through an emulated 10 Mbit/s link with 100 ms
   per request. ``lorachunk.load("hf://…", splits=[…])`` of the split nearest 10% of the modules
   vs ``hf_hub_download`` of the whole ``.safetensors`` (what people do today); median of three
   runs each, with no cache.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ["HF_HUB_DISABLE_XET"] = "1"  # before huggingface_hub is imported: plain LFS uploads
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

import numpy as np
import torch  # noqa: F401 - imported before any timing
from _timing import machine
from huggingface_hub import HfApi, hf_hub_download
from safetensors.numpy import load_file, save_file

import lorachunk
from lorachunk.testing import synth
from lorachunk.testing.http_server import Link
from lorachunk.testing.hub_server import HubServer, serve_hub

ROOT = Path(__file__).resolve().parent.parent

TOKEN = "hf_benchmark"


def sent_bytes(hub: HubServer) -> int:
    return sum(r.received for r in hub.log)


def changed_version(original: Path, dest: Path, manifest: lorachunk.Manifest, fraction: float) -> set[str]:
    """Write ``original`` with ``fraction`` of its modules changed (every tensor of those modules)."""
    rng = np.random.default_rng(int(fraction * 1000))
    names = [m.name for m in manifest.modules]
    chosen = set(rng.choice(names, size=max(1, round(fraction * len(names))), replace=False))
    tensors = load_file(original)
    for name in chosen:
        for entry in manifest.module(name).tensors:
            tensors[entry.key] = (tensors[entry.key].astype(np.float32) * 1.01).astype(tensors[entry.key].dtype)
    metadata = manifest.source.metadata
    save_file(tensors, dest, metadata=None if metadata is None else dict(metadata))
    return chosen


def upload_rows(work: Path) -> list[str]:
    path = synth.sdxl(work / "synthetic_sdxl_r16.safetensors", rank=16, dtype="F16")
    rows = []
    with serve_hub(token=TOKEN) as hub:
        os.environ["HF_ENDPOINT"] = hub.url
        lorachunk.push(path, "bench/sdxl", token=TOKEN)
        manifest = lorachunk.pack(path, lorachunk.storage.MemoryStore())
        in_repo = {m.record for m in manifest.modules}
        for fraction in (0.01, 0.10, 0.50):
            version = work / f"v{fraction}.safetensors"
            chosen = changed_version(path, version, manifest, fraction)
            packed = lorachunk.pack(version, lorachunk.storage.MemoryStore())
            # The floor: records the repo lacks (a change that rounds back to the old F16 values
            # leaves a module's record as it was) plus the manifest pushed.
            new = {m.record: m.stored_size for m in packed.modules if m.record not in in_repo}
            in_repo |= new.keys()
            hub.log.clear()
            before = hub.repos[("model", "bench/sdxl")].refs["main"]
            result = lorachunk.push(version, "bench/sdxl", token=TOKEN)
            sent = sent_bytes(hub)
            with lorachunk.open("hf://bench/sdxl", token=TOKEN, cache=False) as pushed:
                floor = sum(new.values()) + len(pushed.manifest.to_bytes())
            commits = hub.repos[("model", "bench/sdxl")].commits
            old, now = commits[before], commits[result.commit]
            files = sum(1 for path, entry in now.items() if old.get(path) != entry)
            whole = version.stat().st_size
            rows.append(
                f"| {fraction:.0%} ({len(chosen)} modules) | {result.uploaded} | {files} | {sent / 1e6:.2f} MB "
                f"| {floor / 1e6:.2f} MB | **{sent / floor:.3f}x** | {whole / 1e6:.1f} MB | {sent / whole:.3f}x |"
            )
            print(rows[-1], flush=True)
    return rows


def pull_rows(work: Path) -> list[str]:
    path = synth.sdxl(work / "synthetic_sdxl_small.safetensors", rank=16, scale=0.25, text_encoders=True)
    rows = []
    link = Link(bandwidth=10e6 / 8, delay=0.1)
    with serve_hub(token=TOKEN, link=link) as hub:
        os.environ["HF_ENDPOINT"] = hub.url
        link_bandwidth, link.bandwidth = link.bandwidth, None  # set-up at full speed
        lorachunk.push(path, "bench/small", token=TOKEN)
        HfApi(endpoint=hub.url, token=TOKEN).upload_file(
            path_or_fileobj=str(path), path_in_repo=path.name, repo_id="bench/small"
        )
        link.bandwidth = link_bandwidth
        with lorachunk.open("hf://bench/small", token=TOKEN, cache=False) as lora:
            manifest = lora.manifest
        splits = [s for s in manifest.splits if len(s.modules) < len(manifest.modules)]
        split = min(splits, key=lambda s: abs(len(s.modules) / len(manifest.modules) - 0.1))

        def timed(fn: Callable[[int], object]) -> tuple[float, int, int]:
            """Median of three runs (each from nothing: no cache), with the bytes and requests of one."""
            runs = []
            for attempt in range(3):
                hub.log.clear()
                start = time.perf_counter()
                fn(attempt)
                runs.append((time.perf_counter() - start, sum(r.sent for r in hub.log), len(hub.log)))
            return sorted(runs)[1]

        t_lc, b_lc, r_lc = timed(
            lambda _: lorachunk.load("hf://bench/small", splits=[split.name], token=TOKEN, cache=False)
        )
        t_hf, b_hf, r_hf = timed(
            lambda attempt: hf_hub_download(
                "bench/small", path.name, token=TOKEN, endpoint=hub.url, cache_dir=work / f"hf-cache-{attempt}"
            )
        )
    split_bytes = sum(manifest.module(n).stored_size for n in split.modules)
    rows.append(
        f"| {path.name} ({path.stat().st_size / 1e6:.1f} MB) | {split.name} ({len(split.modules)}/"
        f"{len(manifest.modules)} modules, {split_bytes / 1e6:.2f} MB stored) "
        f"| {b_lc / 1e6:.2f} MB, {r_lc} req, {t_lc:.2f} s | {b_hf / 1e6:.2f} MB, {r_hf} req, {t_hf:.2f} s "
        f"| **{t_lc / t_hf:.3f}x** |"
    )
    print(rows[-1], flush=True)
    return rows


def main() -> None:
    print(f"{machine()}, lorachunk {lorachunk.__version__}\n")
    with tempfile.TemporaryDirectory() as tmp:
        print(
            "| modules changed | packs uploaded | files in the commit | bytes sent | new records + manifest | ratio "
            "| whole file | x whole |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        upload_rows(Path(tmp))
        print()
        print("| file | split | lorachunk load of the split | hf_hub_download of the file | time ratio |")
        print("|---|---|---|---|---:|")
        pull_rows(Path(tmp))


if __name__ == "__main__":
    main()
