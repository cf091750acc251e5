"""Writers beside each other and beside repack: the writer lock, pulls that add up, what killed
writers leave, and files that are not lorachunk's (issue #24, items 2, 3, 5 and 6)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import DATA

import lorachunk
from lorachunk._catalog import read_catalog
from lorachunk._cli import main
from lorachunk._keys import LATEST
from lorachunk._lock import STALE, list_locks, locked
from lorachunk._repository import list_manifest_ids
from lorachunk.storage import LocalStore
from lorachunk.testing import synth
from lorachunk.testing.http_server import serve

LORAS = DATA / "loras"
FALCON = LORAS / "smart_falcon_4_lokr.safetensors"
SAM = LORAS / "sam_lora_rank16.safetensors"

# A pack in a child process that stops in the middle (its packs partly written) until told to go
# on, or kills itself there: a fault no real writer gives on cue.
_CHILD = """
import os, signal, sys, time
from pathlib import Path
import lorachunk
src, dest, flag, mode = sys.argv[1:]
def progress(done, total):
    if done * 2 >= total and not Path(flag + ".reached").exists():
        Path(flag + ".reached").touch()
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        while not Path(flag).exists():
            time.sleep(0.02)
lorachunk.pack(src, dest, progress=progress, pack_size=1024 * 1024)
"""


def _child_pack(tmp_path: Path, src: Path, dest: Path, mode: str) -> tuple[subprocess.Popen[bytes], Path]:
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    flag = tmp_path / f"go-{mode}"
    child = subprocess.Popen([sys.executable, str(script), str(src), str(dest), str(flag), mode])
    deadline = time.monotonic() + 120
    while not Path(f"{flag}.reached").exists():
        assert child.poll() is None or mode == "kill", "the child pack ended before its middle"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return child, flag


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic (an SDXL-shaped LoRA at rank 4): large enough for several packs of 1 MiB."""
    return synth.sdxl(tmp_path_factory.mktemp("big") / "sdxl.safetensors", rank=4)


def test_repack_prune_beside_a_pack_refuses_and_loses_nothing(
    tmp_path: Path, big: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    lorachunk.pack(SAM, store)
    child, flag = _child_pack(tmp_path, big, store, "wait")
    try:
        assert main(["repack", str(store), "--prune"]) == 3
        err = capsys.readouterr().err
        assert "is locked" in err and "'pack'" in err and f"pid {child.pid}" in err
    finally:
        flag.touch()
    assert child.wait(120) == 0
    report = lorachunk.verify(store)
    assert report.manifests == 2 and report.unreferenced == 0
    latest = (store / LATEST).read_text().strip()
    assert lorachunk.read_manifest(store, latest).source.name == big.name  # refs/latest did not go back
    lorachunk.repack(store, prune=True)  # once alone, it runs
    assert lorachunk.verify(store).manifests == 2
    assert lorachunk.unpack(store, tmp_path / "back.safetensors").read_bytes() == big.read_bytes()


def test_a_writer_waits_for_a_repack_to_finish(tmp_path: Path) -> None:
    store = tmp_path / "store"
    lorachunk.pack(SAM, store)
    held, release = threading.Event(), threading.Event()

    def repacking() -> None:
        with locked(LocalStore(store), exclusive=True, command="repack --prune"):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=repacking)
    thread.start()
    held.wait(30)
    done: list[lorachunk.Manifest] = []
    packer = threading.Thread(target=lambda: done.append(lorachunk.pack(FALCON, store)))
    packer.start()
    time.sleep(1.0)
    assert not done, "a pack went on beside an exclusive lock"
    release.set()
    thread.join()
    packer.join(60)
    assert done and lorachunk.verify(store).manifests == 2
    assert list_locks(LocalStore(store)) == []


def test_a_writer_gives_up_naming_the_holder(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    with locked(store, exclusive=True, command="repack"):
        waiting = locked(store, exclusive=False, command="pack", wait=0.3)
        with pytest.raises(lorachunk.StoreLockedError, match=r"exclusive lock held by 'repack' \(pid \d+"), waiting:
            pass
        with pytest.raises(OSError), locked(store, exclusive=True, command="repack", wait=0):
            pass
    with locked(store, exclusive=False, command="a"), locked(store, exclusive=False, command="b"):
        assert len(list_locks(store)) == 2  # writers share


def _plant_lock(store: Path, name: str, **fields: object) -> Path:
    body = {"command": "pack", "exclusive": False, "host": "other-host", "pid": 4242, "time": time.time()} | fields
    path = store / "locks" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body))
    return path


def test_locks_of_other_hosts_stale_ones_and_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    lorachunk.pack(SAM, store)
    live = _plant_lock(store, "a" * 32)
    assert main(["repack", str(store), "--prune"]) == 3
    assert "'other-host'" in capsys.readouterr().err
    live.unlink()
    old = _plant_lock(store, "b" * 32, time=time.time() - STALE - 60)  # not refreshed for over 30 minutes
    dead = _plant_lock(store, "c" * 32, host=os.uname().nodename, pid=_dead_pid())  # this host, gone
    assert main(["repack", str(store), "--prune", "-q"]) == 0
    assert not old.exists() and not dead.exists()
    _plant_lock(store, "d" * 32)
    assert main(["repack", str(store), "--force", "-q"]) == 0
    assert "broke 1 lock" in capsys.readouterr().err
    assert list_locks(LocalStore(store)) == []


