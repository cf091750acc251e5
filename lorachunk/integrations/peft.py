"""PEFT: load a packed adapter, or some splits of it, into a model. The only module importing peft.

A PEFT adapter folder (``adapter_model.safetensors`` + ``adapter_config.json`` + small files)
packs into one store with its config in the manifest, pinned by the root like the tensors::

    lorachunk pack ./my-adapter my-adapter.lcs
    lorachunk unpack my-adapter.lcs --format peft -o ./again   # PeftModel.from_pretrained(model, "./again")

or straight into a model, with no folder in between::

    from lorachunk.integrations.peft import load_adapter

    model = load_adapter(base_model, "hf://me/my-adapter", adapter_name="chat")
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

try:
    from peft import PeftConfig, PeftModel, get_peft_model, set_peft_model_state_dict
except ImportError as exc:
    raise ImportError("lorachunk.integrations.peft needs peft: pip install 'lorachunk[peft]'") from exc

import lorachunk
from lorachunk._exceptions import ManifestError, UsageError
from lorachunk._keys import ADAPTER_CONFIG as CONFIG
from lorachunk.storage import Store

if TYPE_CHECKING:
    import torch

__all__ = ["load_adapter"]


def load_adapter(
    model: torch.nn.Module,
    source: str | os.PathLike[str] | Store,
    *,
    adapter_name: str = "default",
    splits: Iterable[str] | None = None,
    modules: Iterable[str] | None = None,
    **open_options: Any,
) -> PeftModel:
    """Load the adapter at ``source`` (only ``splits``/``modules``, if given) into ``model``.

    A plain ``torch.nn.Module`` (e.g. a transformers model) is wrapped with the adapter's config
    and returned as a :class:`peft.PeftModel`; a ``PeftModel`` gets ``adapter_name`` added to it
    and is returned. Adapter layers whose tensors were not selected keep PEFT's initial weights
    (for LoRA, a zero ``lora_B``: they change nothing). ``open_options`` go to
    :func:`lorachunk.open`.

    Raises :class:`UsageError` if the LoRA was not packed from a PEFT folder, or if PEFT finds
    tensors that match no adapter layer of the model (a different base model);
    :class:`ManifestError` if its packed config is not one PEFT reads.
    """
    with lorachunk.open(source, **open_options) as lora:
        text = lora.manifest.files.get(CONFIG)
        if text is None:
            raise UsageError(f"{lora.manifest.source.name} was not packed from a PEFT folder (no {CONFIG})")
        state_dict = lora.load(splits=splits, modules=modules)
    try:
        config = PeftConfig.from_peft_type(**json.loads(text))  # type: ignore[no-untyped-call]
    except (ValueError, TypeError, KeyError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ManifestError(f"the {CONFIG} packed with this LoRA is not a config PEFT reads: {exc!r}") from exc
    if hasattr(config, "init_lora_weights"):
        config.init_lora_weights = True  # layers left unloaded must be no-ops, not random
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config)
        peft_model = model
    else:
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    result = set_peft_model_state_dict(peft_model, state_dict, adapter_name=adapter_name)
    leftover: list[str] = list(getattr(result, "unexpected_keys", []))
    unexpected = [key for key in leftover if "lora_" in key or adapter_name in key]
    if unexpected:
        raise UsageError(f"{len(unexpected)} adapter tensors match no layer of this model, e.g. {unexpected[0]!r}")
    return peft_model
