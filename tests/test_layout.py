"""Module grouping and automatic splits, by naming convention."""

from __future__ import annotations

from pathlib import Path

import pytest

import lorachunk
from lorachunk._layout import auto_splits, block_of, component_of, module_of, transformer_block_of
from lorachunk.testing import synth


@pytest.mark.parametrize(
    ("key", "module"),
    [
        ("lora_unet_mid_block_attentions_0_proj_in.lora_down.weight", "lora_unet_mid_block_attentions_0_proj_in"),
        ("lora_unet_mid_block_attentions_0_proj_in.alpha", "lora_unet_mid_block_attentions_0_proj_in"),
        ("lora_unet_x.dora_scale", "lora_unet_x"),
        ("lora_unet_x.lora_mid.weight", "lora_unet_x"),
        ("lora_te_y.hada_w1_a", "lora_te_y"),
        ("lora_te_y.hada_t2", "lora_te_y"),
        ("lora_te_y.lokr_w2_b", "lora_te_y"),
        ("lora_te_y.lokr_w1", "lora_te_y"),
        ("lora_unet_z.diff", "lora_unet_z"),
        ("lora_unet_z.diff_b", "lora_unet_z"),
        ("base_model.model.layers.0.self_attn.q_proj.lora_A.weight", "base_model.model.layers.0.self_attn.q_proj"),
        (
            "base_model.model.layers.0.self_attn.q_proj.lora_B.default.weight",
            "base_model.model.layers.0.self_attn.q_proj",
        ),
        ("model.embed_tokens.lora_embedding_A", "model.embed_tokens"),
        ("unet.a.to_q.lora_magnitude_vector", "unet.a.to_q"),
        ("unet.a.to_q.lora_magnitude_vector.default.weight", "unet.a.to_q"),
        ("unet.a.to_k.lora.down.weight", "unet.a.to_k"),
        ("unet.a.to_k.lora_linear_layer.up.weight", "unet.a.to_k"),
        (
            "mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight",
            "mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out",
        ),
        ("unet:12:up", "unet:12"),
        ("text_encoder:3:down", "text_encoder:3"),
        ("w_a_007", "w_007"),
        ("w_b_007", "w_007"),
        ("<s1>", "<s1>"),
        ("emb_params", "emb_params"),
        ("some.unknown.layer.weight", "some.unknown.layer"),
        ("some.unknown.layer.bias", "some.unknown.layer"),
        ("odd key without rules", "odd key without rules"),
    ],
)
def test_module_of(key: str, module: str) -> None:
    assert module_of(key) == module


@pytest.mark.parametrize(
    ("module", "component"),
    [
        ("lora_te_text_model_encoder_layers_0_mlp_fc1", "text_encoder"),
        ("lora_te1_text_model_encoder_layers_0_mlp_fc1", "text_encoder"),
        ("lora_te2_text_model_encoder_layers_0_mlp_fc1", "text_encoder_2"),
        ("text_encoder_2.text_model.encoder.layers.0.mlp.fc1", "text_encoder_2"),
        ("base_model.model.text_model.encoder.layers.0.self_attn.q_proj", "text_encoder"),
        ("text_encoder:3", "text_encoder"),
        ("unet:3", "unet"),
        ("lora_unet_mid_block_attentions_0_proj_in", "unet"),
        ("up_blocks.1.attentions.0.proj_in", "unet"),
        ("transformer.single_transformer_blocks.0.attn.to_q", "transformer"),
        ("<s1>", "embeddings"),
        ("w_007", None),
    ],
)
def test_component_of(module: str, component: str | None) -> None:
    assert component_of(module) == component


