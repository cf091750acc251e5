"""The committed store tests/data/store-v1 (format lorachunk/1) must stay readable forever."""

from __future__ import annotations

import hashlib
from pathlib import Path

from conftest import DATA

import lorachunk
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


def test_repacking_reproduces_store_v1(tmp_path: Path) -> None:
    """Packing is deterministic across versions too: same file and options, same bytes."""
    lorachunk.pack(SOURCE, tmp_path / "again", splits={"attn": ["*attn*"]})
    committed = {p.relative_to(STORE): p.read_bytes() for p in STORE.rglob("*") if p.is_file()}
    repacked = {
        p.relative_to(tmp_path / "again"): p.read_bytes() for p in (tmp_path / "again").rglob("*") if p.is_file()
    }
    assert committed == repacked
