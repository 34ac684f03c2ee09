"""Study a model's compressibility: accuracy vs norm loss, each conv kernel cut per bipartition.

python examples/study_compressibility.py OUT_DIR          # vanilla-cnn on digits
python examples/study_compressibility.py OUT_DIR --tiny   # CI scale
"""

import sys
from pathlib import Path

import tensorcut as tc
from tensorcut.study.plots import plot
from tensorcut.study.sweep import analyze
from tensorcut.train import FitConfig, fit

out = Path(sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else "study-out")
tiny = "--tiny" in sys.argv
model = tc.create_model("vanilla-cnn", num_classes=10, in_channels=1, width=0.125, input_size=8)
train = tc.make_loader(
    tc.load_dataset("digits", "train", subset=256 if tiny else None), 64, shuffle=True
)
val = tc.make_loader(tc.load_dataset("digits", "val"), 512)
fit(model, train, val, FitConfig(epochs=1 if tiny else 10, lr=2e-3), device="cpu", progress=False)

report = analyze(
    model,
    {"val": val},
    out / "results.sqlite",
    bipartitions=["OUT", "KW"] if tiny else None,
    model_name="vanilla-cnn",
    data_name="digits",
    progress=not tiny,
)
figures = plot(out / "results.sqlite", out / "figures", formats=("png",))
print(
    f"{report.evaluated} configurations evaluated; results in {report.path}; "
    f"{len(figures)} figures in {out / 'figures'}"
)
