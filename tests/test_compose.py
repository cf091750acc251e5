"""Compose LoRAs from splits of others: two synthetic SDXL-shaped LoRAs (B-LoRA style of one,
content of the other) and two real fixtures (a text encoder LoRA and a UNet LoRA)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import DATA
from safetensors import safe_open
from safetensors.torch import load_file

import lorachunk
from lorachunk import Take
from lorachunk._cli import main as cli
from lorachunk._compose import METADATA_KEY, parse_take
from lorachunk._keys import pack_id_of
from lorachunk.testing import synth
from lorachunk.testing.hub_server import HubServer


@pytest.fixture
def two(tmp_path: Path) -> tuple[Path, Path]:
    """Packed folders of two different synthetic SDXL LoRAs (same layers, different weights)."""
    for name, seed in (("a", 2), ("b", 3)):
        path = synth.sdxl(tmp_path / f"{name}.safetensors", rank=4, scale=0.25, dtype="BF16", seed=seed)
        lorachunk.pack(path, tmp_path / f"{name}.lcs")
    return tmp_path / "a.lcs", tmp_path / "b.lcs"


def _keys(packed: Path, split: str) -> set[str]:
    with lorachunk.open(packed) as lora:
        return {t.key for n in lora.splits[split].modules for t in lora.modules[n].tensors}


def test_style_of_one_content_of_the_other(two: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = two
    manifest = lorachunk.compose(tmp_path / "mix.lcs", [Take("style", a, "style"), Take("content", b, "content")])
    assert {s.name: s.kind for s in manifest.splits if s.kind == "part"} == {"style": "part", "content": "part"}
    got = lorachunk.load(tmp_path / "mix.lcs")
    style_a, content_b = lorachunk.load(a, splits=["style"]), lorachunk.load(b, splits=["content"])
    assert got.keys() == style_a.keys() | content_b.keys()
    assert all(torch.equal(got[k], v) for k, v in (style_a | content_b).items())
    assert lorachunk.verify(tmp_path / "mix.lcs").records == len(manifest.modules)

    # It unpacks to a valid safetensors file whose sha256 the manifest recorded (unpack checks it).
    out = lorachunk.unpack(tmp_path / "mix.lcs", tmp_path / "mix.safetensors")
    assert load_file(out).keys() == got.keys()
    with safe_open(out, "pt") as handle:
        recipe = json.loads(handle.metadata()[METADATA_KEY])
    assert [(r["name"], r["split"]) for r in recipe] == [("style", "style"), ("content", "content")]


def test_records_already_in_the_store_are_not_copied(two: tuple[Path, Path]) -> None:
    a, b = two
    before = set(lorachunk.storage.LocalStore(a).list_prefix("packs/"))
    style = lorachunk.read_manifest(lorachunk.storage.LocalStore(a))
    manifest = lorachunk.compose(a, [Take("style", a, "style"), Take("content", b, "content")])
    (added,) = set(lorachunk.storage.LocalStore(a).list_prefix("packs/")) - before
    content = lorachunk.read_manifest(lorachunk.storage.LocalStore(b)).split("content").modules
    # Only what a lacked went into the one new pack; the style records stay where a had them.
    assert {manifest.module(n).pack for n in content} == {pack_id_of(added)}
    assert (a / added).stat().st_size == sum(manifest.module(n).stored_size for n in content)
    assert all(manifest.module(n).pack == style.module(n).pack for n in manifest.split("style").modules)
    # Composing it again over records that are all there writes a manifest only.
    again = lorachunk.compose(a, [Take("style", a, "style", style.id), Take("content", b, "content")])
    assert again.id == manifest.id and set(lorachunk.storage.LocalStore(a).list_prefix("packs/")) == before | {added}


def test_two_takes_of_one_module_need_prefer(two: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = two
    takes = [Take("base", a), Take("style", b, "style")]
    with pytest.raises(lorachunk.UsageError, match="--prefer"):
        lorachunk.compose(tmp_path / "x.lcs", takes)
    lorachunk.compose(tmp_path / "x.lcs", takes, prefer=["style"])
    got = lorachunk.load(tmp_path / "x.lcs")
    style_b = lorachunk.load(b, splits=["style"])
    rest_a = {k: v for k, v in lorachunk.load(a).items() if k not in style_b}
    assert all(torch.equal(got[k], v) for k, v in (rest_a | style_b).items())
    assert got.keys() == rest_a.keys() | style_b.keys()
    # prefer as one bare name means that name
    by_string = lorachunk.compose(tmp_path / "y.lcs", takes, prefer="style")
    assert by_string.root == lorachunk.read_manifest(tmp_path / "x.lcs").root


def test_scale_is_baked_in_like_a_load_time_scale(two: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = two
    lorachunk.compose(
        tmp_path / "x.lcs", [Take("style", a, "style"), Take("content", b, "content")], scales={"style": 0.5}
    )
    got = lorachunk.load(tmp_path / "x.lcs")
    expected = lorachunk.load(a, splits=["style"], scales={"style": 0.5}) | lorachunk.load(b, splits=["content"])
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert any(not torch.equal(got[k], v) for k, v in lorachunk.load(a, splits=["style"]).items())


def test_real_fixtures_text_encoder_of_one_unet_of_another(tmp_path: Path) -> None:
    te, unet = (
        DATA / "loras" / "peft_sd15_text_encoder.safetensors",
        DATA / "loras" / "diffusers_sd15_attnproc.safetensors",
    )
    lorachunk.pack(te, tmp_path / "te.lcs")
    lorachunk.pack(unet, tmp_path / "unet.lcs")
    assert (
        cli(
            [
                "compose",
                str(tmp_path / "mix.lcs"),
                "--take",
                f"te={tmp_path}/te.lcs",
                "--take",
                f"unet={tmp_path}/unet.lcs",
                "-q",
            ]
        )
        == 0
    )
    assert cli(["unpack", str(tmp_path / "mix.lcs"), "-o", str(tmp_path / "mix.safetensors"), "-q"]) == 0
    got = load_file(tmp_path / "mix.safetensors")
    expected = load_file(te) | load_file(unet)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())


def test_bad_compositions(two: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = two
    with pytest.raises(lorachunk.UsageError, match="no split"):
        lorachunk.compose(tmp_path / "x.lcs", [Take("s", a, "nope")])
    with pytest.raises(lorachunk.UsageError, match="unique"):
        lorachunk.compose(tmp_path / "x.lcs", [Take("s", a, "style"), Take("s", b, "content")])
    with pytest.raises(lorachunk.UsageError, match="name no take"):
        lorachunk.compose(tmp_path / "x.lcs", [Take("s", a, "style")], scales={"t": 2.0})
    with pytest.raises(lorachunk.UsageError, match="list of Take"):
        lorachunk.compose(tmp_path / "x.lcs", [a])  # type: ignore[list-item]
    with pytest.raises(lorachunk.UsageError, match="'s' must be a finite number, got inf"):
        lorachunk.compose(tmp_path / "x.lcs", [Take("s", a, "style")], scales={"s": float("inf")})
    other = tmp_path / "sha.lcs"
    lorachunk.pack(tmp_path / "b.safetensors", other, hash="sha256")
    with pytest.raises(lorachunk.UsageError, match="one hash"):
        lorachunk.compose(tmp_path / "x.lcs", [Take("s", a, "style"), Take("c", other, "content")])
    assert not (tmp_path / "x.lcs" / "refs").exists()


def test_parse_take() -> None:
    assert parse_take("s=a.lcs:style") == Take("s", "a.lcs", "style")
    assert parse_take("s=a.lcs") == Take("s", "a.lcs")
    assert parse_take("s=https://cdn.example.org/a") == Take("s", "https://cdn.example.org/a")
    assert parse_take("s=https://cdn.example.org/a:unet.up_blocks.0") == Take(
        "s", "https://cdn.example.org/a", "unet.up_blocks.0"
    )
    assert parse_take("s=hf://me/x@v2:style") == Take("s", "hf://me/x@v2", "style")
    with pytest.raises(lorachunk.UsageError):
        parse_take("nothing")


def test_pushing_a_composition_next_to_its_sources_uploads_only_the_manifest(
    hub: HubServer, two: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = two
    lorachunk.push(a, "me/loras")
    lorachunk.push(b, "me/loras")
    lorachunk.compose(tmp_path / "mix.lcs", [Take("style", a, "style"), Take("content", b, "content")])
    hub.log.clear()
    result = lorachunk.push(tmp_path / "mix.lcs", "me/loras")
    pushed = lorachunk.read_manifest("hf://me/loras")
    # The repo's packs hold every record: the pushed manifest names them there (same root).
    assert result.uploaded == 0 and result.uploaded_bytes == len(pushed.to_bytes())
    assert pushed.id == result.manifest_id and pushed.root == lorachunk.read_manifest(tmp_path / "mix.lcs").root
    assert len(hub.requests("PUT", "/lfs-upload/")) == 2  # the manifest, and the catalog that names it
    got = lorachunk.load("hf://me/loras")
    assert got.keys() == _keys(a, "style") | _keys(b, "content")


def test_a_take_names_a_manifest_of_a_shared_store(tmp_path: Path) -> None:
    """In a store of several LoRAs, --take SOURCE#MANIFEST:SPLIT takes the split of that one, not the latest."""
    shared = tmp_path / "shared"
    older = lorachunk.pack(DATA / "loras" / "smart_falcon_4_lokr.safetensors", shared)
    lorachunk.pack(DATA / "loras" / "smart_falcon_8_lokr.safetensors", shared)
    prefix = older.id.partition(":")[2][:10]
    take = parse_take(f"te={shared}#{prefix}:text_encoder")
    assert (take.source, take.manifest, take.split) == (str(shared), prefix, "text_encoder")
    assert parse_take(f"te={shared}#{older.id}").manifest == older.id
    composed = lorachunk.compose(tmp_path / "out", [take])
    assert {m.record for m in composed.modules} == {older.module(n).record for n in older.split("text_encoder").modules}
    with pytest.raises(lorachunk.UsageError, match="SOURCE#MANIFEST"):
        parse_take(f"te={shared}#not-hex:x")


