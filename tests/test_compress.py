"""plan / apply / compress over every registered method; checkpoint compress, finetune, export."""

import json

import pytest
import torch
from torch import nn

import tensorcut.layers  # noqa: F401  (registers the layer classes)
from tensorcut import models
from tensorcut.checkpoint import io as tio
from tensorcut.compression import CompressConfig, Plan, apply, compress, plan
from tensorcut.errors import TensorcutError
from tensorcut.layers.base import LAYER_REGISTRY, FactorizedConv2d

METHODS = sorted(LAYER_REGISTRY)


LAYERS = ["layer2.1.conv1", "layer3.0.conv1", "layer3.1.conv2", "layer3.2.conv2"]


def _model():
    torch.manual_seed(0)
    return models.create("resnet20", width=0.5).eval()


@pytest.mark.parametrize("method", METHODS)
def test_ratio_rule_meets_target_per_layer(method):
    m = _model()
    p = plan(m, method=method, ratio=0.3, input_shape=(3, 32, 32), layers=LAYERS, progress=False)
    fact = [l for l in p.layers if l.status == "factorize"]
    assert fact, p.table()
    for l in fact:
        assert l.params_after <= 0.3 * l.params_before + 1e-9
        assert 0 <= l.error < 1
    # plan is pure: the model still has only dense convolutions
    assert not any(isinstance(x, FactorizedConv2d) for x in m.modules())


@pytest.mark.parametrize("method", METHODS)
def test_apply_swaps_modules_and_counts_match(method):
    m = _model()
    x = torch.randn(2, 3, 32, 32)
    p = plan(m, method=method, ratio=0.5, input_shape=(3, 32, 32), layers=LAYERS, progress=False)
    before = sum(q.numel() for q in m.parameters())
    apply(m, p)
    after = sum(q.numel() for q in m.parameters())
    t = p.totals()
    assert after == t["model_params_after"] and before == t["model_params_before"]
    for l in p.layers:
        mod = m.get_submodule(l.name)
        assert isinstance(mod, FactorizedConv2d) == (l.status == "factorize")
        if l.status == "factorize":
            assert list(mod.ranks) == l.ranks and mod.num_params() == l.params_after
            assert mod.macs(tuple(l.input_hw)) == l.macs_after
    assert m(x).shape == (2, 10)


def test_full_rank_plan_reproduces_dense_model():
    m = _model().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ref = m(x)
    cfg = CompressConfig(method="tucker2", rank=10_000)
    p = plan(m, cfg, input_shape=(3, 32, 32), layers=LAYERS, progress=False)
    # a full-rank Tucker-2 is never smaller, so the size guard keeps every layer dense with a reason
    assert all(l.status == "dense" and "would not be smaller" in l.reason for l in p.layers)
    apply(m, p)
    assert torch.allclose(m(x), ref)


def test_eps_rule_bounds_error():
    m = _model()
    p = plan(m, method="tucker2", eps=0.3, input_shape=(3, 32, 32), layers=LAYERS, progress=False)
    for l in p.layers:
        if l.error is not None:
            assert l.error <= 0.3 + 1e-6


def test_vbmf_rule_never_gives_rank_zero():
    p = plan(
        _model(),
        method="tucker2",
        rank="vbmf",
        input_shape=(3, 32, 32),
        layers=LAYERS,
        progress=False,
    )
    assert all(min(l.ranks) >= 1 for l in p.layers if l.status == "factorize")


@pytest.mark.parametrize("kind", ["params", "macs"])
def test_budget_is_met(kind):
    m = _model()
    p = plan(
        m,
        method="tucker2",
        budget=0.3,
        budget_kind=kind,
        input_shape=(3, 32, 32),
        layers=LAYERS,
        progress=False,
    )
    t = p.totals()
    key = "conv_params" if kind == "params" else "conv_macs"
    assert t[f"{key}_after"] <= 0.3 * t[f"{key}_before"]


