"""Push to and pull from a Hub-protocol server on 127.0.0.1, driven by the real huggingface_hub client."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DATA, HUB_TOKEN
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

import lorachunk
from lorachunk._cli import main as cli
from lorachunk._info import ls_dicts
from lorachunk._keys import CATALOG, LATEST_MANIFEST, manifest_key, pack_key
from lorachunk._repository import record_key
from lorachunk.storage import HubStore, Store
from lorachunk.testing import Put, StoreTests
from lorachunk.testing.hub_server import HubServer

ATTN = DATA / "loras" / "diffusers_sd15_attnproc.safetensors"
SAM = DATA / "loras" / "sam_lora_rank16.safetensors"
FALCON = DATA / "loras" / "smart_falcon_16_lokr.safetensors"
REPO = "me/ink"


class TestHubStore(StoreTests):
    """The shared contract; objects are placed into the commit the store is pinned to."""

    @pytest.fixture
    def store(self, hub: HubServer) -> Iterator[Store]:
        from huggingface_hub import HfApi

        HfApi(endpoint=hub.url, token=HUB_TOKEN).create_repo(REPO)
        with HubStore(REPO, path="lora", retries=1, backoff=0.01) as store:
            yield store

    @pytest.fixture
    def put(self, hub: HubServer) -> Put:
        return lambda key, data: hub.place(REPO, f"lora/{key}", data)


def _split_with_fewest_modules(manifest: lorachunk.Manifest) -> lorachunk.Split:
    return min((s for s in manifest.splits if 0 < len(s.modules) < len(manifest.modules)), key=lambda s: len(s.modules))


def test_push_then_pull_whole_and_one_split(hub: HubServer, tmp_path: Path) -> None:
    result = lorachunk.push(ATTN, REPO)
    manifest = lorachunk.read_manifest(lorachunk.storage.LocalStore(_packed(tmp_path, ATTN)))
    assert result.root == manifest.root and result.skipped == 0
    assert result.uploaded == len(manifest.packs) == 1
    assert result.card_written
    # Every request carried the token (the LFS upload URL is the server's own, pre-signed in real life).
    assert all(r.authorization == f"Bearer {HUB_TOKEN}" for r in hub.log if "/lfs-upload/" not in r.path)

    out = tmp_path / "back.safetensors"
    lorachunk.unpack(f"hf://{REPO}", out)
    assert out.read_bytes() == ATTN.read_bytes()

    split = _split_with_fewest_modules(manifest)
    hub.log.clear()
    lorachunk.pull(f"hf://{REPO}", tmp_path / "part", splits=[split.name], cache=False)
    wanted = {record_key(manifest.module(n)) for n in split.modules}
    fetched = [p for p in hub.resolved() if p.startswith("packs/")]
    assert fetched == sorted(wanted) and len(wanted) == 1
    # 1 + (packs touched) resolve requests: one brings the manifest and resolves the revision
    # (X-Repo-Commit); the split's records are one range of the pack, read at that commit.
    first, *rest = hub.requests("GET", "/resolve/")
    assert first.path == f"/{REPO}/resolve/main/refs/latest.json.zst"
    assert [r.path for r in rest] == [f"/{REPO}/resolve/{result.commit}/{key}" for key in wanted]
    part = lorachunk.load(tmp_path / "part", splits=[split.name])
    reference = load_numpy(ATTN)
    assert {k: v.numpy().tobytes() for k, v in part.items()} == {k: reference[k].tobytes() for k in part}


def _manifest(source: str | Path) -> lorachunk.Manifest:
    with lorachunk.open(source) as lora:
        return lora.manifest


def _packed(tmp_path: Path, src: Path) -> Path:
    dest = tmp_path / f"packed-{src.stem}"
    if not dest.exists():
        lorachunk.pack(src, dest)
    return dest


def test_second_version_uploads_only_the_changed_shard(hub: HubServer, tmp_path: Path) -> None:
    first = lorachunk.push(_packed(tmp_path, SAM), REPO)
    tensors = load_numpy(SAM)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + 1
    changed = tmp_path / "v2.safetensors"
    save_numpy(tensors, changed)
    hub.log.clear()
    second = lorachunk.push(changed, REPO)
    v2 = lorachunk.read_manifest(lorachunk.storage.LocalStore(_packed(tmp_path, changed)))
    assert first.uploaded == 1 and second.uploaded == 1 and second.skipped == len(v2.modules) - 1
    uploads = hub.requests("PUT", "/lfs-upload/")
    assert len(uploads) == 3  # a pack of the changed record, the new manifest, the catalog; refs go inline
    pushed = lorachunk.read_manifest(f"hf://{REPO}")
    assert pushed.root == v2.root and pushed.id == second.manifest_id
    changed_records = {m.stored_size for m in v2.modules if key in {t.key for t in m.tensors}}
    with HubStore(REPO) as remote:
        catalog = len(remote.get(CATALOG))
    assert sum(r.received for r in uploads) == sum(changed_records) + len(pushed.to_bytes()) + catalog
    # One commit, of 4 + (new packs) files: the manifest, the two refs, the catalog and the pack.
    assert len(hub.requests("POST", "/commit/")) == 1
    commits = hub.repos[("model", REPO)].commits
    before, after = commits[first.commit], commits[second.commit]
    touched = {path for path, entry in after.items() if before.get(path) != entry}
    assert touched == {manifest_key(pushed.id), "refs/latest", "refs/latest.json.zst", CATALOG} | {
        pack_key(pack)
        for pack in pushed.packs
        if pack not in lorachunk.read_manifest(f"hf://{REPO}@{first.commit}").packs
    }
    assert len(touched) == 5
    assert not second.card_written  # the card from the first push is left alone

    # Both versions stay loadable, each by its commit.
    old = lorachunk.load(f"hf://{REPO}@{first.commit}", keys=[key])
    new = lorachunk.load(f"hf://{REPO}@{second.commit}", keys=[key])
    assert old[key].numpy().tobytes() == load_numpy(SAM)[key].tobytes()
    assert new[key].numpy().tobytes() == tensors[key].tobytes()


def test_two_loras_sharing_modules_upload_shared_shards_once(hub: HubServer, tmp_path: Path) -> None:
    tensors = load_numpy(SAM)  # modules w_000 … w_023, each w_a_NNN + w_b_NNN
    sibling = tmp_path / "sibling.safetensors"
    save_numpy({k: v for k, v in tensors.items() if int(k[-3:]) < 12}, sibling)
    lorachunk.push(SAM, REPO)
    hub.log.clear()
    result = lorachunk.push(sibling, REPO)
    assert result.uploaded == 0 and result.skipped > 0
    assert len(hub.requests("PUT", "/lfs-upload/")) == 2  # only the sibling's manifest and the catalog
    # The first LoRA is still there, by its manifest id, next to the second.
    with HubStore(REPO) as store:
        assert len(list(store.list_prefix("manifests/"))) == 2


def test_revision_is_pinned_for_the_whole_read(hub: HubServer, tmp_path: Path) -> None:
    lorachunk.push(SAM, REPO)
    with lorachunk.open(f"hf://{REPO}", cache=False) as lora:
        tensors = load_numpy(SAM)
        tensors = {k: v * 2 for k, v in tensors.items()}
        save_numpy(tensors, tmp_path / "v2.safetensors")
        lorachunk.push(tmp_path / "v2.safetensors", REPO)  # lands in the middle of our read
        got = lora.load()
    original = load_numpy(SAM)
    assert all(got[k].numpy().tobytes() == original[k].tobytes() for k in original)


def test_create_pr_leaves_main_alone(hub: HubServer, tmp_path: Path) -> None:
    first = lorachunk.push(SAM, REPO)
    tensors = {k: v * 3 for k, v in load_numpy(SAM).items()}
    save_numpy(tensors, tmp_path / "v2.safetensors")
    pr = lorachunk.push(tmp_path / "v2.safetensors", REPO, create_pr=True)
    assert pr.pr_url is not None and pr.pr_url.endswith("/discussions/1")
    assert _manifest(f"hf://{REPO}").root == first.root
    assert _manifest(f"hf://{REPO}@refs%2Fpr%2F1").root == pr.root


def test_push_to_a_new_branch(hub: HubServer) -> None:
    main = lorachunk.push(SAM, REPO)
    branch = lorachunk.push(ATTN, REPO, revision="attn")
    assert _manifest(f"hf://{REPO}").root == main.root
    assert _manifest(f"hf://{REPO}@attn").root == branch.root
    assert lorachunk.push(ATTN, REPO, revision="attn").uploaded == 0  # the branch exists now: no error


def test_wrong_token_is_refused_without_showing_it(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    lorachunk.push(SAM, REPO)
    wrong = "hf_wrong_token_0123456789"
    monkeypatch.setenv("HF_TOKEN", wrong)
    with pytest.raises(lorachunk.AuthenticationError) as caught:
        lorachunk.open(f"hf://{REPO}")
    assert isinstance(caught.value, PermissionError)
    assert wrong not in str(caught.value) and HUB_TOKEN not in str(caught.value)
    with pytest.raises(lorachunk.AuthenticationError) as pushed:
        lorachunk.push(SAM, "me/other")
    assert wrong not in str(pushed.value)


def test_missing_repo_revision_and_shard(hub: HubServer) -> None:
    manifest = lorachunk.pack(SAM, lorachunk.storage.MemoryStore())
    with pytest.raises(lorachunk.RepositoryNotFoundError, match="repository not found"):
        lorachunk.open("hf://me/nothing-here")
    lorachunk.push(SAM, REPO)
    with pytest.raises(lorachunk.RepositoryNotFoundError, match="revision not found"):
        lorachunk.open(f"hf://{REPO}@no-such-branch")
    module = manifest.modules[0]
    hub.remove(REPO, record_key(module))
    with (
        lorachunk.open(f"hf://{REPO}", cache=False, retries=0) as lora,
        pytest.raises(lorachunk.ObjectNotFoundError, match=module.name),
    ):
        lora.load(modules=[module.name])


def test_repo_pushed_before_the_latest_copy_is_read_through_the_ref(hub: HubServer) -> None:
    manifest = lorachunk.push(SAM, REPO)
    hub.remove(REPO, LATEST_MANIFEST)
    hub.log.clear()
    with lorachunk.open(f"hf://{REPO}", cache=False) as lora:
        assert lora.manifest.id == manifest.manifest_id
    paths = [r.path.rpartition("/resolve/")[2] for r in hub.requests("GET", "/resolve/")]
    manifest_path = f"{manifest.commit}/{manifest_key(lora.manifest.id)}"
    assert paths == ["main/refs/latest.json.zst", "main/refs/latest", manifest_path]


def test_corrupted_shard_on_the_hub_is_refused_and_not_cached(hub: HubServer, tmp_path: Path) -> None:
    lorachunk.push(SAM, REPO)
    manifest = _manifest(f"hf://{REPO}")
    module = next(m for m in manifest.modules if m.offset == 0)  # corrupt flips the pack's first byte
    hub.corrupt(REPO, record_key(module))
    cache = lorachunk.Cache(tmp_path / "cache")
    with pytest.raises(lorachunk.IntegrityError), lorachunk.open(f"hf://{REPO}", cache=cache) as lora:
        lora.load(modules=[module.name])
    assert not cache.contains(module.record)


def test_offline_after_a_pull_makes_no_request(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    lorachunk.push(SAM, REPO)
    online = lorachunk.load(f"hf://{REPO}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.log.clear()
    offline = lorachunk.load(f"hf://{REPO}")
    assert hub.log == []
    assert all(offline[k].numpy().tobytes() == online[k].numpy().tobytes() for k in online)
    with pytest.raises(lorachunk.StoreUnavailableError, match="offline"):
        lorachunk.open("hf://me/never-pulled")
    with pytest.raises(lorachunk.StoreUnavailableError, match="HF_HUB_OFFLINE"):
        lorachunk.push(SAM, REPO)


def test_model_card(hub: HubServer, tmp_path: Path) -> None:
    from huggingface_hub import hf_hub_download

    result = lorachunk.push(ATTN, REPO)
    card = Path(hf_hub_download(REPO, "README.md", endpoint=hub.url, cache_dir=tmp_path / "hf")).read_text()
    assert card.startswith("---\ntags:\n- lorachunk\n")
    assert f'lorachunk.open("hf://{REPO}", root="{result.root}")' in card
    manifest = _manifest(f"hf://{REPO}")
    assert all(f"| `{s.name}` |" in card for s in manifest.splits)
    # A card already there is the owner's: left alone, unless asked.
    assert not lorachunk.push(SAM, REPO).card_written
    assert lorachunk.push(SAM, REPO, update_card=True).card_written
    card = Path(hf_hub_download(REPO, "README.md", endpoint=hub.url, cache_dir=tmp_path / "hf2")).read_text()
    assert "# sam_lora_rank16.safetensors" in card


def test_subfolder_and_cli(hub: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    packed = _packed(tmp_path, SAM)
    assert cli(["push", str(packed), REPO, "--path", "loras/sam", "-q"]) == 0
    assert cli(["info", f"hf://{REPO}/loras/sam"]) == 0
    assert "sam_lora_rank16" in capsys.readouterr().out
    assert cli(["unpack", f"hf://{REPO}/loras/sam", "-o", str(tmp_path / "x.safetensors"), "-q"]) == 0
    assert (tmp_path / "x.safetensors").read_bytes() == SAM.read_bytes()
    assert cli(["push", str(SAM), REPO, "--path", "loras/sam"]) == 0
    assert "pushed 0 packs (" in capsys.readouterr().out  # every record already there
    assert cli(["pull", "hf://me/missing", "-o", str(tmp_path / "y")]) == 3
    assert "repository not found" in capsys.readouterr().err


def test_hub_url_parsing() -> None:
    from lorachunk.storage._hub import parse_hf_url

    assert parse_hf_url("hf://datasets/me/x@v1.0/a/b") == {
        "repo_id": "me/x",
        "repo_type": "dataset",
        "revision": "v1.0",
        "path": "a/b",
    }
    assert parse_hf_url("hf://me/x")["revision"] is None
    for bad in ("hf://justone", "hf://me/x/../../etc", "hf://../x"):
        with pytest.raises(lorachunk.UsageError):
            parse_hf_url(bad)


def test_push_of_a_copy_of_a_clone_is_a_local_store(hub: HubServer, tmp_path: Path) -> None:
    """The repo layout is the local layout: pulling everything gives a folder that verifies and loads."""
    lorachunk.push(SAM, REPO)
    lorachunk.pull(f"hf://{REPO}", tmp_path / "clone")
    assert lorachunk.verify(tmp_path / "clone").records > 0
    shutil.copytree(tmp_path / "clone", tmp_path / "copy")
    assert (tmp_path / "copy" / manifest_key(_manifest(tmp_path / "copy").id)).is_file()


def test_token_stays_with_the_hub_on_cdn_redirects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub answers LFS files with a redirect to its CDN; the token must not follow it."""
    from lorachunk.testing.hub_server import serve_hub

    with serve_hub(token=HUB_TOKEN, cdn=True) as cdn_hub:
        monkeypatch.setenv("HF_ENDPOINT", cdn_hub.url)
        monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
        lorachunk.push(SAM, REPO)
        cdn_hub.log.clear()
        got = lorachunk.load(f"hf://{REPO}", cache=False)
        downloads = cdn_hub.requests("GET", "/cdn/")
    reference = load_numpy(SAM)
    assert {k: v.numpy().tobytes() for k, v in got.items()} == {k: v.tobytes() for k, v in reference.items()}
    assert len(downloads) == 2  # the pack and the manifest came from the CDN
    assert all(r.authorization is None for r in downloads)
    assert all(r.authorization == f"Bearer {HUB_TOKEN}" for r in cdn_hub.requests("GET", "/resolve/"))


