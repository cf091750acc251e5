"""The committed store tests/data/store-v1 (format lorachunk/1) must stay readable forever."""

from __future__ import annotations

import hashlib
from pathlib import Path

from conftest import DATA

import lorachunk
from lorachunk._codec import codec_from_config
from lorachunk._repository import decode_module, read_shard
from lorachunk.storage import LocalStore

STORE = DATA / "store-v1"
SOURCE = DATA / "loras" / "smart_falcon_4_lokr.safetensors"
# Pinned when the store was committed; a change here is a format break.
ROOT = "xxh3-128:38d85530bd907c0d36ef08e6d5a7e97b"


def test_store_v1_verifies_and_unpacks(tmp_path: Path) -> None:
    manifest = lorachunk.read_manifest(LocalStore(STORE))
    assert manifest.format == "lorachunk/1"
    assert manifest.root == ROOT
    assert lorachunk.verify(STORE).shards == 350
    out = lorachunk.unpack(STORE, tmp_path / "whole.safetensors")
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(SOURCE.read_bytes()).hexdigest()
    part = lorachunk.unpack(STORE, tmp_path / "attn.safetensors", splits=["attn"])
    assert part.stat().st_size < out.stat().st_size


def test_recorded_codec_reproduces_store_v1_shards() -> None:
    """A manifest's codec config pins the encoder: this version, given store-v1's config, writes
    store-v1's shards byte for byte (so repacking with old settings deduplicates against them)."""
    store = LocalStore(STORE)
    manifest = lorachunk.read_manifest(store)
    codec = codec_from_config(manifest.codec)
    for module in manifest.modules:
        stored, frames = codec.encode(memoryview(decode_module(store, manifest, module)), module.segments)
        assert stored == read_shard(store, module), module.name
        assert frames == module.frames
