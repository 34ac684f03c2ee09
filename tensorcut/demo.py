"""`make demo`: the main job on the embedded digits data, end to end on 2 CPU cores."""

from __future__ import annotations

import time
from pathlib import Path

from tensorcut.train.loop import FitConfig

DEMO_MODEL = "vanilla-cnn"
DEMO_WIDTH = 0.25


def run_demo(out: str | Path, fast: bool = False) -> int:
    """Train a width-reduced vanilla-cnn on digits, evaluate and inspect it; print where outputs are."""
    from tensorcut import io as tio
    from tensorcut.summary import summarize
    from tensorcut.train.api import train

    out = Path(out)
    t0 = time.perf_counter()
    dense_dir = out / "dense"
    epochs = 2 if fast else 15
    if (dense_dir / tio.META).exists() and tio.read_meta(dense_dir).get("metrics"):
        print(f"[1/3] reusing trained model in {dense_dir}")
        ck = tio.load_checkpoint(dense_dir)
    else:
        print(f"[1/3] training {DEMO_MODEL} (width {DEMO_WIDTH}) on digits for {epochs} epochs")
        ck = train(DEMO_MODEL, "digits", dense_dir, epochs=epochs, width=DEMO_WIDTH, batch_size=64,
                   config=FitConfig(epochs=epochs, lr=2e-3, scheduler="cosine"), device="cpu",
                   resume=(dense_dir / tio.META).exists())
    m = ck.meta["metrics"]["test"]
    print(f"[2/3] test split of digits: top-1 {m['top1']:.4f}  top-5 {m['top5']:.4f}  loss {m['loss']:.4f}  (n={m['n']})")
    kw = ck.meta["model"]["kwargs"]
    s = summarize(ck.model, (kw["in_channels"], kw["input_size"], kw["input_size"]))
    print("[3/3] layers:")
    print(s.table())
    print(f"\noutputs: {dense_dir} (model.safetensors + meta.json); {time.perf_counter() - t0:.0f} s in all")
    return 0
