"""Test helpers for code built on lorachunk, and for lorachunk's own tests and benchmarks.

- :class:`StoreTests`: the contract every :class:`~lorachunk.storage.Store` passes. Subclass it
  in a pytest test file and provide a ``store`` fixture (and ``put``, for a read-only store) to
  check a store of your own, as ``zarr.testing.StoreTests`` does for zarr stores. Needs pytest.
- :mod:`lorachunk.testing.http_server`: a static HTTP server on 127.0.0.1 with Range support that
  misbehaves on cue (drops, stalls, wrong ranges, redirects) and can emulate a slow link.
- :mod:`lorachunk.testing.hub_server`: a small Hugging Face Hub on 127.0.0.1, enough for the real
  ``huggingface_hub`` client.
- :mod:`lorachunk.testing.synth`: synthetic LoRA files (labelled synthetic) for layouts no real
  file covers.

None of this is imported by ``import lorachunk``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorachunk.testing.store import Put, StoreTests

__all__ = ["Put", "StoreTests"]


def __getattr__(name: str) -> Any:
    # pytest loads only for the contract, not for the servers or synth.
    if name in __all__:
        from lorachunk.testing import store

        return getattr(store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
