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
        from tensorcut.checkpoint import CheckpointMeta

        m = {"loss": 1.0, "top1": 0.5, "top5": 1.0, "n": 4}
        meta = {"model": {"name": "vanilla-cnn"}, "finetune_history": [{}]}
        return SimpleNamespace(
            info=CheckpointMeta.from_meta(
                dict(meta, metrics={"test_before_finetune": m, "test": m})
            )
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


def test_allocation_flag_is_derived_from_compress_config(capsys) -> None:
    from tensorcut.compression.config import ALLOCATIONS

    a = _parse("compress", "ck", "--out", "o")
    assert (a.allocation, a.drops, a.match_epochs, a.match_lr) == (None, None, 0, 1e-3)
    assert _parse("compress", "ck", "--out", "o", "--allocation", "measured").allocation == (
        "measured"
    )
    with pytest.raises(SystemExit):
        main(["compress", "ck", "--out", "o", "--allocation", "greedy"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("tensorcut compress: error: argument --allocation: invalid choice")
    assert all(c in err for c in ALLOCATIONS)


def test_allocation_measured_needs_budget_before_any_work(tmp_path: Path, capsys) -> None:
    rc = main(["compress", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--keep", "0.3",
               "--allocation", "measured"])  # fmt: skip
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "tensorcut compress: error: --allocation measured splits a --budget by the layers' "
        "measured accuracy costs; give --budget too (with --budget-kind macs or params)"
    ]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "is not a file"),
        ("{not json", "cannot read drop table"),
        ('{"layers": []}', "not a tensorcut drop table"),
        ('{"format": "tensorcut-drops", "layers": [{"name": 3}]}', "malformed drop table"),
    ],
)
def test_a_bad_drops_file_is_one_line_naming_it(
    tiny_checkpoint: Path, tmp_path: Path, capsys, content: str | None, needle: str
) -> None:
    bad = tmp_path / "drops.json"
    if content is not None:
        bad.write_text(content)
    argv = ["compress", str(tiny_checkpoint), "--out", str(tmp_path / "o"), "--budget", "0.5"]
    argv += ["--allocation", "measured", "--drops", str(bad)]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tensorcut compress: error: "), err
    assert str(bad) in err[0] and needle in err[0], err[0]
    assert not (tmp_path / "o").exists()


def test_drops_of_another_model_are_refused_naming_the_file(
    tiny_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    import json

    from tensorcut.compression.measured import DropTable, LayerDrops

    other = DropTable(
        layers=[LayerDrops("features.99", 10, 10, [])],
        baseline_top1=0.5,
        baseline_loss=1.0,
        images=8,
        input_shape=[1, 8, 8],
        methods=["tucker2"],
    )
    path = tmp_path / "other.json"
    path.write_text(json.dumps(other.to_dict()))
    argv = ["compress", str(tiny_checkpoint), "--out", str(tmp_path / "o"), "--budget", "0.5"]
    assert main([*argv, "--allocation", "measured", "--drops", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"tensorcut compress: error: --drops {path} names 1 layer(s) this model lacks (e.g. "
        "'features.99'); it was measured on another model, measure this one (drop --drops)"
    )


def test_compress_measured_and_matching_from_the_command_line(
    tiny_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    """--allocation measured measures on the --bn-images images, says where the table is and
    reuses it with --drops; --match-epochs prints and records the matching."""
    import json

    out = tmp_path / "a"
    argv = ["compress", str(tiny_checkpoint), "--budget", "0.5", "--budget-kind", "macs"]
    argv += ["--allocation", "measured", "--bn-images", "64", "--match-epochs", "1"]
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"measured drops: {out / 'drops.json'} (reuse with --drops {out / 'drops.json'})" in (
        text
    )
    assert "layer matching: 1 epoch(s) on 64 calibration images (1 Adam steps, lr 0.001)" in text
    assert "BatchNorm statistics: re-estimated on 64 training images" in text
    assert main([*argv, "--out", str(tmp_path / "b"), "--drops", str(out / "drops.json"),
                 "--json"]) == 0  # fmt: skip
    doc = json.loads(capsys.readouterr().out)
    assert doc["config"]["allocation"] == "measured" and "drops" not in doc
    assert doc["layer_matching"]["epochs"] == 1 and doc["bn_recalibration"]["images"] == 64
    assert any(layer.get("measured") for layer in doc["layers"])
