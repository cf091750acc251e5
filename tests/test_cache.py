"""The shared cache under loads: warm loads, damaged and unwritable caches, decoded modules and bundles, pruning."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ATTN, SAM, assert_cache_clean, open_http, pack_gets
from safetensors.torch import load_file

import lorachunk
from lorachunk._keys import shard_key
from lorachunk.testing.http_server import FolderServer


def test_warm_cache_skips_the_network(published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path) -> None:
    server, manifest = published
    with open_http(server, tmp_path) as lora:
        first = lora.load()
    assert len(pack_gets(server)) == len(manifest.packs) == 1  # the whole LoRA: its one pack, whole
    server.shutdown()  # a pinned manifest id and a warm cache need no server at all
    with open_http(server, tmp_path, manifest=manifest.id) as lora:
        second = lora.load()
        assert lora.fetched == 0
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_corrupt_cache_entry_is_refetched(published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path) -> None:
    server, manifest = published
    with open_http(server, tmp_path) as lora:
        lora.prefetch()
    victim = max(manifest.modules, key=lambda m: m.stored_size)
    path = tmp_path / "cache" / shard_key(victim.record)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with open_http(server, tmp_path) as lora:
        got = lora.load(modules=[victim.name])
        assert lora.fetched == 1
    reference = load_file(ATTN)
    assert all(torch.equal(t, reference[k]) for k, t in got.items())
    assert_cache_clean(tmp_path / "cache")


_CHILD = """
import sys, lorachunk
with lorachunk.open(sys.argv[1], cache=sys.argv[2], retries=5, backoff=0.01) as lora:
    print(len(lora.load()))
