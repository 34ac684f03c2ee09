"""THE catalogue of bad inputs: one test per entry, each read top to bottom.

Contract for every entry: the command-line verb exits with status 2 and prints exactly
one line, ``tensorcut VERB: error: ...``, that says what is wrong and how to fix it; no
input file is modified, no output is left half-written, and nothing a user handed over is
ever unpickled. (Entries marked *accepted* are inputs that are legal and must simply work.)

Sections
  A. checkpoint files: truncated, random, empty, foreign, missing
  B. meta.json edited by hand so that it disagrees with the weights, or with fields of the
     wrong type (data set, seed, padding mode, stride)
  C. pickles, which are never unpickled
  D. non-finite and degenerate weights: NaN, Inf, zero kernels
  E. kernel shapes: 1x1, one channel, huge (every registered layer class)
  F. ranks: 0, negative, larger than the kernel, wrong count, not a number
  G. data files: wrong magic numbers, sizes, counts, labels, formats
  H. images with the wrong channel count
  I. command-line options and output paths (issue 18): numbers out of range, a resume with
     another recipe, outputs that are files, damaged run directories, late validation
  J. models handed over from Python: TorchScript instead of the eager module
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from formats_util import pickle_dump, write_idx
from safetensors.torch import load as st_load
from safetensors.torch import save_file
from torch import nn

import tensorcut.layers  # noqa: F401  (registers every layer class)
from tensorcut.cli import main
from tensorcut.errors import TensorcutError
from tensorcut.geometry import ConvGeometry
from tensorcut.layers.base import LAYER_REGISTRY

METHODS = sorted(LAYER_REGISTRY)


# ----------------------------------------------------------------------------- helpers


def _digest(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def refused(
    capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str, keep: tuple[Path, ...] = ()
) -> str:
    """Run the CLI; assert exit 2, one error line with ``needles``, the ``keep`` paths unchanged."""
    before = {str(p): _digest(p) for p in keep}
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's own refusals (usage line + error line)
            rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, (rc, err)
    errors = [ln for ln in err if ln.startswith(f"tensorcut {argv[0]}: error: ")]
    assert len(errors) == 1, err
    if not any(ln.startswith("usage:") for ln in err):
        assert len(err) == 1, err
    for n in needles:
        assert n in errors[0], errors[0]
    assert {str(p): _digest(p) for p in keep} == before, "an input was modified"
    return errors[0]


@pytest.fixture
def ck(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the small trained checkpoint (vanilla-cnn on digits: 1 channel, 8x8)."""
    d = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, d)
    return d


