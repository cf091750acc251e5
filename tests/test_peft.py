"""PEFT adapters: a tiny GPT-2 built from a config (random weights, no network) with a LoRA of
non-zero weights (synthetic), saved by PEFT, packed as a folder, and loaded back two ways."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

import lorachunk
from lorachunk._cli import main as cli
from lorachunk.integrations.peft import load_adapter
from lorachunk.testing.hub_server import HubServer

TOKENS = torch.tensor([[1, 5, 9, 42, 7, 3]])


def base_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    model.eval()
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(TOKENS).logits
    return out


@pytest.fixture
def adapter(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    """A saved PEFT folder and the logits of the model it came from."""
    torch.manual_seed(1)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], init_lora_weights=False, fan_in_fan_out=True
    )
    model = get_peft_model(base_model(), config)
    folder = tmp_path / "adapter"
    model.save_pretrained(str(folder))
    (folder / "README.md").write_text("# a tiny adapter\n")
    return folder, logits(model)


def test_folder_packs_with_its_config_and_unpacks_for_peft(
    adapter: tuple[Path, torch.Tensor], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, expected = adapter
    manifest = lorachunk.pack(folder, tmp_path / "s")
    assert manifest.source.name == "adapter_model.safetensors"
    assert set(manifest.files) == {"adapter_config.json", "README.md"}
    assert cli(["info", str(tmp_path / "s"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == ["README.md", "adapter_config.json"]
    assert cli(["unpack", str(tmp_path / "s"), "--format", "peft", "-o", str(tmp_path / "out"), "-q"]) == 0
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
        assert (tmp_path / "out" / name).read_bytes() == (folder / name).read_bytes()
    loaded = PeftModel.from_pretrained(base_model(), tmp_path / "out")
    assert torch.equal(logits(loaded), expected)
    assert not torch.equal(logits(base_model()), expected)  # the adapter does something


def test_load_adapter_gives_identical_logits(adapter: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
    folder, expected = adapter
    lorachunk.pack(folder, tmp_path / "s")
    model = load_adapter(base_model(), tmp_path / "s", adapter_name="tiny")
    assert isinstance(model, PeftModel) and model.active_adapter == "tiny"
    assert torch.equal(logits(model), expected)

    # Into a PeftModel that already has an adapter: added next to it, switchable.
    reference = PeftModel.from_pretrained(base_model(), folder, adapter_name="first")
    both = load_adapter(reference, tmp_path / "s", adapter_name="second")
    both.set_adapter("second")
    assert torch.equal(logits(both), expected)


def test_only_some_layers(adapter: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
    folder, expected = adapter
    manifest = lorachunk.pack(folder, tmp_path / "s")
    layer0 = [m.name for m in manifest.modules if ".h.0." in m.name]
    assert layer0 and len(layer0) < len(manifest.modules)
    partial = load_adapter(base_model(), tmp_path / "s", modules=layer0)
    # The same as the full adapter with layer 1's LoRA switched off.
    full = PeftModel.from_pretrained(base_model(), folder)
    with torch.no_grad():
        for name, parameter in full.named_parameters():
            if ".h.1." in name and "lora_B" in name:
                parameter.zero_()
    assert torch.allclose(logits(partial), logits(full), atol=1e-6)
    assert not torch.allclose(logits(partial), expected)


def test_the_root_pins_the_config(adapter: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
    folder, _ = adapter
    first = lorachunk.pack(folder, tmp_path / "a")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["lora_alpha"] = 16  # same tensors, twice the effect
    (folder / "adapter_config.json").write_text(json.dumps(config))
    second = lorachunk.pack(folder, tmp_path / "b")
    assert [m.record for m in first.modules] == [m.record for m in second.modules]
    assert first.root != second.root


def test_bad_folders_and_sources(adapter: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
    folder, _ = adapter
    (folder / "training_args.bin").write_bytes(b"\x80\x04\x95binary")
    with pytest.raises(lorachunk.UsageError, match=r"training_args\.bin"):
        lorachunk.pack(folder, tmp_path / "s")
    with pytest.raises(lorachunk.FormatError, match=r"adapter_model\.safetensors"):
        lorachunk.pack(tmp_path, tmp_path / "s2")
    lorachunk.pack(Path(__file__).parent / "data" / "loras" / "sam_lora_rank16.safetensors", tmp_path / "plain")
    with pytest.raises(lorachunk.UsageError, match="PEFT"):
        load_adapter(base_model(), tmp_path / "plain")
    with pytest.raises(lorachunk.UsageError, match="PEFT"):
        lorachunk.unpack(tmp_path / "plain", tmp_path / "out", format="peft")


def test_a_config_peft_cannot_read(adapter: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
    folder, _ = adapter
    for text in ("{not json", "[1, 2]"):
        (folder / "adapter_config.json").write_text(text)
        with pytest.raises(lorachunk.FormatError, match=r"adapter_config\.json is not"):
            lorachunk.pack(folder, tmp_path / "s")
        assert not (tmp_path / "s").exists()
    # JSON, but not a config of any PEFT method: packs (lorachunk does not know every method),
    # and loading it says why in lorachunk's terms.
    (folder / "adapter_config.json").write_text('{"peft_type": "NO_SUCH_METHOD"}')
    lorachunk.pack(folder, tmp_path / "s")
    with pytest.raises(lorachunk.ManifestError, match="not a config PEFT reads"):
        load_adapter(base_model(), tmp_path / "s")


def test_push_a_peft_folder_and_load_it_from_the_hub(adapter: tuple[Path, torch.Tensor], hub: HubServer) -> None:
    folder, expected = adapter
    result = lorachunk.push(folder, "me/tiny-adapter")  # packed on the fly, config included
    model = load_adapter(base_model(), "hf://me/tiny-adapter", root=result.root)
    assert torch.equal(logits(model), expected)


def test_one_adapter_of_a_library_by_name(adapter: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
    """Issue #26 item 5: ``STORE#NAME`` picks one LoRA of a store holding several."""
    folder, expected = adapter
    lorachunk.pack(folder, tmp_path / "library", name="tiny")
    lorachunk.pack(Path(__file__).parent / "data" / "loras" / "sam_lora_rank16.safetensors", tmp_path / "library")
    model = load_adapter(base_model(), f"{tmp_path / 'library'}#tiny", adapter_name="tiny")
    assert torch.equal(logits(model), expected)
    with pytest.raises(lorachunk.UsageError, match="no LoRA"):
        load_adapter(base_model(), f"{tmp_path / 'library'}#absent")
