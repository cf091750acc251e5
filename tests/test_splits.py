"""Splits for the LoRAs people use (#19), and selection semantics.

No real LLM adapter or kohya underscore-variant file is among the fixtures: these tests build
synthetic files (labelled synthetic) with the tensor names of the real ones the issue describes —
a Qwen2.5 PEFT adapter (24 layers of q_proj and v_proj = 48 modules), a DistilBERT one (6 layers
of q_lin and v_lin, plus a classifier head = 13 modules, 14 with the pre-classifier), a T5 one, and a
kohya file whose keys end in ``_lora_down.weight``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import lorachunk
from lorachunk._cli import main
from lorachunk._info import info_dict
from lorachunk._layout import auto_splits, natural_key
from lorachunk.testing import synth

LORAS = Path(__file__).parent / "data" / "loras"


def _peft(path: Path, modules: list[str], *, rank: int = 2, width: int = 8) -> Path:
    """A synthetic PEFT adapter file: ``lora_A``/``lora_B`` for each module."""
    rng = np.random.default_rng(0)
    tensors: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    for module in modules:
        down, up = synth.lora_pair(rng, width, width, rank, "F32")
        tensors[f"{module}.lora_A.weight"] = ("F32", (rank, width), down)
        tensors[f"{module}.lora_B.weight"] = ("F32", (width, rank), up)
    return synth.write(path, tensors, None)


QWEN = [f"base_model.model.model.layers.{i}.self_attn.{p}" for i in range(24) for p in ("q_proj", "v_proj")]
DISTILBERT = [
    *(f"base_model.model.distilbert.transformer.layer.{i}.attention.{p}" for i in range(6) for p in ("q_lin", "v_lin")),
    "base_model.model.pre_classifier",
    "base_model.model.classifier",
]
T5 = [
    f"base_model.model.{side}.block.{i}.layer.0.SelfAttention.{p}"
    for side in ("encoder", "decoder")
    for i in range(2)
    for p in ("q", "v")
]


def test_llm_adapter_splits_by_layer_family_and_projection(tmp_path: Path) -> None:
    manifest = lorachunk.pack(_peft(tmp_path / "qwen.safetensors", QWEN), tmp_path / "qwen")
    splits = {s.name: s for s in manifest.splits}
    assert [s.name for s in manifest.splits if s.kind == "layer"] == [f"layers.{i}" for i in range(24)]
    assert len(splits["layers.3"].modules) == 2 and all(".layers.3." in m for m in splits["layers.3"].modules)
    assert len(splits["attn"].modules) == 48 and splits["attn"].kind == "family"
    assert len(splits["q_proj"].modules) == 24 and splits["v_proj"].kind == "projection"


def test_distilbert_and_t5_adapters(tmp_path: Path) -> None:
    splits = auto_splits(DISTILBERT)
    assert {n for n, (kind, _) in splits.items() if kind == "layer"} == {f"layers.{i}" for i in range(6)}
    assert splits["q_lin"][1] == [m for m in DISTILBERT if m.endswith("q_lin")]
    # pre_classifier is most of the head's bytes: `--split heads` must not drop it (issue #24 item 11).
    assert splits["heads"] == ("component", ["base_model.model.pre_classifier", "base_model.model.classifier"])
    assert {m for _, members in splits.values() for m in members} == set(DISTILBERT)  # every module in a split
    t5 = auto_splits(T5)  # two stacks, each numbered from 0: the layer splits say which
    assert sorted(n for n, (kind, _) in t5.items() if kind == "layer") == [
        "decoder.layers.0",
        "decoder.layers.1",
        "encoder.layers.0",
        "encoder.layers.1",
    ]


def test_a_pipeline_stage_loads_its_layers_only(tmp_path: Path) -> None:
    src = _peft(tmp_path / "qwen.safetensors", QWEN)
    lorachunk.pack(src, tmp_path / "qwen")
    with lorachunk.open(tmp_path / "qwen", cache=False) as lora:
        stage = lora.load(layers=range(0, 12))
        assert len(stage) == 12 * 2 * 2 and all(int(k.split(".layers.")[1].split(".")[0]) < 12 for k in stage)
        assert len(lora.load(layers=range(12, 24), splits=["q_proj"])) == 12 * 2  # options narrow each other
        with pytest.raises(lorachunk.UsageError, match="no layer 30 in this LoRA"):
            lora.load(layers=[30])
        zeroed = lora.load(layers=[0, 1], scales={"layers.0": 0.0, "v_proj": 0.5})  # scales by the new splits
        # The last matching entry wins: layer 0's v_proj is halved, its q_proj zeroed.
        assert all(not t.any() for k, t in zeroed.items() if ".layers.0." in k and "q_proj.lora_B" in k)
        plain = lora.load(layers=[1])
        v_up = next(k for k in plain if "v_proj.lora_B" in k)
        assert np.allclose(zeroed[v_up].numpy(), plain[v_up].numpy() * 0.5, atol=1e-6)
    out = tmp_path / "stage.safetensors"
    assert main(["unpack", str(tmp_path / "qwen"), "-o", str(out), "--layers", "0-11", "-q"]) == 0
    assert len(lorachunk.pack(out, lorachunk.storage.MemoryStore()).modules) == 24
    assert main(["unpack", str(tmp_path / "qwen"), "-o", str(out), "--layers", "zero"]) == 2


def _kohya_underscore(path: Path, *, alpha: bool) -> Path:
    """kohya's underscore variant (synthetic): down and up joined to the module name by ``_``."""
    rng = np.random.default_rng(1)
    modules = [
        "lora_unet_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k",
        "lora_unet_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
    ]
    tensors: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    for module in modules:
        down, up = synth.lora_pair(rng, 8, 8, 2, "F16")
        tensors[f"{module}_lora_down.weight"] = ("F16", (2, 8), down)
        tensors[f"{module}_lora_up.weight"] = ("F16", (8, 2), up)
        if alpha:
            tensors[f"{module}.alpha"] = ("F16", (), np.float16(2).tobytes())
    return synth.write(path, tensors, None)


