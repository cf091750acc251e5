"""Every store passes one contract (lorachunk.testing.StoreTests); HTTP on a bad link; fsspec and S3 sources."""

from __future__ import annotations

import errno
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ATTN, DATA, DISNEY, SAM, assert_cache_clean, open_http, s3_options
from safetensors.torch import load_file

import lorachunk
from lorachunk._keys import LATEST, LATEST_MANIFEST, MAX_STORED_MANIFEST_BYTES, manifest_key, shard_key
from lorachunk._repository import record_key
from lorachunk.storage import ByteRange, FsspecStore, HTTPStore, LocalStore, MemoryStore, Store, open_store
from lorachunk.storage import _http as http_module
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
    assert lorachunk.verify(store).records == len(manifest.modules)
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
    with pytest.raises(lorachunk.ObjectNotFoundError) as caught:
        store.get("refs/latest")
    assert "pa55word" not in repr(store) + str(caught.value)
    assert "memory://***@bucket/lora/refs/latest" in str(caught.value)


def test_open_refuses_zero_concurrency_instead_of_taking_the_default(tmp_path: Path) -> None:
    lorachunk.pack(DATA / "loras" / "sam_lora_rank16.safetensors", tmp_path / "s")
    with pytest.raises(lorachunk.UsageError, match="at least 1, got 0"):
        lorachunk.open(tmp_path / "s", concurrency=0)


# -- HTTP on a bad link: faults a constrained link or a broken server produces; each ends in
# correct tensors or one clear error -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["drop", "reset", "ignore_range", "status"])
def test_recoverable_faults(kind: str, published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path) -> None:
    server, manifest = published
    victim = max(manifest.modules, key=lambda m: m.stored_size)
    if kind == "ignore_range":
        server.inject(f"/{record_key(victim)}", "drop", times=1)  # so a resume is attempted
    server.inject(f"/{record_key(victim)}", kind, times=2, retry_after="0")
    with open_http(server, tmp_path) as lora:
        got = lora.load(modules=[victim.name])
    reference = load_file(ATTN)
    assert all(torch.equal(t, reference[k]) for k, t in got.items())
    requests = [r for r in server.gets() if r.path == f"/{record_key(victim)}"]
    assert len(requests) >= 2
    # one module of a pack over 2 MiB: only its record's bytes are asked for (the last is inclusive)
    start, end = victim.offset, victim.offset + victim.stored_size
    assert requests[0].range == f"bytes={start}-{end - 1}"
    if kind in ("drop", "ignore_range"):
        # the second attempt asked to resume where the first broke off instead of starting over
        assert requests[1].range == f"bytes={start + requests[0].sent}-{end - 1}"
    assert_cache_clean(tmp_path / "cache")


def test_429_storm_gives_up_with_a_clear_error(
    published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path
) -> None:
    server, manifest = published
    victim = manifest.modules[0]
    server.inject(f"/{record_key(victim)}", "status", status=429, retry_after="0", times=None)
    with open_http(server, tmp_path, retries=2) as lora, pytest.raises(lorachunk.StoreUnavailableError) as caught:
        lora.load(modules=[victim.name])
    message = str(caught.value)
    assert record_key(victim) in message and victim.name in message and server.url in message
    assert "429" in message
    assert len([r for r in server.gets() if r.path == f"/{record_key(victim)}"]) == 3
    assert not (tmp_path / "cache" / shard_key(victim.record)).exists()


