"""Post-truncation recovery (paper Figs. 14 and 21b): truncate hard, retrain, log accuracy per
epoch.

Each scenario truncates every selected layer at once — single-mode SVD, two-mode SVD or
CP — choosing the mildest candidate that drops top-1 to near chance (at most
``near_chance`` x the chance level, on the first evaluation split). A copy of the model
is then retrained with the project's training loop for ``epochs`` epochs; epoch 0 is the
truncated model before any retraining. The caller's model is never modified.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch

from tensorcut.errors import TensorcutError
from tensorcut.study.cache import LayerRunner, evaluate_full, swapped_weights
from tensorcut.study.metrics import cp_metrics, cp_truncate, mean_metrics, svd_metrics
from tensorcut.tenalg import canonical_bipartition, svd_bipartition

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from tensorcut.train.config import Optimizer

DEFAULT_SCENARIOS: tuple[str, ...] = ("OUT", "OUT-IN", "cp")
DEFAULT_FRACTIONS: tuple[float, ...] = (0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.0)
DEFAULT_CP_RANKS: tuple[int, ...] = (40, 20, 10, 5, 2, 1)


def _candidates_svd(svds: Mapping[str, Any], fractions: Sequence[float]) -> list[dict[str, int]]:
    out: list[dict[str, int]] = []
    for f in fractions:
        st = {layer: max(1, min(s.n, int(round(f * s.n)))) for layer, s in svds.items()}
        if st not in out and any(k < svds[layer].n for layer, k in st.items()):
            out.append(st)
    return out


def run_recovery(
    sweep: Any,
    layers: Sequence[str],
    kernels: Mapping[str, torch.Tensor],
    train_loader: Iterable[Any],
    epochs: int,
    *,
    scenarios: Sequence[str] = DEFAULT_SCENARIOS,
    near_chance: float = 2.0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    cp_ranks: Sequence[int] = DEFAULT_CP_RANKS,
    lr: float = 1e-3,
    optimizer: Optimizer = "adam",
    seed: int = 0,
    cp_kwargs: Mapping[str, Any] | None = None,
) -> None:
    """Run every recovery scenario; one row per (scenario, split, epoch) in the sweep's store."""
    from tqdm.auto import tqdm

    from tensorcut.train.config import FitConfig
    from tensorcut.train.loop import fit

    model = sweep.model
    joined = ",".join(layers)
    splits = list(sweep.evalsets)
    probe_split = splits[0]
    device = next(model.parameters()).device
    for scen in tqdm(
        list(scenarios),
        desc="recovery",
        disable=None if sweep.progress else True,  # off a terminal: no bar, no \r lines
        leave=False,
    ):
        method = "cp" if scen.lower() == "cp" else "svd"
        bip = "" if method == "cp" else canonical_bipartition(scen)
        keys = [
            sweep.key(s, "recovery", method, joined, bip, "", e)
            for s in splits
            for e in range(epochs + 1)
        ]
        if all(sweep.is_done(k) for k in keys):
            sweep.report.skipped += len(keys)
            continue
        # 1. candidates from mild to aggressive; probe until near chance
        t0 = time.perf_counter()
        if method == "svd":
            svds = {layer: svd_bipartition(kernels[layer], bip) for layer in layers}
            cands: list[Any] = _candidates_svd(svds, fractions)
        else:
            cands = [r for r in cp_ranks if r >= 1]
        runner = LayerRunner(
            model,
            layers,
            sweep.evalsets[probe_split],
            traced=None,
            enabled=sweep.use_cache,
            budget_bytes=sweep.cache_bytes,
            spill_dir=sweep.spill_dir,
        )
        probes: list[dict[str, Any]] = []
        chosen: tuple[Any, dict[str, torch.Tensor], dict[str, Any]] | None = None
        num_classes: int | None = None
        try:
            for cand in cands:
                if method == "svd":
                    kt = {layer: svds[layer].truncate(k, layer=layer) for layer, k in cand.items()}
                    per = {
                        layer: svd_metrics(svds[layer], k, entropy_form=sweep.entropy_form)
                        for layer, k in cand.items()
                    }
                else:
                    cps = {
                        layer: cp_truncate(kernels[layer], cand, **dict(cp_kwargs or {}))
                        for layer in layers
                    }
                    kt = {layer: c.kernel for layer, c in cps.items()}
                    per = {
                        layer: cp_metrics(
                            kernels[layer], cps[layer], entropy_form=sweep.entropy_form
                        )
                        for layer in layers
                    }
                m = mean_metrics(per, sweep.entropy_form)
                with swapped_weights(model, kt):
                    res = runner.evaluate()
                    if num_classes is None:
                        num_classes = _num_classes(model, sweep.evalsets[probe_split])
                probes.append(
                    {"truncation": cand, "top1": res.top1, "norm_loss_pct": m["norm_loss_pct"]}
                )
                chosen = (cand, kt, m)
                if res.top1 <= near_chance / max(num_classes, 1):
                    break
        finally:
            runner.close()
        if chosen is None:
            raise TensorcutError(f"recovery scenario {scen!r} has no truncation to apply")
        cand, kt, m = chosen
        reached = probes[-1]["top1"] <= near_chance / max(num_classes or 1, 1)
        extra_base = {
            "scenario": scen,
            "truncation": cand,
            "probes": probes,
            "near_chance_reached": reached,
            "lr": lr,
            "optimizer": optimizer,
            "seed": seed,
        }
        prep = time.perf_counter() - t0
        # 2. retrain a copy
        net = copy.deepcopy(model)
        with torch.no_grad():
            for layer, K in kt.items():
                net.get_submodule(layer).weight.copy_(K)
        keep_int = cand if method == "cp" else None

        log_epoch = functools.partial(
            _log_epoch,
            sweep,
            net,
            splits,
            (method, joined, bip),
            extra_base,
            m,
            prep,
            keep_int,
        )
        log_epoch(0, None)
        cfg = FitConfig(epochs=epochs, optimizer=optimizer, lr=lr, scheduler="none", seed=seed)
        fit(
            net,
            cast("DataLoader[Any]", train_loader),  # fit reads it as a sized iterable of batches
            None,
            cfg,
            device=device,
            progress=False,
            on_epoch=functools.partial(_on_epoch, log_epoch),
        )
        del net, log_epoch


