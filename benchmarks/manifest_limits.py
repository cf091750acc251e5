"""The worst manifests a reader accepts or refuses, within the limits: how long, how much memory.

Target (issue #16): any manifest within the caps is read or refused in under 2 s and 300 MB.
Each case is built here, stored (zstd), then read by ``Manifest.from_bytes`` in a fresh process,
which reports wall time and the peak resident memory of that whole process (Python and the
imports included, so an upper bound on what reading costs)::

    python benchmarks/manifest_limits.py            # the table for docs/benchmarks.md

Cases (names are 100 characters, as long as real kohya names get):
- ``modules at cap``: MAX_MODULES modules of 4 tensors each (MAX_TENSORS in all), the splits a
  real LoRA of that shape gets (a component split and one block split per 16 modules);
- ``split entries at cap``: MAX_MODULES modules of one tensor, splits listing MAX_SPLIT_ENTRIES;
- ``empty modules, 1.5 M``: the attack reported in #16 (1.4 MiB stored), refused by count;
- ``JSON values over cap``: a source order of 700 000 runs, refused before parsing;
- ``root mismatch``: the first case read with ``root=`` of another LoRA, refused early.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from typing import Any

import zstandard

from lorachunk._digest import digest
from lorachunk._layout import auto_splits
from lorachunk._manifest import MAX_MODULES, MAX_SPLIT_ENTRIES, MAX_TENSORS, Manifest, Module, Source, TensorEntry
from lorachunk._safetensors import encode_header

CASES = ("modules at cap", "split entries at cap", "empty modules, 1.5 M", "JSON values over cap", "root mismatch")


def _name(i: int) -> str:
    stem = f"lora_unet_down_blocks_{i % 4}_attentions_{i // 64}_transformer_blocks_{i % 64}_attn1_to_k_{i:06d}"
    return stem.ljust(100, "x")


def _manifest(modules: int, tensors_per_module: int, *, entries: int | None = None) -> Manifest:
    built, keys = [], []
    for i in range(modules):
        name = _name(i)
        entries_of = []
        for t in range(tensors_per_module):
            entries_of.append(TensorEntry(f"{name}.t{t}", "F16", (4,), 8 * t, 8))
            keys.append(entries_of[-1])
        d = digest("xxh3-128", name.encode())
        # Each record in a pack of its own: the largest pack table a manifest within the caps has.
        built.append(Module(name, d, d, 10, 8 * tensors_per_module, (10,), tuple(entries_of), pack=d))
    names = [m.name for m in built]
    if entries is None:
        splits = auto_splits(names)
    else:
        per = modules
        splits = {f"user{j}": ("user", names) for j in range(entries // per)}
    order = ((0, len(keys)),)
    raw = sum(m.raw_size for m in built)
    probe = Source("x.safetensors", 0, "sha256:" + "0" * 64, None, order, 8, None)
    header = len(encode_header([t for m in sorted(built, key=lambda m: m.name) for t in m.tensors], None))
    source = Source("x.safetensors", header + raw, probe.sha256, None, order, 8, None)
    packs = {m.pack: m.stored_size for m in built if m.pack is not None}
    return Manifest.build(
        hash="xxh3-128", codec={"id": "bpz", "level": 3}, source=source, modules=built, splits=splits, packs=packs
    )


def _case(name: str) -> tuple[bytes, str | None]:
    if name == "modules at cap":
        return _manifest(MAX_MODULES, MAX_TENSORS // MAX_MODULES).to_bytes(), None
    if name == "split entries at cap":
        return _manifest(MAX_MODULES, 1, entries=MAX_SPLIT_ENTRIES).to_bytes(), None
    if name == "root mismatch":
        return _manifest(MAX_MODULES, MAX_TENSORS // MAX_MODULES).to_bytes(), "xxh3-128:" + "0" * 32
    small: dict[str, Any] = json.loads(_manifest(1, 1).canonical())
    if name == "empty modules, 1.5 M":
        module = small["modules"][0] | {"frames": [], "raw_size": 0, "stored_size": 0, "tensors": []}
        small["modules"] = [module | {"name": f"m{i:07d}"} for i in range(1_500_000)]
    else:
        small["source"]["order"] = [[0, 1]] * 700_000
    text = json.dumps(small, sort_keys=True, separators=(",", ":")).encode()
    return zstandard.ZstdCompressor(level=19).compress(text), None


def _read(path: str, root: str | None) -> None:
    """In a fresh process: read the stored manifest at ``path``; print seconds, MB and outcome."""
    with open(path, "rb") as handle:
        stored = handle.read()
    start = time.perf_counter()
    try:
        Manifest.from_bytes(stored, root=root)
        outcome = "read"
    except Exception as exc:
        outcome = f"refused: {type(exc).__name__}"
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "mb": _peak_mb(), "outcome": outcome}))


def _peak_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM starts afresh with the new program;
    ru_maxrss does not (it keeps the peak of the parent that forked it, here up to 1 GB)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--read":
        _read(sys.argv[2], None if sys.argv[3] == "-" else sys.argv[3])
        return
    import tempfile

    print("| case | stored | read or refused in | peak RSS of the process | outcome |")
    print("|---|---|---|---|---|")
    for case in CASES:
        stored, root = _case(case)
        with tempfile.NamedTemporaryFile(suffix=".json.zst") as handle:
            handle.write(stored)
            handle.flush()
            result = subprocess.run(
                [sys.executable, __file__, "--read", handle.name, root or "-"],
                check=True,
                capture_output=True,
                text=True,
            )
        got = json.loads(result.stdout)
        print(
            f"| {case} | {len(stored) / 1e6:.2f} MB | {got['seconds']:.2f} s | {got['mb']:.0f} MB | {got['outcome']} |"
        )


if __name__ == "__main__":
    main()
