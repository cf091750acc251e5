"""Format lorachunk/2: records in packs, the range planner, layout, reuse, and hostile pack tables."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import ATTN, DATA, SAM, pack_files, serving
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

import lorachunk
from lorachunk._keys import LATEST, LATEST_MANIFEST, manifest_key, pack_key
from lorachunk._manifest import Manifest
from lorachunk._packing import MAX_REQUEST, WHOLE_MAX, PackBuilder, Span, plan_reads
from lorachunk._repository import list_manifest_ids, record_key, write_manifest
from lorachunk.storage import LocalStore
from lorachunk.testing import synth

MIB = 1024 * 1024
FALCON4 = DATA / "loras" / "smart_falcon_4_lokr.safetensors"


# -- the range planner ---------------------------------------------------------------------------


@st.composite
def _needs(draw: st.DrawFn) -> dict[str, tuple[int, list[Span]]]:
    objects = {}
    for index in range(draw(st.integers(1, 4))):
        size = draw(st.sampled_from([1, 100, WHOLE_MAX + 1, 5 * MIB, 40 * MIB]))
        spans = []
        for _ in range(draw(st.integers(0, 12))):
            start = draw(st.integers(0, size - 1))
            spans.append(Span(start, draw(st.integers(0, size - start))))
        objects[f"packs/{index}"] = (size, spans)
    return objects


@settings(max_examples=300, deadline=None)
@given(needs=_needs(), gap=st.sampled_from([0, 1, 4096, 256 * 1024]), cap=st.sampled_from([64, 4096, MAX_REQUEST]))
def test_planned_reads_cover_every_needed_byte_and_nothing_outside(
    needs: dict[str, tuple[int, list[Span]]], gap: int, cap: int
) -> None:
    reads = plan_reads(needs, gap=gap, cap=cap)
    for read in reads:
        size = needs[read.key][0]
        assert 0 <= read.start < read.end <= size  # nothing outside the object, nothing empty
        assert read.end - read.start <= cap  # no request over the cap
        assert read.whole == (read.start == 0 and read.end == size and size <= cap)
    for key, (size, spans) in needs.items():
        got = sorted((r.start, r.end) for r in reads if r.key == key)
        for span in spans:
            for byte in {span.start, span.start + span.length - 1, span.start + span.length // 2}:
                if span.length:
                    assert any(s <= byte < e for s, e in got), (key, span, byte)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(got))  # no byte asked for twice
        needed = {b for span in spans for b in range(span.start, span.start + span.length)} if size < 5000 else None
        if needed is not None and (size <= WHOLE_MAX or 2 * len(needed) >= size) and size <= cap and needed:
            assert got == [(0, size)]  # small or mostly needed: read whole


def test_ranges_close_together_are_one_request_and_far_apart_are_two() -> None:
    needs = {"packs/a": (10 * MIB, [Span(0, 1000), Span(1000 + 256 * 1024, 1000), Span(4 * MIB, 10)])}
    reads = plan_reads(needs)
    assert [(r.start, r.end) for r in reads] == [(0, 1000 + 256 * 1024 + 1000), (4 * MIB, 4 * MIB + 10)]
    assert plan_reads({"packs/a": (MIB, [Span(10, 5)])})[0].whole  # at most 2 MiB: whole


# -- layout and packs ------------------------------------------------------------------------------


def _record(name: str, size: int) -> tuple[lorachunk.Module, bytes]:
    data = name.encode().ljust(size, b".")[:size]
    from lorachunk._digest import digest

    module = lorachunk.Module(name, digest("xxh3-128", data), digest("xxh3-128", data), size, size, (size,), ())
    return module, data


def test_pack_builder_cuts_at_the_target_and_prefers_group_boundaries() -> None:
    builder = PackBuilder(target=100, algorithm="xxh3-128")
    packs = []
    for index, group in enumerate("aaaaaaaaaabbbbbbbbbbbbbbbbbbb"):
        packs += builder.add(*_record(f"m{index:02d}", 10 if group == "a" else 1), group)
    packs += builder.finish()
    # The record that would take the pack over 100 B comes at 100: cut there, not at the a/b
    # boundary (100 B in, but the rule wants at least 15/16 of 100 before the boundary: it is).
    names = [[m.name for m in p.modules] for p in packs]
    assert names[0] == [f"m{i:02d}" for i in range(10)] and len(packs) == 2
    lax = PackBuilder(target=100, algorithm="xxh3-128")
    cut = []
    for index, group in enumerate("aaaaaaaaaabbbbbbbbbbbbbbbbbbbbbbbbbb"):
        cut += lax.add(*_record(f"n{index:02d}", 9 if group == "a" else 1), group)
    # 90 B of a, then b: at 100 the last boundary (90 B) is under 15/16 of the target, so the
    # pack is filled to the target instead; a boundary at 94+ B would have been taken.
    assert [m.name for m in cut[0].modules][-1] == "n19"
    strict = PackBuilder(target=100, algorithm="xxh3-128")
    kept = []
    for index, group in enumerate("a" * 19 + "b" * 20):
        kept += strict.add(*_record(f"k{index:02d}", 5 if group == "a" else 1), group)
    # 95 B of a (at least 15/16 of the target): the pack ends there and b starts the next whole.
    assert [m.name for m in kept[0].modules] == [f"k{i:02d}" for i in range(19)]
    for pack in packs:
        pack_id, data, placed = pack.assemble()
        assert len(data) == sum(m.stored_size for m in placed) and all(m.pack == pack_id for m in placed)
        assert [m.offset for m in placed] == [sum(x.stored_size for x in placed[:i]) for i in range(len(placed))]
    small = PackBuilder(target=100, algorithm="xxh3-128")
    assert small.add(*_record("one", 60), "") == [] and small.add(*_record("two", 30), "") == []
    assert len(small.finish()) == 1  # less than the target: one pack
    big = PackBuilder(target=100, algorithm="xxh3-128")
    big.add(*_record("small", 10), "")
    (first,) = big.add(*_record("huge", 500), "")  # a record over the target: a pack of its own
    assert [m.name for m in first.modules] == ["small"] and [m.name for p in big.finish() for m in p.modules] == [
        "huge"
    ]


@pytest.mark.parametrize("path", [ATTN, DATA / "loras" / "cloneofsimo_analog_svd_rank4.safetensors"])
def test_every_component_and_block_split_is_one_run_in_each_pack(path: Path, tmp_path: Path) -> None:
    manifest = lorachunk.pack(path, tmp_path / "s", pack_size=MIB)
    assert len(manifest.packs) >= 2
    for split in manifest.splits:
        if split.kind not in ("component", "block"):
            continue
        for pack in manifest.packs:
            runs = sorted({(m.offset, m.stored_size) for n in split.modules if (m := manifest.module(n)).pack == pack})
            assert all(a[0] + a[1] == b[0] for a, b in itertools.pairwise(runs)), (split.name, pack)
    # Packs end where splits do when they can: no component is cut unless it is over the target.
    for split in manifest.splits:
        touched = {manifest.module(n).pack for n in split.modules}
        if split.kind == "block" and sum(manifest.module(n).stored_size for n in split.modules) < MIB / 2:
            assert len(touched) <= 2, split.name


def test_the_root_does_not_depend_on_how_the_lora_is_stored(tmp_path: Path) -> None:
    small = lorachunk.pack(ATTN, tmp_path / "a", pack_size=MIB)
    whole = lorachunk.pack(ATTN, tmp_path / "b")
    slow = lorachunk.pack(ATTN, tmp_path / "c", level=9)
    assert len(small.packs) == 3 and len(whole.packs) == 1
    assert small.root == whole.root == slow.root
    assert len({small.id, whole.id, slow.id}) == 3
    assert small.split("unet").root == whole.split("unet").root


def test_a_new_version_in_the_same_store_writes_only_its_new_records(tmp_path: Path) -> None:
    store = tmp_path / "s"
    first = lorachunk.pack(SAM, store)
    tensors = load_numpy(SAM)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + 1
    save_numpy(tensors, tmp_path / "v2.safetensors")
    second = lorachunk.pack(tmp_path / "v2.safetensors", store)
    changed = [m for m in second.modules if key in {t.key for t in m.tensors}]
    (new_pack,) = set(second.packs) - set(first.packs)
    assert (store / pack_key(new_pack)).stat().st_size == sum(m.stored_size for m in changed)
    assert all(m.pack in first.packs for m in second.modules if m not in changed)
    assert lorachunk.verify(store).manifests == 2
    got = lorachunk.load(store, keys=[key], cache=False)
    assert got[key].numpy().tobytes() == tensors[key].tobytes()


def test_loads_over_http_take_one_request_per_pack_touched(tmp_path: Path) -> None:
    with serving(tmp_path / "www") as server:
        manifest = lorachunk.pack(ATTN, server.root, pack_size=MIB)
        server.log.clear()
        with lorachunk.open(server.url, cache=False) as lora:
            lora.load()
            assert lora._pipeline.requests == len(manifest.packs)
        assert len(server.gets()) == 1 + len(manifest.packs)  # the manifest, then each pack once
        split = max((s for s in manifest.splits if s.kind == "block"), key=lambda s: len(s.modules))
        touched = {manifest.module(n).pack for n in split.modules}
        server.log.clear()
        with lorachunk.open(server.url, cache=False) as lora:
            lora.load(splits=[split.name])
        assert len(server.gets()) == 1 + len(touched)


# -- hostile pack tables -----------------------------------------------------------------------


def _hostile(store: Path, change: Any) -> None:
    """Rewrite the latest manifest's JSON (canonical again) and make it the latest."""
    manifest = lorachunk.read_manifest(LocalStore(store))
    raw = json.loads(manifest.canonical())
    change(raw)
    text = json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    stored = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(text)
    from lorachunk._digest import digest

    manifest_id = digest(manifest.hash, stored)
    (store / manifest_key(manifest_id)).parent.mkdir(exist_ok=True)
    (store / manifest_key(manifest_id)).write_bytes(stored)
    (store / LATEST_MANIFEST).write_bytes(stored)
    (store / LATEST).write_text(f"{manifest_id}\n")