def test_a_scale_that_overflows_is_refused(tmp_path: Path) -> None:
    """Issue #24 item 11: --scale a=1e39 wrote inf into 350 tensors and exited 0."""
    lorachunk.pack(DATA / "loras" / "smart_falcon_4_lokr.safetensors", tmp_path / "a")
    with pytest.raises(lorachunk.UsageError, match=r"scale 1e\+39 overflows F16"):
        lorachunk.compose(tmp_path / "out", [Take("a", str(tmp_path / "a"))], scales={"a": 1e39})
    assert not (tmp_path / "out" / "manifests").exists()


def test_composing_loras_for_different_base_models_warns_naming_both(tmp_path: Path) -> None:
    sd15 = lorachunk.pack(DATA / "loras" / "diffusers_sd15_attnproc.safetensors", tmp_path / "sd15")
    assert sd15.base_model == "sd_v1"
    src = tmp_path / "sd2.safetensors"  # synthetic: the same layout with SD 2's 1024-wide cross-attention
    tensors = load_file(DATA / "loras" / "diffusers_sd15_attnproc.safetensors")
    for key in [k for k in tensors if "attn2.processor.to_" in k and k.endswith("down.weight") and "to_k" in k]:
        tensors[key] = torch.zeros(tensors[key].shape[0], 1024)
    from safetensors.torch import save_file

    save_file(tensors, src)
    assert lorachunk.pack(src, tmp_path / "sd2").base_model == "sd_v2"
    takes = [
        Take("old", str(tmp_path / "sd15"), "unet.down_blocks.0"),
        Take("new", str(tmp_path / "sd2"), "unet.up_blocks.1"),
    ]
    with pytest.warns(lorachunk.BaseModelWarning, match="'old' is for sd_v1 and take 'new' for sd_v2"):
        lorachunk.compose(tmp_path / "mixed", takes)