def _on_epoch(log: Callable[[int, Mapping[str, Any]], None], row: Mapping[str, Any]) -> None:
    log(int(row["epoch"]), row)


def _log_epoch(
    sweep: Any,
    net: torch.nn.Module,
    splits: Sequence[str],
    what: tuple[str, str, str],
    extra_base: Mapping[str, Any],
    m: Mapping[str, Any],
    prep: float,
    keep_int: Any,
    epoch: int,
    train_row: Mapping[str, Any] | None,
) -> None:
    """Evaluate the retrained copy ``net`` on every split not yet recorded at ``epoch``."""
    method, joined, bip = what
    was = net.training
    net.eval()
    for s in splits:
        key = sweep.key(s, "recovery", method, joined, bip, "", epoch)
        if sweep.is_done(key):
            continue
        res = evaluate_full(net, sweep.evalsets[s])
        extra = dict(extra_base)
        if train_row:
            extra.update(
                {k: train_row[k] for k in ("train_loss", "train_top1", "seconds") if k in train_row}
            )
        sweep.record(
            key,
            res,
            m,
            prep_seconds=prep if epoch == 0 else 0.0,
            extra=extra,
            keep_int=keep_int,
        )
    net.train(was)


def _num_classes(model: torch.nn.Module, data: Any) -> int:
    x, _ = next(data.batches())
    with torch.inference_mode():
        return int(model(x[:1].to(next(model.parameters()).device)).shape[1])


__all__ = ["run_recovery", "DEFAULT_SCENARIOS"]
