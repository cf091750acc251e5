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

from lorachunk._digest import check
from lorachunk._exceptions import UsageError
from lorachunk._keys import ADAPTER_WEIGHTS, MANIFESTS, PACKS, flat_twin, pack_key
from lorachunk._manifest import Manifest
from lorachunk._packing import layout_order
from lorachunk._repository import fetch_records, manifest_objects, read_manifest
from lorachunk._threads import cpu_threads
from lorachunk._writer import Held, Writer, held_records, placed_manifest
from lorachunk.storage._base import check_key
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
    with _packed(src, pack_options) as store, tempfile.TemporaryDirectory(prefix="lorachunk-push-") as tmp:
        packed = read_manifest(store, manifest)
        present = repo.files(private=private)
        held = (
            _repo_records(repo, prefix, packed.hash, token=token, endpoint=endpoint)
            if any(key.startswith(f"{prefix}{MANIFESTS}") for key in present)
            else Held({}, {})
        )
        reused = len({m.record for m in packed.modules if m.record in held.records})
        uploads, held = _whole_packs(store, packed, held, present, prefix)
        # The rest (records of packs mostly held already, or of a lorachunk/1 folder) go into new
        # packs, made in a folder of their own and uploaded from there.
        staging = LocalStore(tmp)
        with staging.batch():
            wanted = [m for m in packed.modules if m.record not in held.records]
            records = {m.record: data for m, data in fetch_records(store, wanted, packed.packs, threads=cpu_threads())}
            splits = {s.name: (s.kind, s.modules) for s in packed.splits}
            with Writer(staging, algorithm=packed.hash, held=held) as writer:
                for name, group in layout_order((m.name for m in packed.modules), splits):
                    module = packed.module(name)
                    writer.add(module, records.get(module.record, b""), group)
                modules, packs = writer.finish()
        pushed = placed_manifest(packed, modules, packs)
        uploads += [(prefix + key, staging.path(key)) for key in staging.list_prefix(PACKS)]
        uploaded_bytes = sum(path.stat().st_size for _, path in uploads)
        (manifest_path, stored), *refs = [(prefix + key, value) for key, value in manifest_objects(pushed)]
        # The latest's copy repeats the manifest's bytes: the manifest goes up first (upload_first).
        new_manifest = manifest_path not in present
        files: list[tuple[str, bytes | Path]] = [(manifest_path, stored)] if new_manifest else []
        files += [*uploads, *refs]
        uploaded_bytes += len(stored) if new_manifest else 0
        card = CARD not in present or update_card
        if card:
            files.append((CARD, model_card(pushed, repo_id, path=prefix.rstrip("/")).encode()))
        summary = message or f"lorachunk: push {packed.source.name} ({len(uploads)} new packs)"
        commit = repo.commit(files, message=summary, create_pr=create_pr, upload_first=int(new_manifest))
    return PushResult(
        repo_id=repo_id,
        commit=commit.oid,
        commit_url=commit.url,
        pr_url=commit.pr_url,
        manifest_id=pushed.id,
        root=pushed.root,
        uploaded=len(uploads),
        uploaded_bytes=uploaded_bytes,
        skipped=reused,
        card_written=card,
    )


def _repo_records(repo: HubRepo, prefix: str, algorithm: str, *, token: str | None, endpoint: str | None) -> Held:
    """The records the repo's manifests (under ``prefix``) place in packs it holds."""
    with HubStore(
        repo.repo_id,
        revision=repo.revision,
        repo_type=repo.repo_type,
        path=prefix.rstrip("/") or None,
        token=token,
        endpoint=endpoint,
    ) as remote:
        return held_records(remote, algorithm=algorithm)


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


def model_card(manifest: Manifest, repo_id: str, *, path: str = "") -> str:
    """A model card: front matter with the ``lorachunk`` tag (and the base model when the
    file's metadata names a Hub repo), the splits with their sizes, the root, and how to load."""
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
        ]
    )
