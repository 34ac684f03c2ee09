"""The ``compress``, ``finetune`` and ``export`` verbs' parser layer
(``tensorcut/cli/workflow.py``): flags,
defaults, the rank grammar on the command line, one-line errors with status 2, and the finetune
recipe with explicit flags applied. The pipeline itself is tested in test_workflow.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tensorcut.cli import build_parser, main
from tensorcut.cli.workflow import finetune_config
from tensorcut.layers import get_method, list_methods
from tensorcut.pipeline.workflow import RECIPES


def _parse(*argv: str) -> Any:
    return build_parser().parse_args(list(argv))


def test_compress_defaults() -> None:
    a = _parse("compress", "ck", "--out", "o")
    assert (a.method, a.rank, a.keep, a.eps, a.energy, a.budget) == (
        "tucker2", None, None, None, None, None,
    )  # fmt: skip
    assert (a.budget_kind, a.align, a.bn_images, a.evaluate, a.layers) == (
        "params", 1, None, None, None,
    )  # fmt: skip
    assert not (a.vbmf or a.latency or a.force or a.json)


@pytest.mark.parametrize("text,rank", [("4", 4), ("4,3", (4, 3)), ("4x3x2", (4, 3, 2))])
def test_rank_flag_grammar(text: str, rank: Any) -> None:
    assert _parse("compress", "ck", "--out", "o", "--rank", text).rank == rank


def test_every_method_option_has_a_flag() -> None:
    """Every field of every method's Options is reachable as --<method>-<field>."""
    from tensorcut.cli import verb_parsers

    flags = {f for a in verb_parsers(build_parser())["compress"]._actions for f in a.option_strings}
    for m in list_methods():
        for f in get_method(m).Options.__dataclass_fields__:
            assert f"--{m}-{f.replace('_', '-')}" in flags


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--rank", "a"], "argument --rank: rank must be an int or comma-separated ints, got 'a'"),
        (["--rank", ","], "argument --rank: empty rank"),
        (["--keep", "0.3", "--eps", "0.1"], "argument --eps: not allowed with argument --keep"),
        (
            ["--method", "svd3"],
            "argument --method: invalid choice: 'svd3' (choose from ",
        ),
        (
            ["--budget-kind", "latency"],
            "argument --budget-kind: invalid choice: 'latency' (choose from ",
        ),
    ],
)
def test_compress_usage_errors(argv: list[str], msg: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["compress", "ck", "--out", "o", *argv])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"tensorcut compress: error: {msg}")  # choices are quoted on 3.12+


def test_sensitivity_needs_budget_before_any_work(tmp_path: Path, capsys) -> None:
    rc = main(["compress", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--keep", "0.3",
               "--sensitivity", "s.json"])  # fmt: skip
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "tensorcut compress: error: --sensitivity guides the --budget allocation; give --budget too"
    ]
    assert not (tmp_path / "o").exists()


def test_finetune_recipe_with_explicit_flags() -> None:
    a = _parse("finetune", "ck", "--out", "o")
    assert a.recipe == "thesis" and a.batch_size == 128 and a.device == "auto"
    assert finetune_config(a) == RECIPES["thesis"]
    a = _parse(
        "finetune", "ck", "--out", "o", "--recipe", "rsdtr", "--lr", "0.05", "--patience", "0"
    )
    cfg = finetune_config(a)
    assert (cfg.optimizer, cfg.lr, cfg.patience, cfg.epochs) == ("sgd", 0.05, None, 160)
    assert RECIPES["rsdtr"].lr == 0.01  # the recipe itself is untouched
    a = _parse("finetune", "ck", "--out", "o", "--distill-from", "t", "--amp")
    cfg = finetune_config(a)
    # the recipe's 0, which finetune_checkpoint takes as 0.5 when there is a teacher
    assert cfg.distill_alpha == 0.0 and cfg.amp
    a = _parse("finetune", "ck", "--out", "o", "--distill-from", "t", "--distill-alpha", "0.3")
    assert finetune_config(a).distill_alpha == 0.3


def test_finetune_flags_reach_the_pipeline(monkeypatch, tmp_path: Path, capsys) -> None:
    import tensorcut.pipeline.workflow as wf

    seen: dict[str, Any] = {}

    def fake(checkpoint: Any, out: Any, **kw: Any) -> Any:
        seen.update(checkpoint=checkpoint, out=out, **kw)
        m = {"loss": 1.0, "top1": 0.5, "top5": 1.0, "n": 4}
        return SimpleNamespace(
            meta={"metrics": {"test_before_finetune": m, "test": m}, "finetune_history": [{}]}
        )

    monkeypatch.setattr(wf, "finetune_checkpoint", fake)
    out = str(tmp_path / "ft")
    argv = ["finetune", "ck", "--out", out, "--recipe", "rsdtr", "--distill-from", "t"]
    argv += ["--distill-temperature", "2", "--grad-clip", "1.5", "--seed", "3", "--no-amp"]
    assert main(argv) == 0
    cfg = seen["config"]
    assert (cfg.distill_temperature, cfg.grad_clip, cfg.seed, cfg.amp) == (2.0, 1.5, 3, False)
    assert (cfg.optimizer, cfg.epochs, seen["distill_from"], seen["out"]) == ("sgd", 160, "t", out)
    assert capsys.readouterr().out.splitlines()[-1] == f"checkpoint: {out}"


def test_finetune_refusals(tmp_path: Path, capsys) -> None:
    a = _parse("finetune", "ck", "--out", "o", "--patience", "-1")
    with pytest.raises(Exception) as e:
        finetune_config(a)
    assert str(e.value) == "--patience must be >= 0 (0 turns early stopping off), got -1"
    assert main(["finetune", "ck"]) == 2
    assert capsys.readouterr().err.strip() == (
        "tensorcut finetune: error: say where the fine-tuned model goes: --out NEW_DIR, or "
        "--in-place to replace ck (its weights are kept until the new ones are written)"
    )
    with pytest.raises(SystemExit):
        main(["finetune", "ck", "--out", "o", "--in-place"])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "tensorcut finetune: error: argument --in-place: not allowed with argument --out"
    )


def test_export_flags(capsys) -> None:
    a = _parse("export", "ck", "--format", "onnx")
    assert (a.format, a.out, a.force, a.json) == ("onnx", None, False, False)
    with pytest.raises(SystemExit) as e:
        main(["export", "ck"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "tensorcut export: error: the following arguments are required: --format"
    )
