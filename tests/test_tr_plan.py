"""Tensor-ring (RSDTR) end to end: CLI compress --method tr --eps, size guard, PCR / FCR, save /
load, ONNX export, TR options through CompressConfig, and fine-tuning with the RSDTR recipe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tensorcut
from tensorcut import models
from tensorcut.checkpoint import io as tio
from tensorcut.cli import build_parser, main
from tensorcut.compression import CompressConfig, Plan, apply, compress, plan
from tensorcut.decompose.tr import rsdtr, tr_to_tensor
from tensorcut.errors import TensorcutError
from tensorcut.layers.tr import TRConv2d

SHAPE = (1, 8, 8)  # digits
KWARGS = {"num_classes": 10, "in_channels": 1, "width": 0.25, "input_size": 8}
# resnet20 at width 0.25: layer1 convs are 4 -> 4 (3x3), layer2 8 channels, layer3 16 channels
PLANTED = [f"layer3.{b}.conv{c}" for b in range(3) for c in (1, 2)]
GROWS = [f"layer1.{b}.conv{c}" for b in range(3) for c in (1, 2)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def _model() -> torch.nn.Module:
    """resnet20 (width 0.25, digits-sized): random kernels, but layer3's are planted rings."""
    torch.manual_seed(0)
    m = models.create("resnet20", **KWARGS).eval()
    g = torch.Generator().manual_seed(1)
    for name in PLANTED:
        conv = m.get_submodule(name)
        o, i, kh, kw = conv.weight.shape
        r = (2, 3, 3, 2)
        cores = [
            torch.randn(r[0], o, r[1], generator=g),
            torch.randn(r[1], i, r[2], generator=g),
            torch.randn(r[2], kh, r[3], generator=g),
            torch.randn(r[3], kw, r[0], generator=g),
        ]
        with torch.no_grad():
            conv.weight.copy_(0.05 * tr_to_tensor(cores))
    return m


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tr") / "dense"
    tio.save(
        _model(),
        out,
        {
            "model": {"name": "resnet20", "kwargs": KWARGS},
            "dataset": {"name": "digits", "val_fraction": 0.1, "seed": 0},
        },
    )
    return out


@pytest.fixture(scope="module")
def compressed(dense_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`tensorcut compress DENSE --method tr --eps 0.5 --out OUT`, with its printed table."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("tr") / "compressed"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert (
            main(
                ["compress", str(dense_dir), "--method", "tr", "--eps", "0.5", "--out", str(out)]
                + ["--bn-images", "0"]  # compared below with compress() of the same weights
            )
            == 0
        )
    return out, buf.getvalue()


# ----------------------------------------------------------------------- compress --method tr --eps


def test_cli_compress_tr_guard_and_ratios(compressed):
    out, printed = compressed
    p = Plan.load(out / "plan.json")
    assert p.config["method"] == "tr" and p.config["eps"] == 0.5
    layers = {l.name: l for l in p.layers}
    # random 4x4x3x3 kernels grow as rings at eps 0.5: kept dense, and the table says why
    for name in GROWS:
        l = layers[name]
        assert l.status == "dense" and "tr form would not be smaller" in l.reason, (name, l.reason)
        assert f"{name}" in printed
    assert "dense: tr form would not be smaller" in printed
    # planted rings compress, within the error bound, and every count is the module's
    model = tensorcut.load(out)
    for name in PLANTED:
        l = layers[name]
        assert l.status == "factorize" and l.method == "tr" and l.error <= 0.5 + 1e-6, (
            name,
            l.reason,
        )
        mod = model.get_submodule(name)
        assert isinstance(mod, TRConv2d) and list(mod.ranks) == l.ranks
        assert (
            mod.num_params() == l.params_after == TRConv2d.predicted_params(mod.geometry, mod.ranks)
        )
        assert mod.macs(tuple(l.input_hw)) == l.macs_after
        assert l.ratio == pytest.approx(l.params_before / l.params_after) and l.ratio > 1
        assert l.mac_ratio == pytest.approx(l.macs_before / l.macs_after)
    for l in p.layers:
        if l.status != "factorize":
            assert isinstance(model.get_submodule(l.name), torch.nn.Conv2d)
    # PCR and FCR, per layer and in totals, in the table and in plan.json
    head = printed.splitlines()[0].split()
    assert "PCR" in head and "FCR" in head and "whole model" in printed and "conv layers" in printed
    t = json.loads((out / "plan.json").read_text())["totals"]
    assert t == p.totals()
    assert (
        t["conv_ratio"] == pytest.approx(t["conv_params_before"] / t["conv_params_after"])
        and t["conv_ratio"] > 1
    )
    assert t["conv_mac_ratio"] == pytest.approx(t["conv_macs_before"] / t["conv_macs_after"])
    assert t["model_params_after"] == sum(q.numel() for q in model.parameters())
    assert t["model_ratio"] == pytest.approx(t["model_params_before"] / t["model_params_after"])
    assert t["model_mac_ratio"] == pytest.approx(t["model_macs_before"] / t["model_macs_after"])
    assert f"{t['conv_ratio']:.2f}" in printed and f"{t['model_mac_ratio']:.2f}" in printed


