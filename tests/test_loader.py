"""The loader against real stores: a local folder, a real HTTP server on 127.0.0.1 that misbehaves
on cue, fsspec (memory and moto's S3 server), and the shared cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import DATA, s3_options
from safetensors.torch import load_file

import lorachunk
from lorachunk import _torch
from lorachunk._keys import LATEST, LATEST_MANIFEST, MAX_STORED_MANIFEST_BYTES, manifest_key, shard_key
from lorachunk._safetensors import DTYPE_BITS
from lorachunk.storage import open_store
from lorachunk.testing import synth
from lorachunk.testing.http_server import FolderServer

SAM = DATA / "loras" / "sam_lora_rank16.safetensors"
DISNEY = DATA / "loras" / "cloneofsimo_lora_disney.safetensors"
ATTN = DATA / "loras" / "diffusers_sd15_attnproc.safetensors"


def shard_gets(server: FolderServer) -> list[str]:
    return [r.path for r in server.gets("/shards/")]


@pytest.fixture
def published(served: FolderServer) -> Iterator[tuple[FolderServer, lorachunk.Manifest]]:
    """The attention-processor LoRA packed into the folder the server serves."""
    manifest = lorachunk.pack(ATTN, served.root)
    yield served, manifest


def open_http(server: FolderServer, tmp_path: Path, **options: Any) -> lorachunk.LoRA:
    defaults: dict[str, Any] = {"cache": tmp_path / "cache", "retries": 3, "backoff": 0.01, "timeout": 5.0}
    return lorachunk.open(server.url, **(defaults | options))


def assert_cache_clean(cache: Path) -> None:
    """Every object in the cache hashes to its name, and no temp file is left."""
    assert lorachunk.Cache(cache).verify() == []
    assert not [p for p in cache.rglob(".*") if p.is_file()]


def test_full_load_equals_safetensors(fixture_lora: Path, tmp_path: Path) -> None:
    lorachunk.pack(fixture_lora, tmp_path / "s")
    expected = load_file(fixture_lora)
    with lorachunk.open(tmp_path / "s") as lora:
        got = lora.load()
    assert list(got) == list(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


def test_split_over_http_fetches_only_its_shards(
    published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path
) -> None:
    server, manifest = published
    split = next(s for s in manifest.splits if s.kind == "block" and 0 < len(s.modules) < len(manifest.modules) / 4)
    expected_shards = {shard_key(manifest.module(n).shard) for n in split.modules}
    server.log.clear()
    with open_http(server, tmp_path) as lora:
        # Opening is one request: the latest manifest's copy (no ref, then manifest).
        assert [r.path for r in server.log] == [f"/{LATEST_MANIFEST}"]
        got = lora.load(splits=[split.name])
    assert {p.lstrip("/") for p in shard_gets(server)} == expected_shards
    assert len(shard_gets(server)) == len(expected_shards)
    reference = load_file(ATTN)
    wanted = {t.key for n in split.modules for t in manifest.module(n).tensors}
    assert set(got) == wanted
    for key in wanted:
        assert torch.equal(got[key], reference[key])
    assert_cache_clean(tmp_path / "cache")


def test_store_written_before_the_latest_copy_opens_through_the_ref(
    published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path
) -> None:
    server, manifest = published
    (server.root / LATEST_MANIFEST).unlink()
    server.log.clear()
    with open_http(server, tmp_path) as lora:
        assert lora.manifest.id == manifest.id
    assert [r.path for r in server.log] == [f"/{LATEST_MANIFEST}", f"/{LATEST}", f"/{manifest_key(manifest.id)}"]


def test_warm_cache_skips_the_network(published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path) -> None:
    server, manifest = published
    with open_http(server, tmp_path) as lora:
        first = lora.load()
    assert len(shard_gets(server)) == len({m.shard for m in manifest.modules})
    server.shutdown()  # a pinned manifest id and a warm cache need no server at all
    with open_http(server, tmp_path, manifest=manifest.id) as lora:
        second = lora.load()
        assert lora.fetched == 0
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_corrupt_cache_entry_is_refetched(published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path) -> None:
    server, manifest = published
    with open_http(server, tmp_path) as lora:
        lora.prefetch()
    victim = max(manifest.modules, key=lambda m: m.stored_size)
    path = tmp_path / "cache" / shard_key(victim.shard)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with open_http(server, tmp_path) as lora:
        got = lora.load(modules=[victim.name])
        assert lora.fetched == 1
    reference = load_file(ATTN)
    assert all(torch.equal(t, reference[k]) for k, t in got.items())
    assert_cache_clean(tmp_path / "cache")


def test_root_mismatch_fails_before_any_shard(
    published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path
) -> None:
    server, manifest = published
    wrong = manifest.root[:-4] + ("0000" if not manifest.root.endswith("0000") else "1111")
    with pytest.raises(lorachunk.IntegrityError, match="root"):
        open_http(server, tmp_path, root=wrong)
    with pytest.raises(lorachunk.UsageError, match="'garbage' is not a digest"):
        open_http(server, tmp_path, root="garbage")
    assert shard_gets(server) == []
    with open_http(server, tmp_path, root=manifest.root) as lora:
        assert lora.root == manifest.root


def test_lazy_mapping(published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path) -> None:
    server, manifest = published
    reference = load_file(ATTN)
    with open_http(server, tmp_path) as lora:
        assert list(lora.keys()) == list(reference)
        assert len(lora) == len(reference) and next(iter(reference)) in lora and "nope" not in lora
        assert set(lora.splits) == {s.name for s in manifest.splits}
        assert shard_gets(server) == []
        key = list(reference)[7]
        assert torch.equal(lora[key], reference[key])
        assert len(shard_gets(server)) == 1
        with pytest.raises(KeyError):
            lora["nope"]


# -- faults a constrained link produces; each ends in correct tensors or one clear error ----------


@pytest.mark.parametrize("kind", ["drop", "reset", "ignore_range", "status"])
def test_recoverable_faults(kind: str, published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path) -> None:
    server, manifest = published
    victim = max(manifest.modules, key=lambda m: m.stored_size)
    if kind == "ignore_range":
        server.inject(f"/{shard_key(victim.shard)}", "drop", times=1)  # so a resume is attempted
    server.inject(f"/{shard_key(victim.shard)}", kind, times=2, retry_after="0")
    with open_http(server, tmp_path) as lora:
        got = lora.load(modules=[victim.name])
    reference = load_file(ATTN)
    assert all(torch.equal(t, reference[k]) for k, t in got.items())
    requests = [r for r in server.gets() if r.path == f"/{shard_key(victim.shard)}"]
    assert len(requests) >= 2
    # never more than one byte past the declared size is asked for (the last byte is inclusive)
    assert requests[0].range == f"bytes=0-{victim.stored_size}"
    if kind in ("drop", "ignore_range"):
        # the second attempt asked to resume where the first broke off instead of starting over,
        # up to the end of the object as the first answer gave its size
        assert requests[1].range == f"bytes={requests[0].sent}-{victim.stored_size - 1}"
    assert_cache_clean(tmp_path / "cache")


def test_429_storm_gives_up_with_a_clear_error(
    published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path
) -> None:
    server, manifest = published
    victim = manifest.modules[0]
    server.inject(f"/{shard_key(victim.shard)}", "status", status=429, retry_after="0", times=None)
    with open_http(server, tmp_path, retries=2) as lora, pytest.raises(lorachunk.StoreUnavailableError) as caught:
        lora.load(modules=[victim.name])
    message = str(caught.value)
    assert shard_key(victim.shard) in message and victim.name in message and server.url in message
    assert "429" in message
    assert len([r for r in server.gets() if r.path == f"/{shard_key(victim.shard)}"]) == 3
    assert not (tmp_path / "cache" / shard_key(victim.shard)).exists()


def test_retry_after_is_honoured(published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path) -> None:
    server, manifest = published
    victim = manifest.modules[0]
    server.inject(f"/{shard_key(victim.shard)}", "status", status=503, retry_after="1", times=1)
    with open_http(server, tmp_path) as lora:
        start = time.monotonic()
        lora.load(modules=[victim.name])
        assert time.monotonic() - start >= 0.9


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
        server.inject(f"/{shard_key(victim.shard)}", "drop", times=1)  # so the retry sends a Range
    server.inject(f"/{shard_key(victim.shard)}", kind, times=None)
    with open_http(server, tmp_path) as lora, pytest.raises(error, match=match) as caught:
        lora.load(modules=[victim.name])
    assert shard_key(victim.shard) in str(caught.value) and victim.name in str(caught.value)
    assert not (tmp_path / "cache" / shard_key(victim.shard)).exists()
    assert_cache_clean(tmp_path / "cache")


# What the client reads is bounded; what the server managed to write also fills socket buffers.
_SLACK = 32 * 1024 * 1024


def test_endless_shard_is_refused_after_its_declared_size(
    published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path
) -> None:
    server, manifest = published
    victim = manifest.modules[0]
    server.inject(f"/{shard_key(victim.shard)}", "endless", times=None)
    with open_http(server, tmp_path) as lora, pytest.raises(lorachunk.IntegrityError) as caught:
        lora.load(modules=[victim.name])
    message = str(caught.value)
    assert f"over {victim.stored_size} bytes where the manifest declares" in message and victim.name in message
    assert all(r.sent < _SLACK for r in server.gets("/shards/"))  # it stopped reading; the server gave up
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
    (server.root / shard_key(victim.shard)).unlink()
    with open_http(server, tmp_path) as lora, pytest.raises(lorachunk.ShardNotFoundError) as caught:
        lora.load()
    assert shard_key(victim.shard) in str(caught.value) and victim.name in str(caught.value)
    assert_cache_clean(tmp_path / "cache")


def test_stall_ends_at_the_timeout(published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path) -> None:
    server, manifest = published
    victim = manifest.modules[0]
    server.inject(f"/{shard_key(victim.shard)}", "stall", seconds=3.0, times=None)
    start = time.monotonic()
    with (
        open_http(server, tmp_path, timeout=0.3, retries=1) as lora,
        pytest.raises(lorachunk.StoreUnavailableError, match="Timeout"),
    ):
        lora.load(modules=[victim.name])
    assert time.monotonic() - start < 2.5


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
    assert len(server.gets("/shards/")) == len(manifest.modules)


def test_user_info_in_a_url_is_never_shown(tmp_path: Path) -> None:
    store = open_store("http://me:pa55word@127.0.0.1:9/lora", retries=0, timeout=1)
    assert "pa55word" not in repr(store) and "me:" not in repr(store)
    with pytest.raises(lorachunk.StoreUnavailableError) as caught:
        store.get("refs/latest")
    assert "pa55word" not in str(caught.value) and "***@127.0.0.1:9/lora/refs/latest" in str(caught.value)


def test_rate_cap(published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path) -> None:
    server, manifest = published
    with open_http(server, tmp_path, max_bytes_per_s=2_000_000) as lora:
        start = time.monotonic()
        report = lora.prefetch()
        elapsed = time.monotonic() - start
    # A lower bound only: the cap must hold; how much slower a busy CI machine is does not matter.
    assert report.fetched_bytes == sum(m.stored_size for m in manifest.modules)
    assert elapsed >= (report.fetched_bytes - 2_000_000) / 2_000_000 * 0.9


# -- cache ------------------------------------------------------------------------------------


_CHILD = """
import sys, lorachunk
with lorachunk.open(sys.argv[1], cache=sys.argv[2], retries=5, backoff=0.01) as lora:
    print(len(lora.load()))
