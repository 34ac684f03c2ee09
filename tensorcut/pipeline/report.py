"""The run report: one self-contained HTML file (figures embedded as PNG data URIs; opens offline).

The report opens with a one-sentence verdict computed from the run's numbers and a warning
banner for results a reader must not miss (more MACs than dense, a slower model, a layer
whose kernel approximation is essentially lost). Figures are drawn on ``matplotlib.figure.Figure``
objects with the Agg canvas, so writing a report never changes the caller's matplotlib backend.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from tensorcut.checkpoint import CheckpointMeta
from tensorcut.checkpoint.io import atomic_write_text
from tensorcut.errors import TensorcutError

__all__ = ["write_report", "verdict", "report_warnings", "latency_of", "LAYER_ERROR_WARN"]

#: A factorized layer whose kernel relative error exceeds this has lost (almost) all of its kernel.
LAYER_ERROR_WARN = 0.9

# --- reading the run directory --------------------------------------------------------------


def _read_json(rd: Path, rel: str, expect: type = dict) -> Any:
    """``rd/rel`` parsed as JSON of type ``expect``; else a one-line TensorcutError naming it."""
    p = rd / rel
    try:
        value = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TensorcutError(
            f"{p} is missing; re-run `tensorcut run` with the same --out to redo that stage"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TensorcutError(
            f"{p} is unreadable ({type(e).__name__}); re-run `tensorcut run` into a new --out"
        ) from None
    if not isinstance(value, expect):
        raise TensorcutError(
            f"{p} holds a JSON {type(value).__name__}, not a {expect.__name__}; "
            f"re-run `tensorcut run` into a new --out"
        )
    return value


# --- numbers ----------------------------------------------------------------------------------


def latency_of(row: dict[str, Any], batch: int) -> dict[str, Any] | None:
    """The latency record of one model at ``batch``.

    Its keys: ``median_ms``, ``iqr_ms``, ``q1_ms``, ``q3_ms``, ``threads``, ``batch``,
    ``device``, ``times_ms``, ``session``, ``reps``, ``warmup`` (None where not recorded).

    Reads ``row["latency"]["b<batch>"]`` (:meth:`tensorcut.timing.LatencyStats.to_dict`, or any dict
    with ``median_ms`` and optionally ``q1_ms``/``q3_ms`` or ``iqr_ms``) when present, else the bare
    median ``row["latency_ms_b<batch>"]``; None when neither is.
    """
    rec = (row.get("latency") or {}).get(f"b{batch}")
    if isinstance(rec, dict) and rec.get("median_ms") is not None:
        med = float(rec["median_ms"])
        q1, q3 = rec.get("q1_ms"), rec.get("q3_ms")
        iqr = rec.get("iqr_ms")
        if q1 is not None and q3 is not None:
            q1, q3 = float(q1), float(q3)
            iqr = q3 - q1
        elif iqr is not None:  # quartiles not kept: centre the IQR on the median
            q1, q3 = med - float(iqr) / 2, med + float(iqr) / 2
        return {
            "median_ms": med,
            "iqr_ms": None if iqr is None else float(iqr),
            "q1_ms": q1,
            "q3_ms": q3,
            "threads": rec.get("threads"),
            "batch": rec.get("batch", batch),
            "device": rec.get("device"),
            "times_ms": rec.get("times_ms"),
            "session": rec.get("session", 0),
            "reps": rec.get("reps", len(rec["times_ms"]) if rec.get("times_ms") else None),
            "warmup": rec.get("warmup"),
        }
    ms = row.get(f"latency_ms_b{batch}")
    if ms is None:
        return None
    return {
        "median_ms": float(ms),
        "iqr_ms": None,
        "q1_ms": None,
        "q3_ms": None,
        "threads": None,
        "batch": batch,
        "device": None,
        "times_ms": None,
        "session": 0,
        "reps": None,
        "warmup": None,
    }


def _batches(rows: dict[str, Any]) -> list[int]:
    found: set[int] = set()
    for r in rows.values():
        found.update(
            int(k[1:]) for k in (r.get("latency") or {}) if k[:1] == "b" and k[1:].isdigit()
        )
        found.update(
            int(k.rsplit("_b", 1)[1])
            for k in r
            if k.startswith("latency_ms_b") and k.rsplit("_b", 1)[1].isdigit()
        )
    return sorted(found)


def _comparison(dense: dict[str, Any], final: dict[str, Any]) -> Any:
    """:class:`tensorcut.timing.Comparison` of final / dense, or None when a spread is missing.

    With raw times on both sides :func:`tensorcut.timing.compare` decides (paired when both come
    from one interleaved measurement); with quartiles only, its unpaired rule (IQRs overlap)."""
    from tensorcut.timing import Comparison, compare, latency_stats

    if dense["times_ms"] and final["times_ms"]:

        def stats(name: str, r: dict[str, Any]) -> Any:
            return latency_stats(
                name,
                r["times_ms"],
                batch=int(r["batch"] or 1),
                threads=int(r["threads"] or 0),
                device=str(r["device"]),
                session=int(r["session"] or 0),
            )

        return compare(stats("compressed", final), stats("dense", dense))
    if dense["q1_ms"] is None or final["q1_ms"] is None:
        return None
    return Comparison(
        "compressed",
        "dense",
        final["median_ms"] / dense["median_ms"],
        final["q1_ms"] / dense["q3_ms"],
        final["q3_ms"] / dense["q1_ms"],
        False,
    )


def _speed(dense: dict[str, Any], final: dict[str, Any], batch: int) -> tuple[str, int]:
    """(phrase, sign) comparing the final model's latency record with dense: sign -1 faster,
    +1 slower, 0 no measurable difference (the ratio's spread contains 1), 2 spread unknown."""
    c = _comparison(dense, final)
    if c is None:
        return (
            f"speed at batch {batch} not judged (timing spread not recorded; "
            f"median {dense['median_ms']:.2f} ms dense, {final['median_ms']:.2f} ms compressed)"
        ), 2
    if not c.measurable:
        return f"no measurable difference in speed at batch {batch}", 0
    if c.ratio < 1:
        return f"{1 / c.ratio:.2f}x faster at batch {batch}", -1
    return f"{c.ratio:.2f}x slower at batch {batch}", 1


def verdict(summary: dict[str, Any]) -> str:
    """One sentence: size ratio, top-1 change and speed of the final model against dense.

    A speed-up or slow-down is stated only when the latency ratio's spread excludes 1 (the rule of
    :func:`tensorcut.timing.compare`); without a recorded spread no speed claim is made.
    """
    rows = summary["rows"]
    dense, final = rows["dense"], rows["final"]
    ratio = dense["params"] / final["params"] if final["params"] else math.inf
    size = f"{ratio:.2f}x smaller" if ratio >= 1 else f"{1 / ratio:.2f}x larger"
    pts = 100.0 * (final["top1"] - dense["top1"])
    acc = f"{pts:+.2f} pt top-1"
    judged, unjudged, where = [], [], "this CPU"
    for b in _batches(rows):
        ld, lf = latency_of(dense, b), latency_of(final, b)
        if ld is not None and lf is not None:
            phrase, sign = _speed(ld, lf, b)
            (unjudged.append(str(b)) if sign == 2 else judged.append(phrase))
            where = str(ld["device"]) if ld.get("device") else where
    speed = ", ".join(judged) + (f" on {where}" if judged else "")
    if unjudged:
        speed += (", " if judged else "") + (
            f"speed at batch {' and '.join(unjudged)} not judged "
            "(timing spread not recorded; medians under Latency)"
        )
    return f"{size} (parameters), {acc} (test split), {speed or 'latency not measured'}."


def report_warnings(summary: dict[str, Any], layers: list[dict[str, Any]]) -> list[str]:
    """Warnings for the banner: FCR < 1 (more MACs than dense), a slower compressed model, and
    factorized layers whose kernel relative error exceeds :data:`LAYER_ERROR_WARN`."""
    rows = summary["rows"]
    dense, final = rows["dense"], rows["final"]
    out: list[str] = []
    if final["macs"] > dense["macs"]:
        out.append(
            f"FCR {dense['macs'] / final['macs']:.2f} < 1: "
            "the compressed model needs more MACs per image than "
            f"dense ({final['macs']:,} vs {dense['macs']:,}); "
            "choose a stronger goal or another method."
        )
    conv_fcr = (summary.get("plan_totals") or {}).get("conv_mac_ratio")
    if conv_fcr is not None and conv_fcr < 1 and not final["macs"] > dense["macs"]:
        out.append(
            f"Conv-layer FCR {conv_fcr:.2f} < 1: "
            "the factorized conv layers need more MACs than the dense ones."
        )
    for b in _batches(rows):
        ld, lf = latency_of(dense, b), latency_of(final, b)
        if ld is None or lf is None:
            continue
        phrase, sign = _speed(ld, lf, b)
        if sign == 1:
            out.append(
                f"The compressed model is slower: {phrase} (median {lf['median_ms']:.2f} ms vs "
                f"{ld['median_ms']:.2f} ms dense, beyond the timing spread)."
            )
        elif sign == 2 and lf["median_ms"] > ld["median_ms"]:
            out.append(
                f"The compressed model's median latency at batch {b} is higher than dense "
                f"({lf['median_ms']:.2f} ms vs {ld['median_ms']:.2f} ms); "
                "the timing spread was not recorded, "
                f"so this may be noise."
            )
    bad = [
        ly
        for ly in layers
        if ly.get("status") == "factorize"
        and ly.get("error") is not None
        and float(ly["error"]) > LAYER_ERROR_WARN
    ]
    if bad:
        out.append(
            f"{len(bad)} layer(s) with kernel relative error > {LAYER_ERROR_WARN:g} "
            "(the factorization kept almost nothing of the kernel): "
            + ", ".join(f"{ly['name']} ({float(ly['error']):.3f})" for ly in bad)
            + "."
        )
    return out


# --- figures ----------------------------------------------------------------------------------


def _figure(w: float, h: float) -> Any:
    """A Figure with an Agg canvas, independent of pyplot and of the current backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _img(b64: str, alt: str) -> str:
    a = html.escape(alt)
    return (
        f'<figure><img class="zoom" alt="{a}" title="click to enlarge" '
        f'src="data:image/png;base64,{b64}">'
        f"<figcaption>{a} (click to enlarge)</figcaption></figure>"
    )


def _table(head: list[str], rows: list[list[Any]], cls: str) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _curve_figure(curve: dict[str, Any], chosen: float, final_top1: float, comp_top1: float) -> str:
    fig = _figure(9, 5)
    ax = fig.add_subplot()
    labels = {
        "guided": "sensitivity-guided budget",
        "error": "error-per-parameter budget",
        "uniform": "uniform ranks",
    }
    for kind, style in (("guided", "o-"), ("error", "^-."), ("uniform", "s--")):
        pts = sorted((p["ratio"], p["top1"]) for p in curve["points"] if p["kind"] == kind)
        if pts:
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                style,
                label=f"{labels[kind]} (calibration, before fine-tuning)",
            )
    ax.axhline(curve["baseline_top1"], color="gray", lw=1, ls=":", label="dense (calibration)")
    ax.plot([chosen], [comp_top1], "kx", ms=10, ls="none", label="chosen: test, before fine-tuning")
    ax.plot([chosen], [final_top1], "r*", ms=14, ls="none", label="chosen: test, after fine-tuning")
    ax.set_xscale("log")
    ax.set_xlabel("conv-layer compression ratio (dense / compressed parameters)")
    ax.set_ylabel("top-1 accuracy")
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    return _png(fig)


def _finetune_figure(history: list[dict[str, Any]], test_before: float) -> str:
    """Validation top-1 and loss per epoch.

    The test top-1 right after compression is its own marker.
    """
    fig = _figure(9, 4.5)
    ax = fig.add_subplot()
    ep = [h["epoch"] for h in history]
    ax.plot(ep, [h.get("val_top1", float("nan")) for h in history], "o-", label="validation top-1")
    ax.plot(
        [0],
        [test_before],
        "kD",
        ms=8,
        ls="none",
        label="test top-1 right after compression (epoch 0)",
    )
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("fine-tuning epoch (0 = right after compression)")
    ax.set_ylabel("top-1 accuracy")
    ax2 = ax.twinx()
    ax2.plot(
        ep,
        [h.get("val_loss", float("nan")) for h in history],
        "s--",
        color="tab:orange",
        label="validation loss",
    )
    ax2.set_ylabel("validation loss")
    ax.legend(loc="lower left", fontsize=9)
    ax2.legend(loc="lower right", fontsize=9)
    ax.grid(alpha=0.3)
    return _png(fig)


def _layers_figure(layers: list[dict[str, Any]]) -> str:
    fig = _figure(9, max(2.5, 0.3 * len(layers)))
    ax = fig.add_subplot()
    names = [ly["name"] for ly in layers]
    ratios = [
        ly["params_before"] / ly["params_after"]
        if ly["status"] == "factorize" and ly["params_after"]
        else 1.0
        for ly in layers
    ]
    colors = ["tab:blue" if ly["status"] == "factorize" else "tab:gray" for ly in layers]
    ax.barh(range(len(names)), ratios, color=colors)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("per-layer compression ratio (gray: left dense)")
    ax.grid(alpha=0.3, axis="x")
    return _png(fig)


# --- sections ---------------------------------------------------------------------------------


def _files_section(rd: Path, stages: dict[str, Any]) -> str:
    """Relative links to the files the run wrote (those that exist)."""
    exp = stages.get("export") or {}
    items = [
        (
            exp.get("onnx", "export/model.onnx"),
            "ONNX export" + (f" ({exp['check']})" if exp.get("check") else ""),
        ),
        ("finetuned/model.safetensors", "final (fine-tuned) weights"),
        ("finetuned/meta.json", "final checkpoint metadata"),
        ("compressed/model.safetensors", "compressed weights before fine-tuning"),
        ("compressed/plan.json", "compression plan"),
        ("dense/model.safetensors", "dense weights"),
        ("verify.json", "verification numbers"),
        ("study/truncation.sqlite", "truncation study results (SQLite)"),
        ("run.json", "run ledger"),
    ]
    lis = [
        f'<li><a href="{html.escape(p)}">{html.escape(p)}</a> — {html.escape(what)}</li>'
        for p, what in items
        if (rd / p).is_file()
    ]
    return "<h2>Files</h2>" + (
        f"<ul class='files'>{''.join(lis)}</ul>" if lis else "<p>No output files found.</p>"
    )


def _latency_section(rows: dict[str, Any]) -> str:
    head = ["model", "batch", "median (ms)", "IQR (ms)", "threads", "device", "reps (warm-up)"]
    body = []
    for b in _batches(rows):
        for k, r in rows.items():
            rec = latency_of(r, b)
            if rec is None:
                continue
            body.append(
                [
                    k,
                    rec["batch"],
                    f"{rec['median_ms']:.3f}",
                    "not recorded" if rec["iqr_ms"] is None else f"{rec['iqr_ms']:.3f}",
                    "not recorded" if rec["threads"] is None else rec["threads"],
                    "not recorded" if rec["device"] is None else rec["device"],
                    "not recorded"
                    if rec["reps"] is None
                    else f"{rec['reps']}"
                    + ("" if rec["warmup"] is None else f" ({rec['warmup']})"),
                ]
            )
    if not body:
        return "<h2>Latency</h2><p>Latency was not measured in this run.</p>"
    note = (
        "<p>Forward-pass wall time of one batch of random inputs (tensorcut.timing."
        "measure_latency: warm-up rounds discarded, then the models timed interleaved, one call "
        "each per round); median and interquartile range (IQR) of the timed rounds, with the "
        "torch threads, batch and device they ran with. A speed-up or slow-down is claimed only "
        "when the spread of the latency ratio excludes 1 (tensorcut.timing.compare: paired "
        "per-round ratios when raw times were kept, else non-overlapping IQRs); otherwise the "
        'report says "no measurable difference", and where no spread was recorded no speed '
        "claim is made.</p>"
    )
    return "<h2>Latency</h2>" + _table(head, body, "latency") + note


_STYLE = (
    "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;"
    "padding:3px 8px;text-align:right}td:first-child,th:first-child,.provenance td{text-align:left}"
    ".met{color:#065}.unmet{color:#a00}.verdict{font-size:1.15em;font-weight:bold}"
    ".warnings{background:#fff3cd;border:2px solid #c90;padding:.5em 1em;margin:1em 0}.warnings "
    "h2{margin:.2em 0;color:#850}figure{display:block;margin:1.5em 0}img.zoom{width:100%;"
    "height:auto;cursor:zoom-in}figcaption{font-size:13px;color:#555}#lightbox{position:fixed;"
    "inset:0;background:rgba(0,0,0,.85);overflow:auto;cursor:zoom-out;z-index:10;text-align:center}"
    "#lightbox img{max-width:none;margin:1em}</style>"
)

# Click a figure: an overlay shows it at its natural (full) resolution; click or Escape closes it.
# The overlay image is created on demand, so document.images holds the figures only.
_SCRIPT = (
    "<script>window.addEventListener('load',function(){var im=document.images,ok=0;for(var i=0;"
    "i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0)ok++;}"
    "document.body.setAttribute('data-figures',im.length);"
    "document.body.setAttribute('data-figures-loaded',ok);});function tcClose(){var "
    "b=document.getElementById('lightbox');if(b)b.remove();}"
    "document.addEventListener('click',function(e){var t=e.target;"
    "if(t.classList&&t.classList.contains('zoom')){tcClose();var b=document.createElement('div');"
    "b.id='lightbox';var i=document.createElement('img');i.src=t.src;i.alt=t.alt;b.appendChild(i);"
    "b.onclick=tcClose;document.body.appendChild(b);}});"
    "document.addEventListener('keydown',function(e){if(e.key==='Escape')tcClose();});</script>"
)


def write_report(run_dir: str | Path) -> Path:
    """Render ``RUN_DIR/report.html`` from the artefacts of a finished run.

    Every stage up to verify must have finished.
    """
    rd = Path(run_dir)
    try:
        state = json.loads((rd / "run.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise TensorcutError(
            f"{rd} is not a tensorcut run directory (no readable run.json); "
            "run `tensorcut run` first"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("stages", {}), dict):
        raise TensorcutError(
            f"{rd / 'run.json'} is not a tensorcut run ledger; "
            "re-run `tensorcut run` into a new --out"
        )
    stages = state.get("stages", {})
    missing = [s for s in ("dense", "curve", "compress", "finetune", "verify") if s not in stages]
    if missing:
        raise TensorcutError(
            f"{rd}: stages {', '.join(missing)} have not finished; "
            "re-run `tensorcut run` to complete them"
        )
    summary = _read_json(rd, "verify.json")
    info = CheckpointMeta.from_meta(
        _read_json(rd, "finetuned/meta.json"), rd / "finetuned" / "meta.json"
    )
    planj = _read_json(rd, "compressed/plan.json")
    try:
        rows = summary["rows"]
        t = summary["plan_totals"]
        layers = planj["layers"]
        _ = (rows["dense"], rows["final"], rows["compressed"])
    except (KeyError, TypeError):
        raise TensorcutError(
            f"{rd}: verify.json or compressed/plan.json lacks its rows / totals / layers; "
            f"re-run `tensorcut run` into a new --out"
        ) from None

    parts: list[str] = [
        f"<h1>tensorcut run report</h1><p class='verdict'>{html.escape(verdict(summary))}</p>"
    ]
    warns = report_warnings(summary, layers)
    if warns:
        parts.append(
            "<div class='warnings' role='alert'><h2>Warnings</h2><ul>"
            + "".join(f"<li>{html.escape(w)}</li>" for w in warns)
            + "</ul></div>"
        )
    goal_cls = "met" if summary["goal_met"] else "unmet"
    parts.append(
        f"<p class='{goal_cls}'>Goal: <b>{html.escape(summary['goal'])}</b> — "
        f"{'met' if summary['goal_met'] else 'NOT met'}; "
        f"achieved {html.escape(summary['achieved'])}. "
        f"Model <code>{html.escape(info.model.name)}</code> on "
        f"<code>{html.escape(str(info.dataset.name))}</code>.</p>"
    )

    def lat(r: dict[str, Any], b: int) -> str:
        rec = latency_of(r, b)
        return "-" if rec is None else f"{rec['median_ms']:.2f}"

    head = [
        "model",
        "parameters",
        "size (MB)",
        "MACs / image",
        "median latency b=1 (ms)",
        "median latency b=32 (ms)",
        "top-1",
        "top-5",
    ]
    body = [
        [
            k + (" (before fine-tuning)" if k == "compressed" else ""),
            f"{r['params']:,}",
            f"{r['size_mb']:.3f}",
            f"{r['macs']:,}",
            lat(r, 1),
            lat(r, 32),
            f"{r['top1']:.4f}",
            f"{r['top5']:.4f}",
        ]
        for k, r in rows.items()
    ]
    parts.append("<h2>Before / after</h2>" + _table(head, body, "before-after"))
    fcr = rows["dense"]["macs"] / rows["final"]["macs"] if rows["final"]["macs"] else math.inf
    parts.append(
        f"<p>Test split of <code>{html.escape(str(info.dataset.name))}</code> "
        f"({rows['final']['n']} images). Whole-model "
        f"compression {rows['dense']['params'] / rows['final']['params']:.2f}x in parameters, FCR "
        f"{fcr:.2f} (dense / compressed MACs); "
        f"conv layers (those planned) {t['conv_ratio']:.2f}x in parameters, "
        f"{t['conv_mac_ratio']:.2f}x in MACs. CR = dense / compressed parameters.</p>"
    )
    parts.append(_latency_section(rows))
    parts.append(_files_section(rd, stages))
    lh = [
        "layer",
        "method",
        "ranks",
        "params before",
        "params after",
        "CR",
        "kernel rel. error",
        "sensitivity",
        "decision",
    ]
    lb = []
    for ly in layers:
        f = ly["status"] == "factorize"
        lb.append(
            [
                ly["name"],
                ly["method"] if f else "-",
                "x".join(map(str, ly["ranks"])) if f else "-",
                f"{ly['params_before']:,}",
                f"{ly['params_after']:,}" if f else "-",
                f"{ly['params_before'] / ly['params_after']:.2f}" if f else "1.00",
                f"{ly['error']:.4f}" if (f and ly.get("error") is not None) else "-",
                f"{ly['sensitivity']:.2f}" if ly.get("sensitivity") is not None else "-",
                "factorized" if f else "dense",
            ]
        )
    parts.append("<h2>Per layer</h2>" + _table(lh, lb, "per-layer"))
    parts.append(
        "<p>Kernel rel. error = ||W − W̃||<sub>F</sub> / ||W||<sub>F</sub>. Sensitivity = 1 + 100 "
        "× mean top-1 drop per unit of discarded squared norm (norm loss, Singh et al. Eq. 13) "
        "over single-layer SVD truncations on the calibration set; larger means the layer was "
        "compressed more mildly.</p>"
    )
    comp = stages["compress"]
    if comp.get("calibration"):
        parts.append(
            "<p>Allocation chosen on the calibration set (top-1 before fine-tuning): "
            + html.escape(
                ", ".join(
                    f"{k} {v['top1']:.4f} at x{v['ratio']:.2f}"
                    for k, v in comp["calibration"].items()
                )
            )
            + f"; used <b>{html.escape(str(comp.get('allocation', '?')))}</b>.</p>"
        )
    dense_left = [
        [ly["name"], ly.get("reason", "")] for ly in layers if ly["status"] != "factorize"
    ]
    parts.append(
        "<h2>Left dense, and why</h2>"
        + (
            _table(["layer", "reason"], dense_left, "left-dense")
            if dense_left
            else "<p>Every planned layer was factorized.</p>"
        )
        + "<p>Layers not planned at all (stems with ≤ 3 input channels, linear layers) "
        "stay dense by default.</p>"
    )
    curve = stages["curve"]
    figs = [
        _img(
            _curve_figure(
                curve, t["conv_ratio"], rows["final"]["top1"], rows["compressed"]["top1"]
            ),
            "Accuracy vs conv-layer compression: sensitivity-guided vs uniform ranks, "
            "with the chosen point",
        )
    ]
    hist = stages["finetune"].get("history") or []
    if hist:
        figs.append(
            _img(
                _finetune_figure(hist, rows["compressed"]["top1"]),
                "Fine-tuning curve (validation split per epoch; "
                "the diamond is the test split before fine-tuning)",
            )
        )
    figs.append(_img(_layers_figure(layers), "Per-layer compression ratio"))
    parts.append("<h2>Figures</h2>" + "".join(figs))
    study_figs = (
        sorted((rd / "study" / "figures").glob("*.png"))
        if (rd / "study" / "figures").is_dir()
        else []
    )
    if study_figs:
        parts.append(
            "<h2>Truncation study (calibration subset)</h2><p>Spectra and accuracy vs norm loss "
            "per bipartition. Norm = squared Frobenius norm; entropy = von Neumann entropy of the "
            "normalised spectrum.</p>"
        )
        parts.append(
            "".join(
                _img(base64.b64encode(p.read_bytes()).decode(), p.stem.replace("_", " "))
                for p in study_figs
            )
        )
    cmd = " ".join(map(str, state.get("command") or []))
    parts.append(
        "<h2>Provenance</h2>"
        + _table(
            ["what", "value"],
            [
                ["command", cmd],
                ["versions", json.dumps(state.get("versions", {}))],
                ["run settings", json.dumps(state.get("settings", {}))],
                [
                    "calibration data",
                    f"{info.dataset.name} validation split, seeded subset "
                    "(see settings.calib_subset)",
                ],
                ["verification data", f"{info.dataset.name} test split"],
            ],
            "provenance",
        )
    )
    doc = (
        "<!doctype html><html><head><meta charset='utf-8'><title>tensorcut report</title>"
        f"{_STYLE}</head>"
        f"<body>{''.join(parts)}{_SCRIPT}</body></html>"
    )
    out = rd / "report.html"
    atomic_write_text(out, doc)
    return out
