"""The loader: what it loads (full, split, lazy, keys, dtypes, scales) onto which device, from a local
folder and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import ATTN, DATA, SAM, assert_cache_clean, open_http, pack_gets
from safetensors.torch import load_file

import lorachunk
from lorachunk import _torch
from lorachunk._keys import LATEST, LATEST_MANIFEST, manifest_key, pack_key
from lorachunk._safetensors import DTYPE_BITS
from lorachunk.testing import synth
from lorachunk.testing.http_server import FolderServer


def test_full_load_equals_safetensors(fixture_lora: Path, tmp_path: Path) -> None:
    lorachunk.pack(fixture_lora, tmp_path / "s")
    expected = load_file(fixture_lora)
    with lorachunk.open(tmp_path / "s") as lora:
        got = lora.load()
    assert list(got) == list(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


def test_split_over_http_fetches_only_its_records_in_one_request(
    published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path
) -> None:
    server, manifest = published
    split = next(s for s in manifest.splits if s.kind == "block" and 0 < len(s.modules) < len(manifest.modules) / 4)
    records = [manifest.module(n) for n in split.modules]
    server.log.clear()
    with open_http(server, tmp_path) as lora:
        # Opening is one request: the latest manifest's copy (no ref, then manifest).
        assert [r.path for r in server.log] == [f"/{LATEST_MANIFEST}"]
        got = lora.load(splits=[split.name])
    # A block split is one run of bytes in its pack: one request, for exactly its records.
    (request,) = server.gets("/packs/")
    start = min(m.offset for m in records)
    end = max(m.offset + m.stored_size for m in records)
    assert records[0].pack is not None
    assert request.path == f"/{pack_key(records[0].pack)}" and request.range == f"bytes={start}-{end - 1}"
    assert end - start == sum(m.stored_size for m in records)
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


def test_root_mismatch_fails_before_any_shard(
    published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path
) -> None:
    server, manifest = published
    wrong = manifest.root[:-4] + ("0000" if not manifest.root.endswith("0000") else "1111")
    with pytest.raises(lorachunk.IntegrityError, match="root"):
        open_http(server, tmp_path, root=wrong)
    with pytest.raises(lorachunk.UsageError, match="'garbage' is not a digest"):
        open_http(server, tmp_path, root="garbage")
    assert pack_gets(server) == []
    with open_http(server, tmp_path, root=manifest.root) as lora:
        assert lora.root == manifest.root


def test_lazy_mapping(published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path) -> None:
    server, manifest = published
    reference = load_file(ATTN)
    with open_http(server, tmp_path) as lora:
        assert list(lora.keys()) == list(reference)
        assert len(lora) == len(reference) and next(iter(reference)) in lora and "nope" not in lora
        assert set(lora.splits) == {s.name for s in manifest.splits}
        assert pack_gets(server) == []
        key = list(reference)[7]
        assert torch.equal(lora[key], reference[key])
        assert len(pack_gets(server)) == 1
        with pytest.raises(KeyError):
            lora["nope"]


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
    from lorachunk._repository import decode_module, read_record
    from lorachunk._torch import _ungroup

    manifest = lorachunk.pack(fixture_lora, tmp_path / "s")
    store = lorachunk.storage.LocalStore(tmp_path / "s")
    codec = BytePlaneZstd()
    for module in manifest.modules:
        planes = torch.empty(module.raw_size, dtype=torch.uint8)
        codec.decode_planes(memoryview(read_record(store, module)), module.segments, module.frames, planes.numpy().data)
        assert bytes(_ungroup(planes, module).numpy()) == bytes(decode_module(store, manifest, module)), module.name


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


def test_records_are_decoded_in_runs_of_neighbours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU load decodes records that lie back to back in one request's bytes as one run (one
    streamed zstd call), and never joins records that do not."""
    from lorachunk import _pipeline
    from lorachunk._repository import fetch_records

    monkeypatch.setattr(_pipeline, "RUN_BYTES", 64 * 1024)
    source = synth.sdxl(tmp_path / "s.safetensors", rank=8, scale=0.125, dtype="F16")
    manifest = lorachunk.pack(source, tmp_path / "s.lcs", pack_size=2 * 1024 * 1024)
    assert len(manifest.packs) > 1
    store = lorachunk.storage.LocalStore(tmp_path / "s.lcs")
    records = list(fetch_records(store, manifest.modules, manifest.packs, threads=2))
    runs = list(_pipeline._runs(records))
    assert [m.name for run in runs for m, _ in run] == [m.name for m, _ in records]
    assert len(runs) < len(records) / 4  # most runs join many records
    for run in runs:
        joined = _pipeline._joined(run)
        assert bytes(joined) == b"".join(bytes(data) for _, data in run)
        assert len({m.pack for m, _ in run}) == 1
        assert sum(m.raw_size for m, _ in run[:-1]) < 64 * 1024
    # Records that are not views of one buffer (a cache hit is its own bytes) stay apart.
    copies = [(m, bytes(data)) for m, data in records[:8]]
    assert [len(run) for run in _pipeline._runs(copies)] == [1] * 8
    # A record shared by two modules comes twice with one offset: never its own neighbour.
    module, data = records[0]
    assert [len(run) for run in _pipeline._runs([(module, data), (module, data)])] == [1, 1]
    # And the load itself gives the file's tensors.
    loaded = lorachunk.load(tmp_path / "s.lcs", cache=False)
    expected = load_file(source)
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_tensor_views_of_a_buffer_that_is_itself_a_slice() -> None:
    """Tensors are strided views of a module's buffer viewed once per dtype; a buffer that starts
    inside a larger one (a cache bundle's piece) must give the same values as a plain slice."""
    from lorachunk._manifest import TensorEntry

    base = torch.arange(96, dtype=torch.uint8)
    buffer = base[8:72]
    entries = [
        TensorEntry("a", "F16", (2, 4), 16, 16),
        TensorEntry("b", "F32", (3,), 32, 12),
        TensorEntry("c", "U8", (), 63, 1),
    ]
    typed: dict[torch.dtype, torch.Tensor] = {}
    for entry in entries:
        expected = (
            buffer[entry.offset : entry.offset + entry.length].view(_torch.DTYPES[entry.dtype]).reshape(entry.shape)
        )
        got = _torch._tensor(buffer, entry, typed)
        assert torch.equal(got, expected) and got.shape == entry.shape and got.is_contiguous()
    odd = TensorEntry("d", "F16", (2,), 3, 4)  # after an odd-sized tensor: a copy, aligned
    assert torch.equal(_torch._tensor(buffer, odd, typed), buffer[3:7].clone().view(torch.float16))


@pytest.mark.parametrize("inline_max", [0, 64], ids=["runs on a pool", "runs on the calling thread"])
def test_both_decoding_policies_give_the_files_tensors(
    fixture_lora: Path, inline_max: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On 2 cores runs are decoded by the consuming thread; with more, on a pool: both must be
    exact, whatever this machine's core count picks by default."""
    from lorachunk import _pipeline

    monkeypatch.setattr(_pipeline, "INLINE_MAX_THREADS", inline_max)
    monkeypatch.setattr(_pipeline, "RUN_BYTES", 256 * 1024)  # several runs even in a small LoRA
    lorachunk.pack(fixture_lora, tmp_path / "lora.lcs")
    loaded = lorachunk.load(tmp_path / "lora.lcs", cache=False, concurrency=4)
    expected = load_file(fixture_lora)
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
