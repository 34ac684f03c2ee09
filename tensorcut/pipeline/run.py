"""`tensorcut run`: one command from a trained model to a smaller, verified one, with a report.

Stages, each resumable (a re-run skips stages whose outputs exist and are valid):

1. ``dense``    — copy the given checkpoint into the run directory, or train one.
2. ``study``    — truncation study on a calibration subset of the validation split
                  (single-layer SVD truncations); gives each layer's sensitivity.
3. ``curve``    — accuracy vs conv-layer compression on the calibration subset, before
                  fine-tuning, for the sensitivity-guided allocation and for uniform ranks
                  (BatchNorm statistics re-estimated on the calibration subset after each
                  compression unless ``bn_recalibrate=False``).
4. ``compress`` — the allocation (guided / error / uniform / measured: per-layer calibration
                  loss measured at several ranks, ``study/drops.json``) with the best
                  calibration top-1 (then loss) at the goal after a short probe fine-tune of
                  each (``probe_epochs`` on ``probe_images`` training images; 0 epochs: right
                  after compression);
                  apply, re-estimate BatchNorm statistics.
5. ``finetune`` — fine-tune from the factors.
6. ``verify``   — test-split metrics, size, MACs and CPU latency of dense and final models.
7. ``export``   — ONNX (checked against onnxruntime).
8. ``report``   — ``report.html``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tensorcut import data as tdata
from tensorcut.checkpoint import CheckpointMeta
from tensorcut.checkpoint import io as tio
from tensorcut.compression import CompressConfig, apply, plan
from tensorcut.compression.measured import MEASURE_FRACTIONS, DropTable, measure_layer_drops
from tensorcut.console import say
from tensorcut.errors import TensorcutError
from tensorcut.timing import LatencyStats, compare, measure_latency
from tensorcut.train.loop import FitConfig, fit, recalibrate_bn
from tensorcut.train.loop import evaluate as evaluate_loader

__all__ = ["RunConfig", "run", "STAGES"]

STAGES = ("dense", "study", "curve", "compress", "finetune", "verify", "export", "report")
RUN_FILE = "run.json"


@dataclass
class RunConfig:
    """Goal and recipe of a run. Exactly one of ``target_ratio``, ``target_macs``, ``max_drop``.

    ``target_ratio`` is the compression ratio of the selected conv layers' parameters;
    ``target_macs`` a fraction (< 1) of their MACs to keep; ``max_drop`` the largest allowed
    top-1 drop (absolute, e.g. 0.01), met on the calibration set before fine-tuning.
    """

    target_ratio: float | None = None
    target_macs: float | None = None
    max_drop: float | None = None
    method: str = "tucker2"
    calib_subset: int = 512
    bipartitions: tuple[str, ...] = ("OUT", "IN", "OUT-IN")
    curve_ratios: tuple[float, ...] = (1.5, 2.0, 3.0, 5.0, 10.0, 20.0)
    finetune_epochs: int = 10
    finetune_lr: float = 1e-4
    finetune_patience: int = 3
    distill: bool = False
    bn_recalibrate: bool = True
    probe_epochs: int = 1
    probe_images: int = 2048
    batch_size: int = 128
    seed: int = 0
    train_subset: int | None = None
    measured: bool = False
    match_epochs: int = 0
    match_lr: float = 1e-3

    def __post_init__(self) -> None:
        goals = [
            k for k in ("target_ratio", "target_macs", "max_drop") if getattr(self, k) is not None
        ]
        if len(goals) != 1:
            raise TensorcutError(
                "give exactly one goal: --target-ratio R, --target-macs F or --max-drop D"
                + (f" (got {', '.join(goals)})" if goals else "")
            )
        if self.target_ratio is not None and not self.target_ratio > 1:
            raise TensorcutError(
                "--target-ratio must be > 1 (dense / compressed parameters), "
                f"got {self.target_ratio}"
            )
        if self.target_macs is not None and not 0 < self.target_macs < 1:
            raise TensorcutError(
                "--target-macs is the fraction of conv MACs to keep, in (0, 1); "
                f"got {self.target_macs}"
            )
        if self.max_drop is not None and not 0 <= self.max_drop < 1:
            raise TensorcutError(
                f"--max-drop is an absolute top-1 drop in [0, 1), got {self.max_drop}"
            )
        if self.probe_epochs < 0 or self.probe_images < 1:
            raise TensorcutError(
                f"--probe-epochs must be >= 0 and --probe-images >= 1; got {self.probe_epochs} and "
                f"{self.probe_images}"
            )
        if self.calib_subset < 16:
            raise TensorcutError(f"--calib-subset must be >= 16 images, got {self.calib_subset}")
        if not (self.finetune_lr > 0 and math.isfinite(self.finetune_lr)):
            raise TensorcutError(f"--finetune-lr must be > 0, got {self.finetune_lr:g}")
        if self.finetune_epochs < 0 or self.finetune_patience < 1:
            raise TensorcutError(
                "--finetune-epochs must be >= 0 and the patience >= 1; "
                f"got {self.finetune_epochs} and "
                f"{self.finetune_patience}"
            )
        if self.batch_size < 1 or not 0 <= self.seed < 2**32:
            raise TensorcutError(
                "batch size must be >= 1 and seed in [0, 2**32); "
                f"got {self.batch_size} and {self.seed}"
            )
        if self.train_subset is not None and self.train_subset < 1:
            raise TensorcutError(f"--subset must be >= 1 images, got {self.train_subset}")
        if not self.curve_ratios or any(not float(r) > 1 for r in self.curve_ratios):
            raise TensorcutError(
                f"curve ratios are compression factors > 1; got {tuple(self.curve_ratios)}"
            )
        if isinstance(self.match_epochs, bool) or self.match_epochs < 0:
            raise TensorcutError(f"--match-epochs must be >= 0, got {self.match_epochs}")
        if not (self.match_lr > 0 and math.isfinite(self.match_lr)):
            raise TensorcutError(f"--match-lr must be > 0, got {self.match_lr:g}")
        if self.match_epochs > 0 and not self.bn_recalibrate:
            raise TensorcutError(
                "--match-epochs re-estimates BatchNorm on the calibration images before and after "
                "matching; drop --no-bn-recalibrate"
            )
        CompressConfig(method=self.method, ratio=0.5)  # validates the method name
        self.bipartitions = tuple(self.bipartitions)
        self.curve_ratios = tuple(float(r) for r in self.curve_ratios)

    @property
    def strategies(self) -> tuple[str, ...]:
        """The allocations compared (:data:`STRATEGIES`; ``measured`` only when asked for)."""
        return tuple(k for k in STRATEGIES if self.measured or k != "measured")

    @property
    def goal(self) -> str:
        """A one-line description of the goal."""
        if self.target_ratio is not None:
            return f"conv-layer compression ratio >= {self.target_ratio:g}"
        if self.target_macs is not None:
            return f"conv-layer MACs <= {self.target_macs:g} of dense"
        return f"top-1 drop <= {self.max_drop:g}"


class RunDir:
    """The run directory and its ``run.json`` ledger of finished stages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        f = path / RUN_FILE
        if f.exists():
            try:
                self.state = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:  # ValueError: bad JSON or not UTF-8
                raise TensorcutError(
                    f"{f} is corrupt ({str(e).splitlines()[0][:100]}); remove the run directory or "
                    "choose another --out"
                ) from None
            if not isinstance(self.state, dict) or not isinstance(
                self.state.get("stages", {}), dict
            ):
                raise TensorcutError(
                    f"{f} is corrupt (not a run ledger: {type(self.state).__name__}); "
                    "remove the run directory or choose another --out"
                )
            self.state.setdefault("stages", {})
        else:
            if path.exists() and any(path.iterdir()):
                raise TensorcutError(
                    f"{path} exists and is not a tensorcut run directory; choose another --out"
                )
            self.state = {"format": "tensorcut-run", "stages": {}}

    def save(self) -> None:
        tio.atomic_write_text(self.path / RUN_FILE, json.dumps(self.state, indent=2, default=str))

    def done(self, stage: str) -> bool:
        return stage in self.state["stages"]

    def mark(self, stage: str, info: dict[str, Any], started: float | None = None) -> None:
        extra = {"seconds": round(time.perf_counter() - started, 2)} if started is not None else {}
        self.state["stages"][stage] = dict(
            info, finished=time.strftime("%Y-%m-%d %H:%M:%S"), **extra
        )
        self.save()

    def info(self, stage: str) -> dict[str, Any]:
        return self.state["stages"][stage]


