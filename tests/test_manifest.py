"""Hostile and malformed manifests are refused with ManifestError/IntegrityError before allocation."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import DATA

import lorachunk
from lorachunk._manifest import MAX_MANIFEST_BYTES, Manifest, canonical_json
from lorachunk._merkle import merkle_root


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return lorachunk.pack(DATA / "loras" / "smart_falcon_4_lokr.safetensors", tmp_path_factory.mktemp("s")).canonical()


@pytest.fixture
def manifest_json(packed: bytes) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(packed)
    return result


def _load(raw: dict[str, Any]) -> Manifest:
    return Manifest.from_bytes(zstandard.ZstdCompressor().compress(canonical_json(raw)))


def test_manifest_roundtrips(manifest_json: dict[str, Any]) -> None:
    manifest = _load(manifest_json)
    assert manifest.canonical() == canonical_json(manifest_json)


def _set(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    def apply(raw: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node: Any = raw
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[int(last) if last.isdigit() else last] = value

    return apply


HOSTILE: dict[str, tuple[Callable[[dict[str, Any]], None], type[Exception], str]] = {
    "future format": (_set("format", "lorachunk/3"), lorachunk.ManifestError, "lorachunk/3.*not supported"),
    "unknown hash": (_set("hash", "md5"), lorachunk.ManifestError, "unknown hash"),
    "wrong root": (_set("root", "xxh3-128:" + "0" * 32), lorachunk.IntegrityError, "root"),
    "bad digest": (_set("modules/0/shard", "xxh3-128:zz"), lorachunk.ManifestError, "malformed digest"),
    "digest algo mix": (_set("modules/0/shard", "sha256:" + "0" * 64), lorachunk.ManifestError, "does not use"),
    "huge raw size": (_set("modules/0/raw_size", 2**40), lorachunk.ManifestError, "over the"),
    "huge shape": (_set("modules/0/tensors/0/shape", [2**31, 2**31, 2**31]), lorachunk.ManifestError, "limit"),
    "negative": (_set("modules/0/stored_size", -1), lorachunk.ManifestError, "non-negative"),
    "bool as int": (_set("modules/0/raw_size", True), lorachunk.ManifestError, "non-negative"),
    "frames mismatch": (_set("modules/0/frames", [1]), lorachunk.ManifestError, "frames"),
    "tensor overlap": (_set("modules/0/tensors/1/offset", 0), lorachunk.ManifestError, "tile"),
    "unknown dtype": (_set("modules/0/tensors/0/dtype", "F12"), lorachunk.ManifestError, "dtype"),
    "split of ghosts": (_set("splits/BASE/modules", ["nope"]), lorachunk.ManifestError, "do not exist"),
    "split root": (_set("splits/BASE/root", "xxh3-128:" + "1" * 32), lorachunk.IntegrityError, "BASE"),
    "order not a permutation": (_set("source/order", [[0, 5]]), lorachunk.ManifestError, "order"),
    "wrong size": (_set("source/size", 1), lorachunk.ManifestError, "size"),
    "bad align": (_set("source/align", 3), lorachunk.ManifestError, "align"),
    "lying header": (
        _set("source/header", '{"x":{"dtype":"F16","shape":[1],"data_offsets":[0,2]}}'),
        lorachunk.ManifestError,
        "header",
    ),
    "header naming a key twice": (
        _set("source/header", '{"__metadata__":{},"__metadata__":{}}'),
        lorachunk.ManifestError,
        "twice",
    ),
    "not an object": (lambda raw: raw.clear(), lorachunk.ManifestError, "malformed"),
    "metadata not str": (_set("source/metadata/ss_seed", 5), lorachunk.ManifestError, "metadata"),
    "unsorted modules": (lambda raw: raw["modules"].reverse(), lorachunk.ManifestError, "sorted"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_manifest_refused(case: str, manifest_json: dict[str, Any]) -> None:
    mutate, error, message = HOSTILE[case]
    mutate(manifest_json)
    with pytest.raises(error, match=message):
        _load(manifest_json)


def test_non_canonical_json_refused(manifest_json: dict[str, Any]) -> None:
    text = json.dumps(manifest_json, indent=1).encode()
    with pytest.raises(lorachunk.ManifestError, match="canonical"):
        Manifest.from_bytes(zstandard.ZstdCompressor().compress(text))


def test_deeply_nested_json_refused() -> None:
    for text in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000):
        with pytest.raises(lorachunk.ManifestError, match="too deep"):
            Manifest.from_bytes(zstandard.ZstdCompressor().compress(text))


def test_declared_size_over_limit_refused_before_decompressing() -> None:
    # magic, then a descriptor for a single-segment frame with an 8-byte content size, and no body
    header = b"\x28\xb5\x2f\xfd\xe0" + (MAX_MANIFEST_BYTES + 1).to_bytes(8, "little")
    with pytest.raises(lorachunk.ManifestError, match="declares"):
        Manifest.from_bytes(header)
    with pytest.raises(lorachunk.ManifestError, match="not a zstd frame"):
        Manifest.from_bytes(b"not zstd at all")


def test_merkle_is_domain_separated() -> None:
    """A two-leaf root must not equal a one-leaf root whose data is the two leaf hashes."""
    import xxhash

    a, b = b"alpha", b"beta"
    ha = xxhash.xxh3_128(b"\x00" + a).digest()
    hb = xxhash.xxh3_128(b"\x00" + b).digest()
    assert merkle_root("xxh3-128", [a, b]) == "xxh3-128:" + xxhash.xxh3_128(b"\x01" + ha + hb).hexdigest()
    assert merkle_root("xxh3-128", [ha + hb]) != merkle_root("xxh3-128", [a, b])
    # RFC 6962 shape: 3 leaves split 2 + 1
    hc = xxhash.xxh3_128(b"\x00c").digest()
    left = xxhash.xxh3_128(b"\x01" + ha + hb).digest()
    assert merkle_root("xxh3-128", [a, b, b"c"]) == "xxh3-128:" + xxhash.xxh3_128(b"\x01" + left + hc).hexdigest()
    assert merkle_root("sha256", []) == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_manifest_name_tricks_are_refused(falcon: Path, tmp_path: Path) -> None:
    store = tmp_path / "s"
    lorachunk.pack(falcon, store)
    (store / "refs" / "latest.json.zst").unlink()  # as a store written before the copy existed
    (store / "refs" / "latest").write_text("xxh3-128:../../../../etc/passwd\n")
    with pytest.raises(
        lorachunk.ManifestError, match=r"refs/latest in LocalStore\(.*\) does not hold .*malformed digest"
    ):
        lorachunk.unpack(store, tmp_path / "o.safetensors")
    with pytest.raises(lorachunk.UsageError):
        lorachunk.storage.LocalStore(store).get("../outside")


@pytest.mark.parametrize(
    "files", [{"../escape": "x"}, {"a/b.json": "x"}, {".hidden": "x"}, {"big.txt": "x" * (1024 * 1024 + 1)}]
)
def test_hostile_packed_files_are_refused(files: dict[str, str]) -> None:
    manifest = lorachunk.pack(DATA / "loras" / "sam_lora_rank16.safetensors", lorachunk.storage.MemoryStore())
    raw = json.loads(manifest.canonical())
    raw["files"] = files
    stored = zstandard.ZstdCompressor().compress(json.dumps(raw, sort_keys=True, separators=(",", ":")).encode())
    with pytest.raises(lorachunk.ManifestError):
        lorachunk.Manifest.from_bytes(stored)


def test_a_pack_table_entry_that_holds_no_record_is_refused() -> None:
    """Issue #24 item 7: an entry for an absent, unused pack made verify pass over a pack nothing checks."""
    raw = json.loads(
        lorachunk.pack(DATA / "loras" / "sam_lora_rank16.safetensors", lorachunk.storage.MemoryStore()).canonical()
    )
    raw["packs"] = sorted([*raw["packs"], {"id": "xxh3-128:" + "f" * 32, "size": 10}], key=lambda p: p["id"])
    for module in raw["modules"]:  # the table's order moved: indexes follow their pack
        module["pack"] = next(i for i, p in enumerate(raw["packs"]) if p["size"] != 10)
    text = json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(lorachunk.ManifestError, match="holds no module's record"):
        Manifest.from_bytes(zstandard.ZstdCompressor().compress(text))