def test_saved_tr_checkpoint_reloads_identical_and_exports(compressed, dense_dir, tmp_path, capsys):
    out, _ = compressed
    loaded = tensorcut.load(out)
    ref, _ = compress(
        tio.load(dense_dir), CompressConfig(method="tr", eps=0.5), input_shape=SHAPE, progress=False
    )
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        assert torch.equal(loaded(x), ref.eval()(x))
        again = tensorcut.load(out)
        assert torch.equal(again(x), loaded(x))
    assert main(["export", str(out), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    assert "outputs checked against PyTorch" in capsys.readouterr().out
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 5):  # dynamic batch axis, the folded ring index included
        xb = torch.randn(n, *SHAPE)
        got = sess.run(None, {"input": xb.numpy()})[0]
        with torch.no_grad():
            assert np.abs(got - loaded(xb).numpy()).max() < 1e-4


def test_other_rank_rules_apply_to_tr():
    for kw in ({"ratio": 0.3}, {"rank": (2, 3, 3, 2)}, {"energy": 0.9}, {"budget": 0.4}):
        p = plan(_model(), method="tr", input_shape=SHAPE, layers=PLANTED, progress=False, **kw)
        fact = [l for l in p.layers if l.status == "factorize"]
        assert fact, (kw, p.table())
        if "ratio" in kw:
            assert all(l.params_after <= 0.3 * l.params_before for l in fact)
        if "budget" in kw:
            assert p.totals()["conv_params_after"] <= 0.4 * p.totals()["conv_params_before"]


# ---------------------------------------------------------------- TR options through CompressConfig


def test_tr_options_reach_rsdtr_through_config():
    layers = [
        "layer3.1.conv1",
        "layer3.1.conv2",
        "layer3.2.conv1",
    ]  # all at 2x2 input for an 8x8 image
    m = _model()
    by_params = plan(m, method="tr", eps=0.5, input_shape=SHAPE, layers=layers, progress=False)
    cfg = CompressConfig(
        method="tr", eps=0.5, options={"tr": {"objective": "macs", "input_size": (2, 2)}}
    )
    by_macs = plan(m, cfg, input_shape=SHAPE, layers=layers, progress=False)
    for a, b in zip(by_params.layers, by_macs.layers, strict=True):
        assert a.input_hw == b.input_hw == [2, 2] and b.status == "factorize"
        conv = m.get_submodule(b.name)
        want = rsdtr(
            conv.weight.detach(),
            0.5,
            objective="macs",
            input_size=(2, 2),
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
        )
        assert tuple(b.ranks) == want.ranks and b.error <= 0.5 + 1e-6
        assert b.macs_after <= a.macs_after and a.params_after <= b.params_after
    # other options: the Zhao error split, a restricted shift set; unknown options keep the layer
    # dense
    zhao = plan(
        m,
        method="tr",
        eps=0.5,
        options={"tr": {"split": "zhao", "shifts": [0]}},
        input_shape=SHAPE,
        layers=layers,
        progress=False,
    )
    for l in zhao.layers:
        conv = m.get_submodule(l.name)
        assert tuple(l.ranks) == rsdtr(conv.weight.detach(), 0.5, split="zhao", shifts=[0]).ranks
    # a misspelt option is refused before any work (the typed TROptions), not per layer
    with pytest.raises(
        TensorcutError, match=r"unknown options for tr: \['objectiv'\]; valid: shift"
    ):
        plan(m, method="tr", eps=0.5, options={"tr": {"objectiv": "macs"}}, input_shape=SHAPE)


def test_macs_objective_uses_each_layers_input_size():
    m = _model()
    p = plan(
        m,
        method="tr",
        eps=0.5,
        options={"tr": {"objective": "macs"}},
        input_shape=SHAPE,
        layers=PLANTED,
        progress=False,
    )
    for l in p.layers:
        conv = m.get_submodule(l.name)
        want = rsdtr(
            conv.weight.detach(),
            0.5,
            objective="macs",
            input_size=tuple(l.input_hw),
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
        )
        assert l.status == "factorize" and tuple(l.ranks) == want.ranks


def test_tr_plan_json_round_trip_applies_the_same_rings():
    p = plan(_model(), method="tr", eps=0.5, input_shape=SHAPE, progress=False)
    q = Plan.from_dict(json.loads(p.to_json()))
    a, b = apply(_model(), p), apply(_model(), q)
    x = torch.randn(2, *SHAPE)
    for l in q.layers:
        if l.status == "factorize":
            assert list(b.get_submodule(l.name).ranks) == l.ranks
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), atol=1e-5)


