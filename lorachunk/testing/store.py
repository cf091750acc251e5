"""The contract every Store passes: subclass StoreTests and provide ``store`` (and, for a
read-only store, ``put``: how the test places objects behind it, e.g. in the served folder)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

import lorachunk
from lorachunk.storage import ByteRange, Store

Put = Callable[[str, bytes], None]


class StoreTests:
    @pytest.fixture
    def store(self) -> Store:
        raise NotImplementedError

    @pytest.fixture
    def put(self, store: Store) -> Put:
        return store.set

    def test_set_get(self, store: Store, put: Put) -> None:
        put("packs/ab/abcdef", b"hello world")
        assert store.get("packs/ab/abcdef") == b"hello world"
        assert store.exists("packs/ab/abcdef")

    def test_missing(self, store: Store) -> None:
        assert not store.exists("packs/00/none")
        with pytest.raises(lorachunk.ObjectNotFoundError) as caught:
            store.get("packs/00/none")
        assert isinstance(caught.value, FileNotFoundError)

    def test_byte_ranges(self, store: Store, put: Put) -> None:
        put("obj", bytes(range(100)))
        assert store.get("obj", ByteRange(10, 20)) == bytes(range(10, 20))
        assert store.get("obj", ByteRange(95)) == bytes(range(95, 100))
        assert store.get("obj", ByteRange(0, 0)) == b""
        assert store.get("obj", ByteRange(0)) == bytes(range(100))
        # Past the end, as a file read: what there is. Readers rely on it to bound what they take.
        assert store.get("obj", ByteRange(95, 200)) == bytes(range(95, 100))
        assert store.get("obj", ByteRange(100, 120)) == b""
        assert store.get("obj", ByteRange(150, 160)) == b""
        put("empty", b"")
        assert store.get("empty", ByteRange(0, 10)) == b""
        with pytest.raises(ValueError):
            ByteRange(5, 2)

    def test_overwrite_is_whole(self, store: Store, put: Put) -> None:
        put("refs/latest", b"first version, long")
        put("refs/latest", b"second")
        assert store.get("refs/latest") == b"second"

    def test_writes(self, store: Store) -> None:
        if not store.supports_writes:
            with pytest.raises(lorachunk.UsageError, match="read-only"):
                store.set("packs/aa/aa11", b"same")
            return
        for _ in range(3):
            store.set("packs/aa/aa11", b"same")
        assert store.get("packs/aa/aa11") == b"same"
        store.delete("packs/aa/aa11")
        store.delete("packs/aa/aa11")
        assert not store.exists("packs/aa/aa11")

    def test_batch_writes_are_there_after_it(self, store: Store) -> None:
        if not store.supports_writes:
            return
        with store.batch():
            store.set("packs/aa/aa1", b"one")
            store.set("packs/bb/bb2", b"two")
        assert store.get("packs/aa/aa1") == b"one"
        assert store.get("packs/bb/bb2") == b"two"

    def test_list_prefix(self, store: Store, put: Put) -> None:
        for key in ("packs/aa/aa1", "packs/bb/bb2", "manifests/m.json.zst"):
            put(key, b"1")
        if not store.supports_listing:
            with pytest.raises(lorachunk.UsageError):
                list(store.list_prefix("packs/"))
            return
        assert sorted(store.list_prefix("packs/")) == ["packs/aa/aa1", "packs/bb/bb2"]
        assert sorted(store.list_prefix("")) == ["manifests/m.json.zst", "packs/aa/aa1", "packs/bb/bb2"]
        assert list(store.list_prefix("nothing/")) == []

    @pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", "a/./b", "a\\b", "", "a/../../b"])
    def test_hostile_keys_refused(self, store: Store, key: str) -> None:
        with pytest.raises(lorachunk.UsageError):
            store.set(key, b"x")
        with pytest.raises(lorachunk.UsageError):
            store.get(key)
        with pytest.raises(lorachunk.UsageError):
            store.exists(key)

    def test_concurrent_access(self, store: Store, put: Put) -> None:
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                for j in range(10):
                    key = f"packs/cc/{i}-{j}"
                    put(key, bytes([i]) * 1000 * (j + 1))
                    assert store.get(key) == bytes([i]) * 1000 * (j + 1)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []

    def test_context_manager(self, store: Store, put: Put) -> None:
        put("k", b"v")
        with store as s:
            assert s.get("k") == b"v"