def _into_the_previous(raw: dict[str, Any]) -> None:
    raw["modules"][1]["offset"] = 1  # the first record starts at 0 and is longer than a byte


def _implied_offset_written_out(raw: dict[str, Any]) -> None:
    raw["modules"][1]["offset"] = raw["modules"][0]["stored_size"]


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (_into_the_previous, lorachunk.ManifestError, "pack .* points into module"),
        (_implied_offset_written_out, lorachunk.ManifestError, "offset the entry before implies"),
        (lambda raw: raw["packs"].append(dict(raw["packs"][0])), lorachunk.ManifestError, "pack .* is listed twice"),
        (lambda raw: raw["packs"][0].update(size=10), lorachunk.ManifestError, "outside pack"),
        (lambda raw: raw["modules"][0].update(pack=7), lorachunk.ManifestError, "pack 7 is not in the pack table"),
        (
            lambda raw: raw["packs"].insert(0, {"id": "xxh3-128:" + "f" * 32, "size": 1}),
            lorachunk.ManifestError,
            "out of order",
        ),
    ],
    ids=[
        "offset into another module",
        "implied offset given",
        "pack listed twice",
        "record past the pack",
        "no such pack",
        "unsorted",
    ],
)
def test_a_hostile_pack_table_is_refused_naming_the_pack(
    change: Any, error: type[Exception], match: str, tmp_path: Path
) -> None:
    lorachunk.pack(FALCON4, tmp_path / "s")
    _hostile(tmp_path / "s", change)
    with pytest.raises(error, match=match):
        lorachunk.open(tmp_path / "s", cache=False)
    with pytest.raises(lorachunk.IntegrityError, match=match):
        lorachunk.verify(tmp_path / "s")