"""


def test_concurrent_processes_share_an_empty_cache(
    published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path
) -> None:
    server, manifest = published
    cache = tmp_path / "cache"
    children = [
        subprocess.Popen([sys.executable, "-c", _CHILD, server.url, str(cache)], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [child.communicate(timeout=120)[0].strip() for child in children]
    assert [child.returncode for child in children] == [0, 0, 0]
    assert outputs == [str(sum(len(m.tensors) for m in manifest.modules))] * 3
    assert_cache_clean(cache)
    assert lorachunk.Cache(cache).info().records == len({m.record for m in manifest.modules})


def test_cache_prune_is_lru(tmp_path: Path) -> None:
    cache = lorachunk.Cache(tmp_path / "c")
    blobs = [bytes([i]) * 1000 for i in range(5)]
    from lorachunk._digest import digest

    names = [digest("xxh3-128", b) for b in blobs]
    for i, (name, blob) in enumerate(zip(names, blobs, strict=True)):
        cache.put(name, blob)
        path = tmp_path / "c" / shard_key(name)
        import os

        os.utime(path, (1000 + i, 1000 + i))
    assert cache.get(names[0]) == blobs[0]  # a hit makes it the most recently used
    assert cache.prune(3000) == 2000
    assert [cache.contains(n) for n in names] == [True, False, False, True, True]
    with pytest.raises(lorachunk.IntegrityError):
        cache.put(names[1], b"not those bytes")
    assert not cache.contains(names[1])
    assert cache.clear() == 3000 and cache.info().bytes == 0


def test_local_folder_keeps_only_decoded_modules(tmp_path: Path) -> None:
    manifest = lorachunk.pack(ATTN, tmp_path / "s")
    reference = load_file(ATTN)
    cache = lorachunk.Cache(tmp_path / "cache")
    split = manifest.split("unet.down_blocks.0")
    with lorachunk.open(tmp_path / "s", cache=cache) as lora:
        lora.load(splits=[split.name])
    info = cache.info()
    assert (info.records, info.manifests, info.bundles) == (0, 0, 0)  # the folder is already local
    assert info.decoded == len({manifest.module(n).raw for n in split.modules})  # a partial load: per module
    with lorachunk.open(tmp_path / "s", cache=cache) as lora:
        cold = lora.load()
    assert cache.info().bundles == 1  # a full load: one file for the whole LoRA
    shutil.rmtree(tmp_path / "s" / "packs")  # a warm load needs no pack at all now
    with lorachunk.open(tmp_path / "s", cache=cache) as lora:
        warm = lora.load()
        assert set(lora.load(splits=[split.name])) == {t.key for n in split.modules for t in manifest.module(n).tensors}
        warm[next(iter(warm))].add_(1)  # tensors over the cache's map are private copies on write
    assert cache.verify() == []
    assert all(torch.equal(cold[k], reference[k]) for k in reference)
    assert list(warm) == list(reference)
    # a damaged bundle is detected module by module, dropped, and decoded again (which needs the shards)
    bundle = next((tmp_path / "cache" / "bundles").iterdir())
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 1
    bundle.write_bytes(bytes(data))
    with lorachunk.open(tmp_path / "s", cache=cache) as lora, pytest.raises(lorachunk.ObjectNotFoundError):
        lora.load()
    assert not bundle.exists()


def test_cache_verify_checks_bundles_against_their_manifest(tmp_path: Path) -> None:
    lorachunk.pack(ATTN, tmp_path / "s")
    cache = lorachunk.Cache(tmp_path / "cache")
    lorachunk.load(tmp_path / "s", cache=cache)
    assert cache.info().manifests == 1  # kept with the bundle, to check it by
    assert cache.verify() == []
    bundle = next((tmp_path / "cache" / "bundles").iterdir())
    data = bytearray(bundle.read_bytes())
    data[-1] ^= 1  # the last module's last byte: a partial load would never look there
    bundle.write_bytes(bytes(data))
    assert cache.verify() == [bundle]
    assert not bundle.exists()
    reference = load_file(ATTN)
    again = lorachunk.load(tmp_path / "s", cache=cache)  # decoded from the shards, bundle rebuilt
    assert all(torch.equal(again[k], reference[k]) for k in reference) and bundle.exists()


def test_interrupted_full_load_leaves_no_bundle(tmp_path: Path) -> None:
    lorachunk.pack(SAM, tmp_path / "s")
    cache = lorachunk.Cache(tmp_path / "cache")
    with lorachunk.open(tmp_path / "s", cache=cache) as lora:
        tensors = lora.iter_tensors()
        next(tensors)
        tensors.close()  # the caller stopped half way
    assert cache.info().bundles == 0
    assert not list((tmp_path / "cache" / "bundles").iterdir())  # no temp file either


@pytest.mark.parametrize("remote", [False, True], ids=["folder", "http"])
def test_a_cache_that_cannot_be_written_only_warns(remote: bool, served: FolderServer, tmp_path: Path) -> None:
    """A file where the cache folder should be fails every write, as a read-only or full disk
    does: loads still work, with one warning per cache, and the file is left as it was."""
    blocked = tmp_path / "cache"
    blocked.write_bytes(b"not a folder")
    source = served.root if remote else tmp_path / "s"
    lorachunk.pack(ATTN, source)
    expected = load_file(ATTN)
    with (
        pytest.warns(lorachunk.CacheWarning, match="cannot write to the cache") as record,
        lorachunk.open(served.url if remote else source, cache=blocked) as lora,
    ):
        split = lora.manifest.splits[0]
        part = lora.load(splits=[split.name])  # decoded modules (or shards) one by one
        full = lora.load()  # the bundle
        again = lora.load()
    assert len(record) == 1
    assert len(part) == sum(len(m.tensors) for m in lora.manifest.modules if m.name in split.modules) > 0
    for got in (full, again):
        assert list(got) == list(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert blocked.read_bytes() == b"not a folder"


def test_a_bundle_that_cannot_be_written_only_warns(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "bundles").write_bytes(b"")  # the one folder a full load writes into
    lorachunk.pack(SAM, tmp_path / "s")
    with (
        pytest.warns(lorachunk.CacheWarning, match="cannot write to the cache"),
        lorachunk.open(tmp_path / "s", cache=cache) as lora,
    ):
        got = lora.load()
    assert list(got) == list(load_file(SAM))
    assert lorachunk.Cache(cache).info().manifests == 1  # what could be written was
    assert not [p for p in cache.rglob(".*") if p.is_file()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="names open files through /proc")
def test_a_disk_that_fills_up_while_a_bundle_is_written_only_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bundle's file is made and sized, then writing into it fails, as on a full disk (which
    no test can fill on cue): the load still returns every tensor, and no temp file is left."""
    import errno

    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, handle: Any) -> None:
            self._handle = handle

        def __getattr__(self, name: str) -> Any:
            return getattr(self._handle, name)

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        handle = real_fdopen(fd, *args, **kwargs)
        return FullDisk(handle) if "/bundles/" in os.readlink(f"/proc/self/fd/{fd}") else handle

    lorachunk.pack(SAM, tmp_path / "s")
    monkeypatch.setattr(os, "fdopen", fdopen)
    with (
        pytest.warns(lorachunk.CacheWarning, match="No space left"),
        lorachunk.open(tmp_path / "s", cache=tmp_path / "cache") as lora,
    ):
        got = lora.load()
    assert list(got) == list(load_file(SAM))
    assert lorachunk.Cache(tmp_path / "cache").info().bundles == 0
    assert not [p for p in (tmp_path / "cache").rglob(".*") if p.is_file()]


