"""What a sweep covers: layer selection, bipartitions, keep grids, CP ranks — validated up front."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tensorcut.errors import TensorcutError
from tensorcut.tenalg import BIPARTITIONS, canonical_bipartition, n_singular

# keep fractions used for the simultaneous all-layer sweep (keep = round(f * n), at least 1)
DEFAULT_ALL_LAYER_FRACTIONS: tuple[float, ...] = (0.9, 0.75, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05)

KeepSpec = dict[tuple[str | None, str | None], list[int]]


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """All ``nn.Conv2d`` modules in definition (depth) order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def conv_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The ``weight`` tensor of the named submodule (a conv layer of the study)."""
    w = model.get_submodule(name).weight
    if not isinstance(w, torch.Tensor):
        raise TensorcutError(f"{name!r} has no weight tensor; name a Conv2d layer")
    return w


def select_layers(model: nn.Module, layers: Sequence[str] | None = None) -> list[str]:
    """Layers to truncate, in model order.

    Default: every Conv2d with more than one input channel (per group, i.e.
    ``weight.shape[1] > 1``); explicit names may be any Conv2d. Unknown names list the valid ones.
    """
    convs = conv_layers(model)
    names = [n for n, _ in convs]
    if not convs:
        raise TensorcutError(f"{type(model).__name__} has no Conv2d layer; nothing to truncate")
    if layers is None or len(layers) == 0:
        chosen = [n for n, m in convs if m.weight.shape[1] > 1]
        if not chosen:
            raise TensorcutError(
                f"no eligible conv layer: every Conv2d of {type(model).__name__} has one input "
                f"channel ({', '.join(names)}); name layers explicitly with --layers"
            )
        return chosen
    wanted = [str(x) for x in layers]
    bad = [x for x in wanted if x not in names]
    if bad:
        raise TensorcutError(
            f"unknown layer(s) {', '.join(repr(b) for b in bad)}; "
            f"valid conv layers: {', '.join(names)}"
        )
    return [n for n in names if n in set(wanted)]


def select_bipartitions(bipartitions: Iterable[str] | None) -> list[str]:
    """Canonical names, de-duplicated, in the canonical order; default all seven."""
    if bipartitions is None:
        return list(BIPARTITIONS)
    canon = {canonical_bipartition(b) for b in bipartitions}
    if not canon:
        raise TensorcutError(f"no bipartition given; valid: {', '.join(BIPARTITIONS)}")
    return [b for b in BIPARTITIONS if b in canon]


def _nice_floor(x: float) -> int:
    """Largest 1-2-5 x 10^j not above ``x`` (at least 1)."""
    if x < 1:
        return 1
    p = 10 ** int(math.floor(math.log10(x)))
    for m in (5, 2, 1):
        if m * p <= x:
            return m * p
    return p


def default_keep_grid(n: int) -> list[int]:
    """Keep values for a spectrum of ``n`` singular values, as in the paper's Tables I–II.

    ``n <= 10``: every truncating value ``1..n-1`` (KW, KH: ``1:2``; OUT-IN of a 3x3 kernel:
    ``1:8``).
    Larger: multiples of a 1-2-5 step near ``n / 6`` below ``n`` (16 -> 2:14:2, 64 -> 10:60:10,
    128 -> 20:120:20, 512 -> 50:500:50).
    """
    if n <= 1:
        return []
    if n <= 10:
        return list(range(1, n))
    step = _nice_floor(n / 6)
    return list(range(step, n, step))


def default_cp_ranks(shape: Sequence[int]) -> list[int]:
    """CP ranks for a kernel: 5, 10, 20, 40, ... up to the largest channel mode.

    In the spirit of the paper's Fig. 21a.
    """
    top = max(int(shape[0]), int(shape[1]))
    out, r = [], 5
    while r <= top:
        out.append(r)
        r *= 2
    return out or [1]


def _parse_ints(text: str, what: str) -> list[int]:
    vals: list[int] = []
    for tok in text.replace(";", ",").split(","):
        tok = tok.strip()
        if not tok:
            continue
        if ":" in tok:
            parts = tok.split(":")
            if len(parts) not in (2, 3):
                raise TensorcutError(
                    f"bad range {tok!r} in {what}; use start:end or start:end:step (end included)"
                )
            try:
                a, b = int(parts[0]), int(parts[1])
                s = int(parts[2]) if len(parts) == 3 else 1
            except ValueError as exc:
                raise TensorcutError(
                    f"bad range {tok!r} in {what}; use integers like 10:60:10"
                ) from exc
            if s < 1:
                raise TensorcutError(f"bad range {tok!r} in {what}: step must be >= 1")
            vals.extend(range(a, b + 1, s))
        else:
            try:
                vals.append(int(tok))
            except ValueError as exc:
                raise TensorcutError(f"bad value {tok!r} in {what}; expected integers") from exc
    return vals


def parse_keep(keep: Any) -> KeepSpec:
    """Normalise a keep specification.

    Accepts ``None`` (default grids), a list of ints (every layer and bipartition), a dict
    ``{bipartition: [...]}`` or ``{(layer, bipartition): [...]}``, or CLI tokens:
    ``"10,20"``, ``"1:8"`` (range, end included), ``"OUT=10,20"``, ``"conv2:OUT=10:60:10"``,
    ``"conv2=1,2"``.
    """
    spec: KeepSpec = {}
    layer: str | None
    bip: str | None
    if keep is None:
        return spec
    if isinstance(keep, Mapping):
        for k, v in keep.items():
            layer, bip = k if isinstance(k, tuple) else (None, k)
            bip = None if bip is None else canonical_bipartition(str(bip))
            spec.setdefault((layer, bip), []).extend(int(x) for x in v)
        return spec
    if isinstance(keep, int):
        keep = [keep]
    for tok in keep:
        if isinstance(tok, bool):
            raise TensorcutError(f"keep must be integers, got {tok!r}")
        if isinstance(tok, int):
            spec.setdefault((None, None), []).append(tok)
            continue
        tok = str(tok)
        if "=" in tok:
            target, values = tok.split("=", 1)
            layer, bip = None, None
            if ":" in target:
                layer, b = target.split(":", 1)
                bip = canonical_bipartition(b)
            else:
                try:
                    bip = canonical_bipartition(target)
                except TensorcutError:
                    layer = target  # a layer name; validated against the model later
            spec.setdefault((layer, bip), []).extend(_parse_ints(values, f"--keep {tok}"))
        else:
            spec.setdefault((None, None), []).extend(_parse_ints(tok, f"--keep {tok}"))
    return spec


def keep_values(spec: KeepSpec, layer: str, bipartition: str, shape: Sequence[int]) -> list[int]:
    """The keep values for one (layer, bipartition), validated against ``1..n``."""
    n = n_singular(shape, bipartition)
    for key in ((layer, bipartition), (None, bipartition), (layer, None), (None, None)):
        if key in spec:
            vals = sorted(set(spec[key]))
            for k in vals:
                if not 1 <= k <= n:
                    raise TensorcutError(
                        f"keep={k} out of range for layer {layer!r} along {bipartition} "
                        f"(kernel {tuple(int(s) for s in shape)}): valid 1..{n}"
                    )
            return vals
    return default_keep_grid(n)


def check_keep_layers(spec: KeepSpec, layers: Sequence[str], all_layers: Sequence[str]) -> None:
    """Layer names used inside a keep spec must be selected conv layers."""
    for layer, _ in spec:
        if layer is not None and layer not in layers:
            valid = ", ".join(layers)
            hint = (
                ""
                if layer in all_layers
                else f"; conv layers of the model: {', '.join(all_layers)}"
            )
            raise TensorcutError(
                f"--keep names layer {layer!r}, "
                f"which is not among the selected layers ({valid}){hint}"
            )


def parse_cp_ranks(ranks: Any) -> list[int] | str | None:
    """``None`` (no CP sweep), ``"auto"`` (:func:`default_cp_ranks` per layer) or positive ints."""
    if ranks is None:
        return None
    if isinstance(ranks, str):
        ranks = [ranks]
    if any(isinstance(r, str) and r.strip().lower() == "auto" for r in ranks):
        return "auto"
    vals: list[int] = []
    for r in ranks:
        vals.extend(
            [r]
            if isinstance(r, int) and not isinstance(r, bool)
            else _parse_ints(str(r), "--cp-ranks")
        )
    bad = [r for r in vals if r < 1]
    if bad:
        raise TensorcutError(f"CP rank(s) {bad} invalid: ranks must be >= 1")
    return sorted(set(vals), reverse=True)


def all_layer_steps(
    ns: Mapping[str, int],
    spec: KeepSpec,
    bipartition: str,
    fractions: Sequence[float] | None = None,
) -> list[dict[str, int]]:
    """Per-layer keep values for the simultaneous sweep along one bipartition.

    An explicit keep list applies the same ``k`` to every layer (each must admit it);
    otherwise each step keeps ``max(1, round(f * n_layer))`` for ``f`` in ``fractions``.
    Steps that truncate nothing or repeat an earlier step are dropped.
    """
    explicit = spec.get((None, bipartition)) or spec.get((None, None))
    steps: list[dict[str, int]] = []
    if explicit:
        for k in sorted(set(explicit), reverse=True):
            for layer, n in ns.items():
                if not 1 <= k <= n:
                    raise TensorcutError(
                        f"keep={k} out of range for layer {layer!r} along {bipartition} in the "
                        f"all-layer sweep: valid 1..{n}"
                    )
            steps.append({layer: k for layer in ns})
    else:
        for f in fractions or DEFAULT_ALL_LAYER_FRACTIONS:
            if not 0.0 < f <= 1.0:
                raise TensorcutError(f"all-layer keep fraction {f} invalid: use 0 < f <= 1")
            steps.append({layer: max(1, min(n, int(round(f * n)))) for layer, n in ns.items()})
    out, seen = [], set()
    for s in steps:
        key = tuple(sorted(s.items()))
        if key in seen or all(k == ns[layer] for layer, k in s.items()):
            continue
        seen.add(key)
        out.append(s)
    return out


__all__ = [
    "DEFAULT_ALL_LAYER_FRACTIONS",
    "conv_layers",
    "select_layers",
    "select_bipartitions",
    "default_keep_grid",
    "default_cp_ranks",
    "parse_keep",
    "keep_values",
    "check_keep_layers",
    "parse_cp_ranks",
    "all_layer_steps",
]
