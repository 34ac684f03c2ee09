"""Train low-rank from scratch: Tucker-format convolutions, ranks pruned during training (TDLRT).

python examples/train_low_rank.py          # resnet20 (width 0.5) on digits
python examples/train_low_rank.py --tiny   # CI scale
"""

import sys

import tensorcut as tc
from tensorcut.train import evaluate
from tensorcut.train.tdlrt import rank_report, train_tdlrt

tiny = "--tiny" in sys.argv
model = tc.create_model("resnet20", num_classes=10, in_channels=1, width=0.5)
train = tc.make_loader(
    tc.load_dataset("digits", "train", subset=128 if tiny else None), 64, shuffle=True
)
val = tc.make_loader(tc.load_dataset("digits", "val"), 512)
train_tdlrt(
    model,
    train,
    val,
    tau=0.1,
    epochs=1 if tiny else 10,
    optimizer="sgd",
    lr=0.1,
    momentum=0.9,
    from_pretrained=False,
    device="cpu",
)
r = rank_report(model)
print(
    f"val top-1 {evaluate(model, val)['top1']:.4f}; "
    f"conv layers {r['conv_cr']:.2f}x smaller than dense"
)
