"""A manifest's JSON: the canonical encoding every digest is taken over, a reader that bounds its
work before it builds anything, and the limits it enforces (docs/format.md). No manifest
semantics here: those are :mod:`lorachunk._manifest`'s."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

from lorachunk._exceptions import ManifestError
from lorachunk._json import parse_json
from lorachunk._keys import ADAPTER_WEIGHTS

__all__ = [
    "AUTO_KINDS",
    "LORA_NAME",
    "MAX_FILES",
    "MAX_FILES_BYTES",
    "MAX_JSON_VALUES",
    "MAX_MANIFEST_BYTES",
    "MAX_MODULES",
    "MAX_MODULE_RAW_BYTES",
    "MAX_PACK_BYTES",
    "MAX_SPLIT_ENTRIES",
    "MAX_TENSORS",
    "canonical_json",
    "check_files",
    "check_lora_name",
    "check_name",
    "count",
    "default_lora_name",
    "load_json",
    "product",
    "shown",
    "typed",
]

#: Reader limits, checked before anything of that size is allocated. They bound the work a
#: manifest can cost: any manifest within them is read, or refused, in under 2 s and 300 MB on
#: 2 cores (benchmarks/manifest_limits.py); the largest real LoRAs hold a few thousand modules.
MAX_MANIFEST_BYTES: Final = 32 * 1024 * 1024
MAX_MODULES: Final = 16_384
MAX_TENSORS: Final = 65_536
#: Module names listed by all splits together (a module sits in several).
MAX_SPLIT_ENTRIES: Final = 8 * MAX_MODULES
#: JSON values in a manifest (an upper bound counted on the text before it is parsed).
MAX_JSON_VALUES: Final = 2_000_000
#: Split kinds that pack derives from module names (lorachunk._layout.auto_splits); splits of
#: every other kind (``user``, compose's ``part``) are pinned by a leaf of the root instead.
AUTO_KINDS: Final = frozenset({"component", "block", "block-weight", "b-lora", "layer", "family", "projection"})
MAX_MODULE_RAW_BYTES: Final = 16 * 1024**3
#: A pack holds records up to its target size (at most 128 MiB), or one record larger than that.
MAX_PACK_BYTES: Final = 2 * MAX_MODULE_RAW_BYTES
#: Small text files that travel with the tensors (a PEFT ``adapter_config.json``, a README).
MAX_FILES: Final = 64
MAX_FILES_BYTES: Final = 1024 * 1024
_FILE_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
#: unpack --format peft writes the verified weights under this name; no packed file may take it.
_RESERVED_FILES: Final = frozenset({ADAPTER_WEIGHTS})
#: Names (of modules, splits, tensors, the source) hold no control characters: they are shown in
#: terminals and logs, where such a character could rewrite what the reader sees.
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# One encoder for every call: json.dumps with non-default options builds a new one each time, which
# costs as much as encoding a module's entry.
_CANONICAL: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_json(value: object) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the bytes every digest in the format is taken over."""
    return _CANONICAL.encode(value).encode()


#: A tensor inside a module: ``offset`` and ``length`` locate it in the module's raw bytes.
def load_json(text: bytes) -> dict[str, Any]:
    """The manifest's JSON, bounded before it is parsed and canonical (which also refuses NaN,
    infinities and lone surrogates, none of which canonical JSON can hold)."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest of {len(text)} bytes is over the {MAX_MANIFEST_BYTES}-byte limit")
    # Every value after the first in a container follows a comma, and every container opens with a
    # bracket: their count bounds the objects json.loads would build, at memchr speed.
    values = text.count(b",") + text.count(b"[") + text.count(b"{")
    if values > MAX_JSON_VALUES:
        raise ManifestError(f"manifest holds over {MAX_JSON_VALUES} JSON values")
    raw = parse_json(text, error=ManifestError, what="manifest", parse_constant=_refuse_constant)
    if not isinstance(raw, dict):
        raise ManifestError("manifest is not a JSON object")
    try:
        canonical = canonical_json(raw)
    except ValueError as exc:  # NaN, an infinity, a lone surrogate (UnicodeEncodeError)
        raise ManifestError(f"manifest is not in canonical form: {exc}") from None
    if canonical != text:
        raise ManifestError("manifest is not in canonical form")
    return raw


def _refuse_constant(name: str) -> object:
    raise ManifestError(f"{name} in the manifest (JSON has no such number)")


def shown(value: object) -> str:
    """A value from an untrusted manifest, short and printable, for a message."""
    text = value if isinstance(value, str) else repr(value)
    return ascii(text[:100])[1:-1]


def check_name(name: str, what: str) -> str:
    if not name or _CONTROL.search(name):
        raise ManifestError(f"{what} {shown(name)} is empty or holds control characters")
    return name


#: A LoRA's name in a store: ASCII letters and digits first, then those, ``.``, ``_``, ``-``
#: and ``+``; at most 128 characters. No ``/`` (no path tricks), no ``#`` or ``@`` (they separate
#: a name from a source and a version), no spaces or control characters. Case-sensitive.
LORA_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def check_lora_name(name: object, error: type[Exception] = ManifestError) -> str:
    """``name`` if it is a valid LoRA name (:data:`LORA_NAME`); ``error`` naming the rule otherwise."""
    if not isinstance(name, str) or not LORA_NAME.fullmatch(name):
        raise error(
            f"LoRA name {shown(name)} is not valid: 1 to 128 of A-Z a-z 0-9 . _ - +, starting with a letter or digit"
        )
    return name


def default_lora_name(stem: str) -> str:
    """The name a LoRA gets when none is given: its file's (or folder's) stem with every other
    character made ``-`` (``my lora (v2)`` → ``my-lora-v2``)."""
    name = re.sub(r"[^A-Za-z0-9._+-]+", "-", stem).strip("-._+")[:128]
    return name or "lora"


def check_files(files: Mapping[str, str]) -> None:
    """Plain file names (no folders, nothing hidden), few and small; :class:`ManifestError` otherwise."""
    if len(files) > MAX_FILES:
        raise ManifestError(f"{len(files)} files; at most {MAX_FILES} travel with a LoRA")
    total = 0
    for name, text in files.items():
        if not _FILE_NAME.fullmatch(name) or name in {".", ".."}:
            raise ManifestError(f"file name {shown(name)} is not a plain file name")
        if name in _RESERVED_FILES:
            raise ManifestError(f"file name {name!r} is reserved for the weights themselves")
        total += len(text.encode())
    if total > MAX_FILES_BYTES:
        raise ManifestError(f"files of {total} bytes; at most {MAX_FILES_BYTES} travel with a LoRA")


def typed(value: Any, kind: type) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ManifestError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ManifestError(f"expected a non-negative integer, got {value!r}")
    return value


def product(shape: Sequence[int]) -> int:
    result = 1
    for dim in shape:
        result *= dim
        if result > MAX_MODULE_RAW_BYTES:
            raise ManifestError(f"shape {list(shape)} is over the size limit")
    return result
