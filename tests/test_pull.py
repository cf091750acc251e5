"""pull: a packed LoRA, or some splits of it, copied into a local folder and used offline."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import DATA, pack_files

import lorachunk
from lorachunk._cli import main
from lorachunk._info import info_dict
from lorachunk.testing.http_server import FolderServer


def test_pull_a_split_then_work_offline(published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path) -> None:
    server, manifest = published
    split = manifest.splits[0]
    report = lorachunk.pull(server.url, tmp_path / "copy", splits=[split.name], cache=False, retries=1)
    assert report.records == report.fetched == len({manifest.module(n).record for n in split.modules})
    server.shutdown()
    with lorachunk.open(tmp_path / "copy") as lora:
        assert lora.root == manifest.root
        got = lora.load(splits=[split.name])
    assert len(got) == sum(len(manifest.module(n).tensors) for n in split.modules)
    # The split's records, and nothing else, in one new pack of the copy.
    (pack,) = pack_files(tmp_path / "copy")
    assert pack.stat().st_size == sum(
        {manifest.module(n).record: manifest.module(n).stored_size for n in split.modules}.values()
    )


def test_a_partial_copy_says_so_everywhere(tmp_path: Path) -> None:
    """Issue #24 item 9: info, load and unpack of a pulled split say it is partial, and name the
    splits it holds whole by one rule (unpack named splits it did not hold)."""
    from lorachunk.testing.http_server import serve

    lorachunk.pack(DATA / "loras" / "smart_falcon_4_lokr.safetensors", tmp_path / "www" / "falcon")
    copy = tmp_path / "copy"
    with serve(tmp_path / "www") as server:
        lorachunk.pull(f"{server.url}/falcon", copy, splits=["unet.mid_block"], cache=False)
    info = info_dict(str(copy), None)
    assert info["partial"]["modules"] == 18 < info["modules"]
    held = info["partial"]["splits_held_whole"]
    assert "unet.mid_block" in held and "MID" in held and "text_encoder" not in held
    assert held == list(lorachunk.verify(copy).complete_splits)
    with pytest.raises(lorachunk.UsageError, match=r"partial copy.*pull them") as caught:
        lorachunk.load(copy, splits=["text_encoder"], cache=False)
    assert "holds whole: MID, unet.mid_block" in str(caught.value)
    assert main(["unpack", str(copy), "-o", str(tmp_path / "x.safetensors"), "--split", "unet.up_blocks.0"]) == 2
    with pytest.raises(lorachunk.UsageError) as caught:
        lorachunk.unpack(copy, tmp_path / "x.safetensors", splits=["unet.up_blocks.0"])
    assert str(caught.value).endswith("Splits it holds whole: MID, unet.mid_block")
    assert len(lorachunk.load(copy, splits=["unet.mid_block"], cache=False)) > 0
