"""diffusers: load a packed LoRA, or some splits of it, into a pipeline. The only module importing diffusers.

``lorachunk.load`` already returns state dicts that ``pipe.load_lora_weights`` takes as they are
(the original key names, kohya, diffusers or PEFT style, nothing added). This module adds the one
call that also picks splits and strengths::

    from lorachunk.integrations.diffusers import load_lora

    load_lora(pipe, "hf://me/ink", splits=["style"], scales={"style": 0.8}, adapter_name="ink")
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

try:
    import diffusers  # noqa: F401 - fail here, with the install hint, rather than at first use
except ImportError as exc:
    raise ImportError("lorachunk.integrations.diffusers needs diffusers: pip install 'lorachunk[diffusers]'") from exc

import lorachunk
from lorachunk._exceptions import UsageError
from lorachunk.storage import Store

__all__ = ["COMPONENTS", "LoraPipeline", "load_lora"]


class LoraPipeline(Protocol):
    """What is used of a pipeline: any diffusers pipeline with LoRA support has both."""

    def load_lora_weights(self, state_dict: Any, /, *, adapter_name: str | None = ..., **kwargs: Any) -> None: ...

    def set_adapters(self, adapter_names: Any, /, adapter_weights: Any = ...) -> None: ...


#: Scales with only these keys go to diffusers' ``set_adapters`` (changeable later without
#: reloading); any other key makes every scale a load-time one (exact for every layer).
COMPONENTS = frozenset({"unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"})


def load_lora(
    pipe: LoraPipeline,
    source: str | os.PathLike[str] | Store,
    *,
    splits: Iterable[str] | None = None,
    scales: Mapping[str, float] | None = None,
    adapter_name: str | None = None,
    **open_options: Any,
) -> str:
    """Load ``source`` (only ``splits``, if given) into ``pipe`` as the adapter ``adapter_name``.

    ``scales`` maps split names or module globs to strengths, as :meth:`lorachunk.LoRA.load`
    does. When every key is a pipeline component (``unet``, ``text_encoder``, …) they go to
    ``pipe.set_adapters`` so they can be changed later without reloading; otherwise all of them
    are applied while loading (the last matching entry wins, and a block's strength covers all
    its layers, attention and convolution alike; diffusers' own block dicts scale only attention
    layers).

    Returns the adapter name (default: the packed file's name, made safe for PEFT).
    ``open_options`` go to :func:`lorachunk.open` (``root=``, ``cache=``, ``token=``, …).
    """
    scales = dict(scales or {})
    by_component = bool(scales) and set(scales) <= COMPONENTS
    with lorachunk.open(source, **open_options) as lora:
        state_dict = lora.load(splits=splits, scales=None if by_component else scales or None)
        name = adapter_name or _adapter_name(lora.manifest.source.name)
    if not state_dict:
        raise UsageError("nothing to load: the selected splits hold no tensors")
    # low_cpu_mem_usage: PEFT makes the LoRA layers without first filling them with random
    # values that the state dict replaces straight away.
    pipe.load_lora_weights(state_dict, adapter_name=name, low_cpu_mem_usage=True)
    if by_component:
        pipe.set_adapters([name], adapter_weights=[scales])
    return name


def _adapter_name(file_name: str) -> str:
    stem = file_name.rsplit(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9_]", "_", stem) or "lorachunk"
