"""The Merkle tree of RFC 6962 §2.1 over module leaves.

``leaf = H(0x00 || leaf_bytes)`` and ``node = H(0x01 || left || right)``, so a leaf can never pose as
a node; ``n`` leaves split at the largest power of two below ``n``; the empty tree hashes ``b""``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Final

import xxhash

from lorachunk._digest import new_hasher

__all__ = ["merkle_root"]


def merkle_root(algorithm: str, leaves: Sequence[bytes]) -> str:
    """Return ``"<algorithm>:<hex>"`` of the tree over ``leaves`` (already in canonical order)."""
    hasher = new_hasher(algorithm)
    if not leaves:
        return f"{algorithm}:{hasher.hexdigest()}"
    level = [_hash(algorithm, b"\x00", leaf) for leaf in leaves]
    return f"{algorithm}:{_reduce(algorithm, level).hex()}"


def _reduce(algorithm: str, hashes: Sequence[bytes]) -> bytes:
    if len(hashes) == 1:
        return hashes[0]
    split = 1 << ((len(hashes) - 1).bit_length() - 1)
    return _hash(algorithm, b"\x01", _reduce(algorithm, hashes[:split]) + _reduce(algorithm, hashes[split:]))


# One-shot digests: a manifest's roots take a hash per module per split, and making a hasher
# object for each costs more than hashing a leaf.
_ONE_SHOT: Final[dict[str, Callable[[bytes], bytes]]] = {
    "xxh3-128": xxhash.xxh3_128_digest,
    "sha256": lambda data: hashlib.sha256(data).digest(),
}


def _hash(algorithm: str, prefix: bytes, data: bytes) -> bytes:
    return _ONE_SHOT[algorithm](prefix + data)