@pytest.mark.parametrize(
    "text",
    ['{"time": NaN}', '{"pid": 1' + "0" * 5000 + "}", '{"host": "\\ud800"}', "not json", "[]", '{"time": 1e999}'],
)
def test_a_lock_that_does_not_parse_is_stale(tmp_path: Path, text: str) -> None:
    store = tmp_path / "store"
    lorachunk.pack(SAM, store)
    path = store / "locks" / ("e" * 32)
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    assert lorachunk.repack(store, prune=True).manifests == 1
    assert not path.exists()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# -- what a writer killed with kill -9 leaves ------------------------------------------------------


def test_prune_removes_what_a_killed_pack_left(tmp_path: Path, big: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    child, _ = _child_pack(tmp_path, big, store, "kill")
    assert child.wait(60) == -signal.SIGKILL
    left = LocalStore(store)
    assert left.temp_files() > 0 and len(list_locks(left)) == 1  # its packs, and its lock
    assert main(["info", str(store)]) == 2
    assert "only" in (err := capsys.readouterr().err) and "temp file" in err and "repack --prune" in err
    assert main(["repack", str(store), "--prune"]) == 0  # its lock is stale: its process is gone
    assert "kept" in capsys.readouterr().out  # younger than the grace period: a writer may own them
    assert left.temp_files() > 0
    report = lorachunk.repack(store, prune=True, grace=0)
    assert report.temp_files_removed > 0 and left.temp_files() == 0
    assert list_locks(left) == []
    lorachunk.pack(SAM, store)
    assert lorachunk.verify(store).temp_files == 0


# -- files that are not lorachunk's ----------------------------------------------------------------


def test_files_a_user_put_in_a_store_are_listed_and_never_touched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    lorachunk.pack(SAM, store)
    lorachunk.pack(FALCON, store)
    strays = [
        store / "packs" / "README.md",
        store / "packs" / "notes" / "todo.txt",
        store / "manifests" / "notes.txt",
        store / "manifests" / ("f" * 32 + ".json.zst.bak"),
        store / "shards" / "ab" / "README",
    ]
    for path in strays:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine")
    for command in (["info"], ["ls"], ["verify"]):
        assert main([*command, str(store)]) == 0, capsys.readouterr().err
    assert "not lorachunk's: 5 files" in capsys.readouterr().out
    assert len(lorachunk.verify(store).foreign) == 5
    lorachunk.repack(store, prune=True, grace=0)
    assert all(path.read_text() == "mine" for path in strays)
    assert lorachunk.verify(store).manifests == 2


# -- pulls add up ---------------------------------------------------------------------------------


def test_pulls_in_sequence_add_up(tmp_path: Path) -> None:
    src = tmp_path / "www" / "falcon"
    lorachunk.pack(FALCON, src)
    dest = tmp_path / "copy"
    with serve(tmp_path / "www") as server:
        for split in ("unet.mid_block", "text_encoder", "unet.up_blocks.0"):
            lorachunk.pull(f"{server.url}/falcon", dest, splits=[split], cache=False)
    report = lorachunk.verify(dest)
    assert report.manifests == 1
    assert {"unet.mid_block", "text_encoder", "unet.up_blocks.0"} <= set(report.complete_splits)
    out = lorachunk.unpack(dest, tmp_path / "te.safetensors", splits=["text_encoder"])
    assert out.stat().st_size > 0
    with lorachunk.open(dest, cache=False) as lora:
        assert len(lora.load(splits=["unet.mid_block"])) > 0


def test_concurrent_pulls_into_one_folder_keep_every_split(tmp_path: Path) -> None:
    src = tmp_path / "www" / "falcon"
    lorachunk.pack(FALCON, src)
    dest = tmp_path / "copy"
    splits = ["text_encoder", "unet.mid_block", "unet.up_blocks.1", "unet.down_blocks.2"]
    env = os.environ | {"LORACHUNK_CACHE": str(tmp_path / "cache")}
    with serve(tmp_path / "www") as server:
        children = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "lorachunk",
                    "pull",
                    f"{server.url}/falcon",
                    "-o",
                    str(dest),
                    "--split",
                    s,
                    "-q",
                ],
                env=env,
            )
            for s in splits
        ]
        assert [child.wait(120) for child in children] == [0] * len(splits)
    report = lorachunk.verify(dest)
    assert report.manifests == 1 and report.unreferenced == 0
    assert set(splits) <= set(report.complete_splits)


def test_concurrent_packs_of_different_loras_are_all_kept(tmp_path: Path) -> None:
    store = tmp_path / "store"
    sources = [
        FALCON,
        SAM,
        LORAS / "diffusers_sd15_attnproc.safetensors",
        LORAS / "cloneofsimo_lora_disney.safetensors",
    ]
    children = [
        subprocess.Popen([sys.executable, "-m", "lorachunk", "pack", str(src), str(store), "-q"]) for src in sources
    ]
    assert [child.wait(120) for child in children] == [0] * len(sources)
    assert lorachunk.verify(store).manifests == len(sources)
    held = {lorachunk.read_manifest(store, i).source.name for i in list_manifest_ids(LocalStore(store))}
    assert held == {src.name for src in sources}
    catalog = read_catalog(LocalStore(store))  # every writer's name is in the catalog: none lost
    assert catalog is not None and set(catalog.names()) == {src.stem for src in sources}
    assert list_locks(LocalStore(store)) == []
