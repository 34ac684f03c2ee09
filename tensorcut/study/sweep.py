"""Truncation sweeps: (layer x bipartition x keep), (layer x CP rank), all layers at once, recovery.

:func:`analyze` is the Python form of ``tensorcut analyze``. Every evaluated configuration
becomes one row of the results store as soon as it is measured; a re-run skips rows that
are already there, so an interrupted sweep resumes. For speed, each (layer, bipartition)
SVD is computed once for all keep values, and single-layer sweeps evaluate only the part
of the network downstream of the truncated layer on cached activations
(:mod:`tensorcut.study.cache`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tensorcut.errors import TensorcutError
from tensorcut.study import grid
from tensorcut.study.cache import (
    DEFAULT_CACHE_BYTES,
    EvalResult,
    EvalSet,
    LayerRunner,
    swapped_weights,
    trace,
)
from tensorcut.study.metrics import (
    TruncationMetrics,
    cp_metrics,
    cp_truncate,
    mean_metrics,
    svd_metrics,
)
from tensorcut.study.store import KEY_COLUMNS, ResultsStore
from tensorcut.tenalg import (
    BIPARTITIONS,
    ENTROPY_FORMS,
    entropy,
    n_singular,
    numerical_rank_tol,
    spectrum,
    svd_bipartition,
    unfold_shape,
)

Loaders = Any  # an iterable of (x, y) batches, or {split: iterable}


def model_fingerprint(model: nn.Module) -> str:
    """Short SHA-256 over the state dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _key_of(row: Mapping[str, Any]) -> tuple[Any, ...]:
    """A result row's identity: its values of the store's key columns, in order."""
    return tuple(row[c] for c in KEY_COLUMNS)


@dataclass
class AnalysisReport:
    """What :func:`analyze` did: where the rows are and how many were evaluated or skipped."""

    path: Path
    fingerprint: str
    data: dict[str, str]
    layers: list[str]
    evaluated: int = 0
    skipped: int = 0
    fast_path: dict[str, str] = field(
        default_factory=dict
    )  # layer -> "" (cached) or reason for full evaluation
    baseline: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0


class _Sweep:
    """Shared state of one analyze() call."""

    def __init__(
        self,
        model: nn.Module,
        store: ResultsStore,
        evalsets: dict[str, EvalSet],
        *,
        fingerprint: str,
        data: dict[str, str],
        model_name: str,
        entropy_form: str,
        cache_bytes: int,
        spill_dir: str | Path | None,
        use_cache: bool,
        progress: bool,
        total: int,
        report: AnalysisReport,
    ) -> None:
        self.model, self.store, self.evalsets = model, store, evalsets
        self.fp, self.data, self.model_name = fingerprint, data, model_name
        self.entropy_form, self.cache_bytes, self.spill_dir = entropy_form, cache_bytes, spill_dir
        self.use_cache, self.report, self.progress = use_cache, report, progress
        self.done = store.keys(fingerprint=fingerprint)
        self._traced: Any = None
        self._trace_reason = ""
        self._traced_ready = False
        from tqdm import tqdm

        self.bar = tqdm(
            total=total,
            desc="truncation sweep",
            unit="eval",
            disable=None if progress else True,
            leave=False,
        )

    def key(
        self, split: str, kind: str, method: str, layer: str, bip: str, keep: str, epoch: int = -1
    ) -> dict[str, Any]:
        return {
            "fingerprint": self.fp,
            "data": self.data[split],
            "split": split,
            "kind": kind,
            "method": method,
            "layer": layer,
            "bipartition": bip,
            "keep": keep,
            "epoch": epoch,
        }

    def is_done(self, key: Mapping[str, Any]) -> bool:
        return _key_of(key) in self.done

    def pending(self, kind: str, method: str, layer: str, bip: str, keep: str) -> list[str]:
        return [
            s
            for s in self.evalsets
            if not self.is_done(self.key(s, kind, method, layer, bip, keep))
        ]

    def runners(self, layers: Sequence[str], splits: Iterable[str]) -> dict[str, LayerRunner]:
        if self.use_cache and not self._traced_ready:
            self._traced, self._trace_reason = trace(self.model)
            self._traced_ready = True
        out = {}
        for s in splits:
            out[s] = LayerRunner(
                self.model,
                layers,
                self.evalsets[s],
                traced=self._traced,
                trace_reason=self._trace_reason,
                budget_bytes=self.cache_bytes,
                spill_dir=self.spill_dir,
                enabled=self.use_cache,
            )
        return out

    def record(
        self,
        key: dict[str, Any],
        res: EvalResult,
        metrics: Mapping[str, Any] | None,
        *,
        prep_seconds: float = 0.0,
        fast: bool = False,
        extra: Mapping[str, Any] | None = None,
        **values: Any,
    ) -> None:
        row = dict(key)
        row.update(
            model=self.model_name,
            loss=res.loss,
            top1=res.top1,
            top5=res.top5,
            n=res.n,
            eval_seconds=res.seconds,
            prep_seconds=prep_seconds,
            fast_path=int(fast),
        )
        if metrics:
            row.update(
                {
                    k: metrics[k]
                    for k in (
                        "norm_loss_pct",
                        "rel_error",
                        "entropy_before",
                        "entropy_after",
                        "corr_loss_pct",
                        "compression_ratio",
                        "entropy_form",
                    )
                    if k in metrics
                }
            )
        if extra:
            row["extra"] = dict(extra)
        row.update(values)
        self.store.add(row)
        self.done.add(_key_of(row))
        self.report.evaluated += 1
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _as_loaders(loader: Loaders, split: str | Sequence[str] | None) -> dict[str, Any]:
    if isinstance(loader, Mapping):
        if not loader:
            raise TensorcutError("no evaluation loader given")
        return {str(k): v for k, v in loader.items()}
    name = split if isinstance(split, str) else (split[0] if split else "val")
    return {name: loader}


