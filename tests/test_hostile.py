"""What an attacker tries: hostile servers, mirrors, manifests, folders and caches.

Each test names the defect it guards against (issue #16); each fails on the code before its fix.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import DATA, HUB_TOKEN, serving

import lorachunk
from lorachunk import _manifest
from lorachunk._cli import main
from lorachunk._keys import LATEST, LATEST_MANIFEST, manifest_key, shard_key
from lorachunk._manifest import Manifest
from lorachunk._repository import record_key, write_manifest
from lorachunk._threads import cpu_threads
from lorachunk.storage import ByteRange, LocalStore
from lorachunk.storage._http import _retry_after
from lorachunk.testing.http_server import FolderServer
from lorachunk.testing.hub_server import serve_hub

LORAS = DATA / "loras"
SAM = LORAS / "sam_lora_rank16.safetensors"
SECRET = "-----BEGIN OPENSSH PRIVATE KEY----- do not publish"

# -- redirects and slow servers ----------------------------------------------------------------


@pytest.fixture
def elsewhere(tmp_path: Path) -> Iterator[FolderServer]:
    """A second server: another origin (another port) serving the same files."""
    with serving(tmp_path / "www2") as server:
        yield server


def test_credential_headers_never_follow_a_redirect_to_another_origin(
    served: FolderServer, elsewhere: FolderServer, falcon: Path
) -> None:
    lorachunk.pack(falcon, served.root)
    lorachunk.pack(falcon, elsewhere.root)
    served.inject("/packs/*", "redirect", times=None, location=elsewhere.url)
    secrets = {"X-Api-Key": "k1", "PRIVATE-TOKEN": "k2", "Proxy-Authorization": "k3", "Authorization": "Bearer k4"}
    got = lorachunk.load(served.url, headers=secrets, cache=False)
    assert len(got) == len(lorachunk.read_manifest(served.root).owners)
    assert elsewhere.gets("/packs/"), "the redirect was followed"
    for request in elsewhere.log:
        assert not {name.lower() for name in request.headers} & {name.lower() for name in secrets}
    assert all(r.headers.get("X-Api-Key") == "k1" for r in served.log)  # the store's own origin gets them


def test_a_redirect_to_another_scheme_is_refused(served: FolderServer, falcon: Path) -> None:
    lorachunk.pack(falcon, served.root)
    served.inject("/refs/*", "redirect", times=None, location="file:///etc")
    with pytest.raises(lorachunk.StoreError, match="redirected to a file: URL"):
        lorachunk.open(served.url, cache=False)


def test_a_server_that_trickles_bytes_hits_the_deadline(served: FolderServer, falcon: Path) -> None:
    """One byte every 0.3 s never trips a 1 s read timeout; the per-request deadline does."""
    lorachunk.pack(falcon, served.root)
    served.inject("/refs/*", "trickle", times=None, seconds=0.3, limit=10)
    with pytest.raises(lorachunk.StoreUnavailableError, match="stalled"):
        lorachunk.open(served.url, cache=False, timeout=1, retries=0, min_rate=100_000)


def test_header_lines_trickled_hit_the_deadline(served: FolderServer, falcon: Path) -> None:
    """A byte of a header line every 0.2 s never trips a 1 s read timeout; connection and headers
    get ``timeout`` in all (issue #24, item 4)."""
    lorachunk.pack(falcon, served.root)
    served.inject("/refs/*", "trickle_headers", times=None, seconds=0.2, limit=1000)
    started = time.monotonic()
    with pytest.raises(lorachunk.StoreUnavailableError, match="deadline"):
        lorachunk.open(served.url, cache=False, timeout=1, retries=1, backoff=0.01)
    assert time.monotonic() - started < 6


def test_a_slow_body_declaring_a_megabyte_ends_by_the_call_deadline(served: FolderServer, falcon: Path) -> None:
    lorachunk.pack(falcon, served.root)
    (served.root / "refs" / "latest.json.zst").write_bytes(bytes(1_000_000))
    served.inject("/refs/*", "slow_body", times=None, seconds=0.05)
    started = time.monotonic()
    with pytest.raises(lorachunk.StoreUnavailableError, match="deadline"):
        lorachunk.open(served.url, cache=False, deadline=2)
    assert time.monotonic() - started < 6
    with pytest.raises(lorachunk.UsageError, match="deadline"):
        lorachunk.open(served.url, cache=False, deadline=math.nan)


def test_a_load_ends_by_its_deadline(served: FolderServer, falcon: Path) -> None:
    lorachunk.pack(falcon, served.root)
    served.inject("/packs/*", "slow_body", times=None, seconds=0.05)
    with lorachunk.open(served.url, cache=False) as lora:
        started = time.monotonic()
        with pytest.raises(lorachunk.StoreUnavailableError, match="deadline"):
            lora.load(deadline=1.5)
        assert time.monotonic() - started < 5


def test_a_206_shorter_than_asked_is_resumed(served: FolderServer, falcon: Path) -> None:
    lorachunk.pack(falcon, served.root)
    served.inject("/packs/*", "short", times=3)
    got = lorachunk.load(served.url, cache=False, max_gap=0)
    assert len(got) == len(lorachunk.read_manifest(served.root).owners)
    resumed = [r for r in served.gets("/packs/") if r.range and not r.range.startswith("bytes=0-")]
    assert resumed, "no request resumed from where the short answer stopped"


def test_retry_after_with_other_digits_is_ignored(served: FolderServer, falcon: Path) -> None:
    assert _retry_after("²") is None and _retry_after("3") == 3.0
    lorachunk.pack(falcon, served.root)
    served.inject("/refs/*", "status", status=503, retry_after="²")
    assert lorachunk.open(served.url, cache=False, backoff=0.01).root


# -- folders and links -------------------------------------------------------------------------


def test_a_linked_file_in_a_peft_folder_is_refused(tmp_path: Path) -> None:
    """A README.md that is a link to a key file would be packed into the manifest and pushed."""
    secret = tmp_path / "id_ed25519"
    secret.write_text(SECRET)
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes((LORAS / "peft_sd15_text_encoder.safetensors").read_bytes())
    (folder / "adapter_config.json").write_text('{"r": 4}')
    (folder / "README.md").symlink_to(secret)
    with pytest.raises(lorachunk.FormatError, match=r"README\.md is a symbolic link") as caught:
        lorachunk.pack(folder, tmp_path / "store")
    assert SECRET not in str(caught.value)
    assert not (tmp_path / "store").exists()


def test_a_linked_ref_is_not_followed_nor_echoed(falcon: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    lorachunk.pack(falcon, store)
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    for name in (LATEST, LATEST_MANIFEST):
        (store / name).unlink()
    (store / LATEST).symlink_to(secret)
    with pytest.raises(lorachunk.StoreError, match="symbolic link") as caught:
        lorachunk.open(store)
    assert SECRET not in str(caught.value)


def test_a_fifo_under_an_object_name_does_not_hang(falcon: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    manifest = lorachunk.pack(falcon, store)
    pack = store / record_key(manifest.modules[0])
    pack.unlink()
    os.mkfifo(pack)
    with pytest.raises(lorachunk.StoreError, match="not a regular file"):
        lorachunk.load(store, cache=False)


# -- a pinned root pins what a name selects ----------------------------------------------------


def _rewrite_splits(store: Path, change: Callable[[dict[str, tuple[str, list[str]]]], None]) -> Manifest:
    """A hostile mirror: the same modules and files, the splits rewritten, roots recomputed."""
    manifest = lorachunk.read_manifest(store)
    splits = {s.name: (s.kind, list(s.modules)) for s in manifest.splits}
    change(splits)
    hostile = Manifest.build(
        hash=manifest.hash,
        codec=manifest.codec,
        source=manifest.source,
        modules=manifest.modules,
        splits=splits,
        files=manifest.files,
        packs=manifest.packs,
    )
    write_manifest(LocalStore(store), hostile)
    return hostile


def test_a_mirror_that_rewrites_automatic_splits_is_caught_by_the_root(falcon: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    root = lorachunk.pack(falcon, store).root

    def swap(splits: dict[str, tuple[str, list[str]]]) -> None:
        splits["text_encoder"], splits["unet"] = (
            ("component", splits["unet"][1]),
            ("component", splits["text_encoder"][1]),
        )

    assert _rewrite_splits(store, swap).root == root  # the modules are the same: the root alone cannot tell
    with lorachunk.open(store, root=root, cache=False) as lora:
        with pytest.raises(lorachunk.IntegrityError, match=r"'text_encoder'.*pin the manifest id"):
            lora.load(splits=["text_encoder"])
        with pytest.raises(lorachunk.IntegrityError, match="'unet'"):
            lora.load(scales={"unet": 0.0})
        assert len(lora.load(splits=["MID"])) > 0  # splits left as the packer made them still load


def test_the_root_pins_user_splits(falcon: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    root = lorachunk.pack(falcon, store, splits={"attn": "*attn*"}).root

    def widen(splits: dict[str, tuple[str, list[str]]]) -> None:
        splits["attn"] = ("user", splits["unet"][1])

    original = lorachunk.read_manifest(store)
    hostile = _rewrite_splits(store, widen)
    assert hostile.root != root
    # A pinned root selects: the store still holds the LoRA of that root, and that is what opens.
    with lorachunk.open(store, root=root, cache=False) as lora:
        assert lora.manifest.id == original.id and lora.splits["attn"].modules == original.split("attn").modules
    (store / manifest_key(original.id)).unlink()  # a mirror that drops it: nothing has that root
    with pytest.raises(lorachunk.IntegrityError, match=f"no LoRA has root {root}"):
        lorachunk.open(store, root=root, cache=False)


def test_a_store_packed_before_roots_pinned_user_splits(tmp_path: Path) -> None:
    """store-v1 keeps its root; its user split is pinned by the manifest id only."""
    store = DATA / "store-v1"
    manifest = lorachunk.read_manifest(store)
    with lorachunk.open(store, root=manifest.root, cache=False) as lora:
        with pytest.raises(lorachunk.IntegrityError, match=r"'attn'.*manifest id"):
            lora.load(splits=["attn"])
        assert lora.load(splits=["unet.mid_block"])  # automatic splits are derived, so pinned
    with lorachunk.open(store, root=manifest.root, manifest=manifest.id, cache=False) as lora:
        assert lora.load(splits=["attn"])


def test_an_old_root_does_not_vouch_for_a_user_split_it_never_hashed(tmp_path: Path) -> None:
    """store-v1's root never covered its user split ``attn``; after repack the v2 manifest carries it
    as ``v1_root``. A mirror that rewrites ``attn`` and recomputes its own root must not pass a
    reader pinning the old root (issue #24, item 1)."""
    store = tmp_path / "store"
    shutil.copytree(DATA / "store-v1", store)
    old_root = lorachunk.read_manifest(store).root
    lorachunk.repack(store)
    repacked = lorachunk.read_manifest(store)
    assert repacked.v1_root == old_root
    mlp = [n for n in repacked.split("unet").modules if "attn" not in n]
    hostile = Manifest.build(
        hash=repacked.hash,
        codec=repacked.codec,
        source=repacked.source,
        modules=repacked.modules,
        splits={s.name: (s.kind, mlp if s.name == "attn" else s.modules) for s in repacked.splits},
        files=repacked.files,
        packs=repacked.packs,
        v1_root=repacked.v1_root,
    )
    write_manifest(LocalStore(store), hostile)
    with lorachunk.open(store, root=old_root, cache=False) as lora:
        with pytest.raises(lorachunk.IntegrityError, match="'attn'"):
            lora.load(splits=["attn"])
        with pytest.raises(lorachunk.IntegrityError, match="'attn'"):
            lora.load(scales={"attn": 0.5})
        assert len(lora.load(splits=["unet.mid_block"])) > 0  # derived from module names: pinned
    assert main(["pull", str(store), "-o", str(tmp_path / "copy"), "--root", old_root, "--split", "attn"]) == 1
    assert not (tmp_path / "copy" / "refs").exists()
    # The manifest's own root covers the rewritten split (it is what that root says it is).
    with lorachunk.open(store, root=hostile.root, cache=False) as lora:
        assert len(lora.load(splits=["attn"])) == sum(len(hostile.module(n).tensors) for n in mlp)


@pytest.mark.parametrize("value", [None, "", 7, "sha256:" + "0" * 64, "xxh3-128:zz"])
def test_a_malformed_v1_root_is_a_manifest_error(value: object) -> None:
    raw = json.loads(lorachunk.pack(SAM, lorachunk.storage.MemoryStore()).canonical())
    raw["v1_root"] = value
    with pytest.raises(lorachunk.ManifestError):
        Manifest.from_bytes(_stored(_canonical(raw)))


# -- manifests: bounded work, clear errors -----------------------------------------------------


HUGE = "<a 5000-digit integer>"


def _split_of(raw: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "user", "modules": [raw["modules"][0]["name"]], "root": "xxh3-128:" + "0" * 32}


def _stored(text: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(text)


def _manifest_json() -> dict[str, Any]:
    return json.loads(lorachunk.pack(SAM, lorachunk.storage.MemoryStore()).canonical())  # type: ignore[no-any-return]


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def test_too_many_modules_are_refused_before_any_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _manifest_json()
    empty = {"frames": [], "raw": raw["modules"][0]["raw"], "raw_size": 0, "shard": raw["modules"][0]["shard"]}
    raw["modules"] = [empty | {"name": f"m{i:06d}", "stored_size": 0, "tensors": []} for i in range(20_000)]
    monkeypatch.setattr(_manifest, "module_from_json", lambda *a: pytest.fail("a module was built"))
    with pytest.raises(lorachunk.ManifestError, match="20000 modules; the limit is 16384"):
        Manifest.from_bytes(_stored(_canonical(raw)))


def test_too_many_json_values_are_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _manifest_json()
    raw["source"]["order"] = [[0, 1]] * 700_000
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("parsed"))
    with pytest.raises(lorachunk.ManifestError, match="JSON values"):
        Manifest.from_bytes(_stored(_canonical(raw)))


def test_a_pinned_root_is_compared_before_the_tables_are_built(monkeypatch: pytest.MonkeyPatch) -> None:
    stored = lorachunk.pack(SAM, lorachunk.storage.MemoryStore()).to_bytes()
    monkeypatch.setattr(_manifest, "_parse", lambda raw: pytest.fail("tables built"))
    with pytest.raises(lorachunk.IntegrityError, match=r"expected xxh3-128:0+"):
        Manifest.from_bytes(stored, root="xxh3-128:" + "0" * 32)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["codec"].update(level=float("nan")), "NaN"),
        (lambda m: m["codec"].update(level=HUGE), "digits"),
        (lambda m: m["source"].update(name="\ud800.safetensors"), "canonical"),
        (lambda m: m["source"].update(name="\x1b]0;owned\x07lora"), "control characters"),
        (lambda m: m["splits"].update({"\x1b[2J": _split_of(m)}), "control characters"),
        (lambda m: m["modules"][0].update(stored_size=2**62, frames=[2**62]), "stored size"),
        (lambda m: m["modules"][0].update(stored_size=2**70, frames=[2**70]), "digits"),
        (lambda m: m.update(files={"adapter_model.safetensors": "x"}), "reserved"),
        (lambda m: m.update(files={"README.md\n": "x"}), "not a plain file name"),
    ],
    ids=["NaN", "huge integer", "surrogate", "escape in source", "escape in split", "2**62", "2**70", "weights", "nl"],
)
def test_hostile_manifest_values_are_manifest_errors(edit: Callable[[dict[str, Any]], None], message: str) -> None:
    raw = _manifest_json()
    edit(raw)
    text = json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)
    text = text.replace(json.dumps(HUGE), "9" * 5000)  # Python will not write (nor read) such an integer
    with pytest.raises(lorachunk.ManifestError, match=message):
        Manifest.from_bytes(_stored(text.encode("utf-8", "surrogatepass").replace(b"\xed\xa0\x80", b"\\ud800")))


def test_a_range_past_a_local_file_allocates_nothing(falcon: Path, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    store.set("shards/ab/x", b"12345")
    assert store.get("shards/ab/x", ByteRange(0, 2**62)) == b"12345"
    assert store.get("shards/ab/x", ByteRange(9, 2**70)) == b""


# -- caches ------------------------------------------------------------------------------------


def test_a_wrong_sized_or_fifo_cache_entry_is_never_read(served: FolderServer, tmp_path: Path) -> None:
    manifest = lorachunk.pack(SAM, served.root)
    cache = lorachunk.Cache(tmp_path / "cache", decoded=False)
    big, fifo = manifest.modules[0], manifest.modules[1]
    for module in (big, fifo):
        path = cache.root / shard_key(module.record)
        path.parent.mkdir(parents=True, exist_ok=True)
        if module is big:
            with path.open("wb") as handle:
                handle.truncate(8 * 1024**3)  # sparse: 8 GiB of nothing, never read
        else:
            os.mkfifo(path)
    got = lorachunk.load(served.url, cache=cache)
    assert len(got) == len(manifest.owners)
    assert not (cache.root / shard_key(big.record)).stat().st_size > big.stored_size
    assert cache.verify() == []  # what the load put back is right; the FIFO is gone, not waited on


# -- small things ------------------------------------------------------------------------------


def test_verify_fails_on_a_broken_latest_ref(falcon: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    lorachunk.pack(falcon, store)
    (store / LATEST_MANIFEST).unlink()
    (store / LATEST).write_text("garbage\n")
    assert main(["verify", str(store)]) == 1
    assert "does not hold a manifest id" in capsys.readouterr().err
    (store / LATEST).write_text("xxh3-128:" + "0" * 32 + "\n")
    assert main(["verify", str(store)]) == 1
    assert "which is not in the store" in capsys.readouterr().err


def test_bad_numbers_in_the_environment_and_options(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("LORACHUNK_THREADS", "²")
    assert 1 <= cpu_threads() <= 8
    monkeypatch.setenv("LORACHUNK_THREADS", "3")
    assert cpu_threads() == 3
    assert main(["pull", "http://127.0.0.1:9/x", "-o", str(tmp_path / "y"), "--timeout", "inf"]) == 2
    assert "finite" in capsys.readouterr().err


def test_an_unreachable_fsspec_store_is_a_store_error() -> None:
    pytest.importorskip("fsspec")
    with pytest.raises(lorachunk.StoreUnavailableError, match="cannot open"):
        lorachunk.open("ftp://127.0.0.1:9/lora")


def test_an_offline_push_is_a_store_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """huggingface_hub 2.x raises httpx2 errors; they end as StoreUnavailableError, exit 3."""
    with pytest.raises(lorachunk.StoreUnavailableError, match="ConnectError"):
        lorachunk.push(SAM, "me/lora", endpoint="http://127.0.0.1:9", token=HUB_TOKEN)


def test_offline_refs_are_kept_per_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After reading a mirror, an offline open against another Hub must not get the mirror's LoRA."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    with serve_hub(token=HUB_TOKEN) as mirror, serve_hub(token=HUB_TOKEN) as real:
        monkeypatch.setenv("HF_ENDPOINT", mirror.url)
        lorachunk.push(SAM, "me/lora")
        lorachunk.load("hf://me/lora")
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert lorachunk.open("hf://me/lora").root  # the mirror, offline, from the cache
        monkeypatch.setenv("HF_ENDPOINT", real.url)
        with pytest.raises(lorachunk.StoreUnavailableError, match="offline"):
            lorachunk.open("hf://me/lora")


def test_a_mirror_that_keeps_the_root_but_swaps_a_record_is_caught_after_decoding(
    falcon: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The root pins what modules are (raw digests), not their records: a mirror can swap a record
    and its digest and keep the root. The swapped record decodes, and its raw bytes are refused."""
    import dataclasses

    from lorachunk._codec import codec_from_config
    from lorachunk._digest import digest
    from lorachunk._record import encode_module
    from lorachunk._repository import decode_module

    store = tmp_path / "store"
    manifest = lorachunk.pack(falcon, store)
    victim = max(manifest.modules, key=lambda m: m.raw_size)
    raw = decode_module(LocalStore(store), manifest, victim)
    raw[0] ^= 0x40  # another weight
    forged, record = encode_module(
        victim.name, raw, victim.tensors, codec=codec_from_config(manifest.codec), algorithm=manifest.hash
    )
    pack = digest(manifest.hash, record)
    LocalStore(store).set(f"packs/{pack[9:]}", record)
    swapped = dataclasses.replace(forged, raw=victim.raw, pack=pack, offset=0)  # the root's raw digest kept
    hostile = Manifest.build(
        hash=manifest.hash,
        codec=manifest.codec,
        source=manifest.source,
        modules=[swapped if m.name == victim.name else m for m in manifest.modules],
        splits={s.name: (s.kind, s.modules) for s in manifest.splits},
        packs={**manifest.packs, pack: len(record)},
    )
    assert hostile.root == manifest.root and hostile.id != manifest.id
    write_manifest(LocalStore(store), hostile)
    with pytest.raises(lorachunk.IntegrityError, match="after decoding"):
        lorachunk.load(store, root=manifest.root, modules=[victim.name], cache=False)
    # On a GPU the records are un-grouped on the device without a raw check; pinned by root only,
    # a load decodes and checks on the host instead (CopyPlacer), then copies.
    import torch

    from lorachunk import _torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    placer = _torch.make_placer(codec_from_config(manifest.codec), "cuda", None, check_raw=True)
    assert type(placer) is _torch.CopyPlacer
