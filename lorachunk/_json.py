"""JSON from untrusted bytes (a safetensors header, a manifest): every failure one lorachunk error."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Final

from lorachunk._exceptions import LorachunkError

__all__ = ["parse_json"]

#: Sizes and offsets fit in 64 bits (20 digits); thousands of digits would cost quadratic time to
#: convert, and Python refuses over 4300 with a bare ValueError.
_MAX_DIGITS: Final = 20


def parse_json(
    text: bytes,
    *,
    error: type[LorachunkError],
    what: str,
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
    parse_constant: Callable[[str], Any] | None = None,
) -> Any:
    """``json.loads`` with these hooks: not JSON, nested thousands deep, or an integer of more
    than 20 digits raise ``error`` with a message about ``what``."""

    def parse_int(digits: str) -> int:
        if len(digits.lstrip("-")) > _MAX_DIGITS:
            raise error(f"{what}: an integer of {len(digits)} digits")
        return int(digits)

    try:
        return json.loads(text, parse_int=parse_int, object_pairs_hook=object_pairs_hook, parse_constant=parse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{what} is not JSON ({exc})") from exc
    except RecursionError as exc:  # arrays or objects nested thousands deep: nothing real is
        raise error(f"{what}: JSON nested too deep") from exc