def test_budget_sensitivity_protects_layer():
    m = _model()
    target = LAYERS[-1]
    plain = plan(
        m, method="tucker2", budget=0.3, input_shape=(3, 32, 32), layers=LAYERS, progress=False
    )
    guided = plan(
        m,
        method="tucker2",
        budget=0.3,
        input_shape=(3, 32, 32),
        layers=LAYERS,
        sensitivity={target: 1000.0},
        progress=False,
    )
    pa = {l.name: l for l in plain.layers}[target]
    ga = {l.name: l for l in guided.layers}[target]
    size = lambda l: l.params_after if l.status == "factorize" else l.params_before  # noqa: E731
    assert size(ga) > size(pa)


def test_plan_json_round_trip_and_apply():
    m = _model()
    p = plan(m, method="tucker2", ratio=0.4, input_shape=(3, 32, 32), layers=LAYERS, progress=False)
    q = Plan.from_dict(json.loads(p.to_json()))
    assert q.totals() == p.totals()
    m2 = _model()
    apply(m2, q)
    x = torch.randn(2, 3, 32, 32)
    m3, _ = compress(
        _model(),
        method="tucker2",
        ratio=0.4,
        input_shape=(3, 32, 32),
        layers=LAYERS,
        progress=False,
    )
    assert torch.allclose(m2(x), m3(x), atol=1e-5)


def test_table_mentions_every_layer_and_totals():
    p = plan(
        _model(),
        method="tucker2",
        ratio=0.4,
        input_shape=(3, 32, 32),
        layers=LAYERS,
        progress=False,
    )
    t = p.table()
    assert all(l.name in t for l in p.layers) and "whole model" in t and "rel.err" in t


def test_grouped_and_depthwise_stay_dense_with_reason():
    net = nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),
        nn.Conv2d(16, 32, 3, padding=1, groups=4),
    )
    p = plan(net, method="cp", ratio=0.3, input_shape=(8, 8, 8), progress=False)
    by = {l.name: l for l in p.layers}
    assert by["1"].status == "dense" and "depthwise" in by["1"].reason
    assert by["0"].status == "factorize"


@pytest.mark.parametrize(
    "kw,msg",
    [
        (
            {"method": "svd3", "ratio": 0.5},
            "unknown method 'svd3'; choose one of: auto, cp, tr, tt, tucker, tucker2",
        ),
        ({"method": "cp", "rank": 4, "ratio": 0.5}, "contradictory rank options"),
        ({"method": "cp", "budget": 0.5, "eps": 0.1}, "contradictory rank options: budget and eps"),
        ({"method": "cp"}, "no rank rule"),
        (
            {"method": "cp", "rank": "vbmf"},
            r"rank='vbmf' applies to tucker2 only; use method='tucker2' \(got 'cp'\)",
        ),
        (
            {"method": "cp", "ratio": 0.5, "options": {"cp": {"n_iter": 3}}},
            r"unknown options for cp: \['n_iter'\]; valid: n_iter_max, tol, init",
        ),
        (
            {"method": "cp", "ratio": 0.5, "options": {"svd3": {}}},
            "unknown method 'svd3'; choose one of: cp, tr, tt, tucker, tucker2",
        ),
        (
            {"method": "cp", "ratio": 0.5, "align": 0},
            r"align must be a positive integer \(e.g. 8 or 16\), got 0",
        ),
    ],
)
def test_bad_configs(kw, msg):
    with pytest.raises(TensorcutError, match=msg):
        CompressConfig(**kw)


def test_unknown_layer_lists_valid_ones():
    with pytest.raises(
        TensorcutError, match="unknown layer 'conv9'; conv layers are: conv1, layer1.0.conv1"
    ):
        plan(_model(), method="cp", ratio=0.5, layers=["conv9"], progress=False)


def test_plan_mismatch_is_refused():
    p = plan(
        _model(),
        method="tucker2",
        ratio=0.4,
        input_shape=(3, 32, 32),
        layers=LAYERS,
        progress=False,
    )
    other = models.create("resnet20", width=0.25)
    with pytest.raises(TensorcutError, match="plan does not match model at"):
        apply(other, p)


