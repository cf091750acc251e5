"""diffusers takes what lorachunk loads, unchanged: a tiny Stable Diffusion pipeline built from
configs (random weights, no network), LoRAs for it in kohya, PEFT and diffusers' older
attention-processor naming (synthetic), fused and compared."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import lorachunk
from lorachunk.integrations.diffusers import load_lora

STYLE = "up_blocks.0.attentions.1."  # B-LoRA's style block (SDXL naming; the tiny UNet has it too)


def tiny_pipe(tmp_path: Path, unet: Any = None) -> Any:
    """The same pipeline every call (fixed seed): 2 UNet levels, up_blocks.0 with two attentions.
    ``unet`` replaces the tiny UNet (benchmarks/diffusers_load.py brings an SDXL-shaped one)."""
    torch.manual_seed(0)
    unet = unet or UNet2DConditionModel(
        sample_size=8,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=100)
    )
    vae = AutoencoderKL(
        block_out_channels=(8,),
        norm_num_groups=8,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    )
    (tmp_path / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def make_lora(pipe: Any, path: Path, style: str, rank: int = 4) -> Path:
    """A LoRA on every attention projection of the UNet and the text encoder, non-zero both sides."""
    generator = torch.Generator().manual_seed(1)
    tensors: dict[str, torch.Tensor] = {}
    models = (("unet", pipe.unet, "lora_unet_"), ("text_encoder", pipe.text_encoder, "lora_te_"))
    for component, model, prefix in models:
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or not ("attentions" in name or "self_attn" in name):
                continue
            down = torch.randn(rank, module.in_features, generator=generator) * 0.1
            up = torch.randn(module.out_features, rank, generator=generator) * 0.1
            if style == "attnproc":  # diffusers' older attention-processor format: UNet only
                if component != "unet":
                    continue
                parent, _, proj = name.removesuffix(".0").rpartition(".")
                key = f"unet.{parent}.processor.{proj}_lora"
                tensors |= {f"{key}.down.weight": down, f"{key}.up.weight": up}
            elif style == "kohya":
                key = prefix + name.replace(".", "_")
                tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}
                tensors[f"{key}.alpha"] = torch.tensor(float(rank) / 2)
            else:  # PEFT naming, as diffusers saves it
                tensors |= {f"{component}.{name}.lora_A.weight": down, f"{component}.{name}.lora_B.weight": up}
    save_file(tensors, path)
    return path


def fused(pipe: Any) -> dict[str, torch.Tensor]:
    """The pipeline's weights with the LoRA merged in and the adapter layers gone."""
    pipe.fuse_lora(components=["unet", "text_encoder"])
    pipe.unload_lora_weights()
    return {
        **{f"unet.{k}": v.clone() for k, v in pipe.unet.state_dict().items()},
        **{f"text_encoder.{k}": v.clone() for k, v in pipe.text_encoder.state_dict().items()},
    }


def base(pipe: Any) -> dict[str, torch.Tensor]:
    return {
        **{f"unet.{k}": v.clone() for k, v in pipe.unet.state_dict().items()},
        **{f"text_encoder.{k}": v.clone() for k, v in pipe.text_encoder.state_dict().items()},
    }


Setup = Callable[[str], tuple[Path, Path]]


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    def make(style: str) -> tuple[Path, Path]:
        path = make_lora(tiny_pipe(tmp_path), tmp_path / f"{style}.safetensors", style)
        lorachunk.pack(path, tmp_path / f"{style}.lcs")
        return path, tmp_path / f"{style}.lcs"

    return make


@pytest.mark.parametrize("style", ["kohya", "peft", "attnproc"])
def test_same_fused_weights_as_loading_the_file(style: str, setup: Setup, tmp_path: Path) -> None:
    original, packed = setup(style)
    reference = tiny_pipe(tmp_path)
    reference.load_lora_weights(str(original), adapter_name="ref")
    expected = fused(reference)

    pipe = tiny_pipe(tmp_path)
    assert load_lora(pipe, packed) == style  # the adapter is named after the file
    got = fused(pipe)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert any(not torch.equal(got[k], v) for k, v in base(tiny_pipe(tmp_path)).items())  # it did something

    # The plain state dict goes in as it is, too.
    direct = tiny_pipe(tmp_path)
    direct.load_lora_weights(lorachunk.load(packed), adapter_name="direct")
    assert all(torch.equal(v, expected[k]) for k, v in fused(direct).items())


@pytest.mark.parametrize("style", ["kohya", "peft", "attnproc"])
def test_style_split_changes_only_its_block(style: str, setup: Setup, tmp_path: Path) -> None:
    _, packed = setup(style)
    with lorachunk.open(packed) as lora:
        assert lora.splits["style"].kind == "b-lora"
    before = base(tiny_pipe(tmp_path))
    pipe = tiny_pipe(tmp_path)
    load_lora(pipe, packed, splits=["style"], adapter_name="style")
    after = fused(pipe)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(f"unet.{STYLE}") for k in changed)


def test_scales_multiply_the_delta(setup: Setup, tmp_path: Path) -> None:
    _, packed = setup("kohya")
    before = base(tiny_pipe(tmp_path))

    def delta(**options: object) -> dict[str, torch.Tensor]:
        pipe = tiny_pipe(tmp_path)
        load_lora(pipe, packed, adapter_name="x", **options)  # type: ignore[arg-type]
        return {k: v.double() - before[k].double() for k, v in fused(pipe).items()}

    full = delta()
    half_style = delta(scales={"style": 0.5})
    for key, value in full.items():
        factor = 0.5 if key.startswith(f"unet.{STYLE}") else 1.0
        assert torch.allclose(half_style[key], value * factor, atol=1e-6), key

    # Component strengths go to diffusers' set_adapters and give the same result.
    by_component = delta(scales={"unet": 0.5, "text_encoder": 0.25})
    for key, value in full.items():
        factor = 0.5 if key.startswith("unet.") else 0.25
        assert torch.allclose(by_component[key], value * factor, atol=1e-6), key


def test_unknown_split_is_a_usage_error(setup: Setup, tmp_path: Path) -> None:
    _, packed = setup("peft")
    with pytest.raises(lorachunk.UsageError, match="no split"):
        load_lora(tiny_pipe(tmp_path), packed, splits=["nope"])


def test_a_lora_of_a_library_by_name(tmp_path: Path) -> None:
    """Issue #26 item 5: ``STORE#NAME`` picks one LoRA of a store holding several."""
    pipe = tiny_pipe(tmp_path)
    for n, style in enumerate(["kohya", "peft"]):
        path = make_lora(pipe, tmp_path / f"{style}.safetensors", style, rank=2 + n)
        lorachunk.pack(path, tmp_path / "library", name=style)
    reference = tiny_pipe(tmp_path)
    reference.load_lora_weights(str(tmp_path / "kohya.safetensors"), adapter_name="ref")
    expected = fused(reference)
    named = tiny_pipe(tmp_path)
    assert load_lora(named, f"{tmp_path / 'library'}#kohya") == "kohya"
    assert all(torch.equal(v, expected[k]) for k, v in fused(named).items())