def test_a_truncated_pack_is_named(tmp_path: Path) -> None:
    manifest = lorachunk.pack(FALCON4, tmp_path / "s")
    (pack,) = pack_files(tmp_path / "s")
    pack.write_bytes(pack.read_bytes()[:-100])
    last = max(manifest.modules, key=lambda m: m.offset)
    with pytest.raises(lorachunk.IntegrityError, match=f"{pack.name}.*truncated"):
        lorachunk.load(tmp_path / "s", modules=[last.name], cache=False)
    with pytest.raises(lorachunk.IntegrityError, match=pack.name):
        lorachunk.load(tmp_path / "s", cache=False)
    with pytest.raises(
        lorachunk.IntegrityError, match=f"pack packs/{pack.name[:2]}/{pack.name}: .* bytes where the manifest"
    ):
        lorachunk.verify(tmp_path / "s")


def test_a_manifest_naming_records_in_no_pack_cannot_be_built() -> None:
    manifest = lorachunk.read_manifest(DATA / "store-v1")
    with pytest.raises(KeyError):
        Manifest.build(
            hash=manifest.hash,
            codec=manifest.codec,
            source=manifest.source,
            modules=manifest.modules,
            splits={s.name: (s.kind, s.modules) for s in manifest.splits},
        ).to_bytes()