@pytest.fixture(scope="module")
def compressed_src(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cmp") / "cmp"
    assert (
        main(
            [
                "compress",
                str(tiny_checkpoint),
                "--method",
                "tucker2",
                "--keep",
                "0.5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


@pytest.fixture
def compressed(compressed_src: Path, tmp_path: Path) -> Path:
    d = tmp_path / "cmp"
    shutil.copytree(compressed_src, d)
    return d


def _edit_meta(d: Path, fn: Callable[[dict[str, Any]], Any]) -> Path:
    meta = json.loads((d / "meta.json").read_text())
    fn(meta)
    (d / "meta.json").write_text(json.dumps(meta))
    return d


def load_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors read into memory (not memory-mapped: the tests overwrite the same file)."""
    return st_load(path.read_bytes())


def _edit_weights(d: Path, fn: Callable[[dict[str, torch.Tensor]], Any]) -> Path:
    sd = load_file(d / "model.safetensors")
    fn(sd)
    save_file(sd, d / "model.safetensors")
    return d


class _Booby:
    """Unpickling this would create ``target``: if it stays absent, nothing was unpickled."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.target,))


# ============================================================================= A. checkpoint files


def test_A1_truncated_weights_file(ck: Path, capsys: Any) -> None:
    w = ck / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    refused(capsys, ["evaluate", str(ck)], "model.safetensors is truncated or corrupt", keep=(ck,))


def test_A2_random_bytes_as_weights(ck: Path, capsys: Any) -> None:
    (ck / "model.safetensors").write_bytes(os.urandom(4096))
    refused(
        capsys,
        ["compress", str(ck), "--ratio", "0.5", "--out", str(ck.parent / "o")],
        "truncated or corrupt",
        keep=(ck,),
    )
    assert not (ck.parent / "o").exists()


def test_A3_empty_weights_file(ck: Path, capsys: Any) -> None:
    (ck / "model.safetensors").write_bytes(b"")
    refused(capsys, ["inspect", str(ck)], "truncated or corrupt", keep=(ck,))


def test_A4_safetensors_of_another_model(ck: Path, capsys: Any) -> None:
    save_file({"encoder.weight": torch.zeros(3, 3)}, ck / "model.safetensors")
    refused(
        capsys,
        ["evaluate", str(ck)],
        "weights do not match meta.json",
        "come from different models",
        keep=(ck,),
    )


def test_A5_torch_save_file_in_place_of_safetensors(ck: Path, capsys: Any) -> None:
    torch.save(load_file(ck / "model.safetensors"), ck / "model.safetensors")
    refused(capsys, ["evaluate", str(ck)], "truncated or corrupt", keep=(ck,))


def test_A6_folder_of_another_tool_without_meta_json(tmp_path: Path, capsys: Any) -> None:
    d = tmp_path / "hf"
    d.mkdir()
    torch.save({"w": torch.zeros(2)}, d / "pytorch_model.bin")
    refused(
        capsys,
        ["evaluate", str(d)],
        "has no meta.json; it is not a tensorcut checkpoint",
        keep=(d,),
    )


def test_A7_missing_weights_file(ck: Path, capsys: Any) -> None:
    (ck / "model.safetensors").unlink()
    refused(capsys, ["export", str(ck), "--format", "onnx"], "has no model.safetensors", keep=(ck,))


def test_A8_checkpoint_path_is_a_file(ck: Path, capsys: Any) -> None:
    refused(capsys, ["evaluate", str(ck / "meta.json")], "is not a checkpoint directory")


# ========================================================================== B. meta.json vs weights


def test_B1_meta_not_json(ck: Path, capsys: Any) -> None:
    (ck / "meta.json").write_text("{model: vanilla")
    refused(capsys, ["evaluate", str(ck)], "meta.json is corrupt", keep=(ck,))


def test_B2_meta_binary_garbage(ck: Path, capsys: Any) -> None:
    (ck / "meta.json").write_bytes(b"\xff\xfe\x00\x01" * 10)
    refused(capsys, ["evaluate", str(ck)], "meta.json is corrupt", keep=(ck,))


def test_B3_meta_json_of_another_format(ck: Path, capsys: Any) -> None:
    (ck / "meta.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    refused(capsys, ["evaluate", str(ck)], "is not tensorcut checkpoint metadata", keep=(ck,))


def test_B4_width_edited(ck: Path, capsys: Any) -> None:
    _edit_meta(ck, lambda m: m["model"]["kwargs"].update(width=0.25))
    refused(
        capsys,
        ["evaluate", str(ck)],
        "weights do not match meta.json",
        "of wrong shape",
        keep=(ck,),
    )


def test_B5_number_of_classes_edited(ck: Path, capsys: Any) -> None:
    _edit_meta(ck, lambda m: m["model"]["kwargs"].update(num_classes=7))
    refused(capsys, ["evaluate", str(ck)], "fc3.weight", keep=(ck,))


def test_B6_model_name_edited_to_another_zoo_model(ck: Path, capsys: Any) -> None:
    _edit_meta(ck, lambda m: m["model"].update(name="resnet20"))
    refused(capsys, ["evaluate", str(ck)], "weights do not match meta.json", keep=(ck,))


def test_B7_unknown_model_name(ck: Path, capsys: Any) -> None:
    _edit_meta(ck, lambda m: m["model"].update(name="resnet9000"))
    refused(
        capsys, ["evaluate", str(ck)], "model 'resnet9000'", keep=(ck,)
    )  # unknown / not in the registry


def test_B8_model_argument_of_the_wrong_type(ck: Path, capsys: Any) -> None:
    _edit_meta(ck, lambda m: m["model"]["kwargs"].update(width="wide"))
    refused(
        capsys, ["evaluate", str(ck)], "model.kwargs do not fit model 'vanilla-cnn'", keep=(ck,)
    )


def test_B9_model_too_large_to_build(ck: Path, capsys: Any) -> None:
    _edit_meta(ck, lambda m: m["model"]["kwargs"].update(width=1e6))
    refused(capsys, ["evaluate", str(ck)], "meta.json describes a model with at least", keep=(ck,))


def test_B10_factorized_ranks_edited(compressed: Path, capsys: Any) -> None:
    layer = next(iter(json.loads((compressed / "meta.json").read_text())["layers"]))
    _edit_meta(compressed, lambda m: m["layers"][layer].update(ranks=[1, 1]))
    refused(
        capsys, ["evaluate", str(compressed)], "weights do not match meta.json", keep=(compressed,)
    )


@pytest.mark.parametrize("ranks", [[0, 0], [-2, 3], "ab"])
def test_B11_factorized_ranks_zero_negative_or_not_numbers(
    compressed: Path, capsys: Any, ranks: Any
) -> None:
    layer = next(iter(json.loads((compressed / "meta.json").read_text())["layers"]))
    _edit_meta(compressed, lambda m: m["layers"][layer].update(ranks=ranks))
    refused(
        capsys,
        ["evaluate", str(compressed)],
        f"meta.json layer {layer!r} has an invalid configuration",
        keep=(compressed,),
    )


def test_B12_factorized_ranks_too_large_to_build(compressed: Path, capsys: Any) -> None:
    layer = next(iter(json.loads((compressed / "meta.json").read_text())["layers"]))
    _edit_meta(compressed, lambda m: m["layers"][layer].update(ranks=[10**6, 10**6]))
    refused(capsys, ["evaluate", str(compressed)], "cannot be built here", keep=(compressed,))


def test_B13_unknown_factorization_method(compressed: Path, capsys: Any) -> None:
    layer = next(iter(json.loads((compressed / "meta.json").read_text())["layers"]))
    _edit_meta(compressed, lambda m: m["layers"][layer].update(method="svd9"))
    refused(capsys, ["evaluate", str(compressed)], "unknown method 'svd9'", keep=(compressed,))


def test_B14_factorized_layer_dropped_from_meta(compressed: Path, capsys: Any) -> None:
    layer = next(iter(json.loads((compressed / "meta.json").read_text())["layers"]))
    _edit_meta(compressed, lambda m: m["layers"].pop(layer))
    refused(
        capsys, ["evaluate", str(compressed)], "weights do not match meta.json", keep=(compressed,)
    )


def test_B15_layers_entry_not_an_object(compressed: Path, capsys: Any) -> None:
    _edit_meta(compressed, lambda m: m.update(layers="conv2"))
    refused(
        capsys, ["evaluate", str(compressed)], "'layers' must map layer names", keep=(compressed,)
    )


def test_B16_meta_names_a_layer_the_model_lacks(compressed: Path, capsys: Any) -> None:
    def rename(m: dict[str, Any]) -> None:
        name = next(iter(m["layers"]))
        m["layers"]["conv99"] = m["layers"].pop(name)

    _edit_meta(compressed, rename)
    refused(capsys, ["evaluate", str(compressed)], "names layer 'conv99'", keep=(compressed,))


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda m: m.update(dataset="digits"), '"dataset" must be an object'),
        (lambda m: m.update(dataset=[1, 2]), '"dataset" must be an object'),
        (lambda m: m["dataset"].update(seed="0"), "dataset.seed must be a non-negative integer"),
        (lambda m: m["dataset"].update(seed=-1), "dataset.seed must be a non-negative integer"),
        (lambda m: m["dataset"].update(val_fraction="0.1"), "dataset.val_fraction must be"),
        (lambda m: m["dataset"].update(subset=0), "dataset.subset must be a positive integer"),
    ],
)
@pytest.mark.parametrize("verb", ["evaluate", "finetune"])
def test_B17_dataset_fields_of_the_wrong_type(
    ck: Path, capsys: Any, edit: Callable[[dict[str, Any]], Any], needle: str, verb: str
) -> None:
    _edit_meta(ck, edit)
    argv = [verb, str(ck)] + (["--out", str(ck.parent / "ft")] if verb == "finetune" else [])
    refused(capsys, argv, "meta.json: ", needle, "the file was edited", keep=(ck,))
    assert not (ck.parent / "ft").exists()


def test_B18_unknown_padding_mode_in_a_layer(compressed: Path, capsys: Any) -> None:
    layer = next(iter(json.loads((compressed / "meta.json").read_text())["layers"]))
    _edit_meta(compressed, lambda m: m["layers"][layer]["geometry"].update(padding_mode="mirror"))
    refused(
        capsys,
        ["evaluate", str(compressed)],
        f"layer {layer!r} has unknown padding_mode 'mirror'; choose one of zeros, reflect",
        keep=(compressed,),
    )


@pytest.mark.parametrize("stride", [0, -1, [1, 0], [2, -2], "2", [1, 1, 1]])
def test_B19_non_positive_or_malformed_stride_in_a_layer(
    compressed: Path, capsys: Any, stride: Any
) -> None:
    layer = next(iter(json.loads((compressed / "meta.json").read_text())["layers"]))
    _edit_meta(compressed, lambda m: m["layers"][layer]["geometry"].update(stride=stride))
    refused(
        capsys,
        ["inspect", str(compressed)],
        f"layer {layer!r} has stride {stride!r}; it must be a positive integer or a pair",
        keep=(compressed,),
    )


def test_B20_checked_through_the_python_api_before_building(ck: Path) -> None:
    import tensorcut

    _edit_meta(ck, lambda m: m["dataset"].update(seed="zero"))
    with pytest.raises(TensorcutError, match=r"dataset\.seed must be a non-negative integer"):
        tensorcut.load(ck)


# ============================================================================= C. pickles


def test_C1_pickle_as_weights_is_never_unpickled(ck: Path, tmp_path: Path, capsys: Any) -> None:
    sentinel = tmp_path / "UNPICKLED"
    (ck / "model.safetensors").write_bytes(pickle.dumps(_Booby(sentinel)))
    refused(capsys, ["evaluate", str(ck)], "truncated or corrupt", keep=(ck,))
    assert not sentinel.exists()


def test_C2_pickle_as_training_state_is_never_unpickled(
    ck: Path, tmp_path: Path, capsys: Any
) -> None:
    sentinel = tmp_path / "UNPICKLED"
    (ck / "train_state.pt").write_bytes(pickle.dumps(_Booby(sentinel)))
    argv = [
        "train",
        "--model",
        "vanilla-cnn",
        "--width",
        "0.125",
        "--dataset",
        "digits",
        "--subset",
        "32",
        "--epochs",
        "2",
        "--device",
        "cpu",
        "--out",
        str(ck),
        "--resume",
    ]
    refused(
        capsys,
        argv,
        "train_state.pt is corrupt or not a tensorcut training state",
        "it was not executed",
        keep=(ck,),
    )
    assert not sentinel.exists()


def test_C3_torch_zip_with_code_as_training_state(ck: Path, tmp_path: Path, capsys: Any) -> None:
    sentinel = tmp_path / "UNPICKLED"
    torch.save({"optimizer": _Booby(sentinel), "epoch": 1}, ck / "train_state.pt")
    argv = [
        "train",
        "--model",
        "vanilla-cnn",
        "--width",
        "0.125",
        "--dataset",
        "digits",
        "--subset",
        "32",
        "--epochs",
        "2",
        "--device",
        "cpu",
        "--out",
        str(ck),
        "--resume",
    ]
    refused(capsys, argv, "train_state.pt is corrupt or not a tensorcut training state", keep=(ck,))
    assert not sentinel.exists()


def test_C4_cifar_batch_with_code_is_never_unpickled(tmp_path: Path, capsys: Any) -> None:
    sentinel = tmp_path / "UNPICKLED"
    d = _cifar_py(tmp_path / "c10")
    pickle_dump({b"data": _Booby(sentinel), b"labels": [0]}, d / "data_batch_2")
    refused(
        capsys,
        _train_on("cifar10", d, tmp_path),
        "is not a CIFAR python batch",
        "only arrays are accepted",
        keep=(d,),
    )
    assert not sentinel.exists()


# ============================================================= D. non-finite and degenerate weights


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_D1_nan_or_inf_weights(ck: Path, tmp_path: Path, capsys: Any, value: float) -> None:
    _edit_weights(ck, lambda sd: sd["conv2.weight"].view(-1)[3].fill_(value))
    for argv in (
        ["compress", str(ck), "--ratio", "0.5", "--out", str(tmp_path / "o")],
        ["analyze", str(ck), "--no-progress", "--out", str(tmp_path / "r.sqlite")],
        ["evaluate", str(ck)],
        ["export", str(ck), "--format", "onnx"],
        ["finetune", str(ck), "--epochs", "1", "--out", str(tmp_path / "ft")],
    ):
        refused(capsys, argv, "hold NaN or Inf values (e.g. conv2.weight)", keep=(ck,))
    assert not (tmp_path / "o").exists() and not (tmp_path / "ft").exists()


def test_D2_nan_kernel_through_the_python_api(tmp_path: Path) -> None:
    from tensorcut.study.sweep import analyze

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    with torch.no_grad():
        net[1].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(TensorcutError, match="'1' has NaN or Inf weights"):
        analyze(
            net,
            [(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))],
            tmp_path / "r.sqlite",
            progress=False,
        )
    for cls in LAYER_REGISTRY.values():
        with pytest.raises(TensorcutError, match="NaN or Inf"):
            cls.from_conv(net[1], cls.max_ranks(ConvGeometry.from_conv(net[1])))  # type: ignore[attr-defined]


@pytest.mark.parametrize("method", METHODS)
def test_D3_zero_kernel_is_accepted(ck: Path, tmp_path: Path, capsys: Any, method: str) -> None:
    """*accepted*: an all-zero kernel compresses to a layer that computes zeros (no 0/0 NaN)."""
    from tensorcut.checkpoint import io as tio

    _edit_weights(ck, lambda sd: sd["conv2.weight"].zero_())
    out = tmp_path / "o"
    assert (
        main(
            [
                "compress",
                str(ck),
                "--method",
                method,
                "--eps",
                "0.2",
                "--layers",
                "conv2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    model = tio.load(out)
    assert all(bool(torch.isfinite(t).all()) for t in model.state_dict().values())
    conv2 = model.get_submodule("conv2")
    w = conv2.reconstruct_weight() if hasattr(conv2, "reconstruct_weight") else conv2.weight
    assert float(w.detach().abs().max()) == 0.0


# ============================================================================= E. kernel shapes


def _exact(conv: nn.Conv2d, method: str, hw: int = 17) -> float:
    cls = LAYER_REGISTRY[method]
    conv = conv.double()
    layer = cls.from_conv(conv, cls.max_ranks(ConvGeometry.from_conv(conv)))  # type: ignore[attr-defined]
    x = torch.randn(2, conv.in_channels, hw, hw, dtype=torch.float64)
    with torch.no_grad():
        return float((layer(x) - conv(x)).abs().max() / conv(x).abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("method", METHODS)
def test_E1_1x1_kernels(method: str) -> None:
    assert _exact(nn.Conv2d(24, 16, 1), method) < 1e-10


@pytest.mark.parametrize("method", METHODS)
def test_E2_one_channel_in_or_out(method: str) -> None:
    for conv in (nn.Conv2d(1, 8, 3), nn.Conv2d(8, 1, 3), nn.Conv2d(1, 1, 1)):
        assert _exact(conv, method) < 1e-10


@pytest.mark.parametrize("method", METHODS)
def test_E3_huge_kernels(method: str) -> None:
    assert _exact(nn.Conv2d(2, 3, 11, padding=5), method, hw=14) < 1e-10


def test_E4_kernel_larger_than_the_image_fails_like_the_dense_conv(tmp_path: Path) -> None:
    """*accepted* at layer level: the factorized layer fails exactly where the dense conv fails."""
    conv = nn.Conv2d(3, 4, 9).double()
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    for cls in LAYER_REGISTRY.values():
        layer = cls.from_conv(conv, cls.max_ranks(ConvGeometry.from_conv(conv)))  # type: ignore[attr-defined]
        with pytest.raises(RuntimeError):
            conv(x)
        with pytest.raises(RuntimeError):
            layer(x)


# ============================================================================= F. ranks


@pytest.mark.parametrize("method", METHODS)
def test_F1_rank_zero(ck: Path, tmp_path: Path, capsys: Any, method: str) -> None:
    refused(
        capsys,
        ["compress", str(ck), "--method", method, "--rank", "0", "--out", str(tmp_path / "o")],
        "rank must be >= 1, got 0",
        keep=(ck,),
    )
    assert not (tmp_path / "o").exists()


def test_F2_negative_rank(ck: Path, tmp_path: Path, capsys: Any) -> None:
    refused(
        capsys,
        ["compress", str(ck), "--rank", "-3", "--out", str(tmp_path / "o")],
        "rank must be >= 1, got -3",
        keep=(ck,),
    )


def test_F3_rank_larger_than_the_kernel(ck: Path, tmp_path: Path, capsys: Any) -> None:
    """The CLI refuses (the clamped full rank is not smaller); the layer API clamps and says so."""
    refused(
        capsys,
        ["compress", str(ck), "--rank", "100000", "--out", str(tmp_path / "o")],
        "leaves nothing to compress",
        "would not be smaller",
        keep=(ck,),
    )
    conv = nn.Conv2d(8, 6, 3)
    for cls in LAYER_REGISTRY.values():
        n = len(cls.max_ranks(ConvGeometry.from_conv(conv)))  # type: ignore[attr-defined]
        with pytest.warns(
            UserWarning
        ):  # "... clamped to ..." / "... became ... (what the kernel admits)"
            layer = cls.from_conv(conv, (10**4,) * n)  # type: ignore[attr-defined]
        assert layer.ranks == cls.max_ranks(ConvGeometry.from_conv(conv))  # type: ignore[attr-defined]


@pytest.mark.parametrize("method", METHODS)
def test_F4_zero_negative_or_fractional_ranks_in_the_layer_api(method: str) -> None:
    cls = LAYER_REGISTRY[method]
    conv = nn.Conv2d(8, 6, 3)
    n = len(cls.max_ranks(ConvGeometry.from_conv(conv)))  # type: ignore[attr-defined]
    for ranks in ((0,) * n, (-1,) * n, 2.5, (2,) * (n + 3)):
        with pytest.raises(TensorcutError):
            cls.from_conv(conv, ranks)  # type: ignore[attr-defined]


def test_F5_wrong_number_of_ranks(ck: Path, tmp_path: Path, capsys: Any) -> None:
    refused(
        capsys,
        [
            "compress",
            str(ck),
            "--method",
            "tucker2",
            "--rank",
            "2,3,4,5,6",
            "--out",
            str(tmp_path / "o"),
        ],
        "tucker2 takes 2 ranks",
        keep=(ck,),
    )


def test_F6_rank_that_is_not_a_number(ck: Path, tmp_path: Path, capsys: Any) -> None:
    refused(
        capsys,
        ["compress", str(ck), "--rank", "abc", "--out", str(tmp_path / "o")],
        "rank must be an int or comma-separated ints",
        keep=(ck,),
    )


@pytest.mark.parametrize(
    "flag,value,msg",
    [
        ("--ratio", "0", "must be in (0, 1)"),
        ("--ratio", "1.5", "must be in (0, 1)"),
        ("--eps", "-1", "must be in (0, 1)"),
    ],
)
def test_F7_rank_rule_out_of_range(
    ck: Path, tmp_path: Path, capsys: Any, flag: str, value: str, msg: str
) -> None:
    refused(
        capsys, ["compress", str(ck), flag, value, "--out", str(tmp_path / "o")], msg, keep=(ck,)
    )


# ============================================================================= G. data files


def _fashion(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 50), ("t10k", 20)):
        write_idx(d / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz=False)
        write_idx(d / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n), gz=False)
    return d


def _cifar_py(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pickle_dump(
            {
                b"data": rng.integers(0, 256, (10, 3072)).astype(np.uint8),
                b"labels": [int(v) for v in rng.integers(0, 10, 10)],
            },
            d / name,
        )
    return d


def _cifar_bin(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        rec = np.concatenate([rng.integers(0, 10, (10, 1)), rng.integers(0, 256, (10, 3072))], 1)
        (d / name).write_bytes(rec.astype(np.uint8).tobytes())
    return d


def _train_on(dataset: str, data_dir: Path, tmp: Path) -> list[str]:
    return [
        "train",
        "--model",
        "vanilla-cnn",
        "--width",
        "0.125",
        "--dataset",
        dataset,
        "--data-dir",
        str(data_dir),
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--out",
        str(tmp / "never"),
    ]


def test_G1_idx_wrong_magic_number(tmp_path: Path, capsys: Any) -> None:
    d = _fashion(tmp_path / "fm")
    p = d / "train-images-idx3-ubyte"
    p.write_bytes(b"\x00\x00\x0d\x03" + p.read_bytes()[4:])
    refused(capsys, _train_on("fashion-mnist", d, tmp_path), "bad magic number", keep=(d,))
    assert not (tmp_path / "never").exists()


def test_G2_idx_truncated(tmp_path: Path, capsys: Any) -> None:
    d = _fashion(tmp_path / "fm")
    p = d / "t10k-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-100])
    refused(
        capsys,
        _train_on("fashion-mnist", d, tmp_path),
        "does not match its header",
        "truncated",
        keep=(d,),
    )


def test_G3_idx_images_and_labels_disagree(tmp_path: Path, capsys: Any) -> None:
    d = _fashion(tmp_path / "fm")
    write_idx(d / "train-labels-idx1-ubyte", np.zeros(49), gz=False)
    refused(capsys, _train_on("fashion-mnist", d, tmp_path), "disagree", keep=(d,))


def test_G4_idx_corrupt_gzip(tmp_path: Path, capsys: Any) -> None:
    d = _fashion(tmp_path / "fm")
    (d / "train-images-idx3-ubyte").unlink()
    (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"x" * 100)[:20])
    refused(
        capsys, _train_on("fashion-mnist", d, tmp_path), "train-images-idx3-ubyte.gz", keep=(d,)
    )


def test_G5_idx_images_of_the_wrong_size(tmp_path: Path, capsys: Any) -> None:
    d = _fashion(tmp_path / "fm")
    write_idx(d / "train-images-idx3-ubyte", np.zeros((50, 32, 32)), gz=False)
    refused(
        capsys,
        _train_on("fashion-mnist", d, tmp_path),
        "holds 32x32 images, expected 28x28",
        keep=(d,),
    )


def test_G6_idx_labels_out_of_range(tmp_path: Path, capsys: Any) -> None:
    d = _fashion(tmp_path / "fm")
    write_idx(d / "train-labels-idx1-ubyte", np.full(50, 200), gz=False)
    refused(capsys, _train_on("fashion-mnist", d, tmp_path), "labels outside 0..9", keep=(d,))


def test_G7_idx_of_unexpected_rank(tmp_path: Path, capsys: Any) -> None:
    d = _fashion(tmp_path / "fm")
    write_idx(d / "train-images-idx3-ubyte", np.zeros((5, 28, 28, 3)), gz=False)
    refused(capsys, _train_on("fashion-mnist", d, tmp_path), "unexpected IDX rank 4", keep=(d,))


def test_G8_cifar_binary_truncated(tmp_path: Path, capsys: Any) -> None:
    d = _cifar_bin(tmp_path / "c10")
    p = d / "data_batch_3.bin"
    p.write_bytes(p.read_bytes()[:-7])
    refused(
        capsys,
        _train_on("cifar10", d, tmp_path),
        "not a multiple of the 3073-byte CIFAR record",
        keep=(d,),
    )


def test_G9_cifar_labels_of_another_data_set(tmp_path: Path, capsys: Any) -> None:
    d = _cifar_bin(tmp_path / "c10")
    p = d / "test_batch.bin"
    p.write_bytes(bytes([57]) + p.read_bytes()[1:])
    refused(capsys, _train_on("cifar10", d, tmp_path), "labels outside 0..9", keep=(d,))


@pytest.mark.parametrize(
    "obj,msg",
    [
        ([1, 2], "top level is list"),
        ({b"labels": [0]}, "lacks 'data'"),
        ({b"data": "pixels", b"labels": [0]}, "byte pixel values"),
        ({b"data": np.zeros((2, 3072)), b"labels": ["a", "b"]}, "not numeric"),
    ],
)
def test_G10_cifar_python_batch_of_the_wrong_shape_or_type(
    tmp_path: Path, capsys: Any, obj: Any, msg: str
) -> None:
    d = _cifar_py(tmp_path / "c10")
    pickle_dump(obj, d / "data_batch_4")
    refused(capsys, _train_on("cifar10", d, tmp_path), msg, keep=(d,))


def test_G11_cifar_python_batch_of_random_bytes(tmp_path: Path, capsys: Any) -> None:
    d = _cifar_py(tmp_path / "c10")
    (d / "test_batch").write_bytes(b"\x80\x02" + os.urandom(300))
    refused(capsys, _train_on("cifar10", d, tmp_path), "is not a CIFAR python batch", keep=(d,))


def test_G12_a_directory_where_a_data_file_should_be(tmp_path: Path, capsys: Any) -> None:
    d = _cifar_bin(tmp_path / "c10")
    (d / "test_batch.bin").unlink()
    (d / "test_batch.bin").mkdir()
    refused(capsys, _train_on("cifar10", d, tmp_path), "Is a directory", keep=(d,))


def test_G13_data_set_missing(tmp_path: Path, capsys: Any) -> None:
    refused(
        capsys,
        _train_on("cifar100", tmp_path / "nothing", tmp_path),
        "cifar100 not found",
        "--data-dir",
    )


def test_G14_idx_header_claiming_a_huge_shape(tmp_path: Path, capsys: Any) -> None:
    import struct
    import tracemalloc

    from tensorcut import data as tdata

    d = _fashion(tmp_path / "fm")
    dims = (2**32 - 1,) * 3  # 7.9e28 bytes: numpy's int64 product would overflow
    p = d / "train-images-idx3-ubyte"
    p.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">III", *dims) + p.read_bytes()[16:])
    claimed = 16 + (2**32 - 1) ** 3
    refused(
        capsys,
        _train_on("fashion-mnist", d, tmp_path),
        f"train-images-idx3-ubyte: size {p.stat().st_size:,} bytes does not match its header",
        f"({claimed:,} bytes)",
        keep=(d,),
    )
    # gzipped: 64 MB of zeros compress to ~64 kB; a header claiming 10^12 values is refused
    # from the header alone, before the body is decompressed into memory
    g = tmp_path / "huge-idx3-ubyte.gz"
    head = bytes([0, 0, 8, 3]) + struct.pack(">III", 10**6, 10**3, 10**3)
    g.write_bytes(gzip.compress(head + bytes(64 << 20), compresslevel=1))
    tracemalloc.start()
    try:
        with pytest.raises(TensorcutError, match=r"header claims shape \[1000000, 1000, 1000\]"):
            tdata.read_idx(g)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak


@pytest.mark.parametrize("what", ["zero items", "zero bytes"])
def test_G15_empty_idx_file_is_named(tmp_path: Path, capsys: Any, what: str) -> None:
    d = _fashion(tmp_path / "fm")
    if what == "zero items":
        write_idx(d / "train-images-idx3-ubyte", np.zeros((0, 28, 28)), gz=False)
        write_idx(d / "train-labels-idx1-ubyte", np.zeros(0), gz=False)
        needle = "train-images-idx3-ubyte is empty (its header says shape [0, 28, 28]"
    else:
        (d / "train-images-idx3-ubyte").write_bytes(b"")
        needle = "train-images-idx3-ubyte is empty (0 bytes)"
    err = refused(capsys, _train_on("fashion-mnist", d, tmp_path), needle, keep=(d,))
    assert "validation split" not in err
    assert not (tmp_path / "never").exists()


# =========================================================================== H. wrong channel count


def test_H1_evaluate_a_grey_model_on_colour_images(ck: Path, capsys: Any) -> None:
    refused(
        capsys,
        ["evaluate", str(ck), "--dataset", "synthetic"],
        "synthetic images have 3 channels but the model expects 1",
        keep=(ck,),
    )


def test_H2_finetune_on_a_data_set_with_other_channels(
    ck: Path, tmp_path: Path, capsys: Any
) -> None:
    refused(
        capsys,
        [
            "finetune",
            str(ck),
            "--dataset",
            "synthetic",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "ft"),
        ],
        "3 channels but the model expects 1",
        keep=(ck,),
    )
    assert not (tmp_path / "ft").exists()


def test_H3_analyze_on_a_data_set_with_other_channels(
    ck: Path, tmp_path: Path, capsys: Any
) -> None:
    refused(
        capsys,
        [
            "analyze",
            str(ck),
            "--dataset",
            "synthetic",
            "--no-progress",
            "--out",
            str(tmp_path / "r.sqlite"),
        ],
        "3 channels but the model expects 1",
        keep=(ck,),
    )


def test_H4_cifar_batch_of_grey_images(tmp_path: Path, capsys: Any) -> None:
    d = _cifar_py(tmp_path / "c10")
    pickle_dump({b"data": np.zeros((10, 1024), np.uint8), b"labels": [0] * 10}, d / "data_batch_2")
    refused(capsys, _train_on("cifar10", d, tmp_path), "expected (N, 3072)", keep=(d,))


# ====================================================================== I. options and output paths


TRAIN_CK = [
    "train",
    "--model",
    "vanilla-cnn",
    "--dataset",
    "digits",
    "--width",
    "0.125",
    "--subset",
    "256",
    "--batch-size",
    "64",
    "--lr",
    "0.002",
    "--device",
    "cpu",
]


@pytest.mark.parametrize(
    "flag,value,msg",
    [
        ("--batch-size", "0", "--batch-size must be >= 1, got 0"),
        ("--weight-decay", "-0.1", "--weight-decay must be >= 0, got -0.1"),
        ("--momentum", "-0.5", "--momentum must be in [0, 1), got -0.5"),
        ("--momentum", "1.5", "--momentum must be in [0, 1), got 1.5"),
        ("--seed", "-1", "--seed must be in [0, 2**32), got -1"),
        ("--width", "0", "--width must be > 0, got 0"),
        ("--width", "5000", "more than this machine's memory"),
        ("--lr", "0", "--lr must be > 0, got 0"),
        ("--val-fraction", "1", "--val-fraction must be in (0, 1), got 1"),
    ],
)
def test_I1_train_numbers_out_of_range(
    tmp_path: Path, capsys: Any, flag: str, value: str, msg: str
) -> None:
    out = tmp_path / "t"
    refused(capsys, [*TRAIN_CK, flag, value, "--out", str(out)], msg)
    assert not out.exists()


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
        (["--momentum", "-1"], "--momentum must be in [0, 1)"),
        (["--distill-alpha", "2"], "--distill-alpha must be in [0, 1]"),
    ],
)
def test_I2_finetune_numbers_out_of_range(
    compressed: Path, tmp_path: Path, capsys: Any, argv: list[str], msg: str
) -> None:
    refused(
        capsys,
        ["finetune", str(compressed), *argv, "--out", str(tmp_path / "ft")],
        msg,
        keep=(compressed,),
    )
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--width", "1e9"], "cannot build vgg11"),
        (["--width", "-1"], "--width must be > 0"),
        (["--input-size", "200000"], "use a smaller --input-size"),
        (["--input-size", "0"], "--input-size must be >= 1"),
    ],
)
def test_I3_inspect_a_model_that_cannot_be_allocated(
    capsys: Any, argv: list[str], msg: str
) -> None:
    refused(capsys, ["inspect", "vgg11", *argv], msg)


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--optimizer", "sgd"], "--optimizer adam -> sgd"),
        (["--optimizer", "adam", "--lr", "0.1"], "--lr 0.002 -> 0.1"),
    ],
)
def test_I4_train_resume_with_another_recipe(
    ck: Path, capsys: Any, argv: list[str], msg: str
) -> None:
    # was: KeyError 'momentum' (another optimizer), or training silently on at the old rate (another
    # --lr)
    refused(
        capsys,
        [*TRAIN_CK, *argv, "--resume", "--out", str(ck)],
        "--resume continues",
        msg,
        "drop those options to resume",
        keep=(ck,),
    )


