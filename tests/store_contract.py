"""The contract every Store passes: subclass StoreTests and provide ``store``."""

from __future__ import annotations

import threading

import pytest

import lorachunk
from lorachunk.storage import ByteRange, Store


class StoreTests:
    @pytest.fixture
    def store(self) -> Store:
        raise NotImplementedError

    def test_set_get(self, store: Store) -> None:
        store.set("shards/ab/abcdef", b"hello world")
        assert store.get("shards/ab/abcdef") == b"hello world"
        assert store.exists("shards/ab/abcdef")

    def test_missing(self, store: Store) -> None:
        assert not store.exists("shards/00/none")
        with pytest.raises(lorachunk.ShardNotFoundError) as caught:
            store.get("shards/00/none")
        assert isinstance(caught.value, FileNotFoundError)

    def test_byte_ranges(self, store: Store) -> None:
        store.set("obj", bytes(range(100)))
        assert store.get("obj", ByteRange(10, 20)) == bytes(range(10, 20))
        assert store.get("obj", ByteRange(95)) == bytes(range(95, 100))
        assert store.get("obj", ByteRange(0, 0)) == b""
        with pytest.raises(ValueError):
            ByteRange(5, 2)

    def test_overwrite_is_whole(self, store: Store) -> None:
        store.set("refs/latest", b"first version, long")
        store.set("refs/latest", b"second")
        assert store.get("refs/latest") == b"second"

    def test_idempotent_content_addressed_set(self, store: Store) -> None:
        for _ in range(3):
            store.set("shards/aa/aa11", b"same")
        assert list(store.list_prefix("shards/")) == ["shards/aa/aa11"]

    def test_delete(self, store: Store) -> None:
        store.set("a/b", b"x")
        store.delete("a/b")
        store.delete("a/b")
        assert not store.exists("a/b")

    def test_list_prefix(self, store: Store) -> None:
        for key in ("shards/aa/aa1", "shards/bb/bb2", "manifests/m.json.zst"):
            store.set(key, b"1")
        assert sorted(store.list_prefix("shards/")) == ["shards/aa/aa1", "shards/bb/bb2"]
        assert sorted(store.list_prefix("")) == ["manifests/m.json.zst", "shards/aa/aa1", "shards/bb/bb2"]
        assert list(store.list_prefix("nothing/")) == []

    @pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", "a/./b", "a\\b", "", "a/../../b"])
    def test_hostile_keys_refused(self, store: Store, key: str) -> None:
        with pytest.raises(lorachunk.UsageError):
            store.set(key, b"x")
        with pytest.raises(lorachunk.UsageError):
            store.get(key)

    def test_concurrent_writers(self, store: Store) -> None:
        def write(i: int) -> None:
            for j in range(20):
                store.set(f"shards/cc/{j}", b"v" * 1000)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(store.get(f"shards/cc/{j}") == b"v" * 1000 for j in range(20))

    def test_context_manager(self, store: Store) -> None:
        with store as s:
            s.set("k", b"v")
        assert store.get("k") == b"v"
