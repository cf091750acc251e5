"""A store is a library (issue #25): names, versions, SOURCE#NAME everywhere, the catalog, rm."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import zstandard
from conftest import DATA

import lorachunk
from lorachunk._catalog import Catalog, Version, read_catalog
from lorachunk._cli import main
from lorachunk._info import info_dict
from lorachunk._keys import CATALOG, LATEST
from lorachunk.storage import LocalStore
from lorachunk.testing.http_server import serve

LORAS = DATA / "loras"
FALCON4 = LORAS / "smart_falcon_4_lokr.safetensors"
FALCON8 = LORAS / "smart_falcon_8_lokr.safetensors"
SAM = LORAS / "sam_lora_rank16.safetensors"
ATTN = LORAS / "diffusers_sd15_attnproc.safetensors"


@pytest.fixture
def library(tmp_path: Path) -> Path:
    """Three names, one of them in two versions (falcon: rank 4, then rank 8)."""
    store = tmp_path / "www" / "lib"
    lorachunk.pack(FALCON4, store, name="falcon")
    lorachunk.pack(SAM, store)
    lorachunk.pack(FALCON8, store, name="falcon")
    lorachunk.pack(ATTN, store, name="Ink")
    return store


@pytest.mark.parametrize(
    "name", ["../x", "a/b", "a#b", "a@b", "a b", "bad\x00", "é", "x" * 129, "", ".hidden", "-x", "a\nb"]
)
def test_hostile_names_are_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(lorachunk.UsageError, match="not valid"):
        lorachunk.pack(SAM, tmp_path / "s", name=name)
    assert not (tmp_path / "s").exists()


def test_default_names_and_versions(library: Path, capsys: pytest.CaptureFixture[str]) -> None:
    catalog = read_catalog(LocalStore(library))
    assert catalog is not None
    assert {n: len(v) for n, v in catalog.names().items()} == {"Ink": 1, "falcon": 2, "sam_lora_rank16": 1}
    assert main(["ls", str(library)]) == 0
    out = capsys.readouterr().out
    assert "3 LoRAs" in out and "v2/2" in out and "sd_v1" in out
    assert main(["ls", str(library), "--all"]) == 0
    assert "v1/2" in capsys.readouterr().out
    with lorachunk.open(f"{library}#falcon", cache=False) as lora:
        assert lora.manifest.source.name == FALCON8.name  # the latest version
    with lorachunk.open(f"{library}#falcon@1", cache=False) as lora:
        assert lora.manifest.source.name == FALCON4.name
    first = catalog.names()["falcon"][0].manifest
    assert lorachunk.read_manifest(f"{library}#{first[9:21]}").id == first  # a manifest id's hex prefix
    with pytest.raises(lorachunk.UsageError, match="no LoRA named 'ink'"):  # names are case-sensitive
        lorachunk.open(f"{library}#ink", cache=False)
    with pytest.raises(lorachunk.UsageError, match="no version '3'"):
        lorachunk.open(f"{library}#falcon@3", cache=False)


def test_every_entry_point_takes_source_hash_name(library: Path, tmp_path: Path) -> None:
    reference = lorachunk.read_manifest(library, "sam_lora_rank16")
    with serve(library.parent) as server:
        url = f"{server.url}/lib#sam_lora_rank16"
        assert lorachunk.read_manifest(url).id == reference.id
        assert len(lorachunk.load(url, cache=False)) == 48
        assert info_dict(url, None)["name"] == "sam_lora_rank16"
        assert lorachunk.verify(url).manifests == 1
        out = lorachunk.unpack(url, tmp_path / "sam.safetensors")
        assert out.read_bytes() == SAM.read_bytes()
        lorachunk.pull(url, tmp_path / "copy", cache=False)
        assert all("#" not in r.path for r in server.log)  # the fragment never reaches the server
        # catalog + manifest + packs, and nothing else
        server.log.clear()
        lorachunk.load(url, cache=False)
        assert [r.path.rsplit("/", 1)[0] for r in server.log] == [
            "/lib/refs",
            "/lib/manifests/" + reference.id[9:11],
        ] + ["/lib/packs/" + p[9:11] for p in reference.packs]
    assert lorachunk.read_manifest(tmp_path / "copy").name == "sam_lora_rank16"
    assert main(["unpack", f"{library}#falcon@1", "-o", str(tmp_path / "f.safetensors"), "-q"]) == 0
    assert (tmp_path / "f.safetensors").read_bytes() == FALCON4.read_bytes()
    assert main(["info", f"{library}#Ink", "--json"]) == 0
    with pytest.raises(lorachunk.UsageError, match="name it once"):
        lorachunk.open(f"{library}#Ink", manifest="falcon")


def test_a_root_pin_selects_in_a_store_of_many(library: Path) -> None:
    four = lorachunk.read_manifest(library, "falcon@1")
    with serve(library.parent) as server:
        with lorachunk.open(f"{server.url}/lib", root=four.root, cache=False) as lora:
            assert lora.manifest.id == four.id
        with lorachunk.open(f"{server.url}/lib#{four.root}", cache=False) as lora:
            assert lora.manifest.id == four.id


def test_an_open_without_a_name_says_which_it_took(library: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(library)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("note:") is False or "Ink" in err  # info reads no LoRA implicitly by open
    assert main(["unpack", str(library), "-o", str(library.parent / "x.safetensors"), "-q"]) == 0
    main(["pull", str(library), "-o", str(library.parent / "copy"), "-q", "--no-cache"])
    assert "note:" in capsys.readouterr().err


def _write_catalog(store: Path, versions: list[Version]) -> None:
    (store / CATALOG).write_bytes(Catalog(tuple(versions)).to_bytes())


def test_hostile_catalogs(library: Path) -> None:
    catalog = read_catalog(LocalStore(library))
    assert catalog is not None
    ink = catalog.names()["Ink"][0]
    sam = catalog.names()["sam_lora_rank16"][0]
    # A name pointed at another LoRA's manifest: the manifest says whose it is.
    others = [v for v in catalog.versions if v is not sam]
    _write_catalog(library, [*others, Version(**{**_fields(sam), "name": "Ink"})])  # type: ignore[arg-type]
    with pytest.raises(lorachunk.IntegrityError, match=r"the catalog names .* for 'Ink'"):
        lorachunk.open(f"{library}#Ink", cache=False)
    # ... and a reader pinning Ink's root is refused whatever the catalog says.
    with pytest.raises(lorachunk.IntegrityError):
        lorachunk.open(f"{library}#Ink", root=ink.root, cache=False)
    # A manifest that does not exist: a clear error, and verify names it.
    ghost = Version(**{**_fields(ink), "manifest": "xxh3-128:" + "0" * 32, "name": "ghost"})  # type: ignore[arg-type]
    _write_catalog(library, [*catalog.versions, ghost])
    with pytest.raises(lorachunk.ObjectNotFoundError):
        lorachunk.open(f"{library}#ghost", cache=False)
    with pytest.raises(lorachunk.IntegrityError, match="'ghost' names manifest"):
        lorachunk.verify(library)
    # Truncated, not zstd, NaN inside, a huge declared size: ManifestError, never a crash.
    good = catalog.to_bytes()
    for bad in (
        good[:-5],
        b"not zstd",
        zstandard.ZstdCompressor().compress(b'["lorachunk-catalog/1"]\n["add","Ink",NaN]\n'),
        zstandard.ZstdCompressor().compress(b'["lorachunk-catalog/9"]\n'),
    ):
        (library / CATALOG).write_bytes(bad)
        with pytest.raises(lorachunk.ManifestError):
            lorachunk.open(f"{library}#Ink", cache=False)
    # The same version listed twice is listed once.
    (library / CATALOG).write_bytes(good + good[:0])
    _write_catalog(library, [*catalog.versions, ink])
    assert len(read_catalog(LocalStore(library)).versions) == len(catalog.versions)  # type: ignore[union-attr]
    # repack writes it again from the manifests
    (library / CATALOG).write_bytes(b"garbage")
    lorachunk.repack(library)
    again = read_catalog(LocalStore(library))
    assert again is not None and set(again.names()) == set(catalog.names())
    assert lorachunk.verify(library).manifests == 4


def _fields(version: Version) -> dict[str, object]:
    return {f: getattr(version, f) for f in Version.__dataclass_fields__}


def test_rm_of_the_latest_and_of_a_name(library: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ink = lorachunk.read_manifest(library)
    assert ink.name == "Ink"
    assert main(["rm", f"{library}#Ink"]) == 0
    assert "removed 1 version" in capsys.readouterr().out
    latest = lorachunk.read_manifest(library)
    assert latest.name == "falcon" and latest.source.name == FALCON8.name  # the newest left
    assert (library / LATEST).read_text().strip() == latest.id
    with pytest.raises(lorachunk.UsageError, match="no LoRA named 'Ink'"):
        lorachunk.open(f"{library}#Ink", cache=False)
    first = lorachunk.read_manifest(library, "falcon@1").id
    assert lorachunk.remove(library, manifest="falcon@1") == [first]
    before = sum(p.stat().st_size for p in (library / "packs").rglob("*") if p.is_file())
    report = lorachunk.repack(library, prune=True)
    assert report.deleted_bytes > 0
    assert sum(p.stat().st_size for p in (library / "packs").rglob("*") if p.is_file()) < before
    assert lorachunk.verify(library).manifests == 2
    assert main(["rm", f"{library}#nothing"]) == 2
    for name in ("falcon", "sam_lora_rank16"):
        lorachunk.remove(f"{library}#{name}")
    assert not (library / LATEST).exists()
    assert main(["ls", str(library)]) == 0 and "0 LoRAs" in capsys.readouterr().out


def test_a_store_written_before_names_is_read_by_name(tmp_path: Path) -> None:
    store = tmp_path / "v2"
    shutil.copytree(DATA / "store-v2", store)
    with lorachunk.open(f"{store}#smart_falcon_4_lokr", cache=False) as lora:
        assert len(lora) == 1750
    assert info_dict(str(store), None)["store"]["names"] == 1


def test_a_name_that_looks_like_a_hex_prefix_is_still_a_name(tmp_path: Path) -> None:
    store = tmp_path / "s"
    lorachunk.pack(SAM, store, name="cafe01")
    second = lorachunk.pack(FALCON4, store, name="cafe01")
    assert lorachunk.read_manifest(f"{store}#cafe01").id == second.id  # its latest, not "ambiguous"