def _fingerprint(directory: Path) -> str:
    return hashlib.sha256((directory / tio.WEIGHTS).read_bytes()).hexdigest()[:16]


def _say(msg: str, progress: bool) -> None:
    say(msg, progress, name="tensorcut.pipeline.run")


def _json_ok(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


def _checkpoint_ok(d: Path) -> bool:
    try:
        tio.read_meta(d)
    except TensorcutError:
        return False
    return (d / tio.WEIGHTS).is_file()


def _stage_outputs_ok(out: Path, stage: str) -> bool:
    """Whether a finished stage's files are still there and readable.

    A resumed run trusts only those.
    """
    if stage == "dense":
        return _checkpoint_ok(out / "dense")
    if stage == "study":
        return (out / "study" / "truncation.sqlite").is_file()
    if stage == "compress":
        return _checkpoint_ok(out / "compressed") and _json_ok(out / "compressed" / "plan.json")
    if stage == "finetune":
        return _checkpoint_ok(out / "finetuned")
    if stage == "verify":
        return _json_ok(out / "verify.json")
    if stage == "export":
        return (out / "export" / "model.onnx").is_file()
    return True


def _drop_broken_stages(rd: RunDir, progress: bool) -> None:
    """Forget the first finished stage whose outputs are missing or corrupt, and all after it."""
    for i, stage in enumerate(STAGES):
        if rd.done(stage) and not _stage_outputs_ok(rd.path, stage):
            later = [s for s in STAGES[i:] if rd.done(s)]
            _say(
                f"[{stage}] its outputs are missing or corrupt; redoing {', '.join(later)}",
                progress,
            )
            for s in later:
                del rd.state["stages"][s]
            rd.save()
            return


def _check_out_path(out: Path) -> None:
    """Refuse an --out that is a file or cannot be written as UTF-8, before any work."""
    try:
        str(out).encode("utf-8")
    except UnicodeEncodeError:
        raise TensorcutError(
            f"--out {str(out)!r} is not a valid UTF-8 path; give a UTF-8 directory name"
        ) from None
    if out.is_file():
        raise TensorcutError(f"{out} is a file; give a directory path")
    for parent in out.parents:
        if parent.is_file():
            raise TensorcutError(f"{parent} is a file; give a directory path for --out")


#: `tensorcut run` needs the checkpoint's own data set (calibration, probe, test)
NO_RUN_DATASET = (
    "the checkpoint does not name its data set; `tensorcut run` needs it for calibration"
)


def _split(meta: CheckpointMeta, split: str, subset: int | None = None) -> tdata.ImageDataset:
    """``split`` of the checkpoint's recorded data set (same folder and seeded hold-out)."""
    return meta.dataset.load(split, subset=subset, missing=NO_RUN_DATASET)


def _calibration(meta: CheckpointMeta, subset: int) -> tdata.ImageDataset:
    return _split(meta, "val", subset)


def _test_set(meta: CheckpointMeta) -> tdata.ImageDataset:
    return _split(meta, "test")


#: Rank allocations compared on the calibration set: the sensitivity-guided budget, the same
#: budget allocation without sensitivity (min-max over the layers' rank ladders; for a MAC goal
#: this is close to uniform ranks solved for the budget), uniform per-layer ranks, and the budget
#: split by accuracy costs measured per layer at several ranks on the calibration images
#: (``allocation="measured"``: dense or one measured rung per layer, an exact knapsack).
STRATEGIES = ("guided", "error", "uniform", "measured")
#: where a run keeps the measured per-layer drops (reused by a resumed run)
DROPS_FILE = "study/drops.json"


def _strategy_config(cfg: RunConfig, kind: str, ratio: float | None) -> tuple[CompressConfig, bool]:
    """(config, use sensitivity) of allocation ``kind`` at conv compression ``ratio``.

    ``ratio`` None means the MACs goal.
    """
    if kind == "uniform":
        assert ratio is not None, "the uniform allocation is tried only for a ratio goal"
        return CompressConfig(method=cfg.method, ratio=1.0 / float(ratio)), False
    allocation = "measured" if kind == "measured" else "ladder"
    if ratio is None:
        return CompressConfig(
            method=cfg.method, budget=cfg.target_macs, budget_kind="macs", allocation=allocation
        ), kind == "guided"
    return CompressConfig(
        method=cfg.method, budget=1.0 / ratio, budget_kind="params", allocation=allocation
    ), kind == "guided"


def _measured_drops(
    out: Path, model: nn.Module, cfg: RunConfig, loader: Any, progress: bool
) -> DropTable:
    """The per-layer drops of ``cfg.method`` measured on the calibration images (BatchNorm
    re-estimated before each measurement unless ``bn_recalibrate=False``), measured once per run
    directory and kept in :data:`DROPS_FILE`."""
    path = out / DROPS_FILE
    if path.exists():
        try:
            return DropTable.load(path)
        except TensorcutError:
            path.unlink()  # a broken file (an old or interrupted write): measure again
    _say(
        f"[study] measuring each layer's calibration loss at {len(MEASURE_FRACTIONS)} ranks "
        f"({cfg.method}), one layer at a time",
        progress,
    )
    cc = CompressConfig(method=cfg.method, budget=0.5, budget_kind="macs", allocation="measured")
    table = measure_layer_drops(
        model, loader, cc, bn_recalibrate=cfg.bn_recalibrate, progress=progress
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    table.save(path)
    return table


def _try_strategy(
    model: nn.Module,
    cfg: RunConfig,
    kind: str,
    ratio: float | None,
    shape: tuple[int, int, int],
    sensitivity: dict[str, float],
    loader: Any,
    plans: dict[str, Any] | None = None,
    models: dict[str, nn.Module] | None = None,
    drops: DropTable | None = None,
) -> dict[str, float]:
    """Compress a copy of ``model`` with one allocation; measure calibration top-1 (no fine-tuning).

    The plan is kept in ``plans[kind]`` when given, so the chosen one need not be recomputed, and
    the compressed (BatchNorm-recalibrated) copy in ``models[kind]``, so a probe can start from it.
    ``drops`` (the measured per-layer costs) is used by the ``measured`` allocation.
    """
    m = copy.deepcopy(model)
    cc, use_sens = _strategy_config(cfg, kind, ratio)
    p = plan(
        model,
        cc,
        input_shape=shape,
        sensitivity=sensitivity if use_sens else None,
        drops=drops if cc.allocation == "measured" else None,
        progress=False,
    )
    apply(m, p)
    if cfg.bn_recalibrate:
        recalibrate_bn(m, loader)
    if plans is not None:
        plans[kind] = p
    if models is not None:
        models[kind] = m
    ev = evaluate_loader(m, loader)
    return {"ratio": p.totals()["conv_ratio"], "top1": ev["top1"], "loss": ev["loss"]}


def _probe(
    kind: str, m: nn.Module, cfg: RunConfig, train_loader: Any, calib_loader: Any
) -> dict[str, float]:
    """Calibration metrics of allocation ``kind``'s compressed model ``m`` after a short fine-tune.

    ``m`` is trained in place (the probe).

    Right after compression at x10 and beyond every allocation is near chance on the
    calibration set, so its accuracy there does not say which one fine-tunes best; a probe of
    ``cfg.probe_epochs`` epochs on ``cfg.probe_images`` training images (the run's fine-tuning
    optimiser and lr) does. The compressed checkpoint itself is made from the factors, not from
    the probed copy.
    """
    fc = FitConfig(
        epochs=cfg.probe_epochs,
        optimizer="adam",
        lr=cfg.finetune_lr,
        scheduler="none",
        seed=cfg.seed,
    )
    fit(m, train_loader, None, fc, device="cpu", progress=False)
    ev = evaluate_loader(m, calib_loader)
    return {"top1": ev["top1"], "loss": ev["loss"]}


def _why(best: str, score: dict[str, tuple[float, float]], probed: bool, p: Any) -> str:
    """One phrase: why allocation ``best`` won (its score against the runner-up; for the measured
    allocation also how many layers it left dense)."""
    when = "after the probe" if probed else "right after compression"
    others = sorted((k for k in score if k != best), key=lambda k: score[k], reverse=True)
    top, loss = score[best][0], -score[best][1]
    why = f"the highest calibration top-1 {when} ({top:.4f}, loss {loss:.4f}"
    if others:
        r = others[0]
        why += f"; next {r} {score[r][0]:.4f}, loss {-score[r][1]:.4f}"
        if score[r][0] == top:
            why += ", tied on top-1, so the lower loss decides"
    why += ")"
    if best == "measured":
        dense = sum(1 for e in p.layers if e.measured is not None and e.status == "dense")
        why += (
            f"; it keeps {dense} of {len(p.layers)} layers dense, each other at the measured rung "
            "with the least summed calibration loss increase within the budget"
        )
    return why


#: Latency rounds of the verify stage (after warm-up), per batch size.
LATENCY_REPS = 15
LATENCY_WARMUP = 3


def measure_models(
    models: dict[str, nn.Module],
    shape: tuple[int, int, int],
    batch: int,
    reps: int = LATENCY_REPS,
    warmup: int = LATENCY_WARMUP,
    threads: int | None = None,
) -> dict[str, LatencyStats]:
    """CPU latency of one forward pass at ``batch`` for each model (evaluation mode), measured
    together by :func:`tensorcut.timing.measure_latency`: warm-up, interleaved rounds, median and
    IQR, with the threads, batch and device recorded."""
    x = torch.randn(batch, *shape)
    for m in models.values():
        m.eval().cpu()
    return measure_latency(models, x, threads=threads, warmup=warmup, reps=reps)


def latency_ms(
    models: dict[str, nn.Module],
    shape: tuple[int, int, int],
    batch: int,
    reps: int = LATENCY_REPS,
) -> dict[str, float]:
    """Median latency (ms) of each model at ``batch`` (see :func:`measure_models`)."""
    return {k: st.median_ms for k, st in measure_models(models, shape, batch, reps).items()}


def latency_lines(summary: dict[str, Any]) -> list[str]:
    """What the verify stage measured, one line per model and batch plus the final-vs-dense verdict
    ("no measurable difference" when the ratio's spread covers 1). Old run directories (medians
    only) give the medians and say no spread was recorded."""
    from tensorcut.pipeline.report import latency_of
    from tensorcut.timing import compare, latency_stats

    rows = summary.get("rows") or {}
    lines: list[str] = []
    for b in (1, 32):
        recs = {k: latency_of(r, b) for k, r in rows.items()}
        if any(v is None for v in recs.values()) or not recs:
            continue
        stats = {}
        for k, rec in recs.items():
            assert rec is not None  # checked above
            if rec["times_ms"]:
                stats[k] = latency_stats(
                    k,
                    rec["times_ms"],
                    batch=int(rec["batch"] or b),
                    threads=int(rec["threads"] or 0),
                    device=str(rec["device"]),
                    warmup=int(rec["warmup"] or 0),
                    session=int(rec["session"] or 0),
                )
        if len(stats) == len(recs):
            lines.extend(f"latency {k}: {st.describe()}" for k, st in stats.items())
            if "dense" in stats and "final" in stats:
                lines.append(
                    f"latency at batch {b}: " + compare(stats["final"], stats["dense"]).describe()
                )
        else:
            meds = ", ".join(f"{k} {rec['median_ms']:.2f} ms" for k, rec in recs.items() if rec)
            lines.append(f"latency at batch {b}: medians {meds} (no timing spread recorded)")
    return lines


def run(
    out: str | Path,
    config: RunConfig,
    *,
    checkpoint: str | Path | None = None,
    model: str | None = None,
    dataset: str | None = None,
    train_epochs: int = 10,
    width: float = 1.0,
    data_dir: str | Path | None = None,
    progress: bool = True,
    command: list[str] | None = None,
) -> dict[str, Any]:
    """Run the main job into ``out``.

    Returns the verification summary (also written to ``out/verify.json``).
    """
    from tensorcut.export import require_onnx
    from tensorcut.pipeline.workflow import (
        compress_checkpoint,
        finetune_checkpoint,
        input_shape_of,
        load_sensitivity,
    )

    out = Path(out)
    require_onnx()  # the export stage needs it: stop now, not after training
    _check_out_path(out)
    if (checkpoint is None) == (model is None):
        raise TensorcutError(
            "give a trained checkpoint, or --model and --dataset to train one first (not both)"
        )
    if model is not None:
        from tensorcut.train.api import check_model_size, check_numbers, model_kwargs_for

        if dataset is None:
            raise TensorcutError("--model needs --dataset to train on")
        check_numbers(epochs=train_epochs, width=width)
        check_model_size(model, model_kwargs_for(dataset, width), factor=4.0)
    rd = RunDir(out)
    settings = {
        "config": asdict(config),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "model": model,
        "dataset": dataset,
        "train_epochs": train_epochs,
        "width": width,
    }
    if isinstance(rd.state.get("settings"), dict) and isinstance(
        rd.state["settings"].get("config"), dict
    ):
        defaults = {
            f.name: f.default for f in fields(RunConfig)
        }  # settings added since the run was made
        rd.state["settings"]["config"] = {
            **{k: v for k, v in defaults.items() if k not in rd.state["settings"]["config"]},
            **rd.state["settings"]["config"],
        }
    if checkpoint is not None:
        tio.read_meta(checkpoint)
        fp = _fingerprint(Path(checkpoint))
        if rd.state.get("dense_fingerprint") not in (None, fp):
            raise TensorcutError(
                f"{out} holds a run of another model (fingerprint {rd.state['dense_fingerprint']}, "
                f"this checkpoint {fp}); choose another --out"
            )
    if "settings" in rd.state and json.loads(json.dumps(rd.state["settings"])) != json.loads(
        json.dumps(settings)
    ):
        raise TensorcutError(
            f"{out} was made with different settings; "
            "re-run with the same ones or choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    _drop_broken_stages(rd, progress)
    rd.state["settings"] = settings
    rd.state["command"] = command or sys.argv
    rd.state["versions"] = tio.versions()
    rd.save()
    t0 = time.perf_counter()
    dense_dir, comp_dir, ft_dir = out / "dense", out / "compressed", out / "finetuned"

    # 1. dense -------------------------------------------------------------------------------
    ts = time.perf_counter()
    if not rd.done("dense"):
        if checkpoint is not None:
            _say(f"[dense] copying {checkpoint}", progress)
            tio.load_checkpoint(checkpoint)  # validates before copying
            tmp = out / ".dense.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for name in (tio.WEIGHTS, tio.META):
                shutil.copyfile(Path(checkpoint) / name, tmp / name)
            shutil.rmtree(dense_dir, ignore_errors=True)
            tmp.rename(dense_dir)
        else:
            from tensorcut.train.api import train_checkpoint

            assert model is not None and dataset is not None  # checked on entry
            _say(f"[dense] training {model} on {dataset} for {train_epochs} epochs", progress)
            train_checkpoint(
                model,
                dataset,
                dense_dir,
                epochs=train_epochs,
                width=width,
                data_dir=data_dir,
                config=FitConfig(
                    epochs=train_epochs, lr=2e-3, scheduler="cosine", seed=config.seed
                ),
                device="cpu",
                resume=(dense_dir / tio.META).exists(),
                progress=progress,
                subset=config.train_subset,
            )
        rd.state["dense_fingerprint"] = _fingerprint(dense_dir)
        rd.mark("dense", {"path": "dense"}, ts)
    else:
        _say("[dense] done (skipped)", progress)
    dense = tio.load_checkpoint(dense_dir)
    dense_info = dense.info
    shape = input_shape_of(dense_info)
    calib = _calibration(dense_info, config.calib_subset)
    calib_loader = tdata.make_loader(calib, 512)

    # 2. study -------------------------------------------------------------------------------
    study_db = out / "study" / "truncation.sqlite"
    ts = time.perf_counter()
    if not rd.done("study"):
        from tensorcut.study.plots import plot
        from tensorcut.study.sweep import analyze

        _say(
            f"[study] truncation sweep on {len(calib)} calibration images "
            f"({', '.join(config.bipartitions)})",
            progress,
        )
        analyze(
            dense.model,
            {"val": calib_loader},
            study_db,
            bipartitions=config.bipartitions,
            model_name=dense_info.model.name,
            data_name=dense_info.dataset.name,
            progress=progress,
        )
        plot(study_db, out / "study" / "figures", formats=("png",))
        rd.mark("study", {"results": "study/truncation.sqlite", "figures": "study/figures"}, ts)
    else:
        _say("[study] done (skipped)", progress)
    sensitivity = load_sensitivity(study_db)
    drops = (
        _measured_drops(out, dense.model, config, calib_loader, progress)
        if config.measured
        else None
    )

    # 3. curve -------------------------------------------------------------------------------
    ts = time.perf_counter()
    if not rd.done("curve"):
        _say(
            "[curve] accuracy vs compression at ratios "
            f"{', '.join(f'{r:g}' for r in config.curve_ratios)}",
            progress,
        )
        base = evaluate_loader(dense.model, calib_loader)["top1"]
        points = [
            dict(
                _try_strategy(
                    dense.model, config, kind, r, shape, sensitivity, calib_loader, drops=drops
                ),
                kind=kind,
                target=r,
            )
            for r in config.curve_ratios
            for kind in config.strategies
        ]
        rd.mark("curve", {"baseline_top1": base, "points": points}, ts)
    else:
        _say("[curve] done (skipped)", progress)
    curve = rd.info("curve")

    # 4. compress ----------------------------------------------------------------------------
    ts = time.perf_counter()
    if not rd.done("compress"):
        if config.max_drop is not None:
            ok = [
                p for p in curve["points"] if curve["baseline_top1"] - p["top1"] <= config.max_drop
            ]
            ratio: float | None = max((p["target"] for p in ok), default=min(config.curve_ratios))
            _say(
                "[compress] largest calibrated ratio within a top-1 drop of "
                f"{config.max_drop:g}: {ratio:g}",
                progress,
            )
        else:
            ratio = config.target_ratio
        kinds = tuple(k for k in config.strategies if ratio is not None or k != "uniform")
        plans: dict[str, Any] = {}
        trial: dict[str, nn.Module] = {}  # the compressed copies, for the probe
        tried: dict[str, dict[str, Any]] = {
            k: _try_strategy(
                dense.model,
                config,
                k,
                ratio,
                shape,
                sensitivity,
                calib_loader,
                plans,
                trial if config.probe_epochs > 0 else None,
                drops=drops,
            )
            for k in kinds
        }
        if config.probe_epochs > 0:
            tr = _split(dense_info, "train", config.probe_images)
            probe_loader = tdata.make_loader(tr, config.batch_size, shuffle=True, seed=config.seed)
            _say(
                f"[compress] probing each allocation: {config.probe_epochs} epoch(s) "
                f"on {len(tr)} training images",
                progress,
            )
            for k in kinds:
                tried[k]["probe"] = _probe(k, trial.pop(k), config, probe_loader, calib_loader)
            score = {k: (tried[k]["probe"]["top1"], -tried[k]["probe"]["loss"]) for k in kinds}
        else:
            score = {k: (tried[k]["top1"], -tried[k].get("loss", 0.0)) for k in kinds}
        best = max(kinds, key=lambda k: (*score[k], k == "guided"))
        cc, use_sens = _strategy_config(config, best, ratio)
        why = _why(best, score, config.probe_epochs > 0, plans[best])
        _say(
            "[compress] calibration top-1 by allocation: "
            + ", ".join(
                f"{k} {v['top1']:.4f}"
                + (f" -> {v['probe']['top1']:.4f} after the probe" if "probe" in v else "")
                + f" (x{v['ratio']:.2f})"
                for k, v in tried.items()
            )
            + f"; using {best}: {why}",
            progress,
        )
        shutil.rmtree(comp_dir, ignore_errors=True)
        _, p, cmeta = compress_checkpoint(
            dense_dir,
            comp_dir,
            cc,
            sensitivity=sensitivity if use_sens else None,
            progress=progress,
            precomputed=plans[best],
            bn_loader=calib_loader if config.bn_recalibrate else None,
            match_epochs=config.match_epochs,
            match_lr=config.match_lr,
        )
        matched = CheckpointMeta.from_meta(cmeta).lineage.layer_matching
        if matched is not None:
            from tensorcut.pipeline.workflow import match_line

            _say(f"[compress] {match_line(matched)}", progress)
        rd.mark(
            "compress",
            {
                "path": "compressed",
                "config": cc.to_dict(),
                "totals": p.totals(),
                "allocation": best,
                "why": why,
                "calibration": tried,
                **({} if matched is None else {"layer_matching": matched.to_dict()}),
            },
            ts,
        )
    else:
        _say("[compress] done (skipped)", progress)

    # 5. finetune ----------------------------------------------------------------------------
    ts = time.perf_counter()
    if not rd.done("finetune"):
        _say(
            f"[finetune] up to {config.finetune_epochs} epochs, Adam lr {config.finetune_lr:g}, "
            "early stopping",
            progress,
        )
        shutil.rmtree(ft_dir, ignore_errors=True)
        fc = FitConfig(
            epochs=config.finetune_epochs,
            optimizer="adam",
            lr=config.finetune_lr,
            scheduler="none",
            patience=config.finetune_patience,
            seed=config.seed,
        )
        ck = finetune_checkpoint(
            comp_dir,
            ft_dir,
            config=fc,
            distill_from=dense_dir if config.distill else None,
            batch_size=config.batch_size,
            device="cpu",
            progress=progress,
            subset=config.train_subset,
        )
        history = [r.to_dict() for r in ck.info.finetune_history or ()]
        rd.mark("finetune", {"path": "finetuned", "history": history}, ts)
    else:
        _say("[finetune] done (skipped)", progress)

    # 6. verify ------------------------------------------------------------------------------
    ts = time.perf_counter()
    if not rd.done("verify"):
        _say("[verify] test split, size, MACs and CPU latency", progress)
        summary = verify(dense_dir, ft_dir, comp_dir, config)
        tio.atomic_write_text(out / "verify.json", json.dumps(summary, indent=2))
        rd.mark("verify", {"path": "verify.json"}, ts)
    summary = json.loads((out / "verify.json").read_text())

    # 7. export ------------------------------------------------------------------------------
    ts = time.perf_counter()
    if not rd.done("export"):
        from tensorcut.export import export_with_check

        _say("[export] ONNX", progress)
        final = tio.load(ft_dir)
        e = export_with_check(final, shape, "onnx", out / "export" / "model.onnx")
        _say(f"[export] export/model.onnx: {e.note}", progress)
        rd.mark("export", {"onnx": "export/model.onnx", "checked": e.checked, "check": e.note}, ts)

    # 8. report ------------------------------------------------------------------------------
    from tensorcut.pipeline.report import write_report

    path = write_report(out)
    rd.mark("report", {"path": "report.html"})
    summary["report"] = str(path)
    summary["seconds"] = time.perf_counter() - t0
    return summary


def verify(dense_dir: Path, final_dir: Path, comp_dir: Path, config: RunConfig) -> dict[str, Any]:
    """Before / after metrics on the test split, and whether the goal was met."""
    from tensorcut.compression import Plan
    from tensorcut.pipeline.workflow import input_shape_of
    from tensorcut.summary import summarize

    rows: dict[str, dict[str, Any]] = {}
    models: dict[str, nn.Module] = {}
    for key, d in (("dense", dense_dir), ("compressed", comp_dir), ("final", final_dir)):
        ck = tio.load_checkpoint(d)
        info = ck.info
        shape = input_shape_of(info)
        m = evaluate_loader(ck.model, tdata.make_loader(_test_set(info), 512))
        s = summarize(ck.model, shape)
        models[key] = ck.model
        rows[key] = {
            "params": s.total_params,
            "size_mb": (d / tio.WEIGHTS).stat().st_size / 1e6,
            "macs": s.total_macs,
            "top1": m["top1"],
            "top5": m["top5"],
            "loss": m["loss"],
            "n": m["n"],
        }
    speed: dict[str, Any] = {}
    for batch in (1, 32):
        stats = measure_models(models, shape, batch)
        for key, st in stats.items():
            rows[key][f"latency_ms_b{batch}"] = st.median_ms  # the median alone, as runs before
            rows[key].setdefault("latency", {})[f"b{batch}"] = st.to_dict()
        c = compare(stats["final"], stats["dense"])
        speed[f"b{batch}"] = dict(c.to_dict(), text=c.describe())
    p = Plan.load(comp_dir / "plan.json")
    t = p.totals()
    drop = rows["dense"]["top1"] - rows["final"]["top1"]
    if config.target_ratio is not None:
        met, got = (
            t["conv_ratio"] >= config.target_ratio * 0.999,
            f"conv-layer ratio {t['conv_ratio']:.2f}",
        )
    elif config.target_macs is not None:
        frac = t["conv_macs_after"] / t["conv_macs_before"]
        met, got = frac <= config.target_macs * 1.001, f"conv MACs at {frac:.3f} of dense"
    else:
        assert config.max_drop is not None  # RunConfig has exactly one goal
        met, got = drop <= config.max_drop, f"top-1 drop {drop:.4f}"
    return {
        "goal": config.goal,
        "goal_met": bool(met),
        "achieved": got,
        "top1_drop": drop,
        "plan_totals": t,
        "rows": rows,
        "latency": speed,
        "data": {"test": rows["final"]["n"]},
    }


def print_summary(s: dict) -> None:
    """The before / after table and the report path."""
    head = (
        f"{'':24s}{'params':>12s}{'size MB':>10s}{'MACs':>14s}"
        f"{'CPU ms b=32':>13s}{'top-1':>8s}{'top-5':>8s}"
    )
    print(head)
    for k, r in s["rows"].items():
        label = "compressed (no FT)" if k == "compressed" else k
        print(
            f"{label:24s}{r['params']:>12,}{r['size_mb']:>10.3f}{r['macs']:>14,}{r['latency_ms_b32']:>13.2f}"
            f"{r['top1']:>8.4f}{r['top5']:>8.4f}"
        )
    print(f"goal: {s['goal']} — {'met' if s['goal_met'] else 'NOT met'} ({s['achieved']})")
    print(f"report: {s['report']}")