def test_latency_guard_records_timings():
    p = plan(
        _model(),
        method="tucker2",
        ratio=0.2,
        latency=True,
        input_shape=(3, 32, 32),
        layers=["layer3.0.conv2"],
        progress=False,
    )
    l = p.layers[0]
    assert set(l.latency_ms) == {"dense", "factorized"}
    assert (l.status == "factorize") == (l.latency_ms["factorized"] < l.latency_ms["dense"])


# ----------------------------------------------------------------------------- checkpoint level


def test_compress_finetune_export_checkpoint(tiny_checkpoint, tmp_path):
    from tensorcut.pipeline.workflow import (
        compress_checkpoint,
        export_checkpoint,
        finetune_checkpoint,
    )
    from tensorcut.train.config import FitConfig

    out = tmp_path / "c"
    model, p, meta = compress_checkpoint(
        tiny_checkpoint,
        out,
        CompressConfig(method="tucker2", ratio=0.3),
        evaluate_split="val",
        progress=False,
    )
    loaded = tio.load(out)
    x = torch.randn(3, 1, 8, 8)
    model.eval()
    assert torch.allclose(loaded(x), model(x), atol=1e-6)
    assert (out / "plan.json").exists() and json.loads((out / "meta.json").read_text())["plan"][
        "totals"
    ]
    ck = finetune_checkpoint(
        out, config=FitConfig(epochs=1, lr=1e-4, scheduler="none"), subset=128, progress=False
    )
    assert "test_before_finetune" in ck.meta["metrics"] and len(ck.meta["finetune_history"]) == 1
    reloaded = tio.load(out)
    assert torch.allclose(reloaded(x), ck.model.eval()(x), atol=1e-6)
    path = export_checkpoint(out, "onnx")
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    assert np.abs(got - reloaded(x).detach().numpy()).max() < 1e-4
    for fmt in ("torchscript", "exported"):
        assert export_checkpoint(out, fmt).exists()


def test_compressed_checkpoint_with_wrong_plan_fails_clearly(tiny_checkpoint, tmp_path):
    from tensorcut.pipeline.workflow import compress_checkpoint

    out = tmp_path / "c"
    compress_checkpoint(
        tiny_checkpoint, out, CompressConfig(method="tucker2", ratio=0.3), progress=False
    )
    meta = json.loads((out / "meta.json").read_text())
    name = next(iter(meta["layers"]))
    meta["layers"][name]["ranks"] = [r + 1 for r in meta["layers"][name]["ranks"]]
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(TensorcutError, match="weights do not match meta.json"):
        tio.load(out)


def test_cli_compress_bad_input(tiny_checkpoint, tmp_path, capsys):
    from tensorcut.cli import main

    with pytest.raises(SystemExit) as exit_info:  # argparse: the methods are the verb's choices
        main(
            ["compress", str(tiny_checkpoint), "--method", "foo", "--ratio", "0.5"]
            + ["--out", str(tmp_path / "o")]
        )
    assert exit_info.value.code == 2
    assert "argument --method: invalid choice: 'foo'" in capsys.readouterr().err
    assert (
        main(["compress", str(tiny_checkpoint), "--method", "cp", "--out", str(tmp_path / "o")])
        == 2
    )
    assert "no rank rule" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_auto_keeps_the_smallest_method_within_the_error_bound():
    m = _model()
    layer = ["layer3.1.conv2"]
    auto = plan(
        m, method="auto", eps=0.5, input_shape=(3, 32, 32), layers=layer, progress=False
    ).layers[0]
    assert auto.status == "factorize" and auto.error <= 0.5 + 1e-6
    for method in ("tucker2", "tt", "tr"):
        single = plan(
            m, method=method, eps=0.5, input_shape=(3, 32, 32), layers=layer, progress=False
        ).layers[0]
        if single.status == "factorize":
            assert auto.params_after <= single.params_after


def test_auto_under_a_budget_meets_it():
    m = _model()
    p = plan(m, method="auto", budget=0.3, input_shape=(3, 32, 32), layers=LAYERS, progress=False)
    t = p.totals()
    assert t["conv_params_after"] <= 0.3 * t["conv_params_before"]
    assert {l.method for l in p.layers if l.status == "factorize"} <= {"cp", "tucker2", "tt", "tr"}


