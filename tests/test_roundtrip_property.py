"""Property: any valid safetensors file packs and unpacks byte for byte."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorachunk
from lorachunk._safetensors import DTYPE_BITS
from lorachunk.testing import synth

SHAPES = st.lists(st.integers(0, 7), min_size=0, max_size=3).map(tuple)
# Any key but those with control characters (C0, DEL, C1), which pack refuses: names are shown in
# terminals and logs (test_bad_input.py checks the refusal).
KEYS = st.text(st.characters(codec="utf-8", exclude_categories=["Cc"]), min_size=1, max_size=24).filter(
    lambda k: k != "__metadata__"
)


@st.composite
def lora_files(draw: st.DrawFn) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    keys = draw(st.lists(KEYS, min_size=0, max_size=12, unique=True))
    tensors = {}
    for key in keys:
        dtype = draw(st.sampled_from(sorted(DTYPE_BITS)))
        shape = draw(SHAPES)
        length = math.prod(shape) * DTYPE_BITS[dtype] // 8
        tensors[key] = (dtype, shape, draw(st.binary(min_size=length, max_size=length)))
    return tensors


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tensors=lora_files(),
    metadata=st.none() | st.dictionaries(KEYS, st.text(max_size=10), max_size=3),
    level=st.sampled_from([1, 3]),
)
def test_any_file_roundtrips_exactly(
    tensors: dict[str, tuple[str, tuple[int, ...], bytes]], metadata: dict[str, str] | None, level: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = synth.write(Path(tmp) / "x.safetensors", tensors, metadata)
        manifest = lorachunk.pack(src, Path(tmp) / "store", level=level)
        assert sum(len(m.tensors) for m in manifest.modules) == len(tensors)
        out = lorachunk.unpack(Path(tmp) / "store", Path(tmp) / "out.safetensors")
        assert out.read_bytes() == src.read_bytes()
        if manifest.modules:
            first = manifest.modules[0].name
            part = lorachunk.unpack(Path(tmp) / "store", Path(tmp) / "part.safetensors", modules=[first])
            from safetensors import safe_open

            with safe_open(part, "np") as f:
                assert f.metadata() == (metadata or None) or f.metadata() == metadata