def test_tree_listing_follows_pages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub pages long listings (Link headers); push and listing must see every page."""
    from lorachunk.testing.hub_server import serve_hub

    with serve_hub(token=HUB_TOKEN, page_size=5) as paged:
        monkeypatch.setenv("HF_ENDPOINT", paged.url)
        monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
        first = lorachunk.push(SAM, REPO, pack_size=1024 * 1024)
        again = lorachunk.push(SAM, REPO, pack_size=1024 * 1024)
        assert first.uploaded == 2 and (again.uploaded, again.skipped) == (0, 24)  # every pack seen across pages
        with HubStore(REPO) as store:
            assert len(list(store.list_prefix("packs/"))) == first.uploaded
        assert paged.requests("GET", "cursor=")


def test_a_library_goes_up_in_one_commit_and_loads_by_name(hub: HubServer, tmp_path: Path) -> None:
    """Issue #25 item 6: a store of several named LoRAs, one push, one commit; hf://…#NAME loads
    one; the card lists them; the next LoRA is one commit of at most 5 files."""
    store = tmp_path / "lib"
    lorachunk.pack(SAM, store, name="sam")
    lorachunk.pack(ATTN, store, name="attn")
    result = lorachunk.push(store, REPO)
    assert len(hub.requests("POST", "/commit/")) == 1 and result.card_written
    assert lorachunk.read_manifest(f"hf://{REPO}#sam").name == "sam"
    assert len(lorachunk.load(f"hf://{REPO}#attn")) == len(load_numpy(ATTN))
    with HubStore(REPO) as remote:
        card = remote.get("README.md").decode()
    assert "2 LoRAs in this repo" in card and "| `attn` | sd_v1 |" in card and card.startswith("---\ntags:")
    lorachunk.pack(DATA / "loras" / "smart_falcon_4_lokr.safetensors", store, name="falcon")
    before = hub.repos[("model", REPO)].commits[result.commit]
    third = lorachunk.push(f"{store}#falcon", REPO)
    after = hub.repos[("model", REPO)].commits[third.commit]
    assert len({p for p, e in after.items() if before.get(p) != e}) <= 5
    rows = {row["name"] for row in ls_dicts(f"hf://{REPO}")}
    assert rows == {"sam", "attn", "falcon"}


def test_many_split_loads_resolve_each_pack_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue #27 item 5: the Hub allows 3,000-5,000 resolves per 5 minutes; a program loading
    split after split of one handle must not spend one per read."""
    from lorachunk.testing.hub_server import serve_hub

    with serve_hub(token=HUB_TOKEN, cdn=True) as cdn_hub:
        cdn_hub.cdn_ttl = 3600
        monkeypatch.setenv("HF_ENDPOINT", cdn_hub.url)
        monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
        lorachunk.push(FALCON, REPO, pack_size=1024 * 1024)
        cdn_hub.log.clear()
        with lorachunk.open(f"hf://{REPO}", cache=False) as lora:
            packs = {m.pack for m in lora.manifest.modules}
            splits = [s for s in lora.splits if s.startswith(("IN", "OUT", "MID"))]
            for split in splits:
                lora.load(splits=[split])
            resolves = cdn_hub.requests("GET", "/resolve/")
            assert len(splits) > len(packs) > 1
            assert len(resolves) <= 1 + len(packs)  # the manifest's, and each pack's once
            cdn_hub.cdn_key += 1  # the CDN's URLs go stale: each is resolved again, once
            cdn_hub.log.clear()
            for split in splits:
                lora.load(splits=[split])
            assert len(cdn_hub.requests("GET", "/resolve/")) <= len(packs)
            assert all(r.authorization is None for r in cdn_hub.requests("GET", "/cdn/"))
