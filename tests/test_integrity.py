"""Every flipped byte of a shard or manifest is caught and named; determinism and dedup."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
from conftest import DATA, flip_record, pack_files

import lorachunk
from lorachunk._cli import main
from lorachunk._keys import LATEST_MANIFEST
from lorachunk._repository import record_key
from lorachunk.testing import synth


@pytest.fixture
def tiny_store(tmp_path: Path) -> Path:
    src = synth.write(
        tmp_path / "tiny.safetensors",
        {
            "m1.lora_down.weight": ("F16", (2, 4), bytes(range(16))),
            "m1.lora_up.weight": ("F16", (4, 2), bytes(range(16, 32))),
            "m2.alpha": ("F32", (), b"\x00\x00\x80?"),
        },
        {"k": "v"},
    )
    lorachunk.pack(src, tmp_path / "store")
    return tmp_path / "store"


def _objects(store: Path) -> list[Path]:
    return sorted(p for p in store.rglob("*") if p.is_file() and "refs" not in p.parts)


def test_every_single_byte_flip_is_caught(tiny_store: Path) -> None:
    """Exhaustively: each byte of each shard and manifest, flipped, makes verify fail naming it."""
    for path in _objects(tiny_store):
        original = path.read_bytes()
        for i in range(len(original)):
            corrupt = bytearray(original)
            corrupt[i] ^= 0x01 << (i % 8)
            path.write_bytes(corrupt)
            with pytest.raises(lorachunk.IntegrityError) as caught:
                lorachunk.verify(tiny_store)
            assert path.name in str(caught.value), (path, i)
        path.write_bytes(original)
    lorachunk.verify(tiny_store)


def test_byte_flips_in_real_store_are_named(falcon: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    manifest = lorachunk.pack(falcon, store)
    rng = random.Random(7)
    victims = rng.sample([m for m in manifest.modules if m.stored_size], 3)
    for module in victims:
        flip_record(store, module, rng.randrange(module.stored_size))
    assert main(["verify", str(store)]) == 1
    err = capsys.readouterr().err
    # The pack no longer hashes to its name, and each damaged module is named.
    assert "4 problem(s)" in err and f"pack {record_key(victims[0])}: digest mismatch" in err
    for module in victims:
        assert repr(module.name) in err


def test_missing_pack_is_named(falcon: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    lorachunk.pack(falcon, store)
    (victim,) = pack_files(store)
    victim.unlink()
    with pytest.raises(lorachunk.IntegrityError, match=victim.name):
        lorachunk.verify(store)
    with pytest.raises(lorachunk.ObjectNotFoundError):
        lorachunk.unpack(store, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    assert not list(tmp_path.glob(".*tmp"))


def test_corrupt_record_never_reaches_the_output(falcon: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    manifest = lorachunk.pack(falcon, store)
    victim = manifest.modules[5]
    flip_record(store, victim, victim.stored_size - 1)
    with pytest.raises(lorachunk.IntegrityError, match=victim.name):
        lorachunk.unpack(store, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    assert main(["unpack", str(store), "-o", str(tmp_path / "o.safetensors"), "-q"]) == 1


def test_pack_is_deterministic(falcon: Path, tmp_path: Path) -> None:
    a = lorachunk.pack(falcon, tmp_path / "a")
    b = lorachunk.pack(falcon, tmp_path / "b")
    assert a == b and a.to_bytes() == b.to_bytes()
    files_a = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    files_b = {p.relative_to(tmp_path / "b"): p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()}
    # Every object, byte for byte; the catalog says when each LoRA was added, so it may not be.
    catalog = Path("refs/catalog.json.zst")
    assert files_a.pop(catalog) and files_b.pop(catalog)
    assert files_a == files_b


def test_sha256_stores_verify(falcon: Path, tmp_path: Path) -> None:
    manifest = lorachunk.pack(falcon, tmp_path / "s", hash="sha256")
    assert manifest.root.startswith("sha256:") and all(m.record.startswith("sha256:") for m in manifest.modules)
    assert lorachunk.unpack(tmp_path / "s", tmp_path / "o.safetensors").read_bytes() == falcon.read_bytes()


def test_shared_modules_are_stored_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two LoRAs sharing a text encoder: shared shards once, same split root, saving reported."""
    a = synth.kohya(tmp_path / "a.safetensors", seed=1)
    b_path = tmp_path / "b.safetensors"
    shutil.copy(a, b_path)
    other = synth.kohya(tmp_path / "other.safetensors", seed=2)
    # b = a's text encoder + other's UNet
    from safetensors.numpy import load_file, save_file

    mixed = {k: v for k, v in load_file(a).items() if k.startswith("lora_te")}
    mixed |= {k: v for k, v in load_file(other).items() if k.startswith("lora_unet")}
    save_file(mixed, b_path)
    store = tmp_path / "store"
    ma = lorachunk.pack(a, store)
    mb = lorachunk.pack(b_path, store)
    assert ma.split("text_encoder").root == mb.split("text_encoder").root
    assert ma.split("unet").root != mb.split("unet").root
    unique = {m.record: m.stored_size for m in (*ma.modules, *mb.modules)}
    assert len(unique) == len(ma.modules) + len(mb.modules) - len(ma.split("text_encoder").modules)
    # b's text encoder is named where a put it; only b's UNet went into a pack of its own.
    assert all(mb.module(n).pack == ma.module(n).pack for n in mb.split("text_encoder").modules)
    assert {mb.module(n).pack for n in mb.split("unet").modules}.isdisjoint(ma.packs)
    stored = pack_files(store)
    assert sum(p.stat().st_size for p in stored) == sum(unique.values())
    # the latest is b; a is still there by id
    assert lorachunk.read_manifest(LocalStore(store)).root == mb.root
    assert lorachunk.read_manifest(LocalStore(store), ma.id[9:20]).root == ma.root
    lorachunk.verify(store)
    assert main(["info", str(store)]) == 0
    assert "dedup saves" in capsys.readouterr().out