def _metrics_dict(m: TruncationMetrics) -> dict[str, Any]:
    return m.as_dict()


def analyze(
    model: nn.Module,
    loader: Loaders,
    out: str | Path,
    *,
    split: str | Sequence[str] | None = None,
    layers: Sequence[str] | None = None,
    bipartitions: Iterable[str] | None = None,
    keep: Any = None,
    cp_ranks: Any = None,
    single_layer: bool = True,
    all_layers: bool = False,
    all_layer_fractions: Sequence[float] | None = None,
    recover_epochs: int = 0,
    train_loader: Iterable[Any] | None = None,
    recover_kwargs: Mapping[str, Any] | None = None,
    entropy_form: str = "vn",
    model_name: str | None = None,
    data_name: str | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    spill_dir: str | Path | None = None,
    use_cache: bool = True,
    cp_kwargs: Mapping[str, Any] | None = None,
    csv: str | Path | bool | None = True,
    progress: bool = True,
) -> AnalysisReport:
    """Run the truncation study on ``model`` and record every configuration in ``out`` (SQLite).

    ``loader`` yields ``(images, labels)`` batches; pass ``{"train": tl, "val": vl}`` to report
    several splits (``split`` names a single loader, default ``"val"``). ``layers`` defaults to
    every conv with more than one input channel; ``bipartitions`` to all seven; ``keep`` to
    grids derived from each kernel's shape (see :func:`tensorcut.study.grid.parse_keep` for
    explicit forms). ``cp_ranks`` (ints or ``"auto"``) adds single-layer CP truncation.
    ``all_layers`` adds simultaneous truncation of every selected layer along each bipartition
    (and at each CP rank). ``recover_epochs`` > 0 with a ``train_loader`` runs the recovery
    experiment. ``entropy_form`` is ``"vn"`` (-sum p ln p) or ``"literal"`` (paper Eq. 14).
    ``csv`` writes a CSV export next to ``out`` (``True``), to a given path, or not (``False``).
    The model is used in eval mode and its weights are restored afterwards.

    Args:
        model: the trained network (any ``nn.Module`` with ``Conv2d`` layers).
        loader: a loader of ``(images, labels)`` or ``{split: loader}``.
        out: the SQLite results file (resumable: finished configurations are skipped).
        **options: the study's grid and scope, as described above.

    Returns:
        An :class:`AnalysisReport` (baselines, counts, timings, the CSV path).

    Raises:
        TensorcutError: unknown layers or bipartitions, an empty keep grid, an unwritable ``out``.

    Example:
        >>> import tensorcut as tc
        >>> report = tc.analyze(model, {"val": val_loader}, "study.sqlite", keep=[0.5, 0.25])
    """
    t_start = time.perf_counter()
    if entropy_form not in ENTROPY_FORMS:
        raise TensorcutError(
            f"unknown entropy form {entropy_form!r}; valid: {', '.join(ENTROPY_FORMS)}"
        )
    if recover_epochs < 0:
        raise TensorcutError(f"recover_epochs must be >= 0, got {recover_epochs}")
    if recover_epochs and train_loader is None:
        raise TensorcutError("recovery needs a train_loader to retrain on")
    chosen = grid.select_layers(model, layers)
    all_convs = [n for n, _ in grid.conv_layers(model)]
    bips = grid.select_bipartitions(bipartitions)
    spec = grid.parse_keep(keep)
    grid.check_keep_layers(spec, chosen, all_convs)
    kernels = {name: grid.conv_weight(model, name).detach().clone() for name in chosen}
    bad = [name for name, K in kernels.items() if not bool(torch.isfinite(K).all())]
    if bad:
        raise TensorcutError(
            f"layer {bad[0]!r} has NaN or Inf weights; a truncation study needs finite kernels"
        )
    plan_svd = {
        (layer, b): grid.keep_values(spec, layer, b, kernels[layer].shape)
        for layer in chosen
        for b in bips
    }
    cp_spec = grid.parse_cp_ranks(cp_ranks)
    plan_cp = {
        layer: (
            grid.default_cp_ranks(kernels[layer].shape)
            if isinstance(cp_spec, str)  # "auto"
            else list(cp_spec or [])
        )
        for layer in chosen
    }
    ns = {b: {layer: n_singular(kernels[layer].shape, b) for layer in chosen} for b in bips}
    all_steps = (
        {b: grid.all_layer_steps(ns[b], spec, b, all_layer_fractions) for b in bips}
        if all_layers
        else {}
    )
    all_cp = (
        sorted(set(r for rs in plan_cp.values() for r in rs), reverse=True) if all_layers else []
    )

    store = ResultsStore(out)
    was_training = model.training
    model.eval()
    evalsets: dict[str, EvalSet] = {}
    name = model_name or type(model).__name__
    fp = model_fingerprint(model)
    report = AnalysisReport(Path(out), fp, {}, list(chosen))
    sweep: _Sweep | None = None
    try:
        for s, ld in _as_loaders(loader, split).items():
            evalsets[s] = EvalSet(ld, budget_bytes=cache_bytes, spill_dir=spill_dir, name=s)
        data: dict[str, str] = {}
        for s, es in evalsets.items():
            h = hashlib.sha256()
            es.fingerprint_update(h)
            data[s] = f"{data_name or 'data'}:{s}:n={es.n}#{h.hexdigest()[:10]}"
        report.data = data
        depth = {layer: i for i, layer in enumerate(all_convs)}
        store.set_meta(
            f"model:{fp}",
            {
                "name": name,
                "layers": chosen,
                "depth": {k: depth[k] for k in chosen},
                "shapes": {k: list(kernels[k].shape) for k in chosen},
                "all_convs": all_convs,
                "entropy_form": entropy_form,
            },
        )
        have = {(s["layer"], s["bipartition"]) for s in store.spectra(fingerprint=fp)}
        for layer in chosen:
            for b in BIPARTITIONS:
                if (layer, b) in have:
                    continue
                S = spectrum(kernels[layer], b)
                tol = numerical_rank_tol(
                    S, unfold_shape(kernels[layer].shape, b), kernels[layer].dtype
                )
                store.add_spectrum(
                    fingerprint=fp,
                    model=name,
                    layer=layer,
                    depth=depth[layer],
                    bipartition=b,
                    shape=list(kernels[layer].shape),
                    singular_values=S.tolist(),
                    entropy_vn=entropy(S, "vn", tol=tol),
                    entropy_literal=entropy(S, "literal", tol=tol),
                )
        n_splits = len(evalsets)
        total = n_splits * (
            1
            + (
                sum(len(v) for v in plan_svd.values()) + sum(len(v) for v in plan_cp.values())
                if single_layer
                else 0
            )
            + sum(len(v) for v in all_steps.values())
            + len(all_cp)
        )
        sweep = _Sweep(
            model,
            store,
            evalsets,
            fingerprint=fp,
            data=data,
            model_name=name,
            entropy_form=entropy_form,
            cache_bytes=cache_bytes,
            spill_dir=spill_dir,
            use_cache=use_cache,
            progress=progress,
            total=total,
            report=report,
        )
        _baseline(sweep)
        if single_layer:
            for layer in chosen:
                _single_layer(
                    sweep,
                    layer,
                    depth[layer],
                    kernels[layer],
                    bips,
                    plan_svd,
                    plan_cp[layer],
                    dict(cp_kwargs or {}),
                )
        if all_layers:
            _all_layers(sweep, chosen, kernels, bips, all_steps, all_cp, dict(cp_kwargs or {}))
        sweep.bar.close()
        report.skipped = total - report.evaluated
        if recover_epochs:
            from tensorcut.study.recovery import run_recovery

            assert train_loader is not None  # checked on entry
            run_recovery(
                sweep, chosen, kernels, train_loader, recover_epochs, **dict(recover_kwargs or {})
            )
        for s in evalsets:
            rows = store.rows(fingerprint=fp, data=data[s], kind="baseline")
            if rows:
                report.baseline[s] = {k: rows[0][k] for k in ("loss", "top1", "top5", "n")}
        if csv:
            csv_path = Path(out).with_suffix(".csv") if csv is True else Path(csv)
            store.export_csv(
                csv_path, spectra_path=csv_path.with_name(csv_path.stem + "-spectra.csv")
            )
    finally:
        if sweep is not None:
            sweep.close()
        for es in evalsets.values():
            es.close()
        with torch.no_grad():
            for layer, K in kernels.items():
                grid.conv_weight(model, layer).copy_(K)
        model.train(was_training)
        store.close()
    report.seconds = time.perf_counter() - t_start
    return report


