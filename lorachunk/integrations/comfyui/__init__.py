"""A ComfyUI node pack: load a LoRA from a lorachunk store, whole, one split of it, or weighted
block by block as LoRA Block Weight users write it.

ComfyUI discovers node packs as folders under ``custom_nodes/``; this package is one. Link it
there from the environment ComfyUI runs in (docs/integrations.md)::

    pip install lorachunk
    ln -s "$(python -c 'import lorachunk.integrations.comfyui as m; print(m.__path__[0])')" \\
        ComfyUI/custom_nodes/lorachunk
    export LORACHUNK_COMFYUI_STORE=https://cdn.example.org/loras   # the store whose names are listed

The node hands ComfyUI's own ``comfy.sd.load_lora_for_models`` the state dict lorachunk loads
(verified, only the records the chosen split and blocks need). This module is the only one of
lorachunk that imports ComfyUI, and only when the node runs.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import lorachunk

if TYPE_CHECKING:
    import torch

__all__ = [
    "NODE_CLASS_MAPPINGS",
    "NODE_DISPLAY_NAME_MAPPINGS",
    "LorachunkLoraLoader",
    "parse_block_weights",
    "state_dict",
]

_IN = [f"IN{i:02d}" for i in range(12)]
_OUT = [f"OUT{i:02d}" for i in range(12)]
#: The orders LoRA Block Weight lists are written in, by length: SD1.5's 17 blocks, SDXL's 12,
#: and every block of a UNet (26). The names are lorachunk's block splits (docs/splits.md).
BLOCK_ORDERS: Mapping[int, Sequence[str]] = {
    17: ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", *(f"OUT{i:02d}" for i in range(3, 12))],
    12: ["BASE", "IN04", "IN05", "IN07", "IN08", "MID", *(f"OUT{i:02d}" for i in range(6))],
    26: ["BASE", *_IN, "MID", *_OUT],
}


def parse_block_weights(text: str) -> dict[str, float]:
    """Block name → weight, from what LoRA Block Weight users write: a list of 17 (SD1.5), 12
    (SDXL) or 26 numbers, optionally after a preset name (``"MIDD:0,0,0,…"``), or ``BLOCK=w``
    pairs (``"MID=0.5, OUT01=0"``). Empty: no weights."""
    text = text.strip()
    if not text:
        return {}
    head, colon, rest = text.partition(":")
    if colon and head.strip().isidentifier():
        text = rest  # a preset's name
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if all("=" in p for p in parts):
        pairs = [p.split("=", 1) for p in parts]
        weights = {name.strip().upper(): _weight(value) for name, value in pairs}
        known = set(BLOCK_ORDERS[26])
        unknown = sorted(set(weights) - known)
        if unknown:
            raise lorachunk.UsageError(
                f"block weights: unknown blocks {unknown}; blocks are BASE, IN00 to IN11, MID, OUT00 to OUT11"
            )
        return weights
    order = BLOCK_ORDERS.get(len(parts))
    if order is None:
        raise lorachunk.UsageError(
            f"block weights: {len(parts)} numbers; LoRA Block Weight lists have 17 (SD1.5), 12 (SDXL) or 26,"
            " or write BLOCK=weight pairs"
        )
    return dict(zip(order, map(_weight, parts), strict=True))


def _weight(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise lorachunk.UsageError(f"block weights: {text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise lorachunk.UsageError(f"block weights: {text.strip()!r} is not a finite number")
    return value


def state_dict(source: str, *, split: str = "", weights: str = "", **open_options: Any) -> dict[str, torch.Tensor]:
    """The state dict for ``comfy.sd.load_lora_for_models``: the LoRA ``source`` names
    (``STORE#NAME``), or its ``split``, with each block scaled by its weight. Blocks weighted 0
    are not fetched at all; weights for blocks the LoRA lacks are ignored, as LoRA Block Weight
    does."""
    with lorachunk.open(source, **open_options) as lora:
        weighted = {name: w for name, w in parse_block_weights(weights).items() if name in lora.splits}
        chosen = set(lora.manifest.split(split).modules) if split else set(lora.modules)
        for name, weight in weighted.items():
            if weight == 0:
                chosen -= set(lora.splits[name].modules)
        if not chosen:
            return {}
        scales = {name: w for name, w in weighted.items() if w not in (0.0, 1.0)}
        modules = [] if len(chosen) == len(lora.modules) else sorted(chosen)
        return lora.load(modules=modules, scales=scales)


def _store() -> str:
    return os.environ.get("LORACHUNK_COMFYUI_STORE", "")


#: ComfyUI asks every node for its inputs each time a browser loads the page: a store's names
#: are read once a minute at most, not once per page.
_LISTED_FOR_S = 60.0
_listed: dict[str, tuple[float, list[str]]] = {}


def _names(store: str) -> list[str]:
    if not store:
        return []
    seen = _listed.get(store)
    if seen is not None and time.monotonic() - seen[0] < _LISTED_FOR_S:
        return seen[1]
    try:
        names = sorted({row["name"] for row in lorachunk.ls(store)})
    except lorachunk.LorachunkError:
        names = []  # a store that cannot be read lists nothing; the node says why when it runs
    _listed[store] = (time.monotonic(), names)
    return names


class LorachunkLoraLoader:
    """Load a LoRA from a lorachunk store onto MODEL and CLIP (ComfyUI's LoraLoader, by name)."""

    CATEGORY = "loaders"
    FUNCTION = "load_lora"
    RETURN_TYPES = ("MODEL", "CLIP")
    DESCRIPTION = "A LoRA from a lorachunk store (a folder, http(s)://, hf://, s3://), verified as it is fetched."

    def __init__(self) -> None:
        self._last: tuple[tuple[str, str, str], dict[str, torch.Tensor]] | None = None

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 - ComfyUI's name
        store = _store()
        strength = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
        return {
            "required": {
                "model": ("MODEL",),
                "clip": ("CLIP",),
                "store": ("STRING", {"default": store}),
                "lora_name": (_names(store) or [""],),
                "strength_model": ("FLOAT", strength),
                "strength_clip": ("FLOAT", strength),
            },
            "optional": {
                "split": ("STRING", {"default": ""}),
                "block_weights": ("STRING", {"default": ""}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, store: str, lora_name: str, block_weights: str = "") -> bool | str:  # noqa: N802
        """Names come from the node's store, not the list made at start-up (so ComfyUI's own
        check of the list is skipped)."""
        if not lora_name:
            return "no LoRA name: set LORACHUNK_COMFYUI_STORE or type one"
        try:
            parse_block_weights(block_weights)
        except lorachunk.UsageError as exc:
            return str(exc)
        return True

    def load_lora(  # ComfyUI passes every input by name
        self,
        *,
        model: Any,
        clip: Any,
        store: str,
        lora_name: str,
        strength_model: float,
        strength_clip: float,
        split: str = "",
        block_weights: str = "",
    ) -> tuple[Any, Any]:
        if strength_model == 0 and strength_clip == 0:
            return (model, clip)
        import comfy.sd

        key = (f"{store}#{lora_name}", split, block_weights)
        if self._last is None or self._last[0] != key:
            self._last = (key, state_dict(key[0], split=split, weights=block_weights))
        loaded: tuple[Any, Any] = comfy.sd.load_lora_for_models(
            model, clip, self._last[1], strength_model, strength_clip
        )
        return loaded


NODE_CLASS_MAPPINGS = {"LorachunkLoraLoader": LorachunkLoraLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"LorachunkLoraLoader": "Load LoRA (lorachunk)"}