def test_retry_after_is_honoured(
    published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, manifest = published
    victim = manifest.modules[0]
    server.inject(f"/{record_key(victim)}", "status", status=503, retry_after="1", times=1)
    clock = _Clock(monkeypatch)
    with open_http(server, tmp_path) as lora:
        lora.load(modules=[victim.name])
    assert 1.0 in clock.sleeps  # the server's wait, not the 0.01 s backoff


@pytest.mark.parametrize(
    ("kind", "error", "match"),
    [
        ("corrupt", lorachunk.IntegrityError, "digest mismatch"),
        ("bad_range", lorachunk.StoreError, "Content-Range"),
    ],
)
def test_unrecoverable_faults(
    kind: str,
    error: type[Exception],
    match: str,
    published: tuple[FolderServer, lorachunk.Manifest],
    tmp_path: Path,
) -> None:
    server, manifest = published
    victim = max(manifest.modules, key=lambda m: m.stored_size)
    if kind == "bad_range":
        server.inject(f"/{record_key(victim)}", "drop", times=1)  # so the retry sends a Range
    server.inject(f"/{record_key(victim)}", kind, times=None)
    # The corrupt fault flips the object's first byte: the record at offset 0 of its pack.
    victim = (
        next(m for m in manifest.modules if m.pack == victim.pack and m.offset == 0) if kind == "corrupt" else victim
    )
    with open_http(server, tmp_path) as lora, pytest.raises(error, match=match) as caught:
        lora.load(modules=[victim.name])
    assert record_key(victim) in str(caught.value) and victim.name in str(caught.value)
    assert not (tmp_path / "cache" / shard_key(victim.record)).exists()
    assert_cache_clean(tmp_path / "cache")


_SLACK = 32 * 1024 * 1024


def test_endless_shard_is_refused_after_its_declared_size(
    published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path
) -> None:
    server, manifest = published
    victim = manifest.modules[0]
    server.inject(f"/{record_key(victim)}", "endless", times=None)
    with open_http(server, tmp_path) as lora, pytest.raises(lorachunk.IntegrityError) as caught:
        lora.load(modules=[victim.name])
    message = str(caught.value)
    # A 200 of zeros for a range: the record's bytes are read off it and refused, and no more.
    assert "digest mismatch" in message and victim.name in message
    assert all(r.sent < _SLACK for r in server.gets("/packs/"))  # it stopped reading; the server gave up
    assert_cache_clean(tmp_path / "cache")


@pytest.mark.parametrize(
    ("endless", "missing", "match"),
    [
        (LATEST_MANIFEST, None, "byte limit for a stored manifest"),
        (LATEST, LATEST_MANIFEST, "not a manifest id"),
    ],
)
def test_endless_manifest_or_ref_is_refused_at_its_limit(
    endless: str, missing: str | None, match: str, published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path
) -> None:
    server, _ = published
    if missing is not None:
        (server.root / missing).unlink()
    server.inject(f"/{endless}", "endless", times=None)
    with pytest.raises(lorachunk.ManifestError, match=match):
        open_http(server, tmp_path)
    (request,) = [r for r in server.gets() if r.path == f"/{endless}"]
    assert request.sent < MAX_STORED_MANIFEST_BYTES + _SLACK


def test_missing_shard(published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path) -> None:
    server, manifest = published
    victim = manifest.modules[3]
    (server.root / record_key(victim)).unlink()
    with open_http(server, tmp_path) as lora, pytest.raises(lorachunk.ObjectNotFoundError) as caught:
        lora.load(modules=[victim.name])
    assert record_key(victim) in str(caught.value) and victim.name in str(caught.value)
    assert_cache_clean(tmp_path / "cache")


def test_stall_ends_at_the_timeout(published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path) -> None:
    server, manifest = published
    victim = manifest.modules[0]
    server.inject(f"/{record_key(victim)}", "stall", seconds=3.0, times=None)
    # Without the timeout the load would succeed after 3 s; with it, the error is the proof.
    with (
        open_http(server, tmp_path, timeout=0.3, retries=1) as lora,
        pytest.raises(lorachunk.StoreUnavailableError, match="Timeout"),
    ):
        lora.load(modules=[victim.name])


def test_auth_headers_are_sent_and_never_shown(
    published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path
) -> None:
    server, _ = published
    server.required_header = ("Authorization", "Bearer s3cret-token")
    with pytest.raises(lorachunk.StoreError) as caught:
        open_http(server, tmp_path)
    assert "401" in str(caught.value) and "s3cret" not in str(caught.value)
    with open_http(server, tmp_path, headers={"Authorization": "Bearer s3cret-token"}) as lora:
        assert len(lora.load()) == len(lora)


def test_a_signed_url_query_goes_on_every_object_and_is_never_shown(
    published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path
) -> None:
    server, manifest = published
    server.required_query = "sig=s3cret&exp=9"
    with pytest.raises(lorachunk.AuthenticationError) as caught:
        lorachunk.open(server.url + "/?sig=wrong", cache=False, retries=0)
    assert "403" in str(caught.value) and "wrong" not in str(caught.value)
    with lorachunk.open(server.url + "/?sig=s3cret&exp=9", cache=False) as lora:
        assert len(lora.load()) == len(lora)
        assert "s3cret" not in repr(lora.store) and "…" in repr(lora.store)
    assert {r.path.partition("?")[2] for r in server.gets()} == {"sig=wrong", "sig=s3cret&exp=9"}
    assert len(server.gets("/packs/")) == len(manifest.packs)


def test_user_info_in_a_url_is_never_shown(tmp_path: Path) -> None:
    store = open_store("http://me:pa55word@127.0.0.1:9/lora", retries=0, timeout=1)
    assert "pa55word" not in repr(store) and "me:" not in repr(store)
    with pytest.raises(lorachunk.StoreUnavailableError) as caught:
        store.get("refs/latest")
    assert "pa55word" not in str(caught.value) and "***@127.0.0.1:9/lora/refs/latest" in str(caught.value)


def test_rate_cap(
    published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cap holds: the store waits for every byte past one second's burst (on a clock that only
    its waits advance, so how fast the machine is does not matter)."""
    server, manifest = published
    clock = _Clock(monkeypatch)
    with open_http(server, tmp_path, max_bytes_per_s=2_000_000) as lora:
        report = lora.prefetch()
    assert report.fetched_bytes == sum(m.stored_size for m in manifest.modules)
    assert sum(clock.sleeps) >= (report.fetched_bytes - 2_000_000) / 2_000_000


class _Clock:
    """The HTTP store's clock, replaced: ``sleep`` records its argument and advances ``monotonic``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self._lock = threading.Lock()
        monkeypatch.setattr(http_module, "time", self)

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self.now += seconds


def test_manifest_keeps_the_id_it_was_stored_under(served: FolderServer, tmp_path: Path) -> None:
    """A manifest compressed by another writer (here zstd -3, not -19) is the same manifest: its id
    is the digest of the bytes in the store, through open, the cache and pull."""
    import zstandard

    from lorachunk._digest import digest

    original = lorachunk.pack(SAM, served.root)
    (served.root / manifest_key(original.id)).unlink()
    other = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(original.canonical())
    other_id = digest(original.hash, other)
    assert other_id != original.id
    (served.root / manifest_key(other_id)).parent.mkdir(exist_ok=True)
    (served.root / manifest_key(other_id)).write_bytes(other)
    (served.root / LATEST).write_text(f"{other_id}\n")
    (served.root / LATEST_MANIFEST).write_bytes(other)
    with open_http(served, tmp_path) as lora:
        assert lora.manifest.id == other_id and lora.manifest.to_bytes() == other
    assert (tmp_path / "cache" / "manifests" / f"{other_id[9:]}.json.zst").read_bytes() == other
    lorachunk.pull(served.url, tmp_path / "copy", cache=False, retries=1)
    assert (tmp_path / "copy" / manifest_key(other_id)).read_bytes() == other
    assert lorachunk.verify(tmp_path / "copy").records == len(original.modules)


def test_retry_after_forms() -> None:
    import email.utils

    from lorachunk.storage._http import _retry_after

    assert _retry_after("7") == 7.0
    assert _retry_after(None) is None and _retry_after("soon") is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= (_retry_after(later) or 0) <= 31
    assert _retry_after(email.utils.formatdate(time.time() - 60, usegmt=True)) == 0.0


def test_s3_source_end_to_end(s3_endpoint: str, tmp_path: Path) -> None:
    import uuid

    url = f"s3://lorachunk/{uuid.uuid4().hex}"
    store = lorachunk.storage.FsspecStore(url, storage_options=s3_options(s3_endpoint))
    manifest = lorachunk.pack(SAM, store)
    reference = load_file(SAM)
    with lorachunk.open(url, cache=tmp_path / "cache", storage_options=s3_options(s3_endpoint)) as lora:
        assert lora.root == manifest.root
        got = lora.load()
    assert all(torch.equal(got[k], reference[k]) for k in reference)
    assert lorachunk.Cache(tmp_path / "cache").info().records == len(manifest.modules)


def test_memory_fsspec_source(tmp_path: Path) -> None:
    import uuid

    url = f"memory://lorachunk-tests/{uuid.uuid4().hex}"
    lorachunk.pack(DISNEY, lorachunk.storage.FsspecStore(url))
    got = lorachunk.load(url, cache=False, splits=["unet"])
    reference = load_file(DISNEY)
    assert got and all(torch.equal(t, reference[k]) for k, t in got.items())