@pytest.mark.parametrize("alpha", [True, False], ids=["with alpha", "without alpha"])
def test_kohya_underscore_variant_is_grouped_and_split_like_kohya(tmp_path: Path, alpha: bool) -> None:
    src = _kohya_underscore(tmp_path / "k.safetensors", alpha=alpha)
    manifest = lorachunk.pack(src, tmp_path / "k")
    assert len(manifest.modules) == 4  # down, up (and alpha) together, not one module per tensor
    names = {s.name for s in manifest.splits}
    assert {"unet", "text_encoder", "text_encoder_2", "unet.down_blocks.0", "unet.mid_block", "IN01", "MID"} <= names
    original = lorachunk.load(tmp_path / "k", splits=["MID"], cache=False)
    scaled = lorachunk.load(tmp_path / "k", splits=["MID"], scales={"MID": 0.5}, cache=False)
    up = next(k for k in original if k.endswith("_lora_up.weight"))
    assert np.allclose(scaled[up].float().numpy(), original[up].float().numpy() * 0.5, atol=1e-3)


def test_splits_are_listed_in_numeric_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert sorted(["blocks.12", "blocks.7", "blocks.16", "IN10", "IN02"], key=natural_key) == [
        "IN02",
        "IN10",
        "blocks.7",
        "blocks.12",
        "blocks.16",
    ]
    manifest = lorachunk.pack(_peft(tmp_path / "qwen.safetensors", QWEN), lorachunk.storage.MemoryStore())
    layers = [s.name for s in manifest.splits if s.kind == "layer"]
    assert layers.index("layers.2") < layers.index("layers.10")
    rng = np.random.default_rng(3)
    flux: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    for block in (12, 7, 20, 16):  # Flux double blocks, diffusers names (synthetic)
        down, up = synth.lora_pair(rng, 4, 4, 2, "F16")
        flux[f"transformer.transformer_blocks.{block}.attn.to_q.lora_A.weight"] = ("F16", (2, 4), down)
        flux[f"transformer.transformer_blocks.{block}.attn.to_q.lora_B.weight"] = ("F16", (4, 2), up)
    lorachunk.pack(synth.write(tmp_path / "flux.safetensors", flux, None), tmp_path / "flux")
    assert main(["info", str(tmp_path / "flux")]) == 0
    shown = [line.split()[0] for line in capsys.readouterr().out.splitlines() if "transformer_blocks." in line]
    assert shown == [f"transformer.transformer_blocks.{n}" for n in (7, 12, 16, 20)]


def test_options_narrow_each_other_and_an_empty_one_says_so(falcon: Path, tmp_path: Path) -> None:
    """splits= and modules= used to add up; now every option narrows, and one that keeps nothing
    is a UsageError naming it instead of an empty state dict."""
    lorachunk.pack(falcon, tmp_path / "s")
    with lorachunk.open(tmp_path / "s", cache=False) as lora:
        mid = set(lora.manifest.split("MID").modules)
        both = lora.select(splits=["MID"], modules=["*attn2*"])
        assert both and all(m.name in mid and "attn2" in m.name for m in both)
        assert len(lora.select(splits=["MID", "IN01"])) > len(mid)  # within an option names add up
        outside = next(t.key for m in lora.manifest.modules if m.name not in mid for t in m.tensors)
        with pytest.raises(lorachunk.UsageError, match="keys= selects nothing of what splits= chose"):
            lora.load(splits=["MID"], keys=[outside])
        with pytest.raises(lorachunk.UsageError, match="no layer splits"):
            lora.load(layers=[0])
    part = tmp_path / "part.safetensors"
    assert main(["unpack", str(tmp_path / "s"), "-o", str(part), "--split", "MID", "--module", "*attn2*", "-q"]) == 0
    assert len(lorachunk.pack(part, lorachunk.storage.MemoryStore()).modules) == len(both)


def test_a_checkpoint_that_is_not_a_lora_packs_with_a_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(2)
    weights = rng.normal(0, 0.02, (8, 8)).astype(np.float32).tobytes()
    src = synth.write(tmp_path / "model.safetensors", {"encoder.layer.0.dense.weight": ("F32", (8, 8), weights)}, None)
    assert main(["pack", str(src), str(tmp_path / "s")]) == 0
    assert "looks like a model checkpoint, not a LoRA" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "s")]) == 0
    assert "kind      no tensor has an adapter's name" in capsys.readouterr().out
    lora = LORAS / "sam_lora_rank16.safetensors"  # an adapter, even with names of its own: no note
    assert main(["pack", str(lora), str(tmp_path / "t")]) == 0
    assert "not a LoRA" not in capsys.readouterr().out


def test_info_names_modules_in_no_split(tmp_path: Path) -> None:
    names = [*QWEN[:4], "base_model.model.some_adapter_nobody_names"]
    store = tmp_path / "s"
    lorachunk.pack(_peft(tmp_path / "odd.safetensors", names), store)
    info = info_dict(str(store), None)
    assert info["in_no_split"] == ["base_model.model.some_adapter_nobody_names"]
