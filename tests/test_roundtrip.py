"""pack → verify → unpack on every real fixture and on synthetic layouts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load_file

import lorachunk
from lorachunk._layout import module_of
from lorachunk.testing import synth

# Per real fixture: modules, and splits that must exist with their module counts.
EXPECTED = {
    "cloneofsimo_analog_svd_rank4": (192, {"text_encoder": 48, "unet": 144}),
    "cloneofsimo_lora_disney": (194, {"text_encoder": 48, "unet": 144, "embeddings": 2}),
    "cloneofsimo_lora_disney_inpainting": (194, {"text_encoder": 48, "unet": 144, "embeddings": 2}),
    "diffusers_sd15_attnproc": (128, {"unet": 128, "unet.mid_block": 8, "IN01": 8, "OUT11": 8}),
    "peft_sd15_text_encoder": (24, {"text_encoder": 24, "BASE": 24}),
    "sam_lora_rank16": (24, {}),
    "smart_falcon_4_lokr": (350, {"text_encoder": 72, "unet": 278, "MID": 18, "unet.up_blocks.3": 48}),
    "smart_falcon_8_lokr": (350, {"text_encoder": 72, "unet": 278}),
    "smart_falcon_16_lokr": (350, {"text_encoder": 72, "unet": 278}),
}


def test_fixture_roundtrip(fixture_lora: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    manifest = lorachunk.pack(fixture_lora, store)
    modules, splits = EXPECTED[fixture_lora.stem]
    assert len(manifest.modules) == modules
    for name, count in splits.items():
        assert len(manifest.split(name).modules) == count, name
    assert lorachunk.verify(store).records == modules
    # docs/format.md: every real fixture's header is regenerated, not stored verbatim
    assert manifest.source.header is None
    out = lorachunk.unpack(store, tmp_path / "out.safetensors")
    assert out.read_bytes() == fixture_lora.read_bytes()
    # every tensor in exactly one module, grouped by the documented rule
    keys = [t.key for m in manifest.modules for t in m.tensors]
    assert sorted(keys) == sorted(load_file(fixture_lora))
    assert all(module_of(t.key) == m.name for m in manifest.modules for t in m.tensors)


def test_fixture_split_unpack(fixture_lora: Path, tmp_path: Path) -> None:
    manifest = lorachunk.pack(fixture_lora, tmp_path / "store")
    original = load_file(fixture_lora)
    split = max(manifest.splits, key=lambda s: len(s.modules), default=None)
    selection = {"splits": [split.name]} if split else {"modules": [manifest.modules[0].name]}
    out = lorachunk.unpack(tmp_path / "store", tmp_path / "part.safetensors", **selection)  # type: ignore[arg-type]
    part = load_file(out)
    names = set(split.modules) if split else {manifest.modules[0].name}
    expected_keys = {t.key for m in manifest.modules if m.name in names for t in m.tensors}
    assert set(part) == expected_keys
    for key, value in part.items():
        assert value.dtype == original[key].dtype and (value == original[key]).all()
    from safetensors import safe_open

    with safe_open(out, "np") as f:
        assert f.metadata() == manifest.metadata


@pytest.mark.parametrize(
    ("name", "make", "modules", "splits"),
    [
        ("kohya_f16", synth.kohya, 7, {"text_encoder": 2, "unet": 5, "MID": 1, "IN01": 1, "OUT11": 0}),
        ("kohya_bf16", lambda p: synth.kohya(p, dtype="BF16"), 7, {"unet.up_blocks.1": 1}),
        ("kohya_f32_dora", lambda p: synth.kohya(p, dtype="F32", dora=True), 7, {"unet": 5}),
        ("loha", synth.loha, 3, {"text_encoder": 1, "IN07": 1, "OUT04": 1}),
        (
            "sdxl_kohya",
            lambda p: synth.sdxl(p, kohya_names=True, scale=0.05, rank=2),
            630,
            {"style": 90, "content": 90},
        ),
        ("sdxl_peft", lambda p: synth.sdxl(p, dtype="BF16", scale=0.05, rank=2), 630, {"style": 90, "IN04": 18}),
    ],
)
def test_synthetic_layouts(tmp_path: Path, name: str, make: object, modules: int, splits: dict[str, int]) -> None:
    """Synthetic files: layouts no real fixture covers."""
    src = make(tmp_path / f"{name}.safetensors")  # type: ignore[operator]
    manifest = lorachunk.pack(src, tmp_path / "store")
    assert len(manifest.modules) == modules
    names = {s.name for s in manifest.splits}
    for split, count in splits.items():
        if count == 0:
            assert split not in names
        else:
            assert len(manifest.split(split).modules) == count, split
    assert lorachunk.unpack(tmp_path / "store", tmp_path / "out.safetensors").read_bytes() == src.read_bytes()
    lorachunk.verify(tmp_path / "store")


def test_kohya_module_holds_all_its_tensors(tmp_path: Path) -> None:
    src = synth.kohya(tmp_path / "k.safetensors", dora=True)
    manifest = lorachunk.pack(src, tmp_path / "store")
    module = manifest.module("lora_unet_mid_block_attentions_0_proj_out")
    assert [t.key.removeprefix(module.name) for t in module.tensors] == [
        ".alpha",
        ".dora_scale",
        ".lora_down.weight",
        ".lora_up.weight",
    ]


def test_nonstandard_header_is_kept_verbatim(tmp_path: Path) -> None:
    """A header the safetensors library would not write (spaces, key order) still round-trips."""
    import json
    import struct

    header = json.dumps(
        {"b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"z": "1", "a": "2"}},
        indent=1,
    ).encode()
    src = tmp_path / "odd.safetensors"
    src.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00\x00\x80?\x00\x00\x00@")
    manifest = lorachunk.pack(src, tmp_path / "store")
    assert manifest.source.header == header.decode()
    assert lorachunk.unpack(tmp_path / "store", tmp_path / "out.safetensors").read_bytes() == src.read_bytes()


def test_empty_lora_roundtrips(tmp_path: Path) -> None:
    src = synth.write(tmp_path / "empty.safetensors", {}, {"note": "no tensors"})
    manifest = lorachunk.pack(src, tmp_path / "store")
    assert manifest.modules == ()
    assert lorachunk.unpack(tmp_path / "store", tmp_path / "out.safetensors").read_bytes() == src.read_bytes()


def test_user_splits(falcon: Path, tmp_path: Path) -> None:
    manifest = lorachunk.pack(falcon, tmp_path / "s", splits={"attn": ["*attn*"], "te": ["lora_te_*"]})
    assert manifest.split("te").modules == manifest.split("text_encoder").modules
    assert manifest.split("attn").kind == "user"
    assert all("attn" in m for m in manifest.split("attn").modules)
    # a split with the same modules has the same root wherever it comes from
    assert manifest.split("te").root == manifest.split("text_encoder").root
    with pytest.raises(lorachunk.UsageError, match="matches no module"):
        lorachunk.pack(falcon, tmp_path / "t", splits={"typo": ["lora_nothing*"]})
    for bad, message in ((["attn=*attn*"], "must map split names"), ({" attn": "*"}, "non-empty string")):
        with pytest.raises(lorachunk.UsageError, match=message):
            lorachunk.pack(falcon, tmp_path / "t", splits=bad)  # type: ignore[arg-type]
    assert not (tmp_path / "t").exists()
    # One glob may be a bare string, which is that glob and not its characters.
    single = lorachunk.pack(falcon, tmp_path / "u", splits={"attn": "*attn*"})
    assert single.split("attn").modules == manifest.split("attn").modules


def test_interleaved_modules_roundtrip(tmp_path: Path) -> None:
    """safetensors orders data by dtype first, so a module's F32 alpha sits apart from its F16 weights."""
    import numpy as np
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray[Any, Any]] = {}
    for name in ("lora_unet_a", "lora_unet_b"):
        tensors[f"{name}.alpha"] = np.array(4.0, dtype=np.float32)
        tensors[f"{name}.lora_down.weight"] = np.arange(12, dtype=np.float16).reshape(3, 4)
    src = tmp_path / "mixed.safetensors"
    save_file(tensors, src)
    manifest = lorachunk.pack(src, tmp_path / "store")
    assert len(manifest.source.order) > 1  # the file order is not module order
    assert lorachunk.unpack(tmp_path / "store", tmp_path / "out.safetensors").read_bytes() == src.read_bytes()


def test_a_module_named_with_glob_characters_is_selected_by_its_name(tmp_path: Path) -> None:
    """Hypothesis found it: a name holding ``[0]`` read as a glob matched nothing (synthetic)."""
    up, down = ("F16", (2,), bytes(4)), ("F16", (2,), b"\x01\x00\x02\x00")
    tensors = {"w[0].lora_up.weight": up, "w[0].lora_down.weight": down, "w0.lora_up.weight": up}
    src = synth.write(tmp_path / "x.safetensors", tensors)
    manifest = lorachunk.pack(src, tmp_path / "s", splits={"first": ["w[0]"]})
    assert manifest.split("first").modules == ("w[0]",)  # the exact name, not the glob's w0
    part = lorachunk.unpack(tmp_path / "s", tmp_path / "part.safetensors", modules=["w[0]"])
    assert sorted(load_file(part)) == ["w[0].lora_down.weight", "w[0].lora_up.weight"]
    assert sorted(lorachunk.load(tmp_path / "s", modules="w[0]")) == sorted(load_file(part))
