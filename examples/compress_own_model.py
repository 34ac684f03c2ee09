"""Compress your own model from Python in ten lines (any nn.Module with Conv2d layers).

python examples/compress_own_model.py            # a small CNN on digits
python examples/compress_own_model.py --tiny     # CI scale
"""

import sys

import torch
from torch import nn

import tensorcut as tc
from tensorcut.compression import compress
from tensorcut.train import FitConfig, evaluate, fit

tiny = "--tiny" in sys.argv
torch.manual_seed(0)
# 1. your model and data (here: a plain CNN on the embedded digits data)
model = nn.Sequential(
    nn.Conv2d(1, 32, 3, padding=1),
    nn.ReLU(),
    nn.Conv2d(32, 64, 3, padding=1),
    nn.ReLU(),
    nn.Conv2d(64, 64, 3, padding=1),
    nn.ReLU(),
    nn.AdaptiveAvgPool2d(1),
    nn.Flatten(),
    nn.Linear(64, 10),
)
train = tc.make_loader(
    tc.load_dataset("digits", "train", subset=256 if tiny else None), 64, shuffle=True
)
test = tc.make_loader(tc.load_dataset("digits", "test"), 512)
fit(model, train, None, FitConfig(epochs=1 if tiny else 15, lr=3e-3), device="cpu", progress=False)
dense = evaluate(model, test)

# 2. the ten lines: plan + apply Tucker-2 (30% of each selected layer's parameters), then fine-tune
model, plan = compress(model, method="tucker2", ratio=0.3, input_shape=(1, 8, 8), progress=False)
print(plan.table())
after = evaluate(model, test)
fit(
    model,
    train,
    None,
    FitConfig(epochs=1 if tiny else 5, lr=1e-3, scheduler="none"),
    device="cpu",
    progress=False,
)
tuned = evaluate(model, test)
print(
    f"test top-1: dense {dense['top1']:.4f}, compressed {after['top1']:.4f}, fine-tuned "
    f"{tuned['top1']:.4f}; conv layers {plan.totals()['conv_ratio']:.2f}x smaller"
)
