"""Writers sharing a folder: concurrent packs and unpacks, interrupted ones, and the files they leave."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DATA

import lorachunk
from lorachunk._cli import main
from lorachunk.storage import LocalStore
from lorachunk.storage._local import create_temp

LORAS = DATA / "loras"
BIG = LORAS / "smart_falcon_16_lokr.safetensors"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Interrupted(BaseException):
    """Ctrl-C in a thread: a BaseException, as KeyboardInterrupt is."""


def _interrupted_pack_beside_a_finished_one(dest: Path) -> None:
    """Pack BIG into ``dest`` in a thread that stops half-way until another pack of the same file
    into ``dest`` has finished, then is interrupted."""
    other_done = threading.Event()
    failure: list[BaseException] = []

    def progress(done: int, total: int) -> None:
        if done * 2 >= total:  # by now it has shards of its own in flight
            other_done.wait(60)
            raise Interrupted

    def interrupted() -> None:
        try:
            lorachunk.pack(BIG, dest, progress=progress)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=interrupted)
    thread.start()
    try:
        lorachunk.pack(BIG, dest)
    finally:
        other_done.set()
        thread.join()
    assert len(failure) == 1
    assert isinstance(failure[0], Interrupted)


@pytest.mark.parametrize("existing", [True, False], ids=["existing folder", "folder made by the interrupted pack"])
def test_an_interrupted_pack_never_removes_another_writers_lora(tmp_path: Path, existing: bool) -> None:
    dest = tmp_path / "store"
    if existing:
        lorachunk.pack(LORAS / "sam_lora_rank16.safetensors", dest)
    _interrupted_pack_beside_a_finished_one(dest)
    report = lorachunk.verify(dest)
    assert report.manifests == (2 if existing else 1)
    out = lorachunk.unpack(dest, tmp_path / "out.safetensors")
    assert _sha256(out) == _sha256(BIG)
    assert not [p for p in dest.rglob(".*") if p.name != ".serial"], "temp files left behind"


def test_a_failed_pack_into_a_new_folder_leaves_no_folder(tmp_path: Path) -> None:
    def progress(done: int, total: int) -> None:
        raise Interrupted

    with pytest.raises(Interrupted):
        lorachunk.pack(BIG, tmp_path / "new", progress=progress)
    assert not (tmp_path / "new").exists()


def test_three_processes_pack_into_one_folder(tmp_path: Path) -> None:
    """Real processes, at once: every LoRA is whole afterwards, shared shards included."""
    dest = tmp_path / "shared"
    sources = [LORAS / f"smart_falcon_{n}_lokr.safetensors" for n in (4, 8, 16)]
    env = os.environ | {"LORACHUNK_THREADS": "2"}
    processes = [
        subprocess.Popen([sys.executable, "-m", "lorachunk", "pack", str(src), str(dest), "-q"], env=env)
        for src in sources
    ]
    assert [p.wait(120) for p in processes] == [0, 0, 0]
    assert lorachunk.verify(dest).manifests == 3
    for src in sources:
        manifest = lorachunk.pack(src, lorachunk.storage.MemoryStore())
        out = lorachunk.unpack(dest, tmp_path / src.name, manifest=manifest.id)
        assert _sha256(out) == _sha256(src)


def test_two_unpacks_to_one_output_leave_one_whole_file(tmp_path: Path) -> None:
    sources = [LORAS / "smart_falcon_8_lokr.safetensors", LORAS / "cloneofsimo_lora_disney.safetensors"]
    stores = [lorachunk.pack(src, tmp_path / src.stem) and tmp_path / src.stem for src in sources]
    out = tmp_path / "out.safetensors"
    expected = {_sha256(src) for src in sources}
    for _ in range(3):
        threads = [threading.Thread(target=lorachunk.unpack, args=(store, out)) for store in stores]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert _sha256(out) in expected
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_unpack_does_not_write_through_a_planted_link(falcon: Path, tmp_path: Path) -> None:
    """The temp file has an unpredictable name, created exclusively: a link planted where the
    old fixed name was is never written through."""
    lorachunk.pack(falcon, tmp_path / "store")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "out.safetensors"
    (tmp_path / f".{out.name}.lorachunk.tmp").symlink_to(victim)
    lorachunk.unpack(tmp_path / "store", out)
    assert victim.read_text() == "precious"
    assert _sha256(out) == _sha256(falcon)


def test_unpack_replaces_only_a_regular_file(falcon: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lorachunk.pack(falcon, tmp_path / "store")
    target = tmp_path / "target"
    target.write_text("kept")
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    for out, kind in ((link, "symbolic link"), (fifo, "not a regular file"), (tmp_path, "a folder")):
        with pytest.raises(lorachunk.UsageError, match=kind):
            lorachunk.unpack(tmp_path / "store", out)
    assert target.read_text() == "kept"
    assert link.is_symlink()
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    # A folder that is not there is not made (nor any above it).
    missing = tmp_path / "no" / "such" / "x.safetensors"
    assert main(["unpack", str(tmp_path / "store"), "-o", str(missing), "-q"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root: Path) -> set[int]:
    return {stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()}


def test_files_honour_the_umask(umask_022: None, tmp_path: Path) -> None:
    """A web server running as another user can serve what pack writes (0644 under umask 022,
    not mkstemp's 0600): stores, refs, manifests, unpacked files, PEFT folders and the cache."""
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_model.safetensors").write_bytes((LORAS / "peft_sd15_text_encoder.safetensors").read_bytes())
    (peft / "adapter_config.json").write_text('{"r": 4}')
    lorachunk.pack(peft, tmp_path / "store")
    assert _modes(tmp_path / "store") == {0o644}
    (tmp_path / "out").mkdir()
    lorachunk.unpack(tmp_path / "store", tmp_path / "out" / "adapter", format="peft")
    assert _modes(tmp_path / "out") == {0o644}
    lorachunk.load(tmp_path / "store", cache=tmp_path / "cache")
    assert _modes(tmp_path / "cache") == {0o644}
    os.umask(0o077)
    lorachunk.unpack(tmp_path / "store", tmp_path / "private.safetensors")
    assert stat.S_IMODE((tmp_path / "private.safetensors").stat().st_mode) == 0o600


def test_verify_reports_what_writers_left_over(
    falcon: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A writer killed with kill -9 leaves a hidden temp file; one that failed in a store whose
    writes show at once leaves a pack no manifest names. Neither is damage, and both are counted."""
    store = tmp_path / "store"
    lorachunk.pack(falcon, store)
    handle, _ = create_temp(store / "packs" / ("ab" + "0" * 30))  # as a killed writer leaves it
    handle.close()
    LocalStore(store).set("packs/cd" + "1" * 30, b"an orphan")
    report = lorachunk.verify(store)
    assert (report.unreferenced, report.temp_files) == (1, 1)
    assert main(["verify", str(store)]) == 0
    assert "left over: 1 object no manifest names and 1 temp file" in capsys.readouterr().out
