"""push: publish a packed LoRA to a Hugging Face Hub repo in one commit, uploading only the
module records it lacks.

A repo holds the same layout as a local folder (``refs/latest``, ``manifests/``, ``packs/``), at
its root or under a path, so a clone is a valid :class:`~lorachunk.storage.LocalStore` and several
LoRAs or versions share one repo's records. The Hub itself is reached through
:mod:`lorachunk.storage._hub`, the one module that imports huggingface_hub.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from lorachunk._catalog import Catalog, Version, frame, ordered_versions, read_catalog
from lorachunk._digest import check
from lorachunk._exceptions import ObjectNotFoundError, StoreError, UsageError
from lorachunk._keys import ADAPTER_WEIGHTS, CATALOG, PACKS, flat_twin, pack_key
from lorachunk._manifest import Manifest
from lorachunk._packing import layout_order
from lorachunk._repository import fetch_records, list_manifest_ids, manifest_objects, read_manifest, split_source
from lorachunk._threads import cpu_threads
from lorachunk._writer import Held, Writer, held_records, placed_manifest
from lorachunk.storage._base import Store, check_key
from lorachunk.storage._hub import REPO_ID, HubRepo, HubStore
from lorachunk.storage._local import LocalStore

__all__ = ["CARD", "PushResult", "model_card", "push"]

CARD: Final = "README.md"
#: A local pack is uploaded whole when the records the repo lacks are at least 1/1.05 of it.
_MAX_OVERHEAD: Final = 1.05


@dataclass(frozen=True, slots=True)
class PushResult:
    """What :func:`push` did. ``uploaded`` counts the packs sent (``uploaded_bytes``: with the
    manifest); ``skipped`` the records the repo had already, which the new manifest names where
    they are."""

    repo_id: str
    commit: str
    commit_url: str
    pr_url: str | None
    manifest_id: str
    root: str
    uploaded: int
    uploaded_bytes: int
    skipped: int
    card_written: bool


@contextmanager
def _packed(src: str | os.PathLike[str], pack_options: dict[str, Any]) -> Iterator[LocalStore]:
    """``src`` as a packed folder: as is, or packed into a temporary one if it is a file or a
    PEFT adapter folder."""
    path = Path(src)
    if path.is_dir() and not (path / ADAPTER_WEIGHTS).is_file():
        if pack_options:
            raise UsageError(f"{src} is already packed; pack options apply to .safetensors files only")
        yield LocalStore(path)
        return
    if not path.exists():
        raise UsageError(f"{src}: no such file or folder")
    from lorachunk._pack import pack

    with tempfile.TemporaryDirectory(prefix="lorachunk-push-") as tmp:
        pack(path, tmp, **pack_options)
        yield LocalStore(tmp)


def push(
    src: str | os.PathLike[str],
    repo_id: str,
    *,
    revision: str | None = None,
    repo_type: str = "model",
    path: str | None = None,
    manifest: str | None = None,
    private: bool | None = None,
    create_pr: bool = False,
    message: str | None = None,
    update_card: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    **pack_options: Any,
) -> PushResult:
    """Publish a packed LoRA (or a ``.safetensors`` file, packed on the fly) to a Hub repo.

    The repo (and the branch ``revision``) is created if missing. One commit adds the manifest,
    ``refs/latest`` and its copy, the packs holding the records the repo lacks, and a model card
    when the repo has none (or with ``update_card``). Records the repo's manifests already place
    are not uploaded: the pushed manifest names them where they are (same root, a manifest id of
    its own). A local pack whose records are nearly all new goes up as it is; the other new
    records go into new packs.

    ``manifest`` picks one of several manifests in a packed folder (default: its latest);
    ``pack_options`` (``splits=``, ``level=``, ``hash=``) apply when ``src`` is a file.

    Raises :class:`AuthenticationError` when the token may not write, :class:`RepositoryNotFoundError`
    for a missing revision, :class:`IntegrityError` when a local record or pack does not match the
    manifest (each is checked before it leaves).
    """
    prefix = f"{check_key(path.strip('/'))}/" if path and path.strip("/") else ""
    repo = HubRepo(repo_id, revision=revision, repo_type=repo_type, token=token, endpoint=endpoint)
    local, manifest = split_source(src, manifest)
    if isinstance(local, Store):
        raise UsageError("push takes a packed folder or a .safetensors file")
    with _packed(local, pack_options) as store, tempfile.TemporaryDirectory(prefix="lorachunk-push-") as tmp:
        chosen = _chosen(store, manifest)
        present = repo.files(private=private)
        with _remote(repo, prefix, token=token, endpoint=endpoint) as remote:
            staging = LocalStore(tmp)
            files: list[tuple[str, bytes | Path]] = []
            pushed: list[Manifest] = []
            uploads: list[tuple[str, Path]] = []
            reused = 0
            versions: list[Version] = []  # for the repo's catalog: each with the bytes it sent
            staged = Held({}, {})
            for packed in chosen:
                one, sent, skipped, staged = _push_one(
                    store,
                    staging=staging,
                    remote=remote,
                    packed=packed,
                    present=present,
                    prefix=prefix,
                    staged=staged,
                )
                pushed.append(one)
                uploads += sent
                reused += skipped
                versions.append(Version.of(one, new_bytes=sum(p.stat().st_size for _, p in sent)))
                present |= {key for key, _ in sent}
                for key, value in manifest_objects(one)[:1]:
                    if prefix + key not in present:
                        files.append((prefix + key, value))
                        present.add(prefix + key)
            catalog = _catalog_bytes(remote, versions)
        uploaded_bytes = sum(p.stat().st_size for _, p in uploads) + sum(
            len(v) for _, v in files if isinstance(v, bytes)
        )
        latest = pushed[-1]
        # The manifests go up first (upload_first): the latest's copy repeats one's bytes.
        manifests_first = len(files)
        files += [*uploads, *((prefix + key, value) for key, value in manifest_objects(latest)[1:])]
        files.append((prefix + CATALOG, catalog))
        card = CARD not in present or update_card
        if card:
            files.append((CARD, model_card(latest, repo_id, path=prefix.rstrip("/"), library=pushed).encode()))
        what = latest.source.name if len(pushed) == 1 else f"{len(pushed)} LoRAs"
        summary = message or f"lorachunk: push {what} ({len(uploads)} new packs)"
        commit = repo.commit(files, message=summary, create_pr=create_pr, upload_first=manifests_first)
    return PushResult(
        repo_id=repo_id,
        commit=commit.oid,
        commit_url=commit.url,
        pr_url=commit.pr_url,
        manifest_id=latest.id,
        root=latest.root,
        uploaded=len(uploads),
        uploaded_bytes=uploaded_bytes,
        skipped=reused,
        card_written=card,
    )


def _chosen(store: LocalStore, selector: str | None) -> list[Manifest]:
    """What to push: the LoRA ``selector`` names; without one, every version the folder's catalog
    lists (a library goes up in one commit), or its latest where it has none."""
    if selector is not None:
        return [read_manifest(store, selector)]
    catalog = read_catalog(store)
    if catalog is None or len(catalog.versions) < 2:
        return [read_manifest(store)]
    latest = read_manifest(store)
    chosen = [read_manifest(store, v.manifest) for v in catalog.versions if v.manifest != latest.id]
    return [*chosen, latest]  # the latest last: it is what refs/latest names


@contextmanager
def _remote(repo: HubRepo, prefix: str, *, token: str | None, endpoint: str | None) -> Iterator[HubStore | None]:
    """The repo as a store to read its manifests and catalog from; None while it holds none."""
    try:
        remote = HubStore(
            repo.repo_id,
            revision=repo.revision,
            repo_type=repo.repo_type,
            path=prefix.rstrip("/") or None,
            token=token,
            endpoint=endpoint,
        )
    except StoreError:  # an empty repo: no refs yet
        yield None
        return
    with remote:
        yield remote


def _push_one(
    store: LocalStore,
    *,
    staging: LocalStore,
    remote: HubStore | None,
    packed: Manifest,
    present: set[str],
    prefix: str,
    staged: Held,
) -> tuple[Manifest, list[tuple[str, Path]], int, Held]:
    """One LoRA: the manifest to push (records where the repo or this push holds them, ``staged``
    being what this push holds so far), the packs to upload, how many records the repo had
    already, and what the push holds after it."""
    held = held_records(remote, algorithm=packed.hash, name=packed.name) if remote is not None else Held({}, {})
    held = Held({**staged.records, **held.records}, {**staged.packs, **held.packs})
    reused = len({m.record for m in packed.modules if m.record in held.records})
    uploads, held = _whole_packs(store, packed, held, present, prefix)
    # The rest (records of packs mostly held already, or of a lorachunk/1 folder) go into new
    # packs, made in a folder of their own and uploaded from there.
    before = set(staging.list_prefix(PACKS))
    with staging.batch():
        wanted = [m for m in packed.modules if m.record not in held.records]
        records = {m.record: data for m, data in fetch_records(store, wanted, packed.packs, threads=cpu_threads())}
        splits = {s.name: (s.kind, s.modules) for s in packed.splits}
        with Writer(staging, algorithm=packed.hash, held=held) as writer:
            for name, group in layout_order((m.name for m in packed.modules), splits):
                module = packed.module(name)
                writer.add(module, records.get(module.record, b""), group)
            modules, packs = writer.finish()
    uploads += [(prefix + key, staging.path(key)) for key in staging.list_prefix(PACKS) if key not in before]
    return placed_manifest(packed, modules, packs), uploads, reused, writer.held()


def _catalog_bytes(remote: HubStore | None, versions: list[Version]) -> bytes:
    """The repo's catalog with ``versions`` added: one frame appended to what it has, or (a new
    repo, or one of lorachunk 0.2 without a catalog) written from its manifests."""
    if remote is not None:
        try:
            return remote.get(CATALOG) + frame(v.event() for v in versions)
        except ObjectNotFoundError:
            pass
    held = [read_manifest(remote, i) for i in list_manifest_ids(remote)] if remote is not None else []
    return Catalog(tuple(ordered_versions(held, None))).added(versions).to_bytes()


def _whole_packs(
    store: LocalStore, packed: Manifest, held: Held, present: set[str], prefix: str
) -> tuple[list[tuple[str, Path]], Held]:
    """Local packs to upload as they are (checked against their names first): those the repo
    lacks whose missing records are nearly all of them (so no upload is over 1.05x the bytes
    that are new). Returns them and ``held`` with their records, and those of local packs the
    repo has already, added."""
    records, sizes = dict(held.records), dict(held.packs)
    missing: dict[str, int] = {}
    for module in {m.record: m for m in packed.modules if m.record not in records}.values():
        if module.pack is not None:
            missing[module.pack] = missing.get(module.pack, 0) + module.stored_size
    uploads: list[tuple[str, Path]] = []
    for pack, need in missing.items():
        key = pack_key(pack)
        there = prefix + key in present or prefix + (flat_twin(key) or key) in present
        if not there and need * _MAX_OVERHEAD < packed.packs[pack]:
            continue
        if not there:
            local = key if store.exists(key) else flat_twin(key) or key  # a folder packed by 0.2 is flat
            check(pack, store.get(local), what=f"pack {local} in {store!r}")  # checked before it leaves
            uploads.append((prefix + key, store.path(local)))
        sizes[pack] = packed.packs[pack]
        for module in packed.modules:
            if module.pack == pack:
                records.setdefault(module.record, (pack, module.offset, module.stored_size))
    return uploads, Held(records, sizes)


_BASE_MODEL_KEYS: Final = ("base_model", "base_model_name_or_path", "modelspec.base_model", "ss_sd_model_name")


def model_card(manifest: Manifest, repo_id: str, *, path: str = "", library: list[Manifest] | None = None) -> str:
    """A model card: front matter with the ``lorachunk`` tag (and the base model when the
    file's metadata names a Hub repo), the splits with their sizes, the root, and how to load;
    for a push of several LoRAs (``library``), a table of them (name, base model, root, size,
    splits) and how to load one by name."""
    metadata = manifest.source.metadata or {}
    base = next((v for k in _BASE_MODEL_KEYS if REPO_ID.match(v := metadata.get(k, ""))), None)
    front = ["---", "tags:", "- lorachunk", "- lora"] + ([f"base_model: {base}"] if base else []) + ["---"]
    sizes = {m.name: m.stored_size for m in manifest.modules}
    rows = [
        f"| `{s.name}` | {s.kind} | {len(s.modules)} | {sum(sizes[n] for n in s.modules) / 1e6:.2f} MB |"
        for s in manifest.splits
    ]
    source = f"hf://{repo_id}" + (f"/{path}" if path else "")
    example = next((s.name for s in manifest.splits if s.kind != "all"), None)
    load = f'lora.load(splits=["{example}"])' if example else "lora.load()"
    return "\n".join(
        [
            *front,
            "",
            f"# {manifest.source.name}",
            "",
            "Packed with [lorachunk](https://pypi.org/project/lorachunk/): per-module records, each",
            "verified against a Merkle manifest, so you can fetch and load only the part you need.",
            "",
            f"Root: `{manifest.root}` ({len(manifest.modules)} modules, {manifest.source.size / 1e6:.2f} MB unpacked)",
            "",
            "| split | kind | modules | stored |",
            "|---|---|---:|---:|",
            *rows,
            "",
            "```python",
            "import lorachunk",
            f'lora = lorachunk.open("{source}", root="{manifest.root}")',
            f"state_dict = {load}",
            "```",
            "",
            *_library_table(library or [], source),
        ]
    )


def _library_table(library: list[Manifest], source: str) -> list[str]:
    """The LoRAs a push of several puts in the repo, and how to load one by name."""
    latest = {m.name: m for m in library}  # the last version of each name
    if len(latest) < 2:
        return []
    rows = [
        f"| `{m.name}` | {m.base_model or '-'} | `{m.root}` | {m.stored_size / 1e6:.2f} MB | {len(m.splits)} |"
        for m in sorted(latest.values(), key=lambda m: m.name)
    ]
    example = min(latest)
    return [
        f"## {len(latest)} LoRAs in this repo",
        "",
        "| name | base model | root | stored | splits |",
        "|---|---|---|---:|---:|",
        *rows,
        "",
        f'Load one by name: `lorachunk.load("{source}#{example}")`; list them with `lorachunk ls {source}`.',
        "",
    ]