# -- repack ------------------------------------------------------------------------------------


def test_repack_converts_a_v1_store_and_every_pinned_root_still_opens(tmp_path: Path) -> None:
    store = tmp_path / "s"
    shutil.copytree(DATA / "store-v1", store)
    old = lorachunk.read_manifest(LocalStore(store))
    report = lorachunk.repack(store, prune=True)
    assert (report.rewritten, report.converted, report.packs_written) == (1, 1, 1)
    new = lorachunk.read_manifest(LocalStore(store))
    assert new.format == "lorachunk/2" and new.v1_root == old.root and new.root in old.roots
    assert not (store / "shards").exists() and not (store / manifest_key(old.id)).exists()
    assert report.deleted == len({m.record for m in old.modules}) + 0  # every v1 shard, pruned
    for root in (old.root, new.root):
        with lorachunk.open(store, root=root, cache=False) as lora:
            assert len(lora.load(splits=["unet.mid_block"])) > 0
    assert lorachunk.verify(store).unreferenced == 0
    out = lorachunk.unpack(store, tmp_path / "back.safetensors")
    assert out.read_bytes() == FALCON4.read_bytes()
    assert lorachunk.repack(store).rewritten == 0  # already as packed as it gets


def test_repack_gathers_a_version_scattered_over_many_packs(tmp_path: Path) -> None:
    store = tmp_path / "s"
    src = synth.kohya(tmp_path / "v.safetensors", seed=1)
    tensors = load_numpy(src)
    lorachunk.pack(src, store)
    names = sorted(k for k in tensors if "lora_down" in k)
    for version in range(4):  # each version changes one module: its record goes into a pack of its own
        tensors[names[version]] = tensors[names[version]] + 1
        save_numpy(tensors, tmp_path / "v.safetensors")
        latest = lorachunk.pack(tmp_path / "v.safetensors", store)
    assert len(latest.packs) == 5
    report = lorachunk.repack(store, prune=True)
    after = lorachunk.read_manifest(LocalStore(store))
    assert after.root == latest.root and len(after.packs) == 1
    assert report.rewritten >= 1 and lorachunk.verify(store).unreferenced == 0
    assert lorachunk.load(store, cache=False).keys() == tensors.keys()


def test_a_store_this_version_wrote_v1_and_v2_side_by_side_verifies(tmp_path: Path) -> None:
    store = tmp_path / "s"
    shutil.copytree(DATA / "store-v1", store)
    v2 = lorachunk.pack(SAM, store)
    report = lorachunk.verify(store)
    assert report.manifests == 2 and report.unreferenced == 0
    assert lorachunk.load(store, cache=False).keys() == load_numpy(SAM).keys()
    assert record_key(v2.modules[0]).startswith("packs/")
    write_manifest(LocalStore(store), lorachunk.read_manifest(LocalStore(store), v2.id))


_KILLER = """
import os, signal, sys
import lorachunk
from lorachunk.storage import LocalStore

limit, count = int(sys.argv[2]), [0]


def counted(fn):
    def wrapper(*args, **kwargs):
        count[0] += 1
        if count[0] == limit:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)

    return wrapper


# Every step that changes the folder: writing a temp file, renaming it into place, deleting.
LocalStore.set = counted(LocalStore.set)
LocalStore.delete = counted(LocalStore.delete)
os.replace = counted(os.replace)
lorachunk.repack(sys.argv[1], prune=True)
print(count[0])
"""