# ----------------------------------------------------------------------------- fine-tuning recipes


def _ft_args(*extra: str):
    return build_parser().parse_args(["finetune", "CK", *extra])


def test_rsdtr_recipe_and_cli_overrides():
    from tensorcut.cli.workflow import finetune_config
    from tensorcut.train.recipes import FINETUNE_RECIPE, RECIPES, RSDTR_RECIPE

    r = RSDTR_RECIPE
    assert (r.optimizer, r.scheduler, r.lr, r.momentum, r.weight_decay, r.epochs, r.patience) == (
        "sgd",
        "onecycle",
        0.01,
        0.9,
        1e-4,
        160,
        None,
    )
    assert RECIPES == {"thesis": FINETUNE_RECIPE, "rsdtr": RSDTR_RECIPE}
    assert finetune_config(_ft_args()) == FINETUNE_RECIPE  # the thesis recipe stays the default
    assert finetune_config(_ft_args("--recipe", "rsdtr")) == RSDTR_RECIPE
    c = finetune_config(
        _ft_args(
            "--recipe",
            "rsdtr",
            "--lr",
            "0.003",
            "--epochs",
            "4",
            "--weight-decay",
            "0",
            "--patience",
            "2",
        )
    )
    assert (c.optimizer, c.scheduler, c.lr, c.epochs, c.weight_decay, c.patience) == (
        "sgd",
        "onecycle",
        0.003,
        4,
        0.0,
        2,
    )
    c = finetune_config(_ft_args("--optimizer", "sgd", "--momentum", "0.5", "--patience", "0"))
    assert (c.optimizer, c.momentum, c.lr, c.patience) == ("sgd", 0.5, FINETUNE_RECIPE.lr, None)
    assert (
        RSDTR_RECIPE.lr == 0.01 and FINETUNE_RECIPE.patience == 3
    )  # the recipes themselves are not mutated
    with pytest.raises(SystemExit):
        _ft_args("--recipe", "nope")


def test_cli_finetune_rsdtr_recipe_from_decomposed_factors(compressed, tmp_path, capsys):
    out, _ = compressed
    start = tensorcut.load(out)
    ft = tmp_path / "ft"
    assert (
        main(
            [
                "finetune",
                str(out),
                "--recipe",
                "rsdtr",
                "--epochs",
                "2",
                "--subset",
                "128",
                "--batch-size",
                "16",
                "--device",
                "cpu",
                "--out",
                str(ft),
            ]
        )
        == 0
    )
    assert "before fine-tuning" in capsys.readouterr().out
    ck = tio.load_checkpoint(ft)
    meta = ck.meta
    assert meta["finetune"]["optimizer"] == "sgd" and meta["finetune"]["lr"] == 0.01
    hist = meta["finetune_history"]
    # one cycle over 16 steps: warm-up to 0.01 within the first epoch, annealed in the second
    assert len(hist) == 2 and 0.01 >= hist[0]["lr"] > hist[1]["lr"] and hist[1]["lr"] < 1e-3
    # the fine-tuned model keeps the rings (same ranks), starting from the decomposed cores
    from tensorcut.pipeline.workflow import _dataset_from_meta
    from tensorcut.train.loop import evaluate

    te = tensorcut.make_loader(_dataset_from_meta(ck.info, "test"), 512)
    assert meta["metrics"]["test_before_finetune"]["top1"] == pytest.approx(
        evaluate(start, te)["top1"]
    )
    moved = 0
    for name in PLANTED:
        a, b = start.get_submodule(name), ck.model.get_submodule(name)
        assert isinstance(b, TRConv2d) and b.ranks == a.ranks
        moved += not torch.equal(a.in_proj.weight, b.in_proj.weight)
    assert moved == len(PLANTED)