def test_sensitivity_from_json_and_bad_file(tmp_path):
    from tensorcut.pipeline.workflow import load_sensitivity

    (tmp_path / "s.json").write_text('{"conv2": 3.5}')
    assert load_sensitivity(tmp_path / "s.json") == {"conv2": 3.5}
    (tmp_path / "bad.sqlite").write_bytes(b"not a database at all" * 10)
    with pytest.raises(TensorcutError, match="is not a readable results database"):
        load_sensitivity(tmp_path / "bad.sqlite")
    with pytest.raises(TensorcutError, match="does not exist; run `tensorcut analyze` first"):
        load_sensitivity(tmp_path / "none.sqlite")


def test_from_scratch_reinitialises_factorized_layers():
    x = torch.randn(2, 3, 32, 32)
    m1, p = compress(
        _model(),
        method="tucker2",
        ratio=0.3,
        input_shape=(3, 32, 32),
        layers=LAYERS,
        progress=False,
    )
    m2, _ = compress(
        _model(),
        method="tucker2",
        ratio=0.3,
        input_shape=(3, 32, 32),
        layers=LAYERS,
        progress=False,
        from_scratch=True,
    )
    name = next(l.name for l in p.layers if l.status == "factorize")
    a, b = m1.get_submodule(name), m2.get_submodule(name)
    assert a.ranks == b.ranks and not torch.allclose(a.reconstruct_weight(), b.reconstruct_weight())
    assert m2(x).shape == (2, 10)


def _aligned(ranks, maximum, a):
    return all(r % a == 0 or r == m for r, m in zip(ranks, maximum, strict=True))


@pytest.mark.parametrize("method", ["tucker2", "tt", "cp"])
def test_align_keeps_size_rules_within_their_target(method):
    m = _model()
    plain = plan(
        m, method=method, ratio=0.3, input_shape=(3, 32, 32), layers=LAYERS, progress=False
    )
    p = plan(
        m, method=method, ratio=0.3, align=8, input_shape=(3, 32, 32), layers=LAYERS, progress=False
    )
    cls = LAYER_REGISTRY[method]
    for a, b in zip(plain.layers, p.layers, strict=True):
        if b.status != "factorize":
            continue
        from tensorcut.geometry import ConvGeometry

        mx = cls.max_ranks(ConvGeometry.from_dict(b.geometry))
        assert _aligned(b.ranks, mx, 8), (b.ranks, mx)
        if (
            b.params_after > 0.3 * b.params_before
        ):  # only when the smallest aligned ranks are too big, and said
            assert (
                all(r == min(8, m) for r, m in zip(b.ranks, mx, strict=True))
                and "align=8 needs ranks >= 8" in b.note
            )
        assert (
            b.params_after >= 0.5 * a.params_after
        )  # the greedy fill uses the budget, not just rounding down
    assert p.config["align"] == 8


def test_align_rounds_up_for_error_rules():
    m = _model()
    p = plan(
        m,
        method="tucker2",
        eps=0.5,
        align=16,
        input_shape=(3, 32, 32),
        layers=LAYERS,
        progress=False,
    )
    plain = plan(
        m, method="tucker2", eps=0.5, input_shape=(3, 32, 32), layers=LAYERS, progress=False
    )
    for a, b in zip(plain.layers, p.layers, strict=True):
        assert b.status == "factorize" or "not be smaller" in b.reason
        if b.status == "factorize":
            assert b.error <= 0.5 + 1e-6
            assert all(rb >= ra for ra, rb in zip(a.ranks, b.ranks, strict=True))
            from tensorcut.geometry import ConvGeometry

            assert _aligned(
                b.ranks, LAYER_REGISTRY["tucker2"].max_ranks(ConvGeometry.from_dict(b.geometry)), 16
            )


