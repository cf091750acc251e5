"""Digests that carry their algorithm: ``xxh3-128:<hex>`` or ``sha256:<hex>``.

xxh3-128 is fast and catches accidental corruption (bit rot, truncation, a wrong file); it is not
a cryptographic hash, so a LoRA that must resist a malicious server is packed with ``sha256``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Final, Protocol

import xxhash

from lorachunk._exceptions import IntegrityError, ManifestError

__all__ = ["ALGORITHMS", "DEFAULT_ALGORITHM", "Hasher", "digest", "from_hex", "hex_of", "new_hasher", "split_digest"]


class Hasher(Protocol):
    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...
    def digest(self) -> bytes: ...
    def hexdigest(self) -> str: ...


_FACTORIES: Final[dict[str, Callable[[], Hasher]]] = {
    "xxh3-128": xxhash.xxh3_128,
    "sha256": hashlib.sha256,
}
ALGORITHMS: Final = tuple(_FACTORIES)
DEFAULT_ALGORITHM: Final = "xxh3-128"
_HEX_LENGTH: Final = {"xxh3-128": 32, "sha256": 64}


def new_hasher(algorithm: str) -> Hasher:
    """Return an incremental hasher for ``algorithm``."""
    try:
        return _FACTORIES[algorithm]()
    except KeyError:
        raise ManifestError(f"unknown hash algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}") from None


def digest(algorithm: str, data: bytes | bytearray | memoryview) -> str:
    """Return ``"<algorithm>:<hex>"`` of ``data``."""
    hasher = new_hasher(algorithm)
    hasher.update(data)
    return f"{algorithm}:{hasher.hexdigest()}"


def split_digest(value: str) -> tuple[str, str]:
    """Split and validate ``"<algorithm>:<hex>"``; raise :class:`ManifestError` if malformed."""
    algorithm, sep, hexpart = value.partition(":")
    expected = _HEX_LENGTH.get(algorithm)
    if not sep or expected is None or len(hexpart) != expected or hexpart.strip("0123456789abcdef"):
        raise ManifestError(f"malformed digest {value!r}")
    return algorithm, hexpart


def from_hex(hexpart: str) -> str:
    """The digest an object name stands for: the algorithms have hex parts of different lengths."""
    algorithm = next((a for a, n in _HEX_LENGTH.items() if n == len(hexpart)), DEFAULT_ALGORITHM)
    return f"{algorithm}:{hexpart}"


def hex_of(value: str) -> str:
    """The hex part of a digest string, used to name objects in a store."""
    return split_digest(value)[1]


def check(expected: str, data: bytes | bytearray | memoryview, *, what: str) -> None:
    """Raise :class:`IntegrityError` naming ``what`` unless ``data`` hashes to ``expected``."""
    algorithm = expected.partition(":")[0]
    actual = digest(algorithm, data)  # ManifestError for an algorithm this version lacks
    if actual != expected:
        # Only a digest that does not match is parsed: a well-formed one may be the data's
        # fault, a malformed one is the manifest's (checked on every record, so kept cheap).
        split_digest(expected)
        raise IntegrityError(f"{what}: digest mismatch (expected {expected}, got {actual})")