@pytest.mark.parametrize(
    ("module", "block"),
    [
        ("lora_unet_down_blocks_0_attentions_0_proj_in", ("unet.down_blocks.0", "IN01")),
        ("lora_unet_down_blocks_0_attentions_1_proj_in", ("unet.down_blocks.0", "IN02")),
        ("lora_unet_down_blocks_0_downsamplers_0_conv", ("unet.down_blocks.0", "IN03")),
        ("unet.down_blocks.2.attentions.1.proj_in", ("unet.down_blocks.2", "IN08")),
        ("lora_unet_down_blocks_3_resnets_1_conv1", ("unet.down_blocks.3", "IN11")),
        ("unet.mid_block.attentions.0.proj_in", ("unet.mid_block", "MID")),
        ("lora_unet_up_blocks_0_attentions_0_proj_out", ("unet.up_blocks.0", "OUT00")),
        ("lora_unet_up_blocks_0_upsamplers_0_conv", ("unet.up_blocks.0", "OUT02")),
        ("up_blocks.3.attentions.2.proj_out", ("unet.up_blocks.3", "OUT11")),
        ("lora_unet_input_blocks_4_1_proj_in", ("unet.down_blocks.1", "IN04")),
        ("lora_unet_output_blocks_5_1_proj_in", ("unet.up_blocks.1", "OUT05")),
        ("lora_unet_middle_block_1_proj_in", ("unet.mid_block", "MID")),
        ("lora_unet_conv_in", None),
        ("lora_te_text_model_encoder_layers_0_mlp_fc1", None),
    ],
)
def test_block_of(module: str, block: tuple[str, str] | None) -> None:
    assert block_of(module) == block


def test_blora_splits_in_both_namings() -> None:
    modules = [
        "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q",
        "unet.up_blocks.0.attentions.1.transformer_blocks.3.attn2.to_k",
        "unet.up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_q",
        "lora_te2_text_model_encoder_layers_0_mlp_fc1",
    ]
    splits = auto_splits(modules)
    assert splits["content"] == ("b-lora", [modules[0]])
    assert splits["style"] == ("b-lora", [modules[1], modules[2]])
    assert splits["text_encoder_2"][1] == [modules[4]]
    assert splits["BASE"][1] == [modules[4]]
    assert splits["OUT02"][1] == [modules[3]]
    assert set(splits["unet"][1]) == set(modules[:4])


def _split_shapes(namings: dict[str, list[str]]) -> dict[str, dict[str, tuple[str, int]]]:
    """For each naming of the same layers: every split's kind and size."""
    return {
        naming: {name: (kind, len(members)) for name, (kind, members) in auto_splits(modules).items()}
        for naming, modules in namings.items()
    }


def test_every_naming_gives_the_same_splits() -> None:
    """diffusers, kohya and LDM names of the same SDXL layers split identically (docs/splits.md)."""
    layers = [
        ("down_blocks.1.attentions.0.proj_in", "input_blocks.4.1.proj_in"),
        ("down_blocks.2.attentions.1.attn1", "input_blocks.8.1.attn1"),
        ("mid_block.attentions.0.proj_out", "middle_block.1.proj_out"),
        ("up_blocks.0.attentions.0.proj_in", "output_blocks.0.1.proj_in"),
        ("up_blocks.0.attentions.1.attn2", "output_blocks.1.1.attn2"),
        ("up_blocks.1.resnets.2.conv1", "output_blocks.5.0.conv1"),
    ]
    namings = {
        "diffusers": [f"unet.{d}" for d, _ in layers],
        "kohya": [f"lora_unet_{d.replace('.', '_')}" for d, _ in layers],
        "ldm": [f"lora_unet_{ldm.replace('.', '_')}" for _, ldm in layers],
    }
    shapes = _split_shapes(namings)
    assert shapes["diffusers"] == shapes["kohya"]
    # LDM names carry no attention/resnet distinction, so B-LoRA's attention-level splits need diffusers names.
    assert {k: v for k, v in shapes["diffusers"].items() if v[0] != "b-lora"} == shapes["ldm"]
    assert shapes["diffusers"]["OUT01"] == ("block-weight", 1) and shapes["diffusers"]["style"] == ("b-lora", 1)


