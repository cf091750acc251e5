"""The docs stay true: the generated references match the code, and the quickstart runs."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
from conftest import DATA

from lorachunk._cli import main as cli
from lorachunk._docs import api_reference, cli_reference, with_splits_tables

DOCS = Path(__file__).resolve().parent.parent / "docs"
REGENERATE = "regenerate with: python -m lorachunk._docs docs/"


def test_cli_reference_is_current() -> None:
    assert (DOCS / "cli.md").read_text() == cli_reference(), REGENERATE


def test_api_reference_is_current() -> None:
    assert (DOCS / "api.md").read_text() == api_reference(), REGENERATE


def test_splits_tables_are_current() -> None:
    text = (DOCS / "splits.md").read_text()
    assert with_splits_tables(text) == text, REGENERATE
    assert "`layers.1` | layer" in text and "`q_proj` | projection" in text


def test_quickstart_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    original = DATA / "loras" / "smart_falcon_8_lokr.safetensors"
    shutil.copy(original, "my_lora.safetensors")
    blocks = re.findall(r"```(sh|python)\n(.*?)```", (DOCS / "quickstart.md").read_text(), flags=re.DOTALL)
    assert len(blocks) >= 5
    namespace: dict[str, object] = {}
    for language, code in blocks:
        if "not run by the docs test" in code:
            continue
        if language == "sh":
            for line in code.strip().splitlines():
                words = shlex.split(line)
                assert words[0] == "lorachunk", line
                assert cli(words[1:]) == 0, line
        else:
            exec(compile(code, str(DOCS / "quickstart.md"), "exec"), namespace)
    assert Path("same.safetensors").read_bytes() == original.read_bytes()
    assert Path("text_encoder_only").is_dir() and namespace["te"]
    assert '"GET /' not in capfd.readouterr().err  # the server it starts is quiet, as it says