def _a_file(tmp_path: Path) -> Path:
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    return f


def test_I5_analyze_plots_or_spill_dir_is_a_file(ck: Path, tmp_path: Path, capsys: Any) -> None:
    f = _a_file(tmp_path)
    for flag in ("--plots", "--spill-dir"):
        refused(
            capsys,
            [
                "analyze",
                str(ck),
                flag,
                str(f),
                "--no-progress",
                "--out",
                str(tmp_path / "r.sqlite"),
            ],
            f"{f} is a file; give a directory path",
            keep=(f, ck),
        )
    assert not (tmp_path / "r.sqlite").exists()


def test_I6_plot_out_is_a_file(ck: Path, tmp_path: Path, capsys: Any) -> None:
    db = tmp_path / "r.sqlite"
    assert (
        main(
            [
                "analyze",
                str(ck),
                "--subset",
                "40",
                "--bipartitions",
                "OUT",
                "--keep",
                "1",
                "--layers",
                "conv2",
                "--no-progress",
                "--out",
                str(db),
            ]
        )
        == 0
    )
    f = _a_file(tmp_path)
    refused(
        capsys,
        ["plot", str(db), "--out", str(f)],
        f"{f} is a file; give a directory path",
        keep=(f,),
    )


@pytest.mark.parametrize("verb", ["run", "demo"])
def test_I7_run_or_demo_out_is_a_file(ck: Path, tmp_path: Path, capsys: Any, verb: str) -> None:
    f = _a_file(tmp_path)
    argv = (
        ["run", str(ck), "--target-ratio", "3", "--out", str(f)]
        if verb == "run"
        else ["demo", "--out", str(f)]
    )
    refused(capsys, argv, f"{f} is a file; give a directory path", keep=(f,))


