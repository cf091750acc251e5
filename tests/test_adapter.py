"""A verified adapter folder on demand (issue #26 item 1): what engines that read a path get."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import DATA
from peft import PeftModel
from safetensors import safe_open
from test_peft import adapter, base_model, logits  # noqa: F401 - the fixture, used by name

import lorachunk
import lorachunk._adapter
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
        server.log.clear()
        root = lorachunk.read_manifest(f"{server.url}/lib#tiny").root
        server.log.clear()
        pinned = lorachunk.adapter_path(f"{server.url}/lib#tiny", root=root, cache_dir=tmp_path / "adapters")
        assert pinned == path and not server.log  # pinned: one stat, no request at all


def test_kohya_consumers_get_one_file_and_a_stage_gets_its_layers(tmp_path: Path) -> None:
    src = LORAS / "smart_falcon_4_lokr.safetensors"
    lorachunk.pack(src, tmp_path / "s", name="falcon")
    path = lorachunk.adapter_path(f"{tmp_path / 's'}#falcon", cache_dir=tmp_path / "a")
    assert [p.name for p in path.iterdir()] == ["falcon.safetensors"]
    assert (path / "falcon.safetensors").read_bytes() == src.read_bytes()
    part = lorachunk.adapter_path(tmp_path / "s", splits=iter(["text_encoder"]), cache_dir=tmp_path / "a")
    assert part != path and (part / "falcon.safetensors").stat().st_size < src.stat().st_size
    assert main(["adapter", str(tmp_path / "s"), "--split", "text_encoder", "--cache-dir", str(tmp_path / "a")]) == 0
    some = [m.name for m in lorachunk.read_manifest(tmp_path / "s").modules[:3]]
    picked = lorachunk.adapter_path(tmp_path / "s", modules=iter(some), cache_dir=tmp_path / "a")  # read once
    assert picked == lorachunk.adapter_path(tmp_path / "s", modules=some, cache_dir=tmp_path / "a")
    with safe_open(picked / "falcon.safetensors", "pt") as handle:
        assert {key.split(".")[0] for key in handle.keys()} == set(some)  # noqa: SIM118 - not iterable


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


def test_a_worker_killed_mid_fetch_leaves_a_folder_the_next_call_completes(tmp_path: Path) -> None:
    lorachunk.pack(LORAS / "sam_lora_rank16.safetensors", tmp_path / "www" / "s", name="sam")
    adapters = tmp_path / "adapters"
    with serve(tmp_path / "www") as server:
        server.inject("/s/packs/*", "stall", seconds=60)
        code = f"import lorachunk; lorachunk.adapter_path({server.url + '/s#sam'!r}, cache_dir={str(adapters)!r})"
        worker = subprocess.Popen([sys.executable, "-c", code])
        try:
            deadline = time.monotonic() + 60
            while not any(p.name.endswith(".tmp") for p in adapters.glob(".*")):  # it is writing
                assert time.monotonic() < deadline and worker.poll() is None
                time.sleep(0.05)
        finally:
            worker.send_signal(signal.SIGKILL)
            worker.wait()
        server.faults.clear()
        assert not [p for p in adapters.iterdir() if not p.name.startswith(".")]  # nothing an engine sees
        path = lorachunk.adapter_path(f"{server.url}/s#sam", cache_dir=adapters)  # its lock died with it
    assert (path / "sam.safetensors").read_bytes() == (LORAS / "sam_lora_rank16.safetensors").read_bytes()


def test_a_full_disk_leaves_no_folder_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lorachunk.pack(LORAS / "sam_lora_rank16.safetensors", tmp_path / "s")
    real = lorachunk._adapter.unpack  # type: ignore[attr-defined]

    def full(store: object, target: Path, **options: object) -> object:  # the disk fills half-way
        real(store, target, **options)  # type: ignore[arg-type]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lorachunk._adapter, "unpack", full)
    with pytest.raises(lorachunk.StoreError, match="No space left"):
        lorachunk.adapter_path(tmp_path / "s", cache_dir=tmp_path / "a")
    assert not [p for p in (tmp_path / "a").iterdir() if not p.name.endswith(".lock")]  # no folder, no temp


@pytest.mark.parametrize("name", ["../../etc", "a/b", "x\x00y", "é" * 300, "#", ""])
def test_hostile_names_are_refused_and_write_nothing(tmp_path: Path, name: str) -> None:
    lorachunk.pack(LORAS / "sam_lora_rank16.safetensors", tmp_path / "s", name="sam")
    with pytest.raises(lorachunk.UsageError):
        lorachunk.adapter_path(f"{tmp_path / 's'}#{name}", cache_dir=tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_the_cache_cap_evicts_adapter_folders_but_never_one_in_use(tmp_path: Path) -> None:
    store = tmp_path / "s"
    for n, fixture in enumerate(["sam_lora_rank16", "smart_falcon_4_lokr", "smart_falcon_8_lokr"]):
        lorachunk.pack(LORAS / f"{fixture}.safetensors", store, name=f"l{n}")
    old, recent = lorachunk.adapter_path(f"{store}#l0"), lorachunk.adapter_path(f"{store}#l1")
    code = (
        f"import lorachunk, sys; lorachunk.adapter_path({str(store) + '#l2'!r}, hold=True); "
        "print(1, flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"1\n"
        held = next(p for p in old.parent.iterdir() if p.is_dir() and p not in (old, recent) and p.name[0] != ".")
        info = lorachunk.Cache().info()
        assert info.adapters == 3 and info.bytes >= sum(f.stat().st_size for f in held.iterdir())
        hour_ago = time.time() - 3600
        for folder in (old, held):
            os.utime(folder, (hour_ago, hour_ago))
        lorachunk.Cache(max_size=0).enforce_limit()
        assert not old.exists()  # unused for an hour: evicted, whole
        assert recent.is_dir() and held.is_dir()  # asked for minutes ago; held by a process
        assert lorachunk.Cache().clear() > 0 and held.is_dir() and not recent.exists()
    finally:
        holder.communicate(b"")
    lorachunk.Cache(max_size=0).enforce_limit()
    assert not held.exists()  # let go when its holder ended
    again = lorachunk.adapter_path(f"{store}#l0")
    assert again == old and (again / "l0.safetensors").is_file()  # evicted: made again on demand
