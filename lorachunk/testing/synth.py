"""Synthetic LoRA files (labelled synthetic) for layouts no real fixture covers.

Values are drawn like trained LoRA weights (small normals, rank-r factors) from a fixed seed, so
compression behaves realistically and every run writes the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lorachunk._safetensors import TensorInfo, encode_header

# numpy cannot hold BF16; it is F32 with the low half dropped (round to nearest even).
NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}


def to_bytes(values: np.ndarray[Any, Any], dtype: str) -> bytes:
    if dtype == "BF16":
        bits = values.astype(np.float32).view(np.uint32)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return rounded.astype(np.uint16).tobytes()
    return values.astype(NUMPY_DTYPES[dtype]).tobytes()


def write(
    path: Path, tensors: Mapping[str, tuple[str, tuple[int, ...], bytes]], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a safetensors file, tensors sorted by key like the safetensors library does."""
    infos, blobs, position = [], [], 0
    for key in sorted(tensors):
        dtype, shape, blob = tensors[key]
        infos.append(TensorInfo(key, dtype, shape, position, len(blob)))
        blobs.append(blob)
        position += len(blob)
    path.write_bytes(encode_header(infos, metadata) + b"".join(blobs))
    return path


def lora_pair(rng: np.random.Generator, out_dim: int, in_dim: int, rank: int, dtype: str) -> tuple[bytes, bytes]:
    down = rng.normal(0, 0.02, (rank, in_dim))
    up = rng.normal(0, 0.005, (out_dim, rank))
    return to_bytes(down, dtype), to_bytes(up, dtype)


def kohya(path: Path, *, dtype: str = "F16", rank: int = 4, dora: bool = False, seed: int = 0) -> Path:
    """Plain kohya LoRA on a few SD1.5 modules (text encoder, down/mid/up blocks), optional DoRA."""
    rng = np.random.default_rng(seed)
    modules = {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
        "lora_te_text_model_encoder_layers_0_mlp_fc1": (3072, 768),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320),
        "lora_unet_down_blocks_1_attentions_1_proj_in": (640, 640),
        "lora_unet_mid_block_attentions_0_proj_out": (1280, 1280),
        "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_k": (640, 768),
        "lora_unet_up_blocks_3_attentions_0_transformer_blocks_0_ff_net_2": (320, 1280),
    }
    tensors: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    for name, (out_dim, in_dim) in modules.items():
        down, up = lora_pair(rng, out_dim, in_dim, rank, dtype)
        tensors[f"{name}.lora_down.weight"] = (dtype, (rank, in_dim), down)
        tensors[f"{name}.lora_up.weight"] = (dtype, (out_dim, rank), up)
        tensors[f"{name}.alpha"] = (dtype, (), to_bytes(np.array(rank / 2), dtype))
        if dora:
            tensors[f"{name}.dora_scale"] = (dtype, (1, in_dim), to_bytes(rng.normal(1, 0.01, (1, in_dim)), dtype))
    return write(path, tensors, {"ss_network_module": "networks.lora", "ss_network_dim": str(rank)})