@pytest.mark.parametrize(
    "content,msg",
    [
        (b"[1, 2, 3]", "not a run ledger: list"),
        (b"\xff\xfe\x00{", "is corrupt"),
        (b'{"stages": [1]}', "not a run ledger"),
    ],
)
def test_I8_run_json_that_is_not_a_ledger(
    ck: Path, tmp_path: Path, capsys: Any, content: bytes, msg: str
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_bytes(content)
    refused(
        capsys,
        ["run", str(ck), "--target-ratio", "3", "--out", str(out)],
        "run.json",
        msg,
        keep=(out,),
    )


def test_I9_run_out_that_is_not_utf8(ck: Path, tmp_path: Path, capsys: Any) -> None:
    out = Path(os.fsdecode(bytes(tmp_path) + b"/r\xff"))
    refused(
        capsys,
        ["run", str(ck), "--target-ratio", "3", "--out", str(out)],
        "is not a valid UTF-8 path",
    )
    assert os.listdir(tmp_path) == ["ck"]  # refused at the start: nothing written


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--finetune-lr", "0"], "--finetune-lr must be > 0, got 0"),
        (["--finetune-epochs", "-1"], "--finetune-epochs must be >= 0"),
        (["--subset", "0"], "--subset must be >= 1"),
    ],
)
def test_I10_run_options_are_checked_before_any_stage(
    ck: Path, tmp_path: Path, capsys: Any, argv: list[str], msg: str
) -> None:
    out = tmp_path / "run"
    refused(
        capsys, ["run", str(ck), "--target-ratio", "3", *argv, "--out", str(out)], msg, keep=(ck,)
    )
    assert not out.exists()


