"""Sharded truncation sweeps: one study split across ranks or worker processes, one store.

A thin layer over :func:`tensorcut.study.sweep.analyze`. The study is cut into *units*
(one layer, or one layer along one bipartition; one all-layer sweep per bipartition; the
recovery experiment), units are dealt to ranks by estimated cost (longest first, to the
least loaded rank; the same on every rank), and each rank runs ``analyze`` on its units
against the shared SQLite store. Every row is its own ``INSERT OR IGNORE`` on a unique key,
so overlapping or repeated work never duplicates a row, and the finishing pass — the
ordinary, resumable ``analyze`` call over the whole study — computes exactly the rows a
dead worker left missing, then writes the CSV. Three ways to run it:

* ``torchrun --nproc_per_node=N -m tensorcut analyze ...``: ranks join a process group
  (gloo / nccl), wait for each other at a barrier, run the recovery experiment together
  (DDP through :func:`tensorcut.train.loop.fit`), and rank 0 finishes and exports.
* independent processes on any scheduler: ``RANK=i WORLD_SIZE=N tensorcut analyze ...``
  (no ``MASTER_ADDR``) for each ``i``, then one plain ``tensorcut analyze ...`` to finish.
* Python: :func:`analyze_sharded` with explicit ``rank`` and ``world_size``.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from tensorcut import distributed as tdist
from tensorcut.errors import TensorcutError
from tensorcut.study import grid
from tensorcut.study.sweep import AnalysisReport, analyze
from tensorcut.tenalg import n_singular

__all__ = ["ShardReport", "Unit", "analyze_sharded", "assign", "plan_units"]

#: Collective timeout for sweeps: ranks may wait at the barrier for as long as the slowest
#: shard runs.
SWEEP_TIMEOUT = datetime.timedelta(hours=48)
#: Rough relative costs used to balance shards (one cached single-layer evaluation = 1).
CP_COST, ALL_LAYER_COST, RECOVERY_EPOCH_COST = 4.0, 3.0, 60.0


@dataclass(frozen=True)
class Unit:
    """A piece of a study that one rank runs with one ``analyze`` call."""

    kind: str  # "single", "all-layers" or "recovery"
    layers: tuple[str, ...]
    bipartitions: tuple[str, ...]
    with_cp: bool
    cost: float

    def label(self) -> str:
        """Short description for logs."""
        what = self.layers[0] if self.kind == "single" else f"{len(self.layers)} layers"
        return f"{self.kind}:{what}:{'/'.join(self.bipartitions)}{'+cp' if self.with_cp else ''}"


@dataclass
class ShardReport(AnalysisReport):
    """An :class:`AnalysisReport` that also says its shard and whether the study is finished.

    ``final`` is True only for the report of the finishing pass (rank 0 under torchrun, or a
    single process); other shards report what they evaluated themselves.
    """

    rank: int = 0
    world_size: int = 1
    final: bool = True
    units: list[str] = field(default_factory=list)


def plan_units(
    model: nn.Module,
    *,
    layers: Sequence[str] | None = None,
    bipartitions: Sequence[str] | None = None,
    keep: Any = None,
    cp_ranks: Any = None,
    single_layer: bool = True,
    all_layers: bool = False,
    all_layer_fractions: Sequence[float] | None = None,
    recover_epochs: int = 0,
    world_size: int = 1,
    granularity: str = "auto",
) -> list[Unit]:
    """Cut a study into units; validates the study exactly as ``analyze`` would.

    ``granularity`` is ``"layer"`` (one unit per layer: its activations are cached once),
    ``"bipartition"`` (one per layer and bipartition: finer balance), or ``"auto"`` (per layer
    when there are at least three layers per rank).
    """
    if granularity not in ("auto", "layer", "bipartition"):
        raise TensorcutError(
            f"unknown shard granularity {granularity!r}; use auto, layer or bipartition"
        )
    chosen = grid.select_layers(model, layers)
    all_convs = [n for n, _ in grid.conv_layers(model)]
    bips = grid.select_bipartitions(bipartitions)
    spec = grid.parse_keep(keep)
    grid.check_keep_layers(spec, chosen, all_convs)
    shapes = {name: tuple(grid.conv_weight(model, name).shape) for name in chosen}
    cp_spec = grid.parse_cp_ranks(cp_ranks)
    n_cp = {
        name: len(grid.default_cp_ranks(shapes[name])) if cp_spec == "auto" else len(cp_spec or [])
        for name in chosen
    }
    units: list[Unit] = []
    if single_layer:
        per_layer = granularity == "layer" or (
            granularity == "auto" and len(chosen) >= 3 * world_size
        )
        for name in chosen:
            counts = [len(grid.keep_values(spec, name, b, shapes[name])) for b in bips]
            cp_cost = CP_COST * n_cp[name]
            if per_layer:
                units.append(
                    Unit("single", (name,), tuple(bips), n_cp[name] > 0, sum(counts) + cp_cost)
                )
            else:
                for i, (b, c) in enumerate(zip(bips, counts, strict=True)):
                    first = i == 0 and n_cp[name] > 0
                    units.append(
                        Unit("single", (name,), (b,), first, c + (cp_cost if first else 0.0))
                    )
    if all_layers:
        n_all_cp = len(
            {
                r
                for name in chosen
                for r in (
                    grid.default_cp_ranks(shapes[name])
                    if cp_spec == "auto"
                    else list(cp_spec or [])
                )
            }
        )
        for i, b in enumerate(bips):
            ns = {name: n_singular(shapes[name], b) for name in chosen}
            steps = grid.all_layer_steps(ns, spec, b, all_layer_fractions)
            first = i == 0 and n_all_cp > 0
            cost = (
                ALL_LAYER_COST * len(chosen) * (len(steps) + (CP_COST * n_all_cp if first else 0.0))
            )
            units.append(Unit("all-layers", tuple(chosen), (b,), first, cost))
    if recover_epochs:
        units.append(
            Unit(
                "recovery", tuple(chosen), tuple(bips), False, RECOVERY_EPOCH_COST * recover_epochs
            )
        )
    return units


def assign(units: Sequence[Unit], world_size: int) -> list[list[Unit]]:
    """Deal units to ``world_size`` ranks.

    Longest first, each to the least loaded rank (deterministic).
    """
    if world_size < 1:
        raise TensorcutError(f"world size must be >= 1, got {world_size}")
    load = [0.0] * world_size
    out: list[list[Unit]] = [[] for _ in range(world_size)]
    order = sorted(range(len(units)), key=lambda i: (-units[i].cost, i))
    for i in order:
        r = min(range(world_size), key=lambda k: (load[k], k))
        out[r].append(units[i])
        load[r] += units[i].cost
    order_of = {id(u): i for i, u in enumerate(units)}
    return [sorted(us, key=lambda u: order_of[id(u)]) for us in out]


def _unit_kwargs(u: Unit, kwargs: Mapping[str, Any], spec: grid.KeepSpec) -> dict[str, Any]:
    kw = dict(kwargs)
    kw.update(
        layers=list(u.layers),
        bipartitions=list(u.bipartitions),
        csv=False,
        cp_ranks=kwargs.get("cp_ranks") if u.with_cp else None,
    )
    if u.kind == "single":
        kw.update(
            single_layer=True,
            all_layers=False,
            recover_epochs=0,
            train_loader=None,
            keep={k: v for k, v in spec.items() if k[0] is None or k[0] in u.layers},
        )
    elif u.kind == "all-layers":
        kw.update(
            single_layer=False,
            all_layers=True,
            recover_epochs=0,
            train_loader=None,
            keep=dict(spec),
        )
    else:
        kw.update(single_layer=False, all_layers=False, cp_ranks=None, keep=dict(spec))
    return kw


def _merge(into: AnalysisReport, rep: AnalysisReport) -> None:
    into.evaluated += rep.evaluated
    into.fast_path.update(rep.fast_path)
    into.baseline.update(rep.baseline)
    into.fingerprint, into.data = rep.fingerprint, rep.data


def _env_mode() -> tuple[int, int, bool]:
    """(rank, world_size, with_process_group) from the environment."""
    rank, world, _ = tdist.env_world()
    return rank, world, world > 1 and bool(os.environ.get("MASTER_ADDR"))


def analyze_sharded(
    model: nn.Module,
    loader: Any,
    out: str | Path,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    granularity: str = "auto",
    **kwargs: Any,
) -> AnalysisReport:
    """:func:`~tensorcut.study.sweep.analyze`, with the study split over ranks.

    Without ``rank``/``world_size`` they come from the environment: under ``torchrun``
    (``MASTER_ADDR`` set) the ranks form a process group and rank 0 returns the finished
    study; with only ``RANK``/``WORLD_SIZE`` each process runs its shard and returns a
    partial :class:`ShardReport` (``final=False``) — a later single-process call finishes.
    With one process this is exactly ``analyze``. ``kwargs`` are ``analyze``'s.
    """
    with_pg = False
    if rank is None or world_size is None:
        rank, world_size, with_pg = _env_mode()
    if not 0 <= rank < world_size:
        raise TensorcutError(f"rank {rank} outside 0..{world_size - 1}")
    if world_size == 1:
        return analyze(model, loader, out, **kwargs)
    if with_pg:
        return _with_process_group(model, loader, out, granularity, kwargs)
    units = plan_units(model, world_size=world_size, granularity=granularity, **_study(kwargs))
    mine = assign(units, world_size)[rank]
    with tdist.local_only():  # no process group: a recovery unit retrains in this process alone
        report = _run(model, loader, out, mine, kwargs, rank, world_size)
    report.final = False
    return report


def _study(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    keys = (
        "layers",
        "bipartitions",
        "keep",
        "cp_ranks",
        "single_layer",
        "all_layers",
        "all_layer_fractions",
        "recover_epochs",
    )
    return {k: kwargs[k] for k in keys if k in kwargs}


def _run(
    model: nn.Module,
    loader: Any,
    out: str | Path,
    units: Sequence[Unit],
    kwargs: Mapping[str, Any],
    rank: int,
    world_size: int,
) -> ShardReport:
    spec = grid.parse_keep(kwargs.get("keep"))
    report = ShardReport(
        Path(out), "", {}, [], rank=rank, world_size=world_size, units=[u.label() for u in units]
    )
    for u in units:
        rep = analyze(model, loader, out, **_unit_kwargs(u, kwargs, spec))
        _merge(report, rep)
        report.layers = sorted(set(report.layers) | set(rep.layers))
        report.seconds += rep.seconds
    return report


def _with_process_group(
    model: nn.Module, loader: Any, out: str | Path, granularity: str, kwargs: Mapping[str, Any]
) -> AnalysisReport:
    import time

    import torch

    t0 = time.perf_counter()
    dev = next(iter(model.parameters()), torch.empty(0)).device
    with tdist.session(dev, timeout=SWEEP_TIMEOUT) as ctx:
        if dev.type == "cuda":
            model.to(ctx.device)  # one GPU per rank
        units = plan_units(
            model, world_size=ctx.world_size, granularity=granularity, **_study(kwargs)
        )
        shard = [u for u in units if u.kind != "recovery"]
        mine = assign(shard, ctx.world_size)[ctx.rank]
        report = _run(model, loader, out, mine, kwargs, ctx.rank, ctx.world_size)
        tdist.barrier()
        recovery = [u for u in units if u.kind == "recovery"]
        if recovery:  # every rank together: the retraining runs data-parallel inside fit()
            rep = analyze(
                model,
                loader,
                out,
                **_unit_kwargs(recovery[0], kwargs, grid.parse_keep(kwargs.get("keep"))),
            )
            if ctx.is_main:
                report.evaluated += rep.evaluated
        totals = tdist.all_reduce_sum([report.evaluated])
        paths = tdist.all_gather_object(report.fast_path)

        def finish() -> AnalysisReport:
            with tdist.local_only():
                return analyze(model, loader, out, **kwargs)

        final = tdist.run_on_main(finish)
    if not ctx.is_main or final is None:
        report.final = False
        return report
    done_here = int(totals[0]) + final.evaluated
    fast: dict[str, str] = {}
    for p in paths:
        fast.update(p)
    fast.update(final.fast_path)
    return ShardReport(
        final.path,
        final.fingerprint,
        final.data,
        final.layers,
        evaluated=done_here,
        skipped=max(0, final.evaluated + final.skipped - done_here),
        fast_path=fast,
        baseline=final.baseline,
        seconds=time.perf_counter() - t0,
        rank=ctx.rank,
        world_size=ctx.world_size,
        final=True,
        units=report.units,
    )
