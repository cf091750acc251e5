"""A vLLM LoRA resolver: vLLM asks for an adapter by name, lorachunk fetches it verified.

vLLM looks up adapters it has not loaded through ``LoRAResolver`` plug-ins. This one maps a
``lora_name`` to a LoRA of a lorachunk store (by name, docs/library.md), materializes it as a
PEFT folder with :func:`lorachunk.adapter_path` on a worker thread (vLLM's event loop never
waits on a download), checks the base model as vLLM's own filesystem resolver does, and returns
None for a name the store does not hold. Enable it like vLLM's resolvers::

    pip install lorachunk vllm
    export VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 VLLM_PLUGINS=lorachunk
    export LORACHUNK_VLLM_STORE=https://cdn.example.org/loras     # a folder, http(s)://, hf://, s3://
    export LORACHUNK_VLLM_ROOTS=sql=xxh3-128:…,chat=xxh3-128:…    # optional: pin these names' roots
    export LORACHUNK_VLLM_DIR=/var/cache/lorachunk-adapters       # optional: where folders go

The plug-in is registered through the ``vllm.general_plugins`` entry point ``lorachunk``. This
module is the only one of lorachunk that imports vLLM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

import xxhash
from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

import lorachunk
from lorachunk._manifest_json import LORA_NAME

__all__ = ["LorachunkResolver", "register"]

LOG = logging.getLogger("lorachunk")


class LorachunkResolver(LoRAResolver):
    """Resolve ``lora_name`` to the LoRA of that name in ``store`` (its latest version, or the one
    whose root ``roots`` pins for it)."""

    def __init__(self, store: str, *, roots: dict[str, str] | None = None, cache_dir: str | None = None) -> None:
        self.store = store
        self.roots = dict(roots or {})
        self.cache_dir = cache_dir

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        if not LORA_NAME.fullmatch(lora_name):
            return None  # not a name a store can hold: not ours
        path = await asyncio.to_thread(self._materialize, lora_name)
        if path is None:
            return None
        config = json.loads((path / "adapter_config.json").read_text())
        if config.get("base_model_name_or_path") != base_model_name:
            LOG.warning(
                "lorachunk: %r is an adapter of %r, not of %r; not loaded",
                lora_name,
                config.get("base_model_name_or_path"),
                base_model_name,
            )
            return None
        # A stable id per name (vLLM keys its adapter cache by it), positive and below 2**31.
        lora_id = xxhash.xxh3_64_intdigest(lora_name.encode()) % (2**31 - 1) + 1
        return LoRARequest(lora_name=lora_name, lora_int_id=lora_id, lora_path=str(path))

    def _materialize(self, lora_name: str) -> Path | None:
        try:
            return lorachunk.adapter_path(
                f"{self.store}#{lora_name}",
                root=self.roots.get(lora_name),
                format="peft",
                cache_dir=self.cache_dir,
                hold=True,  # vLLM reloads an adapter it evicted from memory from this path
            )
        except lorachunk.UsageError:
            return None  # no LoRA of that name (or not a PEFT adapter): another resolver may have it


def register() -> None:
    """The ``vllm.general_plugins`` hook: register the resolver when ``LORACHUNK_VLLM_STORE`` is set."""
    store = os.environ.get("LORACHUNK_VLLM_STORE")
    if not store:
        return
    roots = {}
    for pair in filter(None, os.environ.get("LORACHUNK_VLLM_ROOTS", "").split(",")):
        name, sep, root = pair.partition("=")
        if not sep:
            raise lorachunk.UsageError(f"LORACHUNK_VLLM_ROOTS wants NAME=ROOT pairs, got {pair!r}")
        roots[name.strip()] = root.strip()
    resolver = LorachunkResolver(store, roots=roots, cache_dir=os.environ.get("LORACHUNK_VLLM_DIR") or None)
    LoRAResolverRegistry.register_resolver("lorachunk", resolver)
