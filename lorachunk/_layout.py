"""How tensor keys group into modules, and which splits a LoRA gets automatically.

Both are pure functions of names, so a reader can recompute them; the packer writes the result
into the manifest and readers use what the manifest says. docs/splits.md lists every rule.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from fnmatch import fnmatchcase
from numbers import Real
from typing import Final

from lorachunk._exceptions import UsageError

__all__ = [
    "auto_splits",
    "block_of",
    "component_of",
    "is_adapter",
    "layer_of",
    "module_of",
    "natural_key",
    "scale_targets",
    "transformer_block_of",
    "user_splits",
]

# First match wins; group "m" is the module name.
_MODULE_RULES: Final = tuple(
    re.compile(pattern)
    for pattern in (
        # kohya, LyCORIS (LoCon, LoHa, LoKr, full diff), DoRA
        r"^(?P<m>.+)\.(?:lora_down|lora_up|lora_mid)\.weight$",
        # kohya's underscore variant (…_to_k_lora_down.weight, …_to_k_alpha): names without dots
        r"^(?P<m>[^.]+?)_(?:lora_down|lora_up|lora_mid)\.weight$",
        r"^(?P<m>[^.]+?)_alpha$",
        r"^(?P<m>.+)\.(?:alpha|dora_scale|diff|diff_b)$",
        r"^(?P<m>.+)\.hada_(?:w1_a|w1_b|w2_a|w2_b|t1|t2)$",
        r"^(?P<m>.+)\.lokr_(?:w1|w2|w1_a|w1_b|w2_a|w2_b|t1|t2)$",
        # PEFT and diffusers, with or without an adapter name
        r"^(?P<m>.+)\.lora_(?:A|B)(?:\.[^.]+)?\.(?:weight|bias)$",
        r"^(?P<m>.+)\.lora_embedding_(?:A|B)(?:\.[^.]+)?$",
        r"^(?P<m>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$",
        r"^(?P<m>.+)\.lora(?:_linear_layer)?\.(?:down|up)\.(?:weight|bias)$",
        # diffusers attention processors: ...processor.to_q_lora.down.weight
        r"^(?P<m>.+\.[A-Za-z0-9_]+?)_lora\.(?:down|up)\.(?:weight|bias)$",
        # cloneofsimo: unet:12:up, text_encoder:3:down
        r"^(?P<m>[A-Za-z0-9_]+:\d+):(?:up|down)$",
        # SAM-LoRA: w_a_007 and w_b_007 belong together
        r"^(?P<p>w)_[ab]_(?P<n>\d+)$",
    )
)
_PARAMETER_SUFFIX: Final = re.compile(r"^(?P<m>.+)\.(?:weight|bias)$")


def is_adapter(keys: Iterable[str]) -> bool:
    """Whether any of ``keys`` has the name of an adapter tensor (``lora_A``, ``lora_down``,
    ``hada_``, ``lokr_`` …, or a textual-inversion embedding): false for a plain checkpoint."""
    return any(
        any(rule.match(key) for rule in _MODULE_RULES) or component_of(module_of(key)) == "embeddings" for key in keys
    )


def module_of(key: str) -> str:
    """The module a tensor key belongs to.

    Known layouts strip their per-tensor suffix. Anything else falls back to the key without a
    trailing ``.weight``/``.bias``, or the key itself — so every tensor lands in exactly one module
    and unknown layouts never fail.
    """
    for rule in _MODULE_RULES:
        match = rule.match(key)
        if match:
            groups = match.groupdict()
            return f"{groups['p']}_{groups['n']}" if "n" in groups else groups["m"]
    match = _PARAMETER_SUFFIX.match(key)
    return match["m"] if match else key


_COMPONENT_RULES: Final = (
    (re.compile(r"^(?:lora_te2_|text_encoder_2[.:]|lora_te2\.)"), "text_encoder_2"),
    (re.compile(r"^(?:lora_te3_|text_encoder_3[.:])"), "text_encoder_3"),
    (re.compile(r"^(?:lora_te1?_|text_encoder[.:]|(?:base_model\.model\.)?text_model\.)"), "text_encoder"),
    (
        re.compile(r"^(?:lora_unet_|unet[.:]|(?:down_blocks|up_blocks|mid_block|conv_in|conv_out|time_embedding)\.)"),
        "unet",
    ),
    (
        re.compile(
            r"^(?:lora_transformer_|transformer\.|diffusion_model\."
            r"|(?:single_)?transformer_blocks\.|(?:double|single|joint)_blocks\.)"
        ),
        "transformer",
    ),
    (re.compile(r"^(?:<[^>]*>|emb_params|clip_[lg])$"), "embeddings"),
)


def component_of(module: str) -> str | None:
    """``text_encoder``, ``text_encoder_2``, ``unet``, ``transformer``, ``embeddings`` or None.

    By name alone: a kohya Flux or SD3 module (``lora_unet_double_blocks_0_…``) is ``unet`` here;
    :func:`auto_splits`, which sees the whole LoRA, files it under ``transformer``.
    """
    for rule, component in _COMPONENT_RULES:
        if rule.match(module):
            return component
    return None


# UNet blocks in diffusers names (dots) and kohya names (underscores), and in the original
# LDM names (input_blocks / middle_block / output_blocks).
# kohya's prefix is lora_unet_; some writers add the diffusers component again (lora_unet_unet_…).
_UNET: Final = r"(?:lora_unet_(?:unet_)?|unet\.)"
_DIFFUSERS_BLOCK: Final = re.compile(
    rf"^{_UNET}?(?P<dir>down|up)_blocks[._](?P<i>\d+)[._](?P<kind>attentions|resnets|downsamplers|upsamplers)[._](?P<j>\d+)"
)
_DIFFUSERS_MID: Final = re.compile(rf"^{_UNET}?mid_block[._]")
_LDM_BLOCK: Final = re.compile(
    r"^(?:lora_unet_|unet\.|diffusion_model\.)?(?P<dir>input|output)_blocks[._](?P<n>\d+)[._]"
)
_LDM_MID: Final = re.compile(r"^(?:lora_unet_|unet\.|diffusion_model\.)?middle_block[._]")


def block_of(module: str) -> tuple[str, str] | None:
    """The UNet block of a module: (diffusers block path, LoRA Block Weight id), or None.

    The block-weight ids follow the LDM numbering the LoRA Block Weight extension uses:
    ``down_blocks.i`` layer ``j`` is ``IN{3i+j+1}`` and its downsampler ``IN{3i+3}``; ``up_blocks.i``
    layer ``j`` is ``OUT{3i+j}`` and its upsampler ``OUT{3i+2}``; the mid block is ``MID``. The same
    formula holds for SD1.x and SDXL.
    """
    if _DIFFUSERS_MID.match(module) or _LDM_MID.match(module):
        return "unet.mid_block", "MID"
    match = _DIFFUSERS_BLOCK.match(module)
    if match:
        i, j = int(match["i"]), int(match["j"])
        path = f"unet.{match['dir']}_blocks.{i}"
        if match["dir"] == "down":
            return path, f"IN{3 * i + (3 if match['kind'] == 'downsamplers' else j + 1):02d}"
        return path, f"OUT{3 * i + (2 if match['kind'] == 'upsamplers' else j):02d}"
    match = _LDM_BLOCK.match(module)
    if match:
        n = int(match["n"])
        return None if n == 0 and match["dir"] == "input" else _ldm_block(match["dir"], n)
    return None


def _ldm_block(direction: str, n: int) -> tuple[str, str]:
    if direction == "input":
        return f"unet.down_blocks.{(n - 1) // 3}", f"IN{n:02d}"
    return f"unet.up_blocks.{n // 3}", f"OUT{n:02d}"


# Transformer (DiT) blocks: Flux's double-stream and single-stream blocks and SD3's joint blocks,
# in diffusers names (transformer_blocks, single_transformer_blocks), kohya names
# (lora_unet_double_blocks_0_…, lora_transformer_single_transformer_blocks_0_…) and the original
# ones (double_blocks, single_blocks, joint_blocks).
_DIT_BLOCK: Final = re.compile(
    r"^(?:lora_unet_|lora_transformer_|transformer\.|diffusion_model\.)?"
    r"(?P<kind>single_transformer_blocks|transformer_blocks|single_blocks|double_blocks|joint_blocks)[._](?P<n>\d+)(?:[._]|$)"
)
_DIT_KINDS: Final = {
    "transformer_blocks": "transformer_blocks",
    "double_blocks": "transformer_blocks",
    "joint_blocks": "transformer_blocks",
    "single_transformer_blocks": "single_transformer_blocks",
    "single_blocks": "single_transformer_blocks",
}


def transformer_block_of(module: str) -> tuple[str, str] | None:
    """The DiT block of a module, as (group, block) split names in diffusers' naming, or None:
    ``("transformer.transformer_blocks", "transformer.transformer_blocks.3")`` for Flux's double
    block 3 or SD3's joint block 3, ``transformer.single_transformer_blocks…`` for Flux's single ones."""
    match = _DIT_BLOCK.match(module)
    if match is None:
        return None
    group = f"transformer.{_DIT_KINDS[match['kind']]}"
    return group, f"{group}.{int(match['n'])}"


# B-LoRA (Frenkel et al., 2024): on SDXL, up_blocks.0.attentions.0 carries content and
# up_blocks.0.attentions.1 carries style.
_BLORA: Final = (
    ("content", re.compile(rf"^{_UNET}?up_blocks[._]0[._]attentions[._]0[._]")),
    ("style", re.compile(rf"^{_UNET}?up_blocks[._]0[._]attentions[._]1[._]")),
)


# Adapters of transformer models (LLMs, encoders, ViTs) in PEFT's dotted names: the stack of
# layers, whatever the model calls it (Llama …layers.N, GPT-2 …h.N, BERT …layer.N, T5 …block.N,
# SAM …blocks.N), the family of the target module, the projection, and the parts around the stack.
_LAYER: Final = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(?P<n>\d+)\.")
_SIDE: Final = re.compile(r"(?:^|\.)(?P<side>encoder|decoder)\.")
_FAMILIES: Final = (
    (
        "attn",
        re.compile(
            r"(?:^|\.)(?:self_attn|attn|attention|self_attention|SelfAttention|EncDecAttention|cross_attn|crossattention)(?:\.|$)"
        ),
    ),
    (
        "mlp",
        re.compile(r"(?:^|\.)(?:mlp|ffn|feed_forward|intermediate|output|DenseReluDense|block_sparse_moe)(?:\.|$)"),
    ),
)
_PARTS: Final = (
    (
        "embeddings",
        re.compile(r"(?:^|\.)(?:embed_tokens|embed_in|wte|wpe|word_embeddings|position_embeddings|shared|embeddings)$"),
    ),
    # DistilBERT's head is pre_classifier + classifier (the first is most of its bytes).
    (
        "heads",
        re.compile(r"(?:^|\.)(?:lm_head|embed_out|pre_classifier|classifier|score|qa_outputs|pooler|cls)(?:\.|$)"),
    ),
)


def layer_of(module: str) -> int | None:
    """The index of the transformer layer a module sits in (``…layers.3.…`` → 3), or None."""
    match = _LAYER.search(module)
    return int(match["n"]) if match else None


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders the numbers in names by value: ``blocks.7`` before ``blocks.12``."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part)


def _transformer_splits(modules: list[str], add: Callable[[str, str, str], None]) -> None:
    """Layer, family, projection and part splits for modules of no diffusion component."""
    # An encoder-decoder model (T5, BART) numbers each stack from 0: its layer splits say which.
    sides = {match["side"] for m in modules if (match := _SIDE.search(m)) and layer_of(m) is not None}
    both = sides == {"encoder", "decoder"}
    for module in modules:
        layer = layer_of(module)
        if layer is None:
            for name, rule in _PARTS:
                if rule.search(module):
                    add(name, "component", module)
            continue
        side = _SIDE.search(module) if both else None
        add(f"{side['side']}.layers.{layer}" if side else f"layers.{layer}", "layer", module)
        family = next((name for name, rule in _FAMILIES if rule.search(module)), None)
        if family is not None:
            add(family, "family", module)
        add(module.rpartition(".")[2], "projection", module)


def auto_splits(modules: Iterable[str]) -> dict[str, tuple[str, list[str]]]:
    """Splits every LoRA gets: by component, by UNet or transformer block, by block-weight id,
    B-LoRA's, and for adapters of transformer models by layer, family and projection.

    Returns ``{name: (kind, modules)}``; empty splits are left out.
    """
    modules = list(modules)
    splits: dict[str, tuple[str, list[str]]] = {}
    # kohya names a Flux or SD3 LoRA's modules lora_unet_… too; a LoRA with transformer blocks
    # has no UNet, so all of them are the transformer (the component diffusers' pipelines name).
    dit = any(_DIT_BLOCK.match(m) for m in modules)

    def add(name: str, kind: str, module: str) -> None:
        splits.setdefault(name, (kind, []))[1].append(module)

    _transformer_splits([m for m in modules if component_of(m) is None], add)
    for module in modules:
        component = component_of(module)
        if component == "unet" and dit:
            component = "transformer"
        if component is not None:
            add(component, "component", module)
            if component.startswith("text_encoder"):
                add("BASE", "block-weight", module)
        block = block_of(module)
        if block is not None:
            add(block[0], "block", module)
            add(block[1], "block-weight", module)
        for name in transformer_block_of(module) or ():
            add(name, "block", module)
        for name, rule in _BLORA:
            if rule.match(module):
                add(name, "b-lora", module)
    return splits


def matching(names: Iterable[str], pattern: str) -> list[str]:
    """The names ``pattern`` selects: the one it spells exactly, if there is one, else those it
    matches as a glob. A module name may hold ``[``, ``*`` or ``?``; naming it exactly selects it
    alone."""
    names = list(names)
    return [pattern] if pattern in names else [n for n in names if fnmatchcase(n, pattern)]


def as_names(names: Iterable[str]) -> list[str]:
    """A list of names; a single string is one name (``splits="unet"``), not its characters."""
    return [names] if isinstance(names, str) else list(names)


def user_splits(patterns: Mapping[str, Iterable[str]], modules: Iterable[str]) -> dict[str, tuple[str, list[str]]]:
    """Splits from ``{name: [glob, …]}`` (or ``{name: glob}``), matched against module names
    (fnmatch, case-sensitive)."""
    if not isinstance(patterns, Mapping):
        raise UsageError(f"splits must map split names to globs, got {type(patterns).__name__}")
    names = list(modules)
    splits: dict[str, tuple[str, list[str]]] = {}
    for name, globs in patterns.items():
        if not isinstance(name, str) or not name or name != name.strip() or not name.isprintable():
            raise UsageError(f"split name {name!r} must be a printable, non-empty string without surrounding spaces")
        patterns_of_split = as_names(globs)
        chosen = {n for g in patterns_of_split for n in matching(names, g)}
        members = [m for m in names if m in chosen]
        if not members:
            raise UsageError(f"split {name!r}: {', '.join(patterns_of_split)} matches no module")
        splits[name] = ("user", members)
    return splits


# Which tensors carry a module's delta linearly, so multiplying them multiplies the delta. The
# first rule that matches any of a module's keys wins. Alpha is never touched: scaling the up
# factor scales the delta the same way whatever alpha/rank is.
_SCALE_RULES: Final = tuple(
    re.compile(pattern)
    for pattern in (
        r"[._]lora_up\.weight$",  # kohya (and its underscore variant), LoCon, DoRA (the direction; the magnitude stays)
        r"\.lora_B(?:\.[^.]+)?\.(?:weight|bias)$",  # PEFT
        r"\.lora_embedding_B(?:\.[^.]+)?$",
        r"\.lora(?:_linear_layer)?\.up\.(?:weight|bias)$",  # diffusers
        r"_lora\.up\.(?:weight|bias)$",  # diffusers attention processors
        r":up$",  # cloneofsimo
        r"^w_b_\d+$",  # SAM-LoRA
        r"\.hada_w1_a$",  # LoHa: (w1a w1b) * (w2a w2b), so one factor
        r"\.lokr_w1$",  # LoKr: kron(w1, w2)
        r"\.lokr_w1_a$",  # LoKr with a decomposed w1
        r"\.diff(?:_b)?$",  # LyCORIS full: the delta itself (weight and bias)
    )
)


def finite_scales(scales: Mapping[str, float]) -> dict[str, float]:
    """``scales`` with every factor a float; :class:`UsageError` for one that is not a finite number
    (an infinite or NaN strength would turn the weights it touches into inf or NaN)."""
    if not isinstance(scales, Mapping):
        raise UsageError(f"scales must map split names or module patterns to factors, got {type(scales).__name__}")
    result: dict[str, float] = {}
    for name, factor in scales.items():
        if isinstance(factor, bool) or not isinstance(factor, Real) or not math.isfinite(factor):
            raise UsageError(f"scale {name!r} must be a finite number, got {factor!r}")
        result[name] = float(factor)
    return result


def scale_targets(keys: Iterable[str]) -> list[str]:
    """The tensor keys of one module to multiply by a strength factor; empty if the layout has none."""
    keys = list(keys)
    for rule in _SCALE_RULES:
        matched = [key for key in keys if rule.search(key)]
        if matched:
            return matched
    return []


# The width of a UNet's cross-attention (what attn2.to_k/to_v read) names the model family.
_CROSS_ATTENTION: Final = {768: "sd_v1", 1024: "sd_v2", 2048: "sdxl"}
_TO_KV_DOWN: Final = re.compile(r"attn2[._](?:processor[._])?to_[kv](?:_lora)?[._](?:lora_down|lora_A|down)[._]weight$")
_FAMILY_WORDS: Final = (("xl", "sdxl"), ("flux", "flux"), ("sd3", "sd3"), ("v2", "sd_v2"), ("v1", "sd_v1"))


def base_model_of(
    metadata: Mapping[str, str] | None, files: Mapping[str, str], shapes: Iterable[tuple[str, tuple[int, ...]]]
) -> str | None:
    """The base model a LoRA was trained for, where it says or shows: a PEFT config's
    ``base_model_name_or_path``; for a diffusion UNet the width of its cross-attention (768 SD 1.x,
    1024 SD 2.x, 2048 SDXL); else kohya's and modelspec's metadata. None when nothing tells.
    A hint for warnings and listings, never a check: every field it reads is the uploader's."""
    config = files.get("adapter_config.json")
    if config is not None:
        try:
            name = json.loads(config).get("base_model_name_or_path")
        except (ValueError, AttributeError):
            name = None
        if isinstance(name, str) and name.strip():
            return name.strip()[:200]
    for key, shape in shapes:
        if _TO_KV_DOWN.search(key) and len(shape) == 2 and shape[1] in _CROSS_ATTENTION:
            return _CROSS_ATTENTION[shape[1]]
    meta = metadata or {}
    for field in ("ss_base_model_version", "modelspec.architecture"):
        value = meta.get(field, "").lower().split("/")[0]
        for word, family in _FAMILY_WORDS:
            if word in value:
                return family
    if meta.get("ss_v2") in ("True", "False"):
        return "sd_v2" if meta["ss_v2"] == "True" else "sd_v1"
    return None
