"""Bad input files: one clear error from lorachunk's tree, exit code 2, nothing left behind."""

from __future__ import annotations

import errno
import json
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import DATA

import lorachunk
from lorachunk._cli import main
from lorachunk.storage import LocalStore
from lorachunk.storage import _local as local_module


def _file(header: object, data: bytes = b"", *, raw_header: bytes | None = None) -> bytes:
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
_U8 = b'{"dtype":"U8","shape":[1],"data_offsets":[0,1]}'
_ONE_BYTE = {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}

CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "empty file": (lambda d: _write(d, b""), "too short"),
    "not safetensors": (lambda d: _write(d, b"\x01\x02 something else entirely, not a LoRA"), "over the"),
    "a PyTorch zip": (lambda d: _write(d, b"PK\x03\x04 this is a zip file, not a LoRA"), "zip archive"),
    "a pickle": (lambda d: _write(d, b"\x80\x02}q\x00(X\x05\x00\x00\x00alpha"), "PyTorch checkpoint"),
    "a GGUF file": (lambda d: _write(d, b"GGUF\x03\x00\x00\x00" + bytes(24)), "GGUF"),
    "header past end": (lambda d: _write(d, struct.pack("<Q", 5000) + b"{}"), "past the end"),
    "truncated data": (lambda d: _write(d, _file(GOOD, b"\x00" * 5)), "truncated"),
    "trailing bytes": (lambda d: _write(d, _file(GOOD, b"\x00" * 12)), "trailing"),
    "header not json": (lambda d: _write(d, _file(None, raw_header=b"{not json")), "not JSON"),
    "header not object": (lambda d: _write(d, _file([1, 2])), "not a JSON object"),
    "overlapping": (
        lambda d: _write(
            d,
            _file(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
                },
                b"\x00" * 8,
            ),
        ),
        "overlaps",
    ),
    "gap": (
        lambda d: _write(d, _file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\x00" * 8)),
        "gap",
    ),
    "unknown dtype": (
        lambda d: _write(d, _file({"a": {"dtype": "F12", "shape": [1], "data_offsets": [0, 2]}}, b"\x00" * 2)),
        "unknown dtype",
    ),
    "dtype not a string": (
        lambda d: _write(d, _file({"a": {"dtype": ["F16"], "shape": [1], "data_offsets": [0, 2]}}, b"\x00" * 2)),
        "unknown dtype",
    ),
    "shape/length mismatch": (
        lambda d: _write(d, _file({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\x00" * 8)),
        "needs 12 bytes",
    ),
    "negative shape": (
        lambda d: _write(d, _file({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\x00" * 4)),
        "shape",
    ),
    "bad metadata": (lambda d: _write(d, _file({"__metadata__": {"a": 1}})), "__metadata__"),
    "header over cap": (lambda d: _write(d, struct.pack("<Q", 100_000_001) + b" " * 16), "cap"),
    "not utf-8": (lambda d: _write(d, _file(None, raw_header=b'{"\xff": 1}')), "UTF-8"),
    # json takes a \ud800 escape; no manifest could then be written as UTF-8.
    "lone surrogate escape": (
        lambda d: _write(d, _file(None, raw_header=b'{"__metadata__":{"a":"\\ud800"}}')),
        "not valid Unicode",
    ),
    # Names are shown in terminals: an escape sequence in one could rewrite what a user reads.
    "control character in a key": (lambda d: _write(d, _file({"up\x1b[2J.weight": _ONE_BYTE}, b"\x00")), "control"),
    "empty key": (lambda d: _write(d, _file({"": _ONE_BYTE}, b"\x00")), "is empty"),
    # Python keeps the last of two equal keys and some parsers the first; the file is refused.
    "repeated key": (
        lambda d: _write(d, _file(None, b"\x00", raw_header=b'{"a":%s,"a":%s}' % (_U8, _U8))),
        "'a' twice",
    ),
    "header nested too deep": (lambda d: _write(d, _file(None, raw_header=b"[" * 100_000 + b"]" * 100_000)), "deep"),
    "a folder": (lambda d: d, "folder"),
    "missing": (lambda d: d / "nope.safetensors", "cannot read"),
}


def _write(folder: Path, data: bytes) -> Path:
    path = folder / "bad.safetensors"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_file_is_rejected_cleanly(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make, message = CASES[case]
    src = make(tmp_path)
    dest = tmp_path / "store"
    with pytest.raises(lorachunk.FormatError, match=message):
        lorachunk.pack(src, dest)
    assert not dest.exists()
    assert main(["pack", str(src), str(dest)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorachunk: ") and "Traceback" not in err
    assert not dest.exists()


def test_dest_that_is_a_file_under_a_file_or_empty(
    falcon: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad destinations are usage errors (exit 2), like every other bad path, and touch nothing."""
    dest = tmp_path / "file"
    dest.write_text("occupied")
    with pytest.raises(lorachunk.UsageError, match="is a file"):
        lorachunk.pack(falcon, dest)
    assert dest.read_text() == "occupied"
    assert main(["pack", str(falcon), str(dest), "-q"]) == 2
    assert main(["pack", str(falcon), str(dest / "sub" / "store"), "-q"]) == 2
    assert "lies under the file" in capsys.readouterr().err
    lorachunk.pack(falcon, tmp_path / "store")
    assert main(["pull", str(tmp_path / "store"), "-o", str(dest), "-q"]) == 2
    assert main(["compose", str(dest), "--take", f"all={tmp_path / 'store'}", "-q"]) == 2
    monkeypatch.chdir(tmp_path)
    assert main(["pack", str(falcon), "", "-q"]) == 2  # not the current folder
    assert "destination is empty" in capsys.readouterr().err
    assert {p.name for p in tmp_path.iterdir()} <= {"file", "store", "default-cache"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"level": 0}, "level must be an int in 1..22"),
        ({"level": 40}, "got 40"),
        ({"level": "3"}, "got '3'"),
        ({"hash": "md5"}, "unknown hash algorithm"),
    ],
)
def test_bad_pack_options_are_usage_errors(options: dict[str, Any], message: str, falcon: Path, tmp_path: Path) -> None:
    with pytest.raises(lorachunk.UsageError, match=message) as caught:
        lorachunk.pack(falcon, tmp_path / "dest", **options)
    assert isinstance(caught.value, ValueError)
    assert not (tmp_path / "dest").exists()


def test_pack_refuses_what_a_reader_would(falcon: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file past the format's limits fails at pack, not at every later read; the limits are
    lowered here, as a file of a million tensors takes a minute to build."""
    monkeypatch.setattr("lorachunk._pack.MAX_TENSORS", 1749)
    with pytest.raises(lorachunk.FormatError, match="the header holds more than 1749 tensors"):
        lorachunk.pack(falcon, tmp_path / "many")
    monkeypatch.undo()
    monkeypatch.setattr("lorachunk._pack.MAX_MODULE_RAW_BYTES", 1000)
    with pytest.raises(lorachunk.FormatError, match="fc1' holds 1346 bytes; a lorachunk/2 module holds at most 1000"):
        lorachunk.pack(falcon, tmp_path / "large")
    monkeypatch.undo()
    monkeypatch.setattr("lorachunk._repository.MAX_STORED_MANIFEST_BYTES", 10_000)
    with pytest.raises(lorachunk.ManifestError, match="over what a reader accepts"):
        lorachunk.pack(falcon, tmp_path / "big")
    assert not any(tmp_path.iterdir())


class _FullDisk(LocalStore):
    """A disk that fills up: after ``room`` more writes, or at the first manifest (faults no
    real folder gives on cue)."""

    def __init__(self, root: Path, *, room: int | None = None) -> None:
        super().__init__(root)
        self.room = room
        self.lock = threading.Lock()  # shards are written from several threads

    def set(self, key: str, value: bytes) -> None:
        with self.lock:
            if self.room is not None:
                self.room -= 1
            full = key.startswith("manifests/") if self.room is None else self.room < 0
        if full:
            raise lorachunk.StoreError(f"cannot write {key}: No space left on device")
        super().set(key, value)


def test_failed_pack_leaves_existing_store_untouched(falcon: Path, tmp_path: Path) -> None:
    """A failure half-way removes the shards this pack wrote and keeps what was there."""
    dest = tmp_path / "store"
    lorachunk.pack(DATA / "loras" / "sam_lora_rank16.safetensors", dest)
    before = sorted(p.relative_to(dest) for p in dest.rglob("*"))
    with pytest.raises(lorachunk.StoreError, match="No space left"):
        lorachunk.pack(falcon, _FullDisk(dest))
    assert sorted(p.relative_to(dest) for p in dest.rglob("*")) == before


def test_failed_flush_of_the_shards_leaves_nothing(
    falcon: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shards are flushed together before the manifest is written; an I/O error there (a fault
    no real disk gives on cue) undoes the pack and no manifest names a shard not on disk."""
    dest = tmp_path / "store"
    lorachunk.pack(DATA / "loras" / "sam_lora_rank16.safetensors", dest)
    before = sorted(p.relative_to(dest) for p in dest.rglob("*"))

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(local_module, "_syncfs", lambda: failing)
    with pytest.raises(lorachunk.StoreError, match="Input/output error"):
        lorachunk.pack(falcon, dest)
    assert sorted(p.relative_to(dest) for p in dest.rglob("*")) == before


def test_disk_full_while_the_pack_is_written_leaves_nothing(falcon: Path, tmp_path: Path) -> None:
    """A failure writing the pack object undoes the whole pack."""
    dest = tmp_path / "store"
    lorachunk.pack(DATA / "loras" / "sam_lora_rank16.safetensors", dest)
    before = sorted(p.relative_to(dest) for p in dest.rglob("*"))
    with pytest.raises(lorachunk.StoreError, match="No space left"):
        lorachunk.pack(falcon, _FullDisk(dest, room=0))
    assert sorted(p.relative_to(dest) for p in dest.rglob("*")) == before


def test_a_header_of_too_many_tensors_is_refused_while_it_is_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue #24 item 7: a header past the tensor cap stops the parser, not after it (a 97 MB
    header of 1.1 M tensors took 13.9 s and 1.1 GB before, 0.7 s and 272 MB now)."""
    from lorachunk import _safetensors
    from lorachunk._manifest_json import MAX_TENSORS

    n = MAX_TENSORS + 1000
    entries = {
        f"t{i:06d}.lora_down.weight": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(n)
    }
    header = json.dumps(entries, separators=(",", ":")).encode()
    path = tmp_path / "many.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(n))
    seen = [0]
    unique = _safetensors._unique_keys

    def counting(pairs: list[tuple[str, object]]) -> dict[str, object]:
        seen[0] += 1
        return unique(pairs)

    monkeypatch.setattr(_safetensors, "_unique_keys", counting)
    with pytest.raises(lorachunk.FormatError, match=f"more than {MAX_TENSORS} tensors"):
        lorachunk.pack(path, tmp_path / "store")
    assert seen[0] <= MAX_TENSORS + 2  # the parser stopped at the cap
    assert not (tmp_path / "store").exists()


def test_non_ascii_text_in_a_header_is_kept(tmp_path: Path) -> None:
    """Headers of ASCII bytes skip the surrogate check; others (kohya writes tags in any
    script) take it and must still pack, byte for byte."""
    import torch
    from safetensors.torch import save_file

    source = tmp_path / "tags.safetensors"
    save_file({"a.lora_down.weight": torch.ones(2, 2)}, source, metadata={"ss_tag_frequency": "日本語, café"})
    lorachunk.pack(source, tmp_path / "tags.lcs")
    lorachunk.unpack(tmp_path / "tags.lcs", tmp_path / "back.safetensors")
    assert (tmp_path / "back.safetensors").read_bytes() == source.read_bytes()
