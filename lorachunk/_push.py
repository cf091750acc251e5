"""push: publish a packed LoRA to a Hugging Face Hub repo, uploading only the shards it lacks.

A repo holds the same layout as a local folder (``refs/latest``, ``manifests/``, ``shards/``), at
its root or under a path, so a clone is a valid :class:`~lorachunk.storage.LocalStore` and several
LoRAs or versions share one repo's shards. The Hub itself is reached through
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

from lorachunk._exceptions import UsageError
from lorachunk._keys import ADAPTER_WEIGHTS, shard_key
from lorachunk._manifest import Manifest
from lorachunk._repository import manifest_objects, read_manifest, read_shard
from lorachunk.storage._base import check_key
from lorachunk.storage._hub import REPO_ID, HubRepo
from lorachunk.storage._local import LocalStore

__all__ = ["CARD", "PushResult", "model_card", "push"]

CARD: Final = "README.md"


@dataclass(frozen=True, slots=True)
class PushResult:
    """What :func:`push` did. ``uploaded`` counts the shards sent; ``skipped`` those the repo had."""

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
    ``refs/latest`` and only the shards the repo does not hold yet (their names are their
    digests, so the repo's listing says which), and a model card when the repo has none (or
    with ``update_card``).

    ``manifest`` picks one of several manifests in a packed folder (default: its latest);
    ``pack_options`` (``splits=``, ``level=``, ``hash=``) apply when ``src`` is a file.

    Raises :class:`AuthenticationError` when the token may not write, :class:`RepositoryNotFoundError`
    for a missing revision, :class:`IntegrityError` when a local shard does not match the manifest.
    """
    prefix = f"{check_key(path.strip('/'))}/" if path and path.strip("/") else ""
    repo = HubRepo(repo_id, revision=revision, repo_type=repo_type, token=token, endpoint=endpoint)
    with _packed(src, pack_options) as store:
        packed = read_manifest(store, manifest)
        present = repo.files(private=private)
        shards: list[tuple[str, bytes | Path]] = []
        uploaded_bytes = skipped = 0
        for module in {m.shard: m for m in packed.modules}.values():
            key = shard_key(module.shard)
            if prefix + key in present:
                skipped += 1
                continue
            read_shard(store, module)  # checked against the manifest before it leaves
            # Uploaded from the file, not from memory: a LoRA of any size pushes in ~1 shard of RAM.
            shards.append((prefix + key, store.path(key)))
            uploaded_bytes += module.stored_size
        (manifest_path, stored), *refs = [(prefix + key, value) for key, value in manifest_objects(packed)]
        # The latest's copy repeats the manifest's bytes: the manifest goes up first (upload_first).
        new_manifest = manifest_path not in present
        files: list[tuple[str, bytes | Path]] = [(manifest_path, stored)] if new_manifest else []
        files += [*shards, *refs]
        uploaded_bytes += len(stored) if new_manifest else 0
        card = CARD not in present or update_card
        if card:
            files.append((CARD, model_card(packed, repo_id, path=prefix.rstrip("/")).encode()))
        summary = message or f"lorachunk: push {packed.source.name} ({len(shards)} new shards)"
        commit = repo.commit(files, message=summary, create_pr=create_pr, upload_first=int(new_manifest))
    return PushResult(
        repo_id=repo_id,
        commit=commit.oid,
        commit_url=commit.url,
        pr_url=commit.pr_url,
        manifest_id=packed.id,
        root=packed.root,
        uploaded=len(shards),
        uploaded_bytes=uploaded_bytes,
        skipped=skipped,
        card_written=card,
    )


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
            "Packed with [lorachunk](https://pypi.org/project/lorachunk/): per-module shards, each",
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