def _baseline(sw: _Sweep) -> None:
    from tensorcut.study.cache import evaluate_full

    for s in sw.pending("baseline", "none", "", "", ""):
        res = evaluate_full(sw.model, sw.evalsets[s])
        sw.record(sw.key(s, "baseline", "none", "", "", ""), res, None)


def _single_layer(
    sw: _Sweep,
    layer: str,
    depth: int,
    K: torch.Tensor,
    bips: Sequence[str],
    plan_svd: Mapping[tuple[str, str], list[int]],
    cp_ranks: Sequence[int],
    cp_kwargs: dict[str, Any],
) -> None:
    todo_svd = {
        b: [k for k in plan_svd[(layer, b)] if sw.pending("single", "svd", layer, b, str(k))]
        for b in bips
    }
    todo_cp = [r for r in cp_ranks if sw.pending("cp", "cp", layer, "", str(r))]
    if not any(todo_svd.values()) and not todo_cp:
        return
    runners = sw.runners([layer], sw.evalsets)
    first = next(iter(runners.values()))
    sw.report.fast_path[layer] = "" if first.fast else first.reason
    try:
        for b in bips:
            if not todo_svd[b]:
                continue
            t0 = time.perf_counter()
            svd = svd_bipartition(K, b)
            svd_seconds = time.perf_counter() - t0
            for k in todo_svd[b]:
                t1 = time.perf_counter()
                Kt = svd.truncate(k, layer=layer)
                m = _metrics_dict(svd_metrics(svd, k, entropy_form=sw.entropy_form))
                prep = time.perf_counter() - t1 + svd_seconds
                svd_seconds = 0.0  # the SVD is charged to the first keep only
                with swapped_weights(sw.model, {layer: Kt}):
                    for s in sw.pending("single", "svd", layer, b, str(k)):
                        res = runners[s].evaluate()
                        sw.record(
                            sw.key(s, "single", "svd", layer, b, str(k)),
                            res,
                            m,
                            prep_seconds=prep,
                            fast=runners[s].fast,
                            depth=depth,
                            keep_int=k,
                            n_values=svd.n,
                        )
        for r in todo_cp:
            t1 = time.perf_counter()
            cp = cp_truncate(K, r, **cp_kwargs)
            m = _metrics_dict(cp_metrics(K, cp, entropy_form=sw.entropy_form))
            prep = time.perf_counter() - t1
            extra = {
                "cp_rel_error": cp.rel_error,
                "n_iter": cp.n_iter,
                "converged": cp.converged,
                "message": cp.message,
                "entropy_bipartition": m["entropy_bipartition"],
            }
            with swapped_weights(sw.model, {layer: cp.kernel}):
                for s in sw.pending("cp", "cp", layer, "", str(r)):
                    res = runners[s].evaluate()
                    sw.record(
                        sw.key(s, "cp", "cp", layer, "", str(r)),
                        res,
                        m,
                        prep_seconds=prep,
                        fast=runners[s].fast,
                        extra=extra,
                        depth=depth,
                        keep_int=r,
                    )
    finally:
        for rn in runners.values():
            rn.close()