def test_align_under_a_budget_meets_it():
    m = _model()
    p = plan(
        m,
        method="tucker2",
        budget=0.4,
        align=8,
        input_shape=(3, 32, 32),
        layers=LAYERS,
        progress=False,
    )
    fact = [l for l in p.layers if l.status == "factorize"]
    assert fact
    assert (
        sum(l.params_after if l.status == "factorize" else l.params_before for l in p.layers)
        <= 0.4 * sum(l.params_before for l in p.layers) + 1
    )
    assert all(r % 8 == 0 for l in fact for r in l.ranks)


# --------------------------------------------------------------------------- real-network semantics


class _Shared(nn.Module):
    """One conv reachable under two names, called twice; a parent reads the conv's attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Conv2d(16, 16, 3, padding=1)
        self.alias = self.body
        self.proj = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.alias(torch.relu(self.body(x))))
        pos = torch.ones(
            1,
            self.proj.in_channels,
            1,
            1,
            dtype=self.proj.weight.dtype,
            device=self.proj.weight.device,
        )
        x = self.proj(x + pos)
        return self.head(x.mean((2, 3)))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_shared_conv_is_swapped_once_under_every_name():
    torch.manual_seed(0)
    m = _Shared().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    y = m(x)
    m, p = compress(m, method="tucker2", rank="full", input_shape=(3, 8, 8), progress=False)
    e = next(l for l in p.layers if l.name == "body")
    assert e.aliases == ["alias"] and e.calls == 2 and e.status == "factorize"
    assert m.body is m.alias and isinstance(m.body, FactorizedConv2d)
    assert _rel(m(x), y) < 1e-12
    assert p.totals()["model_params_after"] == sum(q.numel() for q in m.parameters())


def test_parent_reading_conv_attributes_still_works():
    torch.manual_seed(0)
    m = _Shared().eval()
    m, p = compress(
        m, method="tucker2", ratio=0.6, layers=["proj"], input_shape=(3, 8, 8), progress=False
    )
    layer = m.proj
    assert isinstance(layer, FactorizedConv2d)
    assert (
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        layer.stride,
        layer.groups,
    ) == (16, 16, (1, 1), (1, 1), 1)
    assert layer.weight.shape == (16, 16, 1, 1) and layer.weight.dtype == torch.float32
    with pytest.raises((AttributeError, KeyError)):
        layer.weight = nn.Parameter(torch.zeros(16, 16, 1, 1))  # read-only
    assert m(torch.randn(1, 3, 8, 8)).shape == (1, 4)


def test_rank_full_reproduces_and_is_recorded():
    torch.manual_seed(0)
    m = _model().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y = m(x)
    m, p = compress(m, method="tucker2", rank="full", input_shape=(3, 32, 32), progress=False)
    assert all(l.status == "factorize" for l in p.layers), p.table()
    assert _rel(m(x), y) < 1e-10 and p.model_output_error < 1e-10
    assert all(l.output_error is not None and l.output_error < 1e-10 for l in p.layers)


def test_frozen_convs_stay_frozen():
    m = _model()
    for q in m.parameters():
        q.requires_grad_(False)
    m, p = compress(
        m, method="tucker2", ratio=0.5, layers=LAYERS, input_shape=(3, 32, 32), progress=False
    )
    assert not any(q.requires_grad for q in m.parameters())


def test_decompress_is_the_inverse_of_apply():
    from tensorcut.compression import decompress

    torch.manual_seed(0)
    m = _Shared().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    m, _ = compress(m, method="tucker2", ratio=0.6, input_shape=(3, 8, 8), progress=False)
    y = m(x)
    decompress(m)
    assert not any(isinstance(s, FactorizedConv2d) for s in m.modules())
    assert type(m.body) is nn.Conv2d and m.body is m.alias
    assert _rel(m(x), y) < 1e-12


def test_conv_never_called_is_left_dense_with_reason():
    class _Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Conv2d(8, 8, 3, padding=1)
            self.unused = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    p = plan(_Unused(), method="tucker2", ratio=0.5, input_shape=(8, 6, 6), progress=False)
    e = next(l for l in p.layers if l.name == "unused")
    assert (
        e.status == "dense"
        and e.reason == "not called by forward on the calibration input; left dense"
    )


def test_custom_forward_subclass_is_left_dense():
    class Odd(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).flip(-1)

    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Odd(8, 8, 3, padding=1))
    p = plan(m, method="tucker2", ratio=0.5, input_shape=(3, 6, 6), progress=False)
    assert p.layers[0].status == "dense" and p.layers[0].reason == "custom forward (Odd)"
    # opting in still verifies: the flip makes the module differ from its kernel, so it stays dense
    p = plan(
        m,
        method="tucker2",
        ratio=0.5,
        input_shape=(3, 6, 6),
        progress=False,
        allow_custom_forward=True,
    )
    assert p.layers[0].status == "dense"
    assert p.layers[0].reason.startswith(
        "the module's output differs from a convolution with the kernel"
    )


def test_bad_calibration_and_input_shape_are_one_line_errors():
    m = _model()
    with pytest.raises(
        TensorcutError,
        match=r"^input_shape must be \(C, H, W\) of one image, three positive ints; "
        r"got \(32, 32\)$",
    ):
        plan(m, ratio=0.5, input_shape=(32, 32))
    with pytest.raises(
        TensorcutError,
        match=r"^calibration batch has shape \(2, 3, 16, 16\) but input_shape is \(3, 32, 32\)",
    ):
        plan(m, ratio=0.5, input_shape=(3, 32, 32), calibration=torch.randn(2, 3, 16, 16))
    with pytest.raises(
        TensorcutError, match=r"^the model's forward failed on an input of shape \(2, 5, 32, 32\)"
    ):
        plan(m, ratio=0.5, input_shape=(5, 32, 32))


def test_no_input_shape_warns_about_the_assumption():
    with pytest.warns(
        UserWarning, match="no input_shape or calibration batch given: assuming one 3x32x32 image"
    ):
        plan(_model(), ratio=0.5, layers=LAYERS, progress=False)


def test_calibration_batch_sets_the_input_shape():
    p = plan(
        _model(), ratio=0.5, layers=LAYERS, calibration=torch.randn(3, 3, 24, 24), progress=False
    )
    assert p.input_shape == [3, 24, 24]


def test_compressing_a_compressed_model_is_refused():
    m, p = compress(
        _model(),
        method="tucker2",
        rank="full",
        filter_fn=lambda n, mod: True,
        input_shape=(3, 32, 32),
        progress=False,
    )
    assert all(l.status == "factorize" for l in p.layers)
    with pytest.raises(
        TensorcutError,
        match=r"^the model is already compressed \(19 factorized layers, no dense Conv2d left\)",
    ):
        plan(m, method="tucker2", ratio=0.5, input_shape=(3, 32, 32))


def test_poor_results_are_flagged():
    with pytest.warns(
        UserWarning, match=r"keep almost nothing of their kernel \(relative error > 0.9"
    ):
        p = plan(
            _model(),
            method="tucker2",
            rank=1,
            layers=LAYERS,
            input_shape=(3, 32, 32),
            progress=False,
        )
    assert any("almost nothing of the kernel is kept" in l.note for l in p.layers)


def test_plan_with_out_of_range_ranks_is_refused_by_apply():
    m = _model()
    p = plan(m, method="tucker2", ratio=0.5, layers=LAYERS, input_shape=(3, 32, 32), progress=False)
    d = p.to_dict()
    d["layers"][0]["ranks"] = [10_000, 10_000]
    with pytest.raises(
        TensorcutError, match="records .* parameters at ranks \\(10000, 10000\\)"
    ) as e:
        apply(m, Plan.from_dict(d))
    assert not any(isinstance(s, FactorizedConv2d) for s in m.modules())
    assert "plan was edited" in str(e.value)


def test_plan_file_that_is_not_utf8_is_one_line(tmp_path):
    f = tmp_path / "plan.json"
    f.write_bytes(b"\xff\xfe{not utf-8")
    with pytest.raises(TensorcutError, match=r"^cannot read plan .*UnicodeDecodeError"):
        Plan.load(f)
