"""`make demo`: the main job on the embedded digits data, end to end on 2 CPU cores."""

from __future__ import annotations

import time
from pathlib import Path

DEMO_MODEL = "vanilla-cnn"
DEMO_WIDTH = 0.25


def run_demo(out: str | Path, fast: bool = False, as_json: bool = False) -> int:
    """Train a width-reduced vanilla-cnn on digits, then `tensorcut run` it to 5x conv compression.

    Stages: train, truncation study, accuracy-vs-compression curve, sensitivity-guided
    Tucker-2 compression, fine-tuning, verification on the test split, ONNX export, report.
    Re-running resumes (finished stages are skipped). ``as_json`` prints the summary as JSON.
    Latency is measured by :func:`tensorcut.timing.measure_latency` (interleaved, median and
    IQR) and printed with its threads, batch and device.
    """
    from tensorcut.pipeline.run import RunConfig, latency_lines, print_summary, run

    out = Path(out)
    t0 = time.perf_counter()
    cfg = RunConfig(
        target_ratio=5.0,
        method="tucker2",
        calib_subset=64 if fast else 144,
        finetune_epochs=1 if fast else 8,
        finetune_lr=1e-3,
        curve_ratios=(5.0,) if fast else (1.5, 2.0, 3.0, 5.0, 10.0, 20.0),
        bipartitions=("OUT",) if fast else ("OUT", "IN", "KH", "KW", "OUT-IN"),
    )
    s = run(
        out,
        cfg,
        model=DEMO_MODEL,
        dataset="digits",
        train_epochs=1 if fast else 15,
        width=DEMO_WIDTH,
        command=["tensorcut", "demo", "--out", str(out)] + (["--fast"] if fast else []),
    )
    if as_json:
        from tensorcut.console import print_json

        print_json(dict(s, out=str(out)))
        return 0
    print()
    print_summary(s)
    for line in latency_lines(s):  # median, IQR, threads, batch, device; the measured verdict
        print(line)
    print(
        f"outputs in {out}: dense/, compressed/, finetuned/ (checkpoints), "
        "study/ (truncation results + figures), "
        f"export/model.onnx; {time.perf_counter() - t0:.0f} s"
    )
    return 0
