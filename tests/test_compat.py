"""The committed store tests/data/store-v1 (format lorachunk/1) must stay readable forever."""

from __future__ import annotations

import hashlib
from pathlib import Path

from conftest import DATA

import lorachunk
from lorachunk._codec import codec_from_config
from lorachunk._repository import canonical_key, decode_module, read_record
from lorachunk.storage import LocalStore

STORE = DATA / "store-v1"
SOURCE = DATA / "loras" / "smart_falcon_4_lokr.safetensors"
# Pinned when the store was committed; a change here is a format break.
ROOT = "xxh3-128:38d85530bd907c0d36ef08e6d5a7e97b"


def test_store_v1_verifies_and_unpacks(tmp_path: Path) -> None:
    manifest = lorachunk.read_manifest(LocalStore(STORE))
    assert manifest.format == "lorachunk/1"
    assert manifest.root == ROOT
    assert lorachunk.verify(STORE).records == 350
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
        assert stored == read_record(store, module), module.name
        assert frames == module.frames


STORE_V2 = DATA / "store-v2"
# Pinned when the store was committed; a change here is a format break. The same LoRA as
# store-v1, so its root is the content root store-v1's manifest also proves.
ROOT_V2 = "xxh3-128:4a7a977c3fa09db66d719bc42d28ab23"
MANIFEST_V2 = "xxh3-128:4bec3ef412a7d35fab21aa85ded1e631"


def test_store_v2_verifies_and_unpacks(tmp_path: Path) -> None:
    manifest = lorachunk.read_manifest(LocalStore(STORE_V2))
    assert (manifest.format, manifest.root, manifest.id, len(manifest.packs)) == (
        "lorachunk/2",
        ROOT_V2,
        MANIFEST_V2,
        1,
    )
    assert lorachunk.verify(STORE_V2).records == 350
    out = lorachunk.unpack(STORE_V2, tmp_path / "whole.safetensors")
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(SOURCE.read_bytes()).hexdigest()
    with lorachunk.open(STORE_V2, root=ROOT_V2, cache=False) as lora:
        assert lora.load(splits=["attn"]).keys() == lorachunk.load(STORE, splits=["attn"], cache=False).keys()


def test_one_lora_has_one_content_root_in_both_formats() -> None:
    """store-v1 answers to the root this version gives the same file, so a root pinned from
    either store opens the other."""
    v1 = lorachunk.read_manifest(LocalStore(STORE))
    assert ROOT_V2 in v1.roots and v1.root == ROOT
    with lorachunk.open(STORE, root=ROOT_V2, cache=False) as lora:
        assert lora.manifest.format == "lorachunk/1"


def test_this_version_packs_store_v2_byte_for_byte(tmp_path: Path) -> None:
    manifest = lorachunk.pack(SOURCE, tmp_path / "again", splits={"attn": ["*attn*"]})
    assert manifest.id == MANIFEST_V2
    # store-v2 was written by 0.2, whose folders were flat: the same objects, fanned out now.
    same = {
        canonical_key(p.relative_to(STORE_V2).as_posix()): p.read_bytes() for p in STORE_V2.rglob("*") if p.is_file()
    }
    again = tmp_path / "again"
    written = {p.relative_to(again).as_posix(): p.read_bytes() for p in again.rglob("*") if p.is_file()}
    assert written.pop("refs/catalog.json.zst")  # new in 0.3: the store's names
    assert written.pop("locks/.serial") == b""  # and the file its writers' mutex is held on
    assert written == same


def test_a_store_of_0_2_is_read_flat_and_repack_fans_it_out(tmp_path: Path) -> None:
    """Issue #25 item 5: stores written before the fanned-out layout keep being read (over HTTP
    too, at one extra request per store), and repack moves their objects."""
    import shutil

    from lorachunk.testing.http_server import serve

    shutil.copytree(STORE_V2, tmp_path / "www" / "v2")
    with serve(tmp_path / "www") as server:
        got = lorachunk.load(f"{server.url}/v2", manifest=MANIFEST_V2, cache=False)
        assert len(got) == 1750
        misses = [r for r in server.log if r.path.startswith(("/packs/", "/manifests/")) and r.sent == 0]
        assert len(misses) <= 2  # the fanned-out key tried once, then the flat one first
    store = tmp_path / "www" / "v2"
    report = lorachunk.repack(store)
    assert report.moved == 2 and report.rewritten == 0
    assert all(len(p.relative_to(store).parts) == 3 for p in store.glob("packs/**/*") if p.is_file())
    assert lorachunk.verify(store).records == 350
    assert lorachunk.read_manifest(store).id == MANIFEST_V2
