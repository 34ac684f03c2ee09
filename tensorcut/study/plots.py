"""Figures of the truncation study (matplotlib, PNG and SVG), drawn from a results store.

One call, :func:`plot`, writes every figure the data supports:

- ``spectra``: singular values per bipartition, one line per layer (paper Figs. 6-7);
- ``accuracy_vs_norm_loss_<BIP>``: top-1 / top-5 vs norm loss, one line per layer
  (Figs. 8-11, 18-19),
  and ``accuracy_vs_norm_loss_all`` with every bipartition side by side;
- ``robustness_vs_depth``: tolerated norm loss vs layer depth per bipartition (Fig. 20);
- ``all_layers``: simultaneous truncation, accuracy vs average norm loss (Figs. 12-13);
- ``cp_truncation``: CP vs SVD (OUT) truncation per layer (Figs. 15, 21a);
- ``recovery``: accuracy per retraining epoch (Figs. 14, 21b);
- ``correlation_vs_norm_loss``: correlation loss vs norm loss (Sec. III E).

Axis labels name the norm (squared Frobenius) and entropy definition used. Uses the
object-oriented matplotlib API with the Agg canvas: no global backend is changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tensorcut.errors import TensorcutError
from tensorcut.study import findings
from tensorcut.study.store import ResultsStore, open_results
from tensorcut.tenalg import BIPARTITIONS, ENTROPY_LABELS

NORM_LABEL = "norm loss % (discarded share of ||K||_F^2 = sum S^2)"
AVG_NORM_LABEL = "average norm loss % over truncated conv layers (||K||_F^2)"
FORMATS: tuple[str, ...] = ("png", "svg")


def _figure(
    nrows: int = 1, ncols: int = 1, *, size: tuple[float, float] | None = None
) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size or (5.2 * ncols, 3.8 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig: Any, out: Path, name: str, formats: Sequence[str]) -> list[Path]:
    from matplotlib import rc_context

    paths = []
    # fixed SVG ids and no creation date: re-rendering the same results gives the same files
    with rc_context({"svg.hashsalt": "tensorcut"}):
        for fmt in formats:
            p = out / f"{name}.{fmt}"
            fig.savefig(
                p,
                dpi=130 if fmt == "png" else None,
                metadata={"Date": None} if fmt in ("svg", "pdf") else None,
            )
            paths.append(p)
    return paths


def _layer_order(meta: Mapping[str, Any] | None, names: Sequence[str]) -> list[str]:
    depth = (meta or {}).get("depth", {})
    return sorted(set(names), key=lambda n: (depth.get(n, 10**6), n))


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.85 * i / max(n - 1, 1)) for i in range(n)]


def plot_spectra(
    spectra: Sequence[Mapping[str, Any]],
    out: Path,
    formats: Sequence[str],
    *,
    entropy_form: str = "vn",
) -> list[Path]:
    """Normalised singular values S_i / S_1 per bipartition (log scale), one line per layer."""
    if not spectra:
        return []
    fig, axes = _figure(2, 4, size=(18, 7.5))
    layers = sorted(
        {s["layer"] for s in spectra},
        key=lambda n: min(s["depth"] for s in spectra if s["layer"] == n),
    )
    colors = dict(zip(layers, _colors(len(layers)), strict=True))
    ekey = "entropy_vn" if entropy_form == "vn" else "entropy_literal"
    for ax, bip in zip(axes.flat, BIPARTITIONS, strict=False):  # 8 panels, 7 bipartitions
        for s in spectra:
            if s["bipartition"] != bip:
                continue
            sv = s["singular_values"]
            top = sv[0] if sv and sv[0] > 0 else 1.0
            ax.semilogy(
                range(1, len(sv) + 1),
                [max(v / top, 1e-12) for v in sv],
                marker="." if len(sv) < 40 else None,
                color=colors[s["layer"]],
                label=f"{s['layer']} {tuple(s['shape'])}, E={s[ekey]:.2f}",
            )
        ax.set_title(f"bipartition {bip}")
        ax.set_xlabel("singular value index i")
        ax.set_ylabel("S_i / S_1")
        ax.legend(fontsize=7)
    ax = axes.flat[7]
    ax.axis("off")
    ax.text(
        0.0, 0.5, f"Entropy E in legends:\n{ENTROPY_LABELS[entropy_form]}\nnatural log", fontsize=9
    )
    fig.suptitle("Singular value spectra of the conv kernels (paper Figs. 6-7)")
    return _save(fig, out, "spectra", formats)


def _acc_panel(
    ax: Any,
    curves: Mapping[tuple[Any, ...], list[findings.Point]],
    layers: Sequence[str],
    metric: str,
    title: str,
) -> None:
    colors = dict(zip(layers, _colors(len(layers)), strict=True))
    for layer in layers:
        pts = curves.get((layer,))
        if not pts:
            continue
        ax.plot(
            [p.norm_loss for p in pts],
            [getattr(p, metric) for p in pts],
            marker="o",
            ms=3,
            color=colors[layer],
            label=layer,
        )
    ax.set_title(title)
    ax.set_xlabel(NORM_LABEL, fontsize=8)
    ax.set_ylabel(f"{metric.replace('top', 'top-')} accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_accuracy(
    rows: Sequence[Mapping[str, Any]],
    out: Path,
    formats: Sequence[str],
    split: str,
    meta: Mapping[str, Any] | None,
) -> list[Path]:
    """Per bipartition: top-1 and top-5 vs norm loss, one line per layer; plus an overview grid."""
    paths: list[Path] = []
    per_bip = {}
    for bip in BIPARTITIONS:
        sub = [r for r in rows if r["bipartition"] == bip]
        c = findings.curves(sub, kind="single", method="svd", split=split, by=("layer",))
        if c:
            per_bip[bip] = c
    if not per_bip:
        return paths
    for bip, c in per_bip.items():
        layers = _layer_order(meta, [k[0] for k in c])
        fig, axes = _figure(1, 2)
        _acc_panel(axes[0, 0], c, layers, "top1", f"SVD truncation along {bip} ({split})")
        _acc_panel(axes[0, 1], c, layers, "top5", f"SVD truncation along {bip} ({split})")
        paths += _save(fig, out, f"accuracy_vs_norm_loss_{bip}_{split}", formats)
    fig, axes = _figure(2, 4, size=(20, 8))
    for ax, bip in zip(axes.flat, BIPARTITIONS, strict=False):  # 8 panels, 7 bipartitions
        if bip in per_bip:
            c = per_bip[bip]
            _acc_panel(ax, c, _layer_order(meta, [k[0] for k in c]), "top1", f"{bip} ({split})")
        else:
            ax.axis("off")
    axes.flat[7].axis("off")
    fig.suptitle(
        "Single-layer SVD truncation: top-1 vs norm loss per bipartition (paper Figs. 8-11, 18-19)"
    )
    paths += _save(fig, out, f"accuracy_vs_norm_loss_all_{split}", formats)
    return paths


def plot_depth(
    rows: Sequence[Mapping[str, Any]],
    out: Path,
    formats: Sequence[str],
    split: str,
    meta: Mapping[str, Any] | None,
    *,
    max_drop: float = 0.01,
) -> list[Path]:
    """Tolerated norm loss (largest loss with top-1 drop <= max_drop) vs layer depth (Fig. 20)."""
    base = [r for r in rows if r["kind"] == "baseline" and r["split"] == split]
    if not base:
        return []
    b1 = float(base[0]["top1"])
    fig, axes = _figure(1, 2, size=(11, 4))
    any_line = False
    ticks: dict[int, str] = {}
    for bip in BIPARTITIONS:
        sub = [r for r in rows if r["bipartition"] == bip]
        c = findings.curves(sub, kind="single", method="svd", split=split, by=("layer",))
        if not c:
            continue
        layers = _layer_order(meta, [k[0] for k in c])
        depth = (meta or {}).get("depth", {})
        xs = [depth.get(layer, i) + 1 for i, layer in enumerate(layers)]
        tol = [findings.tolerated_norm_loss(c[(layer,)], b1, max_drop=max_drop) for layer in layers]
        at50 = [findings.accuracy_at(c[(layer,)], 50.0) for layer in layers]
        style = "-" if "-" not in bip else "--"
        axes[0, 0].plot(xs, tol, marker="o", linestyle=style, label=bip)
        axes[0, 1].plot(
            [x for x, a in zip(xs, at50, strict=True) if a is not None],
            [b1 - a for a in at50 if a is not None],
            marker="o",
            linestyle=style,
            label=bip,
        )
        ticks.update(zip(xs, layers, strict=True))
        any_line = True
    if not any_line:
        return []
    axes[0, 0].set_xlabel("conv layer depth (1 = first conv)")
    axes[0, 0].set_ylabel(
        f"tolerated norm loss % (top-1 drop <= {100 * max_drop:g} pt)", fontsize=8
    )
    axes[0, 0].set_title(f"Robustness vs depth ({split})")
    axes[0, 1].set_xlabel("conv layer depth (1 = first conv)")
    axes[0, 1].set_ylabel("top-1 drop at 50% norm loss (interpolated)", fontsize=8)
    axes[0, 1].set_title("Accuracy lost at 50% norm loss")
    for ax in axes.flat:
        ax.set_xticks(sorted(ticks), labels=[f"{d}: {ticks[d]}" for d in sorted(ticks)])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Impact of truncation vs depth (paper Fig. 20); norm = ||K||_F^2")
    return _save(fig, out, f"robustness_vs_depth_{split}", formats)


def plot_all_layers(
    rows: Sequence[Mapping[str, Any]], out: Path, formats: Sequence[str], split: str
) -> list[Path]:
    """Accuracy vs average norm loss, every selected layer truncated at once (Figs. 12-13)."""
    svd = findings.curves(rows, kind="all-layers", method="svd", split=split, by=("bipartition",))
    cp = findings.curves(rows, kind="all-layers", method="cp", split=split, by=("method",))
    if not svd and not cp:
        return []
    fig, axes = _figure(1, 2)
    for ax, metric in zip(axes.flat, ("top1", "top5"), strict=True):
        for (bip,), pts in sorted(svd.items(), key=lambda kv: BIPARTITIONS.index(kv[0][0])):
            ax.plot(
                [p.norm_loss for p in pts],
                [getattr(p, metric) for p in pts],
                marker="o",
                ms=3,
                label=f"SVD {bip}",
            )
        for _, pts in cp.items():
            ax.plot(
                [p.norm_loss for p in pts],
                [getattr(p, metric) for p in pts],
                marker="s",
                ms=3,
                color="k",
                linestyle=":",
                label="CP",
            )
        ax.set_xlabel(AVG_NORM_LABEL, fontsize=8)
        ax.set_ylabel(f"{metric.replace('top', 'top-')} accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"All selected layers truncated simultaneously ({split}; paper Figs. 12-13)")
    return _save(fig, out, f"all_layers_{split}", formats)


def plot_cp(
    rows: Sequence[Mapping[str, Any]],
    out: Path,
    formats: Sequence[str],
    split: str,
    meta: Mapping[str, Any] | None,
) -> list[Path]:
    """CP truncation per layer (solid) against SVD truncation along OUT (dashed).

    Top-1 and top-5 accuracy vs norm loss.
    """
    cp = findings.curves(rows, kind="cp", method="cp", split=split, by=("layer",))
    if not cp:
        return []
    svd = findings.curves(
        [r for r in rows if r["bipartition"] == "OUT"],
        kind="single",
        method="svd",
        split=split,
        by=("layer",),
    )
    layers = _layer_order(meta, [k[0] for k in cp])
    colors = dict(zip(layers, _colors(len(layers)), strict=True))
    fig, axes = _figure(1, 2)
    for ax, metric in zip(axes.flat, ("top1", "top5"), strict=True):
        for layer in layers:
            pts = cp[(layer,)]
            ax.plot(
                [p.norm_loss for p in pts],
                [getattr(p, metric) for p in pts],
                marker="s",
                ms=3,
                color=colors[layer],
                label=f"{layer} CP",
            )
            if (layer,) in svd:
                sp = svd[(layer,)]
                ax.plot(
                    [p.norm_loss for p in sp],
                    [getattr(p, metric) for p in sp],
                    linestyle="--",
                    alpha=0.7,
                    color=colors[layer],
                    label=f"{layer} SVD OUT",
                )
        ax.set_xlabel(NORM_LABEL, fontsize=8)
        ax.set_ylabel(f"{metric.replace('top', 'top-')} accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"CP truncation vs SVD truncation ({split}; paper Figs. 15, 21a)")
    return _save(fig, out, f"cp_truncation_{split}", formats)


def plot_recovery(
    rows: Sequence[Mapping[str, Any]], out: Path, formats: Sequence[str], split: str
) -> list[Path]:
    """Accuracy after each retraining epoch, one line per scenario (Figs. 14, 21b)."""
    rc = findings.recovery_curves(rows, split=split)
    if not rc:
        return []
    base = [r for r in rows if r["kind"] == "baseline" and r["split"] == split]
    fig, axes = _figure(1, 1, size=(6, 4))
    ax = axes[0, 0]
    for name, pts in rc.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if base:
        ax.axhline(float(base[0]["top1"]), color="gray", linestyle="--", label="before truncation")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("retraining epoch (0 = just truncated)")
    ax.set_ylabel("top-1 accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Recovery after aggressive all-layer truncation ({split})")
    return _save(fig, out, f"recovery_{split}", formats)


def plot_correlation(
    rows: Sequence[Mapping[str, Any]], out: Path, formats: Sequence[str], split: str
) -> list[Path]:
    """Correlation (entropy) loss vs norm loss for the single-layer SVD truncations."""
    pts = [
        r
        for r in rows
        if r["kind"] == "single" and r["split"] == split and r.get("corr_loss_pct") is not None
    ]
    if not pts:
        return []
    form = pts[0].get("entropy_form") or "vn"
    fig, axes = _figure(1, 1, size=(6, 4.5))
    ax = axes[0, 0]
    for bip in BIPARTITIONS:
        sub = [r for r in pts if r["bipartition"] == bip]
        if sub:
            ax.scatter(
                [r["norm_loss_pct"] for r in sub],
                [r["corr_loss_pct"] for r in sub],
                s=10,
                label=bip,
            )
    cp = [
        r
        for r in rows
        if r["kind"] == "cp" and r["split"] == split and r.get("corr_loss_pct") is not None
    ]
    if cp:
        ax.scatter(
            [r["norm_loss_pct"] for r in cp],
            [r["corr_loss_pct"] for r in cp],
            s=14,
            marker="x",
            color="k",
            label="CP (entropy along OUT)",
        )
    ax.set_xlabel(NORM_LABEL, fontsize=8)
    ax.set_ylabel("correlation loss % = 100 (E - E~)/E", fontsize=8)
    ax.set_title(f"Entropy: {ENTROPY_LABELS.get(form, form)}", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out, f"correlation_vs_norm_loss_{split}", formats)


def plot(
    results: str | Path | ResultsStore,
    out: str | Path,
    *,
    formats: Sequence[str] = FORMATS,
    max_drop: float = 0.01,
    fingerprint: str | None = None,
) -> list[Path]:
    """Write every figure the results support into ``out``; returns the files written.

    With several models in one results file, each gets a subfolder named by its fingerprint
    (or pass ``fingerprint``).
    """
    bad = [f for f in formats if f not in ("png", "svg", "pdf")]
    if bad:
        raise TensorcutError(f"unknown figure format(s) {bad}; use png, svg or pdf")
    store, owned = open_results(results)
    try:
        rows = store.rows()
        spectra = store.spectra()
        if not rows and not spectra:
            raise TensorcutError(
                f"{store.path} holds no results yet; run `tensorcut analyze` first"
            )
        fps = sorted({r["fingerprint"] for r in rows} | {s["fingerprint"] for s in spectra})
        if fingerprint is not None:
            if fingerprint not in fps:
                raise TensorcutError(
                    f"fingerprint {fingerprint!r} not in {store.path}; present: {', '.join(fps)}"
                )
            fps = [fingerprint]
        metas = {fp: store.get_meta(f"model:{fp}") for fp in fps}
    finally:
        if owned:
            store.close()
    out = Path(out)
    written: list[Path] = []
    for fp in fps:
        target = out if len(fps) == 1 else out / fp
        target.mkdir(parents=True, exist_ok=True)
        r_fp = [r for r in rows if r["fingerprint"] == fp]
        s_fp = [s for s in spectra if s["fingerprint"] == fp]
        meta = metas.get(fp) or {}
        written += plot_spectra(s_fp, target, formats, entropy_form=meta.get("entropy_form", "vn"))
        for split in findings.splits_of(r_fp):
            written += plot_accuracy(r_fp, target, formats, split, meta)
            written += plot_depth(r_fp, target, formats, split, meta, max_drop=max_drop)
            written += plot_all_layers(r_fp, target, formats, split)
            written += plot_cp(r_fp, target, formats, split, meta)
            written += plot_recovery(r_fp, target, formats, split)
            written += plot_correlation(r_fp, target, formats, split)
    return written


__all__ = ["plot", "NORM_LABEL", "AVG_NORM_LABEL", "FORMATS"]
