"""A verified adapter folder on demand (issue #26 item 1): what engines that read a path get."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import DATA
from peft import PeftModel
from test_peft import adapter, base_model, logits  # noqa: F401 - the fixture, used by name

import lorachunk
from lorachunk._cli import main
from lorachunk.testing.http_server import serve

LORAS = DATA / "loras"


def test_a_peft_folder_an_engine_loads(adapter: tuple[Path, torch.Tensor], tmp_path: Path) -> None:  # noqa: F811
    folder, expected = adapter
    lorachunk.pack(folder, tmp_path / "www" / "lib", name="tiny")
    with serve(tmp_path / "www") as server:
        path = lorachunk.adapter_path(f"{server.url}/lib#tiny", cache_dir=tmp_path / "adapters")
        for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
            assert (path / name).read_bytes() == (folder / name).read_bytes()
        loaded = PeftModel.from_pretrained(base_model(), path)
        assert torch.equal(logits(loaded), expected)
        server.log.clear()
        started = time.perf_counter()
        again = lorachunk.adapter_path(f"{server.url}/lib#tiny", cache_dir=tmp_path / "adapters")
        assert again == path and time.perf_counter() - started < 1.0
        assert not any(r.path.startswith("/lib/packs/") for r in server.log)  # a lookup: no pack fetched


def test_kohya_consumers_get_one_file_and_a_stage_gets_its_layers(tmp_path: Path) -> None:
    src = LORAS / "smart_falcon_4_lokr.safetensors"
    lorachunk.pack(src, tmp_path / "s", name="falcon")
    path = lorachunk.adapter_path(f"{tmp_path / 's'}#falcon", cache_dir=tmp_path / "a")
    assert [p.name for p in path.iterdir()] == ["falcon.safetensors"]
    assert (path / "falcon.safetensors").read_bytes() == src.read_bytes()
    part = lorachunk.adapter_path(tmp_path / "s", splits=["text_encoder"], cache_dir=tmp_path / "a")
    assert part != path and (part / "falcon.safetensors").stat().st_size < src.stat().st_size
    assert main(["adapter", str(tmp_path / "s"), "--split", "text_encoder", "--cache-dir", str(tmp_path / "a")]) == 0


def test_a_root_that_does_not_match_writes_nothing(tmp_path: Path) -> None:
    lorachunk.pack(LORAS / "sam_lora_rank16.safetensors", tmp_path / "s")
    with pytest.raises(lorachunk.IntegrityError):
        lorachunk.adapter_path(tmp_path / "s", root="xxh3-128:" + "0" * 32, cache_dir=tmp_path / "a")
    assert not (tmp_path / "a").exists() or not [p for p in (tmp_path / "a").iterdir() if not p.name.startswith(".")]


def test_eight_workers_asking_at_once_make_one_fetch(tmp_path: Path) -> None:
    lorachunk.pack(LORAS / "diffusers_sd15_attnproc.safetensors", tmp_path / "www" / "s")
    paths: list[Path] = []
    with serve(tmp_path / "www") as server:
        server.log.clear()

        def worker() -> None:
            paths.append(lorachunk.adapter_path(f"{server.url}/s", cache_dir=tmp_path / "a"))

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        fetched = [r for r in server.log if r.path.startswith("/s/packs/")]
    assert len(set(paths)) == 1 and len(paths) == 8
    assert len(fetched) == 1  # one pack, fetched once for all eight
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.endswith(".tmp")]


def test_a_worker_killed_while_materializing_leaves_nothing_an_engine_sees(tmp_path: Path) -> None:
    lorachunk.pack(LORAS / "sam_lora_rank16.safetensors", tmp_path / "s")
    adapters = Path(os.environ["LORACHUNK_CACHE"]) / "adapters"  # the shared cache's (conftest: a temp one)
    leftover = adapters / ".deadbeef.0123456789abcdef.tmp"
    leftover.mkdir(parents=True)
    (leftover / "adapter_model.safetensors").write_bytes(b"half")
    old = time.time() - 7200
    os.utime(leftover, (old, old))
    path = lorachunk.adapter_path(tmp_path / "s")
    assert path.parent == adapters and path.is_dir() and not leftover.exists()
    assert lorachunk.Cache().clear() > 0 and not path.exists()  # cache clear removes them
