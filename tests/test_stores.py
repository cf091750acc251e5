from __future__ import annotations

from pathlib import Path

import pytest
from store_contract import StoreTests

from lorachunk.storage import LocalStore, MemoryStore, Store


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

    def test_delete_prunes_empty_fanout(self, store: Store, tmp_path: Path) -> None:
        store.set("shards/aa/x", b"1")
        store.delete("shards/aa/x")
        assert not (tmp_path / "store" / "shards").exists()
        assert (tmp_path / "store").exists()


def test_pack_into_memory_store(tmp_path: Path) -> None:
    from conftest import DATA

    import lorachunk

    store = MemoryStore()
    manifest = lorachunk.pack(DATA / "loras" / "sam_lora_rank16.safetensors", store)
    assert lorachunk.verify(store).shards == len(manifest.modules)
    out = lorachunk.unpack(store, tmp_path / "o.safetensors")
    assert out.read_bytes() == (DATA / "loras" / "sam_lora_rank16.safetensors").read_bytes()
