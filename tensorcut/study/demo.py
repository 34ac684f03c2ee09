"""A small truncation study on the embedded digits data, for ``make demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def demo_sweep(
    checkpoint: str | Path, out: str | Path, *, fast: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Sweep a trained digits checkpoint and draw its figures into ``out/figures``.

    All seven bipartitions on the default layers (plus CP ranks 2 and 4 and the all-layer
    sweep unless ``fast``). Resumable: the results live in ``out/truncation.sqlite``.
    Returns the report and the figure files.
    """
    from tensorcut import data as tdata
    from tensorcut.checkpoint import DatasetSpec
    from tensorcut.checkpoint import io as tio
    from tensorcut.study.plots import plot
    from tensorcut.study.sweep import analyze

    out = Path(out)
    ck = tio.load_checkpoint(checkpoint)
    spec = DatasetSpec.from_meta(ck.meta)
    spec = spec if spec.name else spec.resolve("digits")
    name = spec.name
    val = spec.load("val")
    db = out / "truncation.sqlite"
    report = analyze(
        ck.model,
        {"val": tdata.make_loader(val, 500)},
        db,
        cp_ranks=None if fast else [2, 4],
        all_layers=not fast,
        bipartitions=("OUT", "KW", "OUT-IN") if fast else None,
        model_name=ck.info.model.name,
        data_name=name,
        progress=progress,
    )
    files = plot(db, out / "figures", formats=("png",) if fast else ("png", "svg"))
    return {"report": report, "results": db, "figures": files}


__all__ = ["demo_sweep"]