def test_repack_killed_at_any_point_leaves_a_store_that_verifies(tmp_path: Path) -> None:
    """kill -9 (a fault no real store gives on cue: the steps are counted in a child process)
    before each kind of step, and in the middle of the deletes: every manifest left names only
    objects that are there, and a second repack finishes the job."""
    import subprocess
    import sys

    template = tmp_path / "template"
    shutil.copytree(DATA / "store-v1", template)
    v2 = lorachunk.pack(DATA / "loras" / "smart_falcon_8_lokr.safetensors", template)
    v1 = lorachunk.read_manifest(LocalStore(template), lorachunk.read_manifest(DATA / "store-v1").id)
    script = tmp_path / "killer.py"
    script.write_text(_KILLER)

    def run(store: Path, limit: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(script), str(store), str(limit)], capture_output=True, text=True, check=False
        )

    dry = tmp_path / "dry"
    shutil.copytree(template, dry)
    steps = int(run(dry, 0).stdout)  # 0: never killed
    assert steps > 300  # two writes, their renames, one manifest and 350 shards deleted
    for limit in (1, 2, 3, 4, 5, 6, 7, steps // 2, steps):
        store = tmp_path / f"killed-{limit}"
        shutil.copytree(template, store)
        assert run(store, limit).returncode == -9
        report = lorachunk.verify(store)  # raises naming any object a manifest lacks
        assert report.manifests in (2, 3)
        # Both LoRAs are still there, each opening under its pinned root.
        for root in (v1.root, v2.root):
            (manifest_id, *_) = [i for i in list_manifest_ids(LocalStore(store)) if root in _roots(store, i)]
            with lorachunk.open(store, manifest=manifest_id, root=root, cache=False) as lora:
                assert lora.load(modules=[lora.manifest.modules[0].name])
        assert lorachunk.read_manifest(LocalStore(store)).root == v2.root  # the latest never moves
        lorachunk.repack(store, prune=True)
        finished = lorachunk.verify(store)
        assert (finished.manifests, finished.unreferenced) == (2, 0)


def _roots(store: Path, manifest_id: str) -> frozenset[str]:
    return lorachunk.read_manifest(LocalStore(store), manifest_id).roots


def test_max_gap_joins_ranges_or_keeps_them_apart(tmp_path: Path) -> None:
    from lorachunk._cli import main

    with serving(tmp_path / "www") as server:
        manifest = lorachunk.pack(ATTN, server.root)  # one pack of 2.75 MB: read by range
        first, _, third = sorted(manifest.modules, key=lambda m: m.offset)[:3]  # a record apart
        for max_gap, requests in ((256 * 1024, 1), (0, 2)):
            server.log.clear()
            lorachunk.load(server.url, modules=[first.name, third.name], cache=False, max_gap=max_gap)
            assert len(server.gets("/packs/")) == requests
        server.log.clear()
        args = ["pull", server.url, "-o", str(tmp_path / "c"), "--module", first.name, "--module", third.name]
        assert main([*args, "--max-gap", "0", "--no-cache", "-q"]) == 0
        assert len(server.gets("/packs/")) == 2
    with pytest.raises(lorachunk.UsageError, match="max_gap"):
        lorachunk.open(tmp_path / "c", max_gap=-1)


def test_a_reader_holding_a_manifest_a_prune_replaced_is_told_to_open_again(tmp_path: Path) -> None:
    """docs/security.md: after `repack --prune`, a handle opened before it finds its records gone
    (ObjectNotFoundError, no wrong byte), and opening again gives the same LoRA."""
    store = tmp_path / "s"
    shutil.copytree(DATA / "store-v1", store)
    with lorachunk.open(store, cache=False) as before:
        lorachunk.repack(store, prune=True)
        with pytest.raises(lorachunk.ObjectNotFoundError):
            before.load()
        with lorachunk.open(store, root=before.root, cache=False) as again:
            assert again.load().keys() == load_numpy(FALCON4).keys()