def loha(path: Path, *, seed: int = 1) -> Path:
    """LyCORIS LoHa (hada_w1_a/b, hada_w2_a/b, alpha), F16."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    for name, (out_dim, in_dim) in {
        "lora_te_text_model_encoder_layers_3_mlp_fc2": (768, 3072),
        "lora_unet_up_blocks_1_attentions_1_proj_out": (640, 640),
        "lora_unet_down_blocks_2_resnets_0_conv1": (1280, 640),
    }.items():
        for w in ("w1", "w2"):
            tensors[f"{name}.hada_{w}_a"] = ("F16", (out_dim, 8), to_bytes(rng.normal(0, 0.02, (out_dim, 8)), "F16"))
            tensors[f"{name}.hada_{w}_b"] = ("F16", (8, in_dim), to_bytes(rng.normal(0, 0.02, (8, in_dim)), "F16"))
        tensors[f"{name}.alpha"] = ("F16", (), to_bytes(np.array(4.0), "F16"))
    return write(path, tensors, {"ss_network_module": "lycoris.kohya"})


SDXL_UNET_BLOCKS = (
    # (diffusers prefix, width, transformer depth, layers) of the SDXL UNet's attention blocks
    ("down_blocks.1.attentions", 640, 2, 2),
    ("down_blocks.2.attentions", 1280, 10, 2),
    ("mid_block.attentions", 1280, 10, 1),
    ("up_blocks.0.attentions", 1280, 10, 3),
    ("up_blocks.1.attentions", 640, 2, 3),
)


def sdxl(
    path: Path,
    *,
    dtype: str = "F16",
    rank: int = 32,
    kohya_names: bool = False,
    scale: float = 1.0,
    text_encoders: bool = False,
    seed: int = 2,
) -> Path:
    """SDXL-shaped LoRA: every attention projection of every UNet transformer block (630 modules),
    plus with ``text_encoders`` the attention and MLP of both CLIP encoders (264 more).

    rank 64 with text encoders gives 894 modules and about 250 MB in F16; ``scale`` < 1 shrinks
    widths for tests.
    """
    rng = np.random.default_rng(seed)
    tensors: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    if text_encoders:
        for encoder, width, layers in (("text_encoder", 768, 12), ("text_encoder_2", 1280, 32)):
            w = max(8, int(width * scale))
            for layer in range(layers):
                for proj, (out_dim, in_dim) in {
                    "self_attn.q_proj": (w, w),
                    "self_attn.k_proj": (w, w),
                    "self_attn.v_proj": (w, w),
                    "self_attn.out_proj": (w, w),
                    "mlp.fc1": (4 * w, w),
                    "mlp.fc2": (w, 4 * w),
                }.items():
                    down, up = lora_pair(rng, out_dim, in_dim, rank, dtype)
                    name = f"{encoder}.text_model.encoder.layers.{layer}.{proj}"
                    tensors[f"{name}.lora_A.weight"] = (dtype, (rank, in_dim), down)
                    tensors[f"{name}.lora_B.weight"] = (dtype, (out_dim, rank), up)
    for prefix, width, depth, layers in SDXL_UNET_BLOCKS:
        w = max(8, int(width * scale))
        for layer in range(layers):
            for block in range(depth):
                base = f"unet.{prefix}.{layer}.transformer_blocks.{block}"
                projections = {
                    "attn1.to_q": (w, w),
                    "attn1.to_k": (w, w),
                    "attn1.to_v": (w, w),
                    "attn1.to_out.0": (w, w),
                    "attn2.to_q": (w, w),
                    "attn2.to_k": (w, int(2048 * scale)),
                    "attn2.to_v": (w, int(2048 * scale)),
                    "attn2.to_out.0": (w, w),
                    "ff.net.2": (w, 4 * w),
                }
                for proj, (out_dim, in_dim) in projections.items():
                    down, up = lora_pair(rng, out_dim, in_dim, rank, dtype)
                    name = f"{base}.{proj}"
                    if kohya_names:
                        name = "lora_" + name.replace(".", "_")
                        tensors[f"{name}.lora_down.weight"] = (dtype, (rank, in_dim), down)
                        tensors[f"{name}.lora_up.weight"] = (dtype, (out_dim, rank), up)
                    else:
                        tensors[f"{name}.lora_A.weight"] = (dtype, (rank, in_dim), down)
                        tensors[f"{name}.lora_B.weight"] = (dtype, (out_dim, rank), up)
    return write(path, tensors)


def sdxl_lokr(path: Path, *, dtype: str = "F16", factor: int = 8, scale: float = 1.0, seed: int = 3) -> Path:
    """SDXL-shaped LoKr (LyCORIS, kohya names): every attention projection of every UNet
    transformer block (630 modules), each ``lokr_w1`` (``factor`` x ``factor``), ``lokr_w2``
    (out/``factor`` x in/``factor``) and ``alpha``. Factor 8 gives about 43 MB in F16; synthetic,
    for the sizes where LoKr's small factors meet a large model."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    for prefix, width, depth, layers in SDXL_UNET_BLOCKS:
        w = max(factor, int(width * scale))
        for layer in range(layers):
            for block in range(depth):
                base = f"lora_unet_{prefix}_{layer}_transformer_blocks_{block}"
                for proj, in_dim in (
                    ("attn1_to_q", w),
                    ("attn1_to_k", w),
                    ("attn1_to_v", w),
                    ("attn1_to_out_0", w),
                    ("attn2_to_q", w),
                    ("attn2_to_k", int(2048 * scale)),
                    ("attn2_to_v", int(2048 * scale)),
                    ("attn2_to_out_0", w),
                    ("ff_net_2", 4 * w),
                ):
                    w1 = rng.normal(0, 0.05, (factor, factor))
                    w2 = rng.normal(0, 0.02, (w // factor, in_dim // factor))
                    tensors[f"{base}_{proj}.lokr_w1"] = (dtype, (factor, factor), to_bytes(w1, dtype))
                    tensors[f"{base}_{proj}.lokr_w2"] = (dtype, w2.shape, to_bytes(w2, dtype))
                    tensors[f"{base}_{proj}.alpha"] = (dtype, (), to_bytes(np.array(float(factor)), dtype))
    return write(path, tensors, {"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "lokr"}'})