@pytest.mark.parametrize(
    ("module", "block"),
    [
        ("lora_unet_double_blocks_0_img_attn_proj", "transformer.transformer_blocks.0"),
        ("diffusion_model.double_blocks.18.txt_mlp.0", "transformer.transformer_blocks.18"),
        ("transformer.transformer_blocks.3.attn.to_q", "transformer.transformer_blocks.3"),
        ("lora_unet_joint_blocks_5_x_block_attn_qkv", "transformer.transformer_blocks.5"),  # SD3
        ("lora_unet_single_blocks_12_linear1", "transformer.single_transformer_blocks.12"),
        ("lora_transformer_single_transformer_blocks_0_attn_to_k", "transformer.single_transformer_blocks.0"),
        ("single_transformer_blocks.37.proj_mlp", "transformer.single_transformer_blocks.37"),
        # a UNet's attention has transformer_blocks too, deeper in: not a DiT block
        ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", None),
        ("unet.up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k", None),
        ("lora_unet_img_in", None),
    ],
)
def test_transformer_block_of(module: str, block: str | None) -> None:
    got = transformer_block_of(module)
    assert (got[1] if got else None) == block
    if got:
        assert block is not None and block.startswith(got[0] + ".")


def test_every_flux_naming_gives_the_same_splits() -> None:
    """kohya, diffusers and the original (BFL) names of the same Flux layers split identically,
    and kohya's lora_unet_ prefix does not make a Flux LoRA a UNet one."""
    layers = [  # (diffusers, original)
        ("transformer_blocks.0.attn.to_q", "double_blocks.0.img_attn.qkv"),
        ("transformer_blocks.18.ff.net.0.proj", "double_blocks.18.img_mlp.0"),
        ("single_transformer_blocks.0.proj_mlp", "single_blocks.0.linear1"),
        ("single_transformer_blocks.37.proj_out", "single_blocks.37.linear2"),
        ("x_embedder", "img_in"),
    ]
    namings = {
        "diffusers": [f"transformer.{d}" for d, _ in layers],
        "original": [f"diffusion_model.{o}" for _, o in layers],
        "kohya": [f"lora_unet_{o.replace('.', '_')}" for _, o in layers],
    }
    shapes = _split_shapes(namings)
    assert shapes["diffusers"] == shapes["original"] == shapes["kohya"]
    assert shapes["kohya"] == {
        "transformer": ("component", 5),
        "transformer.transformer_blocks": ("block", 2),
        "transformer.transformer_blocks.0": ("block", 1),
        "transformer.transformer_blocks.18": ("block", 1),
        "transformer.single_transformer_blocks": ("block", 2),
        "transformer.single_transformer_blocks.0": ("block", 1),
        "transformer.single_transformer_blocks.37": ("block", 1),
    }


def test_a_flux_split_loads_alone(tmp_path: Path) -> None:
    """A synthetic kohya-style Flux LoRA (Flux's layer names, tiny shapes): its single-stream
    blocks load without the rest."""
    names = ["double_blocks_0_img_attn_qkv", "double_blocks_1_txt_mlp_0", "single_blocks_0_linear1", "img_in"]
    tensors: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    for name in names:
        tensors[f"lora_unet_{name}.lora_down.weight"] = ("BF16", (2, 3), bytes(12))
        tensors[f"lora_unet_{name}.lora_up.weight"] = ("BF16", (3, 2), bytes(12))
        tensors[f"lora_unet_{name}.alpha"] = ("F32", (), bytes(4))
    src = synth.write(tmp_path / "flux.safetensors", tensors)
    manifest = lorachunk.pack(src, tmp_path / "s")
    assert {s.name for s in manifest.splits} >= {"transformer", "transformer.single_transformer_blocks"}
    got = lorachunk.load(tmp_path / "s", splits=["transformer.single_transformer_blocks"], cache=False)
    assert sorted(got) == sorted(k for k in tensors if "single_blocks_0" in k)