def test_I11_run_training_options_are_checked_before_any_stage(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "run"
    refused(
        capsys,
        [
            "run",
            "--model",
            "vgg11",
            "--dataset",
            "digits",
            "--width",
            "5000",
            "--target-ratio",
            "3",
            "--out",
            str(out),
        ],
        "more than this machine's memory",
    )
    refused(
        capsys,
        [
            "run",
            "--model",
            "vgg11",
            "--dataset",
            "digits",
            "--epochs",
            "-1",
            "--target-ratio",
            "3",
            "--out",
            str(out),
        ],
        "--epochs must be >= 0",
    )
    assert not out.exists()


@pytest.mark.parametrize("keep", [",", "OUT=", "5:1"])
def test_I12_analyze_with_an_empty_keep_list(
    ck: Path, tmp_path: Path, capsys: Any, keep: str
) -> None:
    refused(
        capsys,
        ["analyze", str(ck), "--keep", keep, "--no-progress", "--out", str(tmp_path / "r.sqlite")],
        "gives no keep values",
        keep=(ck,),
    )
    assert not (tmp_path / "r.sqlite").exists()


def test_I13_analyze_csv_over_another_file(ck: Path, tmp_path: Path, capsys: Any) -> None:
    refused(
        capsys,
        [
            "analyze",
            str(ck),
            "--csv",
            str(ck / "meta.json"),
            "--no-progress",
            "--out",
            str(tmp_path / "r.sqlite"),
        ],
        "is not a CSV export of `tensorcut analyze`",
        "--force",
        keep=(ck,),
    )


@pytest.mark.parametrize(
    "sens,msg",
    [
        ({"conv2": -3.0}, "sensitivities must be finite and >= 0, got conv2: -3"),
        ({"layer1.0.conv1": 2.0}, "names 1 layer(s) this model lacks (e.g. 'layer1.0.conv1')"),
    ],
)
def test_I14_negative_or_foreign_sensitivity_file(
    ck: Path, tmp_path: Path, capsys: Any, sens: dict[str, float], msg: str
) -> None:
    f = tmp_path / "sens.json"
    f.write_text(json.dumps(sens))
    out = tmp_path / "o"
    refused(
        capsys,
        ["compress", str(ck), "--budget", "0.5", "--sensitivity", str(f), "--out", str(out)],
        msg,
        keep=(ck, f),
    )
    assert not out.exists()


# ============================================================================ J. models from Python


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten()
    ).eval()


