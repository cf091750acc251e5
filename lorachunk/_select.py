"""Selection: which modules a set of options names, and which tensors a set of strengths scales.

One rule everywhere (docs/loading.md): names within an option add up, options narrow each other,
and an option that keeps nothing is a :class:`~lorachunk.UsageError` naming it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from lorachunk._exceptions import UsageError
from lorachunk._layout import as_names, finite_scales, matching, scale_targets
from lorachunk._manifest import Manifest, Module

__all__ = ["layer_splits", "scale_factors", "select_modules"]


def layer_splits(manifest: Manifest, layers: Iterable[int]) -> list[str]:
    """The layer splits (``layers.N``, or ``encoder.layers.N`` … in an encoder-decoder model) of
    the layer indices ``layers``; :class:`UsageError` for an index the LoRA has no layer of."""
    wanted = list(layers)
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in wanted):
        raise UsageError(f"layers must be layer indices (e.g. range(0, 16)), got {wanted!r}")
    by_index: dict[int, list[str]] = {}
    for split in manifest.splits:
        if split.kind == "layer":
            by_index.setdefault(int(split.name.rpartition(".")[2]), []).append(split.name)
    missing = sorted(set(wanted) - by_index.keys())
    if missing:
        held = f"it has layers {min(by_index)}-{max(by_index)}" if by_index else "it has no layer splits"
        raise UsageError(f"layers: no layer {missing[0]} in this LoRA ({held})")
    return [name for index in sorted(set(wanted)) for name in by_index[index]]


def select_modules(
    manifest: Manifest,
    *,
    splits: Iterable[str] = (),
    modules: Iterable[str] = (),
    layers: Iterable[int] | None = None,
    keys: Iterable[str] | None = None,
) -> list[Module]:
    """The modules a selection names, in manifest order; all of them when nothing is given.

    Within an option the names add up (``splits=["unet", "text_encoder"]`` is both); across
    options each narrows what the others chose (``splits=["MID"], modules=["*attn2*"]`` is MID's
    attn2 modules; ``layers=range(16), splits=["attn"]`` the attention of layers 0-15). An option
    that keeps nothing of what the others chose is a :class:`UsageError` naming it, as is a name
    that selects nothing at all (docs/loading.md).
    """
    options: list[tuple[str, set[str]]] = []
    split_names = as_names(splits)
    if split_names:
        options.append(("splits", {n for s in split_names for n in manifest.split(s).modules}))
    globs = as_names(modules)
    if globs:
        names: set[str] = set()
        for glob in globs:
            matched = matching((m.name for m in manifest.modules), glob)
            if not matched:
                raise UsageError(f"module pattern {glob!r} matches no module")
            names.update(matched)
        options.append(("modules", names))
    if layers is not None:
        options.append(("layers", {n for s in layer_splits(manifest, layers) for n in manifest.split(s).modules}))
    if keys is not None:
        wanted = as_names(keys)
        owners = manifest.owners
        missing = [k for k in wanted if k not in owners]
        if missing:
            raise UsageError(f"no tensor {missing[0]!r} in this LoRA ({len(missing)} unknown key(s))")
        options.append(("keys", {owners[k].name for k in wanted}))
    chosen: set[str] | None = None
    used: list[str] = []
    for option, names in options:
        picked = names if chosen is None else chosen & names
        if not picked:
            others = " and ".join(f"{o}=" for o in used)
            raise UsageError(
                f"{option}= selects nothing" + (f" of what {others} chose (options narrow each other)" if used else "")
            )
        chosen = picked
        used.append(option)
    return list(manifest.modules) if chosen is None else [m for m in manifest.modules if m.name in chosen]


def scale_factors(manifest: Manifest, chosen: Sequence[Module], scales: Mapping[str, float]) -> dict[str, float]:
    """Tensor key → factor. Modules with no delta (textual-inversion tokens) are left alone; a
    pattern whose modules carry no delta at all is an error, as is one that matches nothing."""
    split_names = {s.name for s in manifest.splits}
    factors: dict[str, float] = {}
    for pattern, factor in finite_scales(scales).items():
        if pattern in split_names:
            matched = set(manifest.split(pattern).modules)
        else:
            matched = set(matching((m.name for m in manifest.modules), pattern))
            if not matched:
                raise UsageError(f"scale {pattern!r} names no split and matches no module")
        targets = {m.name: scale_targets(t.key for t in m.tensors) for m in manifest.modules if m.name in matched}
        if not any(targets.values()):
            raise UsageError(f"scale {pattern!r}: none of its modules has a tensor of a known layout to scale")
        for module in chosen:
            factors.update(dict.fromkeys(targets.get(module.name, ()), factor))
    return factors
