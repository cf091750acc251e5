"""The public surface and what importing it costs."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import termios
import zipfile
from pathlib import Path
from typing import Any

import pytest
from conftest import DATA

import lorachunk
from lorachunk._cli import main
from lorachunk.testing import synth


def test_all_is_sorted_and_complete() -> None:
    # ruff's isort-style order: CONSTANTS, then Classes, then functions
    def order(name: str) -> tuple[int, str]:
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)

    assert lorachunk.__all__ == sorted(lorachunk.__all__, key=order)
    for name in lorachunk.__all__:
        assert hasattr(lorachunk, name)


def test_exception_tree() -> None:
    assert issubclass(lorachunk.ObjectNotFoundError, lorachunk.StoreError)
    assert issubclass(lorachunk.ObjectNotFoundError, FileNotFoundError)
    assert issubclass(lorachunk.StoreError, OSError)
    for error in (lorachunk.FormatError, lorachunk.ManifestError, lorachunk.IntegrityError, lorachunk.UsageError):
        assert issubclass(error, lorachunk.LorachunkError) and issubclass(error, ValueError)


def test_import_is_light() -> None:
    code = (
        "import sys, lorachunk; print([m for m in ('torch', 'httpx', 'huggingface_hub', 'tqdm') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_wheel_holds_the_package_its_types_and_the_licence(tmp_path: Path) -> None:
    """What pip installs from a release: every module, the PEP 561 marker (without it mypy sees
    lorachunk as untyped in a user's project), the full licence and the console script; none of
    the tests, benchmarks or docs."""
    root = Path(__file__).parent.parent
    source = tmp_path / "source"
    shutil.copytree(root / "lorachunk", source / "lorachunk", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(root / name, source / name)
    build = "import sys, setuptools.build_meta as backend; print(backend.build_wheel(sys.argv[1]))"
    run = subprocess.run(
        [sys.executable, "-c", build, str(tmp_path)], check=False, cwd=source, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    with zipfile.ZipFile(tmp_path / run.stdout.split()[-1]) as wheel:
        names = set(wheel.namelist())
        modules = {p.relative_to(root).as_posix() for p in (root / "lorachunk").rglob("*.py")}
        assert modules | {"lorachunk/py.typed"} == {n for n in names if n.startswith("lorachunk/")}
        assert not [n for n in names if n.split("/")[0] in ("tests", "benchmarks", "docs")]
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        licence = wheel.read(f"{info}/licenses/LICENSE").decode()
        assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in licence
        assert "lorachunk = lorachunk._cli:main" in wheel.read(f"{info}/entry_points.txt").decode()


def test_cli_info_json(falcon: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pack", str(falcon), str(tmp_path / "s"), "-q", "--split", "attn=*attn*"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["info", str(tmp_path / "s"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["modules"] == 350 and info["tensors"] == 1750
    assert info["source"]["size"] == falcon.stat().st_size
    assert info["stored_bytes"] < info["raw_bytes"]
    splits = {s["name"]: s for s in info["splits"]}
    assert splits["attn"]["kind"] == "user" and splits["text_encoder"]["modules"] == 72
    assert info["root"].startswith("xxh3-128:")
    assert main(["info", str(tmp_path / "s")]) == 0
    text = capsys.readouterr().out
    assert info["root"] in text and "text_encoder" in text


def test_cli_info_of_a_file_not_yet_packed(falcon: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`info` of a .safetensors file shows what pack would store, and writes nothing."""
    src = tmp_path / falcon.name
    src.write_bytes(falcon.read_bytes())
    assert main(["info", str(src), "--json"]) == 0
    preview = json.loads(capsys.readouterr().out)
    assert list(tmp_path.iterdir()) == [src]
    assert main(["pack", str(src), str(tmp_path / "s"), "-q"]) == 0
    assert main(["info", str(tmp_path / "s"), "--json"]) == 0
    packed = json.loads(capsys.readouterr().out)
    assert preview.pop("packed") is False and packed.pop("packed") is True
    assert preview == packed  # same root, manifest, sizes and splits
    assert main(["info", str(src)]) == 0
    assert "not packed" in capsys.readouterr().out
    assert main(["info", str(src), "--manifest", "ab"]) == 2
    assert main(["verify", str(src)]) == 3
    assert "a packed LoRA is the folder `lorachunk pack` writes" in capsys.readouterr().err


def test_cli_counts_agree_with_their_nouns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    synth.write(tmp_path / "one.safetensors", {"w": ("F16", (2,), b"\x00<\x00<")})
    assert main(["pack", str(tmp_path / "one.safetensors"), str(tmp_path / "s")]) == 0
    assert "one.safetensors as one: 1 module, 0 splits" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "s")]) == 0
    assert "B, 1 tensor)\n" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "s")]) == 0
    assert capsys.readouterr().out.startswith("ok: 1 manifest, 1 module record, ")