"""


def test_concurrent_processes_share_an_empty_cache(
    published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path
) -> None:
    server, manifest = published
    cache = tmp_path / "cache"
    children = [
        subprocess.Popen([sys.executable, "-c", _CHILD, server.url, str(cache)], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [child.communicate(timeout=120)[0].strip() for child in children]
    assert [child.returncode for child in children] == [0, 0, 0]
    assert outputs == [str(sum(len(m.tensors) for m in manifest.modules))] * 3
    assert_cache_clean(cache)
    assert lorachunk.Cache(cache).info().shards == len({m.shard for m in manifest.modules})


def test_cache_prune_is_lru(tmp_path: Path) -> None:
    cache = lorachunk.Cache(tmp_path / "c")
    blobs = [bytes([i]) * 1000 for i in range(5)]
    from lorachunk._digest import digest

    names = [digest("xxh3-128", b) for b in blobs]
    for i, (name, blob) in enumerate(zip(names, blobs, strict=True)):
        cache.put(name, blob)
        path = tmp_path / "c" / shard_key(name)
        import os

        os.utime(path, (1000 + i, 1000 + i))
    assert cache.get(names[0]) == blobs[0]  # a hit makes it the most recently used
    assert cache.prune(3000) == 2000
    assert [cache.contains(n) for n in names] == [True, False, False, True, True]
    with pytest.raises(lorachunk.IntegrityError):
        cache.put(names[1], b"not those bytes")
    assert not cache.contains(names[1])
    assert cache.clear() == 3000 and cache.info().bytes == 0


# -- selection, dtype, scales -------------------------------------------------------------------


def test_keys_dtype_and_iter(tmp_path: Path) -> None:
    lorachunk.pack(SAM, tmp_path / "s")
    reference = load_file(SAM)
    keys = list(reference)[:5]
    with lorachunk.open(tmp_path / "s") as lora:
        got = lora.load(keys=keys, dtype="bfloat16")
        assert list(got) == keys
        assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], reference[k].bfloat16()) for k in keys)
        streamed = dict(lora.iter_tensors())
        assert streamed.keys() == reference.keys()
        with pytest.raises(lorachunk.UsageError, match="no tensor"):
            lora.load(keys=["missing"])
        with pytest.raises(lorachunk.UsageError, match="no split"):
            lora.load(splits=["missing"])
        with pytest.raises(lorachunk.UsageError):
            lora.load(device="tpu")
        # A single name may be a bare string: one name, not its characters.
        assert list(lora.load(keys=keys[0])) == keys[:1]


def test_other_devices_get_copies_of_the_decoded_tensors(tmp_path: Path) -> None:
    """A device without its own path here (mps, xpu, …) gets each tensor decoded on the host and
    copied over. ``meta`` is the one such device every torch build has: it keeps shape and dtype."""
    lorachunk.pack(SAM, tmp_path / "s")
    reference = load_file(SAM)
    with lorachunk.open(tmp_path / "s", cache=False) as lora:
        got = lora.load(device="meta", dtype="bfloat16", scales={"*": 0.5})
    assert list(got) == list(reference)
    for key, tensor in got.items():
        assert tensor.device.type == "meta"
        assert tensor.shape == reference[key].shape
        assert tensor.dtype == (torch.bfloat16 if reference[key].is_floating_point() else reference[key].dtype)


def test_a_device_torch_cannot_use_is_refused_before_any_fetch(tmp_path: Path) -> None:
    lorachunk.pack(SAM, tmp_path / "s")
    # torch.xpu came in torch 2.4; before, "xpu" is a device name torch has no backend for.
    xpu = getattr(torch, "xpu", None)
    missing = [d for d, ok in (("xpu", xpu and xpu.is_available()), ("cuda", torch.cuda.is_available())) if not ok]
    with lorachunk.open(tmp_path / "s", cache=False) as lora:
        for device in missing:
            with pytest.raises(lorachunk.UsageError, match=f"device '{device}'"):
                lora.load(device=device)
        assert lora.fetched == 0


def test_a_tensor_the_device_cannot_hold_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Apple's mps has no float64: the copy fails in torch, which no device here can do on cue."""
    lorachunk.pack(SAM, tmp_path / "s")

    def refuse(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise TypeError("Cannot convert a MPS Tensor to float64 dtype")

    monkeypatch.setattr(torch.Tensor, "to", refuse)
    with lorachunk.open(tmp_path / "s", cache=False) as lora, pytest.raises(lorachunk.UsageError, match="cannot place"):
        lora.load(device="meta")


def test_every_dtype_loads_and_one_this_torch_lacks_is_refused_before_any_fetch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every dtype this torch has loads bit for bit. Builds before 2.7 lack F8_E8M0 (and before
    2.3 the unsigned ones); to see that on any build, the test takes F8_E8M0 out of the table."""
    rng = np.random.default_rng(5)
    blobs = {dtype: rng.integers(0, 256, 3 * DTYPE_BITS[dtype] // 8, dtype=np.uint8).tobytes() for dtype in DTYPE_BITS}
    synth.write(tmp_path / "all.safetensors", {f"t_{d.lower()}": (d, (3,), blob) for d, blob in blobs.items()})
    lorachunk.pack(tmp_path / "all.safetensors", tmp_path / "s")
    with lorachunk.open(tmp_path / "s", cache=False) as lora:
        got = lora.load(keys=[f"t_{dtype.lower()}" for dtype in _torch.DTYPES])
        for dtype, torch_dtype in _torch.DTYPES.items():
            tensor = got[f"t_{dtype.lower()}"]
            assert tensor.dtype == torch_dtype, dtype
            assert tensor.view(torch.uint8).numpy().tobytes() == blobs[dtype], dtype
        fetched = lora.fetched
        monkeypatch.delitem(_torch.DTYPES, "F8_E8M0", raising=False)
        lacking = ", ".join(sorted(DTYPE_BITS.keys() - _torch.DTYPES.keys()))
        with pytest.raises(lorachunk.UsageError, match=rf"torch .* has no dtype for {lacking}: upgrade torch"):
            lora.load()
        assert lora.fetched == fetched
        assert list(lora.load(keys=["t_f16"])) == ["t_f16"]  # a selection without it loads


def test_a_bare_string_is_one_split_or_pattern(falcon: Path, tmp_path: Path) -> None:
    lorachunk.pack(falcon, tmp_path / "s")
    with lorachunk.open(tmp_path / "s") as lora:
        assert lora.load(splits="text_encoder").keys() == lora.load(splits=["text_encoder"]).keys()
        assert lora.load(modules="lora_te_*").keys() == lora.load(splits=["text_encoder"]).keys()
        with pytest.raises(lorachunk.UsageError, match="scales must map"):
            lora.load(scales=[("unet", 0.5)])  # type: ignore[arg-type]
    lorachunk.unpack(tmp_path / "s", tmp_path / "te.safetensors", splits="text_encoder")
    assert all(k.startswith("lora_te_") for k in load_file(tmp_path / "te.safetensors"))


def test_scales_multiply_the_delta(tmp_path: Path) -> None:
    from lorachunk.testing import synth

    path = synth.sdxl(tmp_path / "x.safetensors", kohya_names=True, scale=0.05, rank=4)
    lorachunk.pack(path, tmp_path / "s")
    reference = load_file(path)
    with lorachunk.open(tmp_path / "s") as lora:
        scaled = lora.load(scales={"unet": 0.5, "lora_unet_up_blocks_0_*": 2.0})
    for key, tensor in reference.items():
        factor = 1.0
        if key.endswith("lora_up.weight"):
            factor = 2.0 if key.startswith("lora_unet_up_blocks_0_") else 0.5
        expected = (tensor.float() * factor).to(tensor.dtype)
        assert torch.equal(scaled[key], expected), key
    with lorachunk.open(tmp_path / "s") as lora:
        with pytest.raises(lorachunk.UsageError, match="matches no"):
            lora.load(scales={"nothing*": 2.0})
        for bad in (float("inf"), float("nan"), "2", True):
            with pytest.raises(lorachunk.UsageError, match="finite number"):
                lora.load(scales={"unet": bad})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("fixture", "scaled_suffix"),
    [
        ("smart_falcon_4_lokr.safetensors", (".lokr_w1", ".diff", ".diff_b", ".lokr_w1_a")),
        ("peft_sd15_text_encoder.safetensors", (".lora_B.weight", ".lora_B.default.weight")),
        ("cloneofsimo_lora_disney.safetensors", (":up",)),
    ],
)
def test_scales_per_layout(fixture: str, scaled_suffix: tuple[str, ...], tmp_path: Path) -> None:
    lorachunk.pack(DATA / "loras" / fixture, tmp_path / "s")
    reference = load_file(DATA / "loras" / fixture)
    with lorachunk.open(tmp_path / "s") as lora:
        got = lora.load(scales={"*": 3.0})
    changed = {k for k in reference if not torch.equal(got[k], reference[k])}
    assert changed and all(k.endswith(scaled_suffix) for k in changed)
    for key in changed:
        assert torch.allclose(got[key].float(), reference[key].float() * 3.0, rtol=1e-2)


# -- pull, prefetch, other stores ------------------------------------------------------------


def test_pull_a_split_then_work_offline(published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path) -> None:
    server, manifest = published
    split = manifest.splits[0]
    report = lorachunk.pull(server.url, tmp_path / "copy", splits=[split.name], cache=False, retries=1)
    assert report.shards == report.fetched == len({manifest.module(n).shard for n in split.modules})
    server.shutdown()
    with lorachunk.open(tmp_path / "copy") as lora:
        assert lora.root == manifest.root
        got = lora.load(splits=[split.name])
    assert len(got) == sum(len(manifest.module(n).tensors) for n in split.modules)
    files = [p for p in (tmp_path / "copy" / "shards").rglob("*") if p.is_file()]
    assert len(files) == report.shards


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
    assert lorachunk.Cache(tmp_path / "cache").info().shards == len(manifest.modules)


def test_memory_fsspec_source(tmp_path: Path) -> None:
    import uuid

    url = f"memory://lorachunk-tests/{uuid.uuid4().hex}"
    lorachunk.pack(DISNEY, lorachunk.storage.FsspecStore(url))
    got = lorachunk.load(url, cache=False, splits=["unet"])
    reference = load_file(DISNEY)
    assert got and all(torch.equal(t, reference[k]) for k, t in got.items())


def test_local_folder_keeps_only_decoded_modules(tmp_path: Path) -> None:
    manifest = lorachunk.pack(ATTN, tmp_path / "s")
    reference = load_file(ATTN)
    cache = lorachunk.Cache(tmp_path / "cache")
    split = manifest.split("unet.down_blocks.0")
    with lorachunk.open(tmp_path / "s", cache=cache) as lora:
        lora.load(splits=[split.name])
    info = cache.info()
    assert (info.shards, info.manifests, info.bundles) == (0, 0, 0)  # the folder is already local
    assert info.decoded == len({manifest.module(n).raw for n in split.modules})  # a partial load: per module
    with lorachunk.open(tmp_path / "s", cache=cache) as lora:
        cold = lora.load()
    assert cache.info().bundles == 1  # a full load: one file for the whole LoRA
    shutil.rmtree(tmp_path / "s" / "shards")  # a warm load needs no shard at all now
    with lorachunk.open(tmp_path / "s", cache=cache) as lora:
        warm = lora.load()
        assert set(lora.load(splits=[split.name])) == {t.key for n in split.modules for t in manifest.module(n).tensors}
        warm[next(iter(warm))].add_(1)  # tensors over the cache's map are private copies on write
    assert cache.verify() == []
    assert all(torch.equal(cold[k], reference[k]) for k in reference)
    assert list(warm) == list(reference)
    # a damaged bundle is detected module by module, dropped, and decoded again (which needs the shards)
    bundle = next((tmp_path / "cache" / "bundles").iterdir())
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 1
    bundle.write_bytes(bytes(data))
    with lorachunk.open(tmp_path / "s", cache=cache) as lora, pytest.raises(lorachunk.ShardNotFoundError):
        lora.load()
    assert not bundle.exists()


def test_cache_verify_checks_bundles_against_their_manifest(tmp_path: Path) -> None:
    lorachunk.pack(ATTN, tmp_path / "s")
    cache = lorachunk.Cache(tmp_path / "cache")
    lorachunk.load(tmp_path / "s", cache=cache)
    assert cache.info().manifests == 1  # kept with the bundle, to check it by
    assert cache.verify() == []
    bundle = next((tmp_path / "cache" / "bundles").iterdir())
    data = bytearray(bundle.read_bytes())
    data[-1] ^= 1  # the last module's last byte: a partial load would never look there
    bundle.write_bytes(bytes(data))
    assert cache.verify() == [bundle]
    assert not bundle.exists()
    reference = load_file(ATTN)
    again = lorachunk.load(tmp_path / "s", cache=cache)  # decoded from the shards, bundle rebuilt
    assert all(torch.equal(again[k], reference[k]) for k in reference) and bundle.exists()


def test_interrupted_full_load_leaves_no_bundle(tmp_path: Path) -> None:
    lorachunk.pack(SAM, tmp_path / "s")
    cache = lorachunk.Cache(tmp_path / "cache")
    with lorachunk.open(tmp_path / "s", cache=cache) as lora:
        tensors = lora.iter_tensors()
        next(tensors)
        tensors.close()  # the caller stopped half way
    assert cache.info().bundles == 0
    assert not list((tmp_path / "cache" / "bundles").iterdir())  # no temp file either


@pytest.mark.parametrize("remote", [False, True], ids=["folder", "http"])
def test_a_cache_that_cannot_be_written_only_warns(remote: bool, served: FolderServer, tmp_path: Path) -> None:
    """A file where the cache folder should be fails every write, as a read-only or full disk
    does: loads still work, with one warning per cache, and the file is left as it was."""
    blocked = tmp_path / "cache"
    blocked.write_bytes(b"not a folder")
    source = served.root if remote else tmp_path / "s"
    lorachunk.pack(ATTN, source)
    expected = load_file(ATTN)
    with (
        pytest.warns(lorachunk.CacheWarning, match="cannot write to the cache") as record,
        lorachunk.open(served.url if remote else source, cache=blocked) as lora,
    ):
        split = lora.manifest.splits[0]
        part = lora.load(splits=[split.name])  # decoded modules (or shards) one by one
        full = lora.load()  # the bundle
        again = lora.load()
    assert len(record) == 1
    assert len(part) == sum(len(m.tensors) for m in lora.manifest.modules if m.name in split.modules) > 0
    for got in (full, again):
        assert list(got) == list(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert blocked.read_bytes() == b"not a folder"


def test_a_bundle_that_cannot_be_written_only_warns(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "bundles").write_bytes(b"")  # the one folder a full load writes into
    lorachunk.pack(SAM, tmp_path / "s")
    with (
        pytest.warns(lorachunk.CacheWarning, match="cannot write to the cache"),
        lorachunk.open(tmp_path / "s", cache=cache) as lora,
    ):
        got = lora.load()
    assert list(got) == list(load_file(SAM))
    assert lorachunk.Cache(cache).info().manifests == 1  # what could be written was
    assert not [p for p in cache.rglob(".*") if p.is_file()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="names open files through /proc")
def test_a_disk_that_fills_up_while_a_bundle_is_written_only_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bundle's file is made and sized, then writing into it fails, as on a full disk (which
    no test can fill on cue): the load still returns every tensor, and no temp file is left."""
    import errno

    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, handle: Any) -> None:
            self._handle = handle

        def __getattr__(self, name: str) -> Any:
            return getattr(self._handle, name)

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        handle = real_fdopen(fd, *args, **kwargs)
        return FullDisk(handle) if "/bundles/" in os.readlink(f"/proc/self/fd/{fd}") else handle

    lorachunk.pack(SAM, tmp_path / "s")
    monkeypatch.setattr(os, "fdopen", fdopen)
    with (
        pytest.warns(lorachunk.CacheWarning, match="No space left"),
        lorachunk.open(tmp_path / "s", cache=tmp_path / "cache") as lora,
    ):
        got = lora.load()
    assert list(got) == list(load_file(SAM))
    assert lorachunk.Cache(tmp_path / "cache").info().bundles == 0
    assert not [p for p in (tmp_path / "cache").rglob(".*") if p.is_file()]


