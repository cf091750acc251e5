"""The CLI against remote sources (a real HTTP server on 127.0.0.1) and the cache commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DATA, pack_files
from safetensors.torch import load_file

import lorachunk
from lorachunk._cli import main
from lorachunk._repository import record_key
from lorachunk.testing.http_server import FolderServer

ATTN = DATA / "loras" / "diffusers_sd15_attnproc.safetensors"


@pytest.fixture
def published(served: FolderServer) -> tuple[FolderServer, lorachunk.Manifest]:
    return served, lorachunk.pack(ATTN, served.root)


def test_pull_split_then_info_verify_unpack(
    published: tuple[FolderServer, lorachunk.Manifest],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, manifest = published
    monkeypatch.setenv("LORACHUNK_CACHE", str(tmp_path / "cache"))
    split = next(s for s in manifest.splits if s.name == "unet.up_blocks.1")
    out = tmp_path / "copy"
    code = main(["pull", server.url, "-o", str(out), "--split", split.name, "--root", manifest.root])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"pulled {len(split.modules)} records" in printed
    assert len(server.gets("/packs/")) == 1  # the split is one run of bytes in the pack
    # A partial copy is a normal state: verify checks what it holds and says what it lacks.
    assert main(["verify", str(out)]) == 0
    printed = capsys.readouterr().out
    others = len({m.record for m in manifest.modules}) - len(split.modules)
    assert f"partial copy: {others} records not pulled" in printed
    assert split.name in printed.rpartition("splits held whole:")[2]
    report = lorachunk.verify(out)
    assert (report.records, report.missing) == (len(split.modules), others)
    # A split it was never given: a usage error that says how to get it, and no file.
    assert main(["unpack", str(out), "-o", str(tmp_path / "te.safetensors"), "--split", "unet.down_blocks.0"]) == 2
    err = capsys.readouterr().err
    assert "partial copy" in err and "lorachunk pull" in err
    assert not (tmp_path / "te.safetensors").exists()
    # A pack damaged in the copy fails verify, and the next pull writes it again.
    (damaged,) = pack_files(out)
    damaged.write_bytes(b"rot" + damaged.read_bytes()[3:])
    assert main(["verify", str(out), "-q"]) == 1
    capsys.readouterr()
    assert main(["pull", server.url, "-o", str(out), "--split", split.name, "--no-cache"]) == 0
    assert f": {len(split.modules)} fetched" in capsys.readouterr().out
    assert main(["verify", str(out), "-q"]) == 0
    assert lorachunk.verify(out).unreferenced == 0
    assert main(["pull", server.url, "-o", str(out), "--split", split.name, "--no-cache"]) == 0
    assert f"0 fetched (0 B), {len(split.modules)} from the cache or already there" in capsys.readouterr().out
    assert main(["unpack", str(out), "-o", str(tmp_path / "up.safetensors"), "--split", split.name, "-q"]) == 0
    reference = load_file(ATTN)
    got = load_file(tmp_path / "up.safetensors")
    assert got and all(k in reference and (reference[k] == t).all() for k, t in got.items())
    # A pull's destination is its verified copy: nothing goes into the cache too (issue #24 item 8),
    # so another pull of the same split fetches it again.
    before = len(server.gets("/packs/"))
    assert main(["pull", server.url, "-o", str(tmp_path / "copy2"), "--split", split.name, "-q"]) == 0
    assert len(server.gets("/packs/")) == before + 1
    assert lorachunk.Cache().info().records == 0


def test_remote_info_unpack_verify(
    published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, manifest = published
    assert main(["info", server.url, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["root"] == manifest.root and info["store"]["manifests"] == 1
    server.log.clear()
    assert main(["unpack", server.url, "-o", str(tmp_path / "whole.safetensors"), "-q"]) == 0
    assert (tmp_path / "whole.safetensors").read_bytes() == ATTN.read_bytes()
    assert len(server.gets("/packs/")) == len(manifest.packs) == 1  # planned requests, not one per module
    assert main(["verify", server.url, "-q"]) == 0
    assert main(["info", server.url, "--manifest", manifest.id[:12]]) == 2
    assert "full id" in capsys.readouterr().err


def test_pull_errors_are_clear(
    published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, manifest = published
    code = main(["pull", server.url, "-o", str(tmp_path / "c"), "--root", "xxh3-128:" + "0" * 32, "--no-cache"])
    assert code == 1 and "expected xxh3-128:000" in capsys.readouterr().err
    victim = manifest.modules[0]
    server.inject(f"/{record_key(victim)}", "status", status=503, times=None)
    code = main(["pull", server.url, "-o", str(tmp_path / "d"), "--no-cache", "--retries", "1", "-q"])
    err = capsys.readouterr().err
    assert code == 3 and victim.name in err and "503" in err
    assert not (tmp_path / "d" / "refs").exists()  # no manifest ref for an incomplete copy


def test_cache_commands(
    published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, manifest = published
    cache = tmp_path / "cache"
    with lorachunk.open(server.url, cache=cache) as lora:
        lora.prefetch()
    assert main(["cache", "info", "--cache-dir", str(cache)]) == 0
    assert f"{len(manifest.modules)} records, 1 manifest," in capsys.readouterr().out
    assert main(["cache", "verify", "--cache-dir", str(cache)]) == 0
    victim = next(p for p in (cache / "shards").rglob("*") if p.is_file())
    victim.write_bytes(b"rot")
    assert main(["cache", "verify", "--cache-dir", str(cache)]) == 1
    assert not victim.exists()
    assert main(["cache", "prune", "--cache-dir", str(cache)]) == 2
    for bad in ("-1MB", "inf", "1e400", "nan", "10 parsecs"):
        assert main(["cache", "prune", f"--max-size={bad}", "--cache-dir", str(cache)]) == 2
        assert "cannot read size" in capsys.readouterr().err
    assert lorachunk.Cache(cache).info().records == len(manifest.modules) - 1
    assert main(["cache", "prune", "--max-size", "10kB", "--cache-dir", str(cache)]) == 0
    assert lorachunk.Cache(cache).info().bytes <= 10_000
    assert main(["cache", "clear", "--cache-dir", str(cache)]) == 0
    assert lorachunk.Cache(cache).info().bytes == 0