from lorachunk.storage import LocalStore  # noqa: E402


def test_a_manifest_is_parsed_once_but_always_checked(tmp_path: Path) -> None:
    """Parsed manifests are remembered by id; the bytes are still checked against the id each time."""
    from lorachunk._keys import manifest_key

    store = lorachunk.storage.LocalStore(tmp_path / "s")
    manifest = lorachunk.pack(DATA / "loras" / "sam_lora_rank16.safetensors", store)
    assert store.get(LATEST_MANIFEST) == manifest.to_bytes()
    first, second = lorachunk.read_manifest(store), lorachunk.read_manifest(store)
    assert first is second and first.id == manifest.id
    stored = bytearray(store.get(manifest_key(manifest.id)))
    stored[-1] ^= 1
    store.set(manifest_key(manifest.id), bytes(stored))
    with pytest.raises(lorachunk.IntegrityError):
        lorachunk.read_manifest(store, manifest.id)
    # The latest's copy has no name to check against; its bytes are parsed afresh, never taken
    # for the remembered manifest.
    store.set(LATEST_MANIFEST, bytes(stored))
    with pytest.raises((lorachunk.IntegrityError, lorachunk.ManifestError)):
        lorachunk.read_manifest(store)


def test_verify_names_a_latest_copy_that_is_not_the_latest(tmp_path: Path) -> None:
    store = lorachunk.storage.LocalStore(tmp_path / "s")
    first = lorachunk.pack(DATA / "loras" / "sam_lora_rank16.safetensors", store)
    lorachunk.pack(DATA / "loras" / "peft_sd15_text_encoder.safetensors", store)
    assert lorachunk.verify(store).manifests == 2
    store.set(LATEST_MANIFEST, first.to_bytes())  # a valid manifest, but not the one refs/latest names
    with pytest.raises(lorachunk.IntegrityError, match=r"refs/latest\.json\.zst is not the manifest refs/latest names"):
        lorachunk.verify(store)


def test_chunked_encoding_stores_each_shard_once_and_reports_every_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pack hands modules to its threads in chunks; with chunks made tiny, duplicates that straddle
    them are still stored once and progress sees every module."""
    from lorachunk import _threads
    from lorachunk.storage import MemoryStore

    monkeypatch.setattr(_threads, "CHUNK_BYTES", 40)  # modules per encoding task
    same = ("F16", (2, 4), bytes(range(16)))
    tensors = {f"m{i}.lora_down.weight": same if i % 3 == 0 else ("F16", (2, 4), bytes([i]) * 16) for i in range(12)}
    src = synth.write(tmp_path / "dups.safetensors", tensors, None)

    class Counting(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.sets: list[str] = []

        def set(self, key: str, value: bytes) -> None:
            self.sets.append(key)
            super().set(key, value)

    store = Counting()
    seen: list[tuple[int, int]] = []
    manifest = lorachunk.pack(src, store, progress=lambda done, total: seen.append((done, total)))
    (pack,) = [key for key in store.sets if key.startswith("packs/")]
    unique = {m.record: m.stored_size for m in manifest.modules}
    assert len(unique) == 12 - 3 and len(store.get(pack)) == sum(unique.values())
    # the duplicates name one record: the same place in the pack
    assert len({(m.pack, m.offset) for m in manifest.modules}) == len(unique)
    assert len(seen) == 12 and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert seen[-1][0] == seen[-1][1] == sum(m.raw_size for m in manifest.modules)
    lorachunk.unpack(store, tmp_path / "back.safetensors")
    assert (tmp_path / "back.safetensors").read_bytes() == src.read_bytes()