def test_prefetch_into_a_cache_that_cannot_be_written_is_an_error(
    published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path
) -> None:
    """Filling the cache is prefetch's whole job, so there the failure is an error."""
    server, _ = published
    blocked = tmp_path / "blocked"
    blocked.write_bytes(b"")
    with (
        pytest.warns(lorachunk.CacheWarning),
        open_http(server, tmp_path, cache=blocked) as lora,
        pytest.raises(lorachunk.StoreError, match="cannot write to the cache"),
    ):
        lora.prefetch()


def test_a_cache_entry_that_cannot_be_removed_is_a_store_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tests run as root here, where no permission stops an unlink, so the refusal is simulated."""
    from lorachunk._cli import main

    cache = tmp_path / "cache"
    lorachunk.pack(SAM, tmp_path / "s")
    with lorachunk.open(tmp_path / "s", cache=cache) as lora:
        lora.load()

    def refuse(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", refuse)
    with pytest.raises(lorachunk.StoreError, match="cannot remove"):
        lorachunk.Cache(cache).clear()
    assert main(["cache", "prune", "--max-size", "0", "--cache-dir", str(cache)]) == 3
    assert "cannot remove" in capsys.readouterr().err
    with (
        pytest.warns(lorachunk.CacheWarning, match="cannot remove"),  # pruning after a load only warns
        lorachunk.open(tmp_path / "s", cache=lorachunk.Cache(cache, max_size=0)) as lora,
    ):
        assert len(lora.load()) == len(load_file(SAM))


def test_no_cache_option(tmp_path: Path) -> None:
    lorachunk.pack(SAM, tmp_path / "s")
    with lorachunk.open(tmp_path / "s", cache=False) as lora:
        assert lora.cache is None
        assert len(lora.load()) == len(load_file(SAM))
    assert not (tmp_path / "default-cache").exists()


def test_cache_size_cap_holds_after_a_load(published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path) -> None:
    server, manifest = published
    cap = manifest.stored_size // 3
    with pytest.raises(lorachunk.UsageError, match="0 or more"):
        lorachunk.Cache(tmp_path / "capped", max_size=-1)
    cache = lorachunk.Cache(tmp_path / "capped", max_size=cap)
    with lorachunk.open(server.url, cache=cache, retries=1) as lora:
        got = lora.load()
    assert len(got) == len(lora)
    assert 0 < cache.info().bytes <= cap


def test_a_local_folder_is_read_where_it_is(tmp_path: Path) -> None:
    """Issue #24 item 8: a load of a local folder with the default cache writes no decoded copy."""
    lorachunk.pack(SAM, tmp_path / "s")
    with lorachunk.open(tmp_path / "s") as lora:
        assert lora.cache is None
        assert len(lora.load()) == len(load_file(SAM))
    assert not (tmp_path / "default-cache").exists()
    with lorachunk.open(tmp_path / "s", cache=True) as lora:  # asked for: warm loads from decoded modules
        lora.load()
    assert lorachunk.Cache().info().bundles == 1


def test_the_cache_has_a_default_cap(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from lorachunk._cli import main

    assert lorachunk.Cache().max_size == 10 * 10**9
    monkeypatch.setenv("LORACHUNK_CACHE_MAX_SIZE", "2GiB")
    assert lorachunk.Cache().max_size == 2 * 2**30
    assert main(["cache", "info"]) == 0
    assert "cap 2.1 GB (LORACHUNK_CACHE_MAX_SIZE)" in capsys.readouterr().out
    monkeypatch.setenv("LORACHUNK_CACHE_MAX_SIZE", "none")
    assert lorachunk.Cache().max_size is None
    monkeypatch.setenv("LORACHUNK_CACHE_MAX_SIZE", "lots")
    with pytest.raises(lorachunk.UsageError, match="LORACHUNK_CACHE_MAX_SIZE"):
        lorachunk.Cache()
    assert lorachunk.Cache(max_size=5).max_size == 5


def test_cache_info_shows_decoded_loras(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lorachunk._cli import main

    lorachunk.pack(SAM, tmp_path / "s")
    lorachunk.load(tmp_path / "s", cache=True)
    assert main(["cache", "info"]) == 0
    assert "1 decoded LoRA" in capsys.readouterr().out


def test_a_pull_leaves_the_cache_alone(served: FolderServer, tmp_path: Path) -> None:
    lorachunk.pack(SAM, served.root)
    lorachunk.pull(served.url, tmp_path / "copy")
    info = lorachunk.Cache().info()  # the manifest (a few kB, for offline opens) only
    assert (info.records, info.decoded, info.bundles) == (0, 0, 0)
    assert lorachunk.verify(tmp_path / "copy").manifests == 1
