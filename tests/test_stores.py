from __future__ import annotations

import errno
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DATA, s3_options

import lorachunk
from lorachunk.storage import ByteRange, FsspecStore, HTTPStore, LocalStore, MemoryStore, Store, open_store
from lorachunk.storage import _local as local_module
from lorachunk.testing import Put, StoreTests
from lorachunk.testing.http_server import FolderServer

NEEDS_SYNCFS = pytest.mark.skipif(
    local_module._syncfs() is None, reason="LocalStore batches writes only where syncfs exists (Linux)"
)


class TestMemoryStore(StoreTests):
    @pytest.fixture
    def store(self) -> Store:
        return MemoryStore()


class TestLocalStore(StoreTests):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Store:
        return LocalStore(tmp_path / "store")

    def test_no_temp_files_left(self, store: Store, tmp_path: Path) -> None:
        store.set("shards/aa/x", b"1" * 100_000)
        assert [p.name for p in (tmp_path / "store").rglob("*") if p.is_file()] == ["x"]

    @NEEDS_SYNCFS
    def test_batch_shows_its_writes_only_at_its_end(self, store: Store, tmp_path: Path) -> None:
        with store.batch():
            store.set("shards/aa/x", b"1" * 10)
            store.set("shards/bb/y", b"2" * 100_000)  # large: flushed at once, still hidden
            assert not store.exists("shards/aa/x") and not store.exists("shards/bb/y")
            assert list(store.list_prefix("shards/")) == []
        assert store.get("shards/aa/x") == b"1" * 10 and store.get("shards/bb/y") == b"2" * 100_000
        assert sorted(p.name for p in (tmp_path / "store").rglob("*") if p.is_file()) == ["x", "y"]

    @NEEDS_SYNCFS
    def test_failed_batch_leaves_nothing(self, store: Store, tmp_path: Path) -> None:
        store.set("shards/aa/old", b"kept")
        with pytest.raises(RuntimeError), store.batch():
            store.set("shards/aa/x", b"1")
            raise RuntimeError("the caller fails half-way")
        assert [p.name for p in (tmp_path / "store").rglob("*") if p.is_file()] == ["old"]

    def test_failed_flush_is_a_store_error_and_leaves_nothing(
        self, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An I/O error when the batch is flushed (a fault no real disk gives on cue)."""

        def failing(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(local_module, "_syncfs", lambda: failing)
        with pytest.raises(lorachunk.StoreError, match="Input/output error"), store.batch():
            store.set("shards/aa/x", b"1")
        assert not [p for p in (tmp_path / "store").rglob("*") if p.is_file()]

    def test_delete_prunes_empty_fanout(self, store: Store, tmp_path: Path) -> None:
        store.set("shards/aa/x", b"1")
        store.delete("shards/aa/x")
        assert not (tmp_path / "store" / "shards").exists()
        assert (tmp_path / "store").exists()


class TestHTTPStore(StoreTests):
    """A real server on 127.0.0.1; objects are placed in the folder it serves."""

    @pytest.fixture
    def store(self, served: FolderServer) -> Iterator[Store]:
        with HTTPStore(served.url, retries=1, backoff=0.01) as store:
            yield store

    @pytest.fixture
    def put(self, served: FolderServer) -> Put:
        return LocalStore(served.root).set

    @pytest.mark.parametrize("fault", ["drop", "ignore_range"])
    def test_ranged_get_survives_a_drop(self, store: Store, put: Put, served: FolderServer, fault: str) -> None:
        data = bytes(range(256)) * 400
        put("obj", data)
        served.inject("/obj", "drop")
        if fault == "ignore_range":
            served.inject("/obj", "ignore_range")  # the resume is answered with the whole object
        assert store.get("obj", ByteRange(1000, 90_000)) == data[1000:90_000]
        ranges = [r.range for r in served.gets("/obj")]
        assert ranges[0] == "bytes=1000-89999" and ranges[1] is not None and ranges[1].endswith("-89999")
        assert ranges[1] != ranges[0]  # resumed, not restarted


class TestFsspecMemory(StoreTests):
    @pytest.fixture
    def store(self) -> Store:
        return FsspecStore(f"memory://lorachunk-tests/{uuid.uuid4().hex}")


class TestFsspecLocal(StoreTests):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Store:
        return FsspecStore(f"file://{tmp_path}/store")


class TestFsspecS3(StoreTests):
    """s3fs against moto's S3 server on 127.0.0.1."""

    @pytest.fixture
    def store(self, s3_endpoint: str) -> Store:
        return FsspecStore(f"s3://lorachunk/{uuid.uuid4().hex}", storage_options=s3_options(s3_endpoint))


def test_pack_into_memory_store(tmp_path: Path) -> None:
    store = MemoryStore()
    manifest = lorachunk.pack(DATA / "loras" / "sam_lora_rank16.safetensors", store)
    assert lorachunk.verify(store).shards == len(manifest.modules)
    out = lorachunk.unpack(store, tmp_path / "o.safetensors")
    assert out.read_bytes() == (DATA / "loras" / "sam_lora_rank16.safetensors").read_bytes()


def test_open_store_dispatch(tmp_path: Path) -> None:
    assert isinstance(open_store(tmp_path / "x"), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}/x"), LocalStore)
    assert isinstance(open_store("https://example.org/lora"), HTTPStore)
    assert isinstance(open_store("memory://somewhere"), FsspecStore)
    memory = MemoryStore()
    assert open_store(memory) is memory
    with pytest.raises(lorachunk.UsageError, match="is a file"):
        lorachunk.open(DATA / "loras" / "sam_lora_rank16.safetensors")
    with pytest.raises(lorachunk.UsageError, match="fsspec"):
        open_store("nosuchscheme://x")


def test_open_store_pool_sizes_http_and_the_callers_concurrency_wins() -> None:
    with pytest.raises(lorachunk.UsageError, match="concurrency"):
        open_store("https://example.org/lora", pool=0)  # pool reaches the store
    with pytest.raises(lorachunk.UsageError, match="concurrency"):
        open_store("https://example.org/lora", pool=4, concurrency=0)  # and concurrency= overrides it
    open_store("https://example.org/lora", pool=4, concurrency=2).close()
    bad_values: list[dict[str, Any]] = [
        {"timeout": 0},
        {"timeout": float("nan")},
        {"timeout": float("inf")},
        {"retries": -1},
        {"min_rate": 0},
        {"min_rate": float("inf")},
    ]
    for bad in bad_values:
        with pytest.raises(lorachunk.UsageError, match="finite and > 0"):
            open_store("https://example.org/lora", **bad)


def test_credentials_in_an_fsspec_url_are_never_shown() -> None:
    store = open_store("memory://me:pa55word@bucket/lora")
    with pytest.raises(lorachunk.ShardNotFoundError) as caught:
        store.get("refs/latest")
    assert "pa55word" not in repr(store) + str(caught.value)
    assert "memory://***@bucket/lora/refs/latest" in str(caught.value)


def test_open_refuses_zero_concurrency_instead_of_taking_the_default(tmp_path: Path) -> None:
    lorachunk.pack(DATA / "loras" / "sam_lora_rank16.safetensors", tmp_path / "s")
    with pytest.raises(lorachunk.UsageError, match="at least 1, got 0"):
        lorachunk.open(tmp_path / "s", concurrency=0)
