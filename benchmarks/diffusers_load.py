"""Time from call to "LoRA applied to the UNet", diffusers' way and lorachunk's.

    python benchmarks/diffusers_load.py        # about 6 minutes, ~7 GB of memory

An SDXL-shaped UNet (the real SDXL config: 2.6 B parameters, F16) is built on the meta device and
given uninitialised CPU memory (its values do not matter for timing), inside a Stable Diffusion
pipeline whose other parts are tiny. The LoRA is the synthetic SDXL-shaped one (every attention
projection of every transformer block, 630 modules, rank 16, F16; synthetic). Best of five, taken
round robin, in two states of the UNet: **fresh** (each run ends with ``pipe.unload_lora_weights()``,
so every load starts from the UNet as built) and **reused** (each run ends with
``pipe.delete_adapters()``, which leaves PEFT's LoRA layers in place; the next load then pays for
walking them):

(a) ``pipe.load_lora_weights("lora.safetensors")`` (the file in the page cache);
(b) ``lorachunk.integrations.diffusers.load_lora(pipe, "lora.lcs")`` from a packed local folder,
    with the shared cache warm (decoded modules memory-mapped) and with no cache (every shard
    decoded), in full and for the split nearest 10% of the modules.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

import torch
from _timing import machine
from diffusers import UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from test_diffusers import tiny_pipe

import lorachunk
from lorachunk.integrations.diffusers import load_lora
from lorachunk.testing import synth

ROOT = Path(__file__).resolve().parent.parent

SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}


def pipeline(work: Path) -> Any:
    with torch.device("meta"):
        unet: Any = UNet2DConditionModel(**SDXL_UNET)
    return tiny_pipe(work, unet.to(torch.float16).to_empty(device="cpu"))


def timed(pipe: Any, load: Callable[[], object], *, unload: bool) -> float:
    start = time.perf_counter()
    load()
    seconds = time.perf_counter() - start
    if unload:
        pipe.unload_lora_weights()  # PEFT's LoRA layers removed: the UNet is as built
    else:
        pipe.delete_adapters(pipe.get_active_adapters())  # the adapter goes, PEFT's LoRA layers stay
    return seconds


def main() -> None:
    diffusers_logging.set_verbosity_error()
    print(f"{machine()}, torch {torch.__version__}, lorachunk {lorachunk.__version__}\n")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = synth.sdxl(work / "synthetic_sdxl_r16.safetensors", rank=16, dtype="F16")
        size = path.stat().st_size
        manifest = lorachunk.pack(path, work / "lora.lcs")
        splits = [s for s in manifest.splits if len(s.modules) < len(manifest.modules)]
        split = min(splits, key=lambda s: abs(len(s.modules) / len(manifest.modules) - 0.1))
        cache = lorachunk.Cache(work / "cache")
        pipe = pipeline(work)
        path.read_bytes()  # page cache, as for a file used before
        load_lora(pipe, work / "lora.lcs", adapter_name="warmup", cache=cache)  # fills the cache
        pipe.unload_lora_weights()

        methods: dict[tuple[str, str], Callable[[], object]] = {
            ("(a) pipe.load_lora_weights(file)", "all"): functools.partial(
                pipe.load_lora_weights, str(path), adapter_name="a"
            )
        }
        for label, option in (("warm cache", cache), ("no cache", False)):
            for which, chosen in (("all", None), (f"{split.name} ({len(split.modules)}/630)", [split.name])):
                methods[(f"(b) load_lora(folder), {label}", which)] = functools.partial(
                    load_lora, pipe, work / "lora.lcs", splits=chosen, adapter_name="b", cache=option
                )
        # Round robin, best of five: the machine's drift hits every method alike.
        results = {}
        for state, unload in (("fresh", True), ("reused", False)):
            times: dict[tuple[str, str], list[float]] = {key: [] for key in methods}
            for _ in range(5):
                for key, run in methods.items():
                    times[key].append(timed(pipe, run, unload=unload))
            results[state] = [(name, which, min(seconds)) for (name, which), seconds in times.items()]
    print(f"synthetic SDXL LoRA: {size / 1e6:.1f} MB, {len(manifest.modules)} modules\n")
    for state, title in (
        ("fresh", "UNet as built (pipe.unload_lora_weights() after each run)"),
        ("reused", "UNet that held a LoRA before (pipe.delete_adapters() after each run; PEFT's layers stay)"),
    ):
        rows = results[state]
        baseline = rows[0][2]
        print(f"{title}\n")
        print("| method | modules | seconds | x (a) |")
        print("|---|---|---:|---:|")
        for name, which, seconds in rows:
            print(f"| {name} | {which} | {seconds:.2f} | {seconds / baseline:.2f} |")
        print()


if __name__ == "__main__":
    main()