def _jit(model: nn.Module, how: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if how == "script":
            return torch.jit.script(model)
        return torch.jit.trace(model, torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize("how", ["script", "trace"])
def test_J1_torchscript_model_in_summary(how: str) -> None:
    import tensorcut

    scripted = _jit(_small_cnn(), how)
    with pytest.raises(TensorcutError, match="the model is TorchScript") as e:
        tensorcut.inspect(scripted, (3, 8, 8))
    assert "pass the eager nn.Module" in str(e.value) and "no Conv2d" not in str(e.value)
    assert len(tensorcut.inspect(_small_cnn(), (3, 8, 8)).rows) == 2  # the eager one is listed


def test_J2_model_holding_a_torchscript_part_with_convolutions() -> None:
    import tensorcut

    outer = nn.Sequential(nn.Identity(), _jit(_small_cnn(), "script"))
    with pytest.raises(TensorcutError, match=r"submodule '1' is TorchScript"):
        tensorcut.inspect(outer, (3, 8, 8))
    # a scripted part without convolutions (an activation) hides nothing: accepted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        relu = torch.jit.script(nn.ReLU())
    ok = nn.Sequential(nn.Conv2d(3, 4, 3), relu, nn.Flatten())
    assert [r.name for r in tensorcut.inspect(ok, (3, 8, 8)).rows] == ["0"]


@pytest.mark.parametrize("how", ["script", "trace"])
def test_J3_torchscript_model_in_plan_and_compress(how: str) -> None:
    from tensorcut.compression import compress, plan

    scripted = _jit(_small_cnn(), how)
    for fn in (plan, compress):
        with pytest.raises(TensorcutError, match="the model is TorchScript"):
            fn(scripted, method="tucker2", ratio=0.5, input_shape=(3, 8, 8))