def test_prefetch_into_a_cache_that_cannot_be_written_is_an_error(
    published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path
) -> None:
    """Filling the cache is prefetch's whole job, so there the failure is an error."""
    server, _ = published
    blocked = tmp_path / "blocked"
    blocked.write_bytes(b"")
    with (
        pytest.warns(lorachunk.CacheWarning),
        open_http(server, tmp_path, cache=blocked) as lora,
        pytest.raises(lorachunk.StoreError, match="cannot write to the cache"),
    ):
        lora.prefetch()


def test_a_cache_entry_that_cannot_be_removed_is_a_store_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tests run as root here, where no permission stops an unlink, so the refusal is simulated."""
    from lorachunk._cli import main

    cache = tmp_path / "cache"
    lorachunk.pack(SAM, tmp_path / "s")
    with lorachunk.open(tmp_path / "s", cache=cache) as lora:
        lora.load()

    def refuse(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", refuse)
    with pytest.raises(lorachunk.StoreError, match="cannot remove"):
        lorachunk.Cache(cache).clear()
    assert main(["cache", "prune", "--max-size", "0", "--cache-dir", str(cache)]) == 3
    assert "cannot remove" in capsys.readouterr().err
    with (
        pytest.warns(lorachunk.CacheWarning, match="cannot remove"),  # pruning after a load only warns
        lorachunk.open(tmp_path / "s", cache=lorachunk.Cache(cache, max_size=0)) as lora,
    ):
        assert len(lora.load()) == len(load_file(SAM))


def test_no_cache_option(tmp_path: Path) -> None:
    lorachunk.pack(SAM, tmp_path / "s")
    with lorachunk.open(tmp_path / "s", cache=False) as lora:
        assert lora.cache is None
        assert len(lora.load()) == len(load_file(SAM))
    assert not (tmp_path / "default-cache").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_load_equals_cpu(tmp_path: Path) -> None:
    from lorachunk.testing import synth

    path = synth.sdxl(tmp_path / "x.safetensors", scale=0.1, rank=8, dtype="BF16", text_encoders=True)
    lorachunk.pack(path, tmp_path / "s")
    reference = load_file(path)
    with lorachunk.open(tmp_path / "s") as lora:
        got = lora.load(device="cuda", scales={"unet": 0.5})
    for key, tensor in reference.items():
        assert got[key].is_cuda
        scaled = key.endswith("lora_B.weight") and key.startswith("unet")
        expected = (tensor.float() * 0.5).to(tensor.dtype) if scaled else tensor
        assert torch.equal(got[key].cpu(), expected), key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_load_of_every_fixture(fixture_lora: Path, tmp_path: Path) -> None:
    lorachunk.pack(fixture_lora, tmp_path / "s")
    reference = load_file(fixture_lora)
    got = lorachunk.load(tmp_path / "s", device="cuda")
    assert all(torch.equal(got[k].cpu(), t) for k, t in reference.items())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_load_over_http_with_few_threads(served: FolderServer, tmp_path: Path) -> None:
    """Remote shards of mixed sizes through a small pool: staging slots must never deadlock,
    and a cast on the device must give what a cast on the CPU gives."""
    from lorachunk.testing import synth

    path = synth.sdxl(tmp_path / "x.safetensors", scale=0.1, rank=16, dtype="BF16", text_encoders=True)
    lorachunk.pack(path, served.root)
    reference = load_file(path)
    with lorachunk.open(served.url, concurrency=2) as lora:
        got = dict(lora.iter_tensors(device="cuda:0", dtype="float16"))
    assert got.keys() == reference.keys()
    for key, tensor in reference.items():
        expected = tensor.to(torch.float16) if tensor.is_floating_point() else tensor
        assert got[key].device == torch.device("cuda", 0)
        assert torch.equal(got[key].cpu(), expected), key


def test_device_side_ungrouping_matches_cpu_decode(fixture_lora: Path, tmp_path: Path) -> None:
    """The CUDA path decodes byte planes on the host and un-groups them on the device; the
    un-grouping is plain torch, so it is checked here on the CPU for every module of every fixture."""
    from lorachunk._codec import BytePlaneZstd
    from lorachunk._repository import decode_module, read_shard
    from lorachunk._torch import _ungroup

    manifest = lorachunk.pack(fixture_lora, tmp_path / "s")
    store = lorachunk.storage.LocalStore(tmp_path / "s")
    codec = BytePlaneZstd()
    for module in manifest.modules:
        planes = torch.empty(module.raw_size, dtype=torch.uint8)
        codec.decode_planes(memoryview(read_shard(store, module)), module.segments, module.frames, planes.numpy().data)
        assert bytes(_ungroup(planes, module).numpy()) == bytes(decode_module(store, manifest, module)), module.name


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
    (served.root / manifest_key(other_id)).write_bytes(other)
    (served.root / LATEST).write_text(f"{other_id}\n")
    (served.root / LATEST_MANIFEST).write_bytes(other)
    with open_http(served, tmp_path) as lora:
        assert lora.manifest.id == other_id and lora.manifest.to_bytes() == other
    assert (tmp_path / "cache" / manifest_key(other_id)).read_bytes() == other
    lorachunk.pull(served.url, tmp_path / "copy", cache=False, retries=1)
    assert (tmp_path / "copy" / manifest_key(other_id)).read_bytes() == other
    assert lorachunk.verify(tmp_path / "copy").shards == len(original.modules)


def test_retry_after_forms() -> None:
    import email.utils

    from lorachunk.storage._http import _retry_after

    assert _retry_after("7") == 7.0
    assert _retry_after(None) is None and _retry_after("soon") is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= (_retry_after(later) or 0) <= 31
    assert _retry_after(email.utils.formatdate(time.time() - 60, usegmt=True)) == 0.0


def test_cache_size_cap_holds_after_a_load(published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path) -> None:
    server, manifest = published
    cap = manifest.stored_size // 3
    with pytest.raises(lorachunk.UsageError, match="0 or more"):
        lorachunk.Cache(tmp_path / "capped", max_size=-1)
    cache = lorachunk.Cache(tmp_path / "capped", max_size=cap)
    with lorachunk.open(server.url, cache=cache, retries=1) as lora:
        got = lora.load()
    assert len(got) == len(lora)
    assert 0 < cache.info().bytes <= cap


def test_remote_sources_default_to_more_requests_in_flight(
    served: FolderServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lorachunk.pack(SAM, served.root)
    with lorachunk.open(served.url) as remote, lorachunk.open(served.root) as local:
        assert remote.concurrency == 16 and local.concurrency == min(8, os.cpu_count() or 1)
    monkeypatch.setenv("LORACHUNK_THREADS", "3")
    with lorachunk.open(served.root) as local:
        assert local.concurrency == 3  # a local load is decoding: one thread per core, or as told
        assert remote.store._client._transport._pool._max_connections == 16  # type: ignore[attr-defined]
    with lorachunk.open(served.url, concurrency=3) as chosen:
        assert chosen.concurrency == 3