def _keep_label(keeps: Mapping[str, int]) -> str:
    return ",".join(f"{layer}={k}" for layer, k in keeps.items())


def _all_layers(
    sw: _Sweep,
    layers: Sequence[str],
    kernels: Mapping[str, torch.Tensor],
    bips: Sequence[str],
    steps: Mapping[str, list[dict[str, int]]],
    cp_ranks: Sequence[int],
    cp_kwargs: dict[str, Any],
) -> None:
    joined = ",".join(layers)
    todo = {
        b: [
            st
            for st in steps.get(b, [])
            if sw.pending("all-layers", "svd", joined, b, _keep_label(st))
        ]
        for b in bips
    }
    todo_cp = [r for r in cp_ranks if sw.pending("all-layers", "cp", joined, "", str(r))]
    if not any(todo.values()) and not todo_cp:
        return
    runners = sw.runners(layers, sw.evalsets)
    try:
        for b in bips:
            if not todo[b]:
                continue
            svds = {layer: svd_bipartition(kernels[layer], b) for layer in layers}
            for st in todo[b]:
                t1 = time.perf_counter()
                kt = {layer: svds[layer].truncate(k, layer=layer) for layer, k in st.items()}
                per = {
                    layer: svd_metrics(svds[layer], k, entropy_form=sw.entropy_form)
                    for layer, k in st.items()
                }
                m = mean_metrics(per, sw.entropy_form)
                prep = time.perf_counter() - t1
                extra = {
                    "keeps": st,
                    "per_layer": {layer: per[layer].as_dict() for layer in layers},
                }
                label = _keep_label(st)
                with swapped_weights(sw.model, kt):
                    for s in sw.pending("all-layers", "svd", joined, b, label):
                        res = runners[s].evaluate()
                        sw.record(
                            sw.key(s, "all-layers", "svd", joined, b, label),
                            res,
                            m,
                            prep_seconds=prep,
                            fast=runners[s].fast,
                            extra=extra,
                        )
        for r in todo_cp:
            t1 = time.perf_counter()
            cps = {layer: cp_truncate(kernels[layer], r, **cp_kwargs) for layer in layers}
            per = {
                layer: cp_metrics(kernels[layer], cps[layer], entropy_form=sw.entropy_form)
                for layer in layers
            }
            m = mean_metrics(per, sw.entropy_form)
            prep = time.perf_counter() - t1
            extra = {"rank": r, "per_layer": {layer: per[layer].as_dict() for layer in layers}}
            with swapped_weights(sw.model, {layer: cps[layer].kernel for layer in layers}):
                for s in sw.pending("all-layers", "cp", joined, "", str(r)):
                    res = runners[s].evaluate()
                    sw.record(
                        sw.key(s, "all-layers", "cp", joined, "", str(r)),
                        res,
                        m,
                        prep_seconds=prep,
                        fast=runners[s].fast,
                        extra=extra,
                        keep_int=r,
                    )
    finally:
        for rn in runners.values():
            rn.close()


__all__ = ["analyze", "AnalysisReport", "model_fingerprint"]