def test_progress_bars_show_on_a_terminal_only(falcon: Path, tmp_path: Path) -> None:
    """pack, pull and info of an unpacked file draw a bar on stderr when it is a terminal; not when
    it is a pipe or a file, nor with --quiet, nor for info of a packed LoRA (nothing to wait for)."""
    terminal, terminal_end = os.openpty()
    os.set_blocking(terminal, False)
    # A new pty is 0 columns wide, and tqdm draws nothing in 0 columns.
    fcntl.ioctl(terminal_end, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))

    def stderr_of(*args: str, tty: bool) -> str:
        command = [sys.executable, "-m", "lorachunk", *args]
        if not tty:
            return subprocess.run(command, capture_output=True, text=True, check=True).stderr
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=terminal_end, check=True)
        chunks = []
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(terminal, 65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    try:
        assert "pack: 100%" in stderr_of("pack", str(falcon), str(tmp_path / "a"), tty=True)
        assert stderr_of("pack", str(falcon), str(tmp_path / "b"), tty=False) == ""
        assert stderr_of("pack", "--quiet", str(falcon), str(tmp_path / "c"), tty=True) == ""
        assert "pack in memory: 100%" in stderr_of("info", str(falcon), tty=True)
        assert stderr_of("info", str(tmp_path / "a"), tty=True) == ""
        pulled = stderr_of("pull", str(tmp_path / "a"), "-o", str(tmp_path / "p"), "--split", "text_encoder", tty=True)
        assert "pull: 100%" in pulled and "72 records" in pulled
    finally:
        os.close(terminal)
        os.close(terminal_end)


def test_cli_usage_errors(falcon: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pack", str(falcon), str(tmp_path / "s"), "-q", "--split", "bad"]) == 2
    assert "NAME=GLOB" in capsys.readouterr().err
    for option, message in (("--level=0", "level must be an int in 1..22"), ("--level=23", "got 23")):
        assert main(["pack", str(falcon), str(tmp_path / "s"), "-q", option]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    for command in ("info", "verify"):
        assert main([command, str(tmp_path / "typo")]) == 2  # a path that is not there, as for pack
        assert "typo does not exist" in capsys.readouterr().err
        (tmp_path / "empty").mkdir(exist_ok=True)
        assert main([command, str(tmp_path / "empty")]) == 2  # the same class, the same code (#24 item 11)
        assert "holds no packed LoRA" in capsys.readouterr().err
    main(["pack", str(falcon), str(tmp_path / "s"), "-q"])
    assert main(["unpack", str(tmp_path / "s"), "-o", str(tmp_path / "x"), "--split", "nope", "-q"]) == 2
    assert "no split 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert lorachunk.__version__ in capsys.readouterr().out


def test_cli_unpack_split(falcon: Path, tmp_path: Path) -> None:
    main(["pack", str(falcon), str(tmp_path / "s"), "-q"])
    assert (
        main(["unpack", str(tmp_path / "s"), "-o", str(tmp_path / "te.safetensors"), "--split", "text_encoder", "-q"])
        == 0
    )
    from safetensors.numpy import load_file

    assert all(k.startswith("lora_te_") for k in load_file(tmp_path / "te.safetensors"))


def test_cli_ls_lists_every_lora_of_a_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "s"
    four = lorachunk.pack(DATA / "loras" / "smart_falcon_4_lokr.safetensors", store)
    eight = lorachunk.pack(DATA / "loras" / "smart_falcon_8_lokr.safetensors", store)
    lorachunk.compose(store, [lorachunk.Take("te", store, "text_encoder")])  # shares eight's text encoder
    assert main(["ls", str(store), "--json"]) == 0
    rows = {row["manifest"]: row for row in json.loads(capsys.readouterr().out)}
    composed = lorachunk.read_manifest(store)
    assert set(rows) == {four.id, eight.id, composed.id}
    assert {row["name"] for row in rows.values()} == {four.name, eight.name, composed.name}
    assert [row["latest"] for row in rows.values()].count(True) == 1 and rows[composed.id]["latest"]
    # shared: what a version reuses of the records added before it (the composed one: all of them)
    assert rows[four.id]["shared_bytes"] == rows[eight.id]["shared_bytes"] == 0
    assert rows[composed.id]["shared_bytes"] == rows[composed.id]["stored_bytes"] > 0
    assert rows[four.id]["root"] == four.root and rows[four.id]["added"] and rows[four.id]["base_model"] == "sd_v1"
    assert main(["ls", str(store)]) == 0
    assert "3 LoRAs; * is the latest" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retries": 0, "timeout": 5}, "retries, timeout do not apply to a local folder"),
        ({"max_gap": None}, "max_gap must be"),
        ({"max_gap": "256kB"}, "max_gap must be"),
        ({"max_gap": math.nan}, "max_gap must be"),
        ({"max_gap": math.inf}, "max_gap must be"),
        ({"concurrency": "4"}, "concurrency must be"),
        ({"deadline": -1}, "deadline must be"),
    ],
)
def test_api_options_are_checked_like_cli_ones(options: dict[str, Any], message: str, tmp_path: Path) -> None:
    """Issue #24 item 11: these raised raw TypeErrors or were accepted."""
    lorachunk.pack(DATA / "loras" / "sam_lora_rank16.safetensors", tmp_path / "s")
    with pytest.raises(lorachunk.UsageError, match=message):
        lorachunk.load(tmp_path / "s", **options)
