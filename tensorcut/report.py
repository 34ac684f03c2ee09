"""The run report: one self-contained HTML file (figures embedded as PNG data URIs; opens offline)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from tensorcut.errors import TensorcutError
from tensorcut.io import atomic_write_text

__all__ = ["write_report"]


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _img(b64: str, alt: str) -> str:
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _table(head: list[str], rows: list[list[Any]], cls: str) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _curve_figure(curve: dict[str, Any], chosen: float, final_top1: float, comp_top1: float) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    labels = {"guided": "sensitivity-guided budget", "error": "error-per-parameter budget", "uniform": "uniform ranks"}
    for kind, style in (("guided", "o-"), ("error", "^-."), ("uniform", "s--")):
        pts = sorted((p["ratio"], p["top1"]) for p in curve["points"] if p["kind"] == kind)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{labels[kind]} (calibration, before fine-tuning)")
    ax.axhline(curve["baseline_top1"], color="gray", lw=1, ls=":", label="dense (calibration)")
    ax.plot([chosen], [comp_top1], "kx", ms=10, label="chosen: test, before fine-tuning")
    ax.plot([chosen], [final_top1], "r*", ms=14, label="chosen: test, after fine-tuning")
    ax.set_xscale("log")
    ax.set_xlabel("conv-layer compression ratio (dense / compressed parameters)")
    ax.set_ylabel("top-1 accuracy")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _png(fig)


def _finetune_figure(history: list[dict[str, Any]], before: float) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ep = [0] + [h["epoch"] for h in history]
    ax.plot(ep, [before] + [h.get("val_top1", float("nan")) for h in history], "o-", label="validation top-1")
    ax.set_xlabel("fine-tuning epoch (0 = right after compression; test top-1 at 0)")
    ax.set_ylabel("top-1 accuracy")
    ax2 = ax.twinx()
    ax2.plot(ep[1:], [h.get("val_loss", float("nan")) for h in history], "s--", color="tab:orange", label="validation loss")
    ax2.set_ylabel("validation loss")
    ax.legend(loc="lower left", fontsize=8)
    ax2.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def _layers_figure(layers: list[dict[str, Any]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, max(2.5, 0.28 * len(layers))))
    names = [l["name"] for l in layers]
    ratios = [l["params_before"] / l["params_after"] if l["status"] == "factorize" and l["params_after"] else 1.0 for l in layers]
    colors = ["tab:blue" if l["status"] == "factorize" else "tab:gray" for l in layers]
    ax.barh(range(len(names)), ratios, color=colors)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("per-layer compression ratio (gray: left dense)")
    ax.grid(alpha=0.3, axis="x")
    return _png(fig)


def write_report(run_dir: str | Path) -> Path:
    """Render ``RUN_DIR/report.html`` from the artefacts of a (possibly partial) run."""
    rd = Path(run_dir)
    try:
        state = json.loads((rd / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise TensorcutError(f"{rd} is not a tensorcut run directory (no readable run.json); run `tensorcut run` first") from None
    stages = state.get("stages", {})
    missing = [s for s in ("dense", "curve", "compress", "finetune", "verify") if s not in stages]
    if missing:
        raise TensorcutError(f"{rd}: stages {', '.join(missing)} have not finished; re-run `tensorcut run` to complete them")
    summary = json.loads((rd / "verify.json").read_text())
    meta = json.loads((rd / "finetuned" / "meta.json").read_text())
    planj = json.loads((rd / "compressed" / "plan.json").read_text())
    rows = summary["rows"]
    ds = meta.get("dataset", {})
    t = summary["plan_totals"]

    parts: list[str] = []
    goal_cls = "met" if summary["goal_met"] else "unmet"
    parts.append(f"<h1>tensorcut run report</h1><p class='{goal_cls}'>Goal: <b>{html.escape(summary['goal'])}</b> — "
                 f"{'met' if summary['goal_met'] else 'NOT met'}; achieved {html.escape(summary['achieved'])}. "
                 f"Model <code>{html.escape(meta['model']['name'])}</code> on <code>{html.escape(str(ds.get('name')))}</code>.</p>")
    head = ["model", "parameters", "size (MB)", "MACs / image", "CPU latency b=1 (ms)", "CPU latency b=32 (ms)", "top-1", "top-5"]
    body = [[k + (" (before fine-tuning)" if k == "compressed" else ""), f"{r['params']:,}", f"{r['size_mb']:.3f}", f"{r['macs']:,}",
             f"{r['latency_ms_b1']:.2f}", f"{r['latency_ms_b32']:.2f}", f"{r['top1']:.4f}", f"{r['top5']:.4f}"]
            for k, r in rows.items()]
    parts.append("<h2>Before / after</h2>" + _table(head, body, "before-after"))
    parts.append(f"<p>Test split of <code>{html.escape(str(ds.get('name')))}</code> ({rows['final']['n']} images). Whole-model "
                 f"compression {rows['dense']['params'] / rows['final']['params']:.2f}x; conv layers (those planned) "
                 f"{t['conv_ratio']:.2f}x in parameters, {t['conv_mac_ratio']:.2f}x in MACs. Latency: median of 20 forward "
                 f"passes on this machine's CPU. CR = dense / compressed parameters.</p>")
    lh = ["layer", "method", "ranks", "params before", "params after", "CR", "kernel rel. error", "sensitivity", "decision"]
    lb = []
    for l in planj["layers"]:
        f = l["status"] == "factorize"
        lb.append([l["name"], l["method"] if f else "-", "x".join(map(str, l["ranks"])) if f else "-", f"{l['params_before']:,}",
                   f"{l['params_after']:,}" if f else "-", f"{l['params_before'] / l['params_after']:.2f}" if f else "1.00",
                   f"{l['error']:.4f}" if (f and l.get("error") is not None) else "-",
                   f"{l['sensitivity']:.2f}" if l.get("sensitivity") is not None else "-",
                   "factorized" if f else "dense"])
    parts.append("<h2>Per layer</h2>" + _table(lh, lb, "per-layer"))
    parts.append("<p>Kernel rel. error = ||W − W̃||<sub>F</sub> / ||W||<sub>F</sub>. Sensitivity = 1 + 100 × mean top-1 drop per "
                 "unit of discarded squared norm (norm loss, Singh et al. Eq. 13) over single-layer SVD truncations on the "
                 "calibration set; larger means the layer was compressed more mildly.</p>")
    comp = stages["compress"]
    if comp.get("calibration"):
        parts.append("<p>Allocation chosen on the calibration set (top-1 before fine-tuning): "
                     + html.escape(", ".join(f"{k} {v['top1']:.4f} at x{v['ratio']:.2f}" for k, v in comp["calibration"].items()))
                     + f"; used <b>{html.escape(comp.get('allocation', '?'))}</b>.</p>")
    dense_left = [[l["name"], l["reason"]] for l in planj["layers"] if l["status"] != "factorize"]
    parts.append("<h2>Left dense, and why</h2>" + (_table(["layer", "reason"], dense_left, "left-dense") if dense_left
                                                      else "<p>Every planned layer was factorized.</p>")
                 + "<p>Layers not planned at all (stems with ≤ 3 input channels, linear layers) stay dense by default.</p>")
    curve = stages["curve"]
    figs = [_img(_curve_figure(curve, t["conv_ratio"], rows["final"]["top1"], rows["compressed"]["top1"]),
                 "Accuracy vs conv-layer compression: sensitivity-guided vs uniform ranks, with the chosen point")]
    hist = stages["finetune"].get("history") or []
    if hist:
        figs.append(_img(_finetune_figure(hist, rows["compressed"]["top1"]), "Fine-tuning curve"))
    figs.append(_img(_layers_figure(planj["layers"]), "Per-layer compression ratio"))
    parts.append("<h2>Figures</h2>" + "".join(figs))
    study_figs = sorted((rd / "study" / "figures").glob("*.png")) if (rd / "study" / "figures").exists() else []
    if study_figs:
        parts.append("<h2>Truncation study (calibration subset)</h2><p>Spectra and accuracy vs norm loss per bipartition. "
                     "Norm = squared Frobenius norm; entropy = von Neumann entropy of the normalised spectrum.</p>")
        parts.append("".join(_img(base64.b64encode(p.read_bytes()).decode(), p.stem.replace("_", " ")) for p in study_figs))
    cmd = " ".join(state.get("command") or [])
    parts.append("<h2>Provenance</h2>" + _table(["what", "value"], [
        ["command", cmd], ["versions", json.dumps(state.get("versions", {}))],
        ["run settings", json.dumps(state.get("settings", {}))],
        ["calibration data", f"{ds.get('name')} validation split, seeded subset (see settings.calib_subset)"],
        ["verification data", f"{ds.get('name')} test split"]], "provenance"))
    script = ("<script>window.addEventListener('load',function(){var im=document.images,ok=0;"
              "for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0)ok++;}"
              "document.body.setAttribute('data-figures',im.length);document.body.setAttribute('data-figures-loaded',ok);});</script>")
    style = ("<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse;"
             "margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,"
             "th:first-child{text-align:left}.met{color:#065}.unmet{color:#a00}figure{display:inline-block;margin:8px}"
             "img{max-width:520px}figcaption{font-size:12px;color:#555}</style>")
    doc = f"<!doctype html><html><head><meta charset='utf-8'><title>tensorcut report</title>{style}</head><body>{''.join(parts)}{script}</body></html>"
    out = rd / "report.html"
    atomic_write_text(out, doc)
    return out
