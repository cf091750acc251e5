"""Sizes as people write them (``500MB``, ``2GiB``, ``10k``): for the CLI and the environment."""

from __future__ import annotations

import math

from lorachunk._exceptions import UsageError

__all__ = ["parse_size"]


def parse_size(text: str) -> int:
    """``"500MB"``, ``"2GiB"``, ``"10k"`` or plain bytes → bytes; :class:`UsageError` otherwise."""
    units = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30}
    value = text.strip().lower().removesuffix("b")
    number = value.rstrip("kmgti")
    unit = value[len(number) :]
    try:
        size = float(number) * units[unit]
    except (KeyError, ValueError):
        size = math.nan
    if not 0 <= size < math.inf:
        raise UsageError(f"cannot read size {text!r}; use e.g. 500MB or 2GiB (0 or more)")
    return int(size)
