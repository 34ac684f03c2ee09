"""Data-parallel training on PyTorch's engine: 2 CPU processes (gloo on 127.0.0.1) against one
process.

The equivalence check uses a model without BatchNorm or dropout: under DDP each rank
normalises only its own share of the batch (SyncBatchNorm is GPU-only in PyTorch), so
a BatchNorm model is *not* expected to match a single process step for step. With a
global batch of 16 split 8 + 8 by the DistributedSampler, DDP's averaged gradient is the
gradient of the single-process batch of 16, summed in another order, so losses and weights
agree to float rounding: within ``TOL``, derived from float32 summation
(ddp_util.sum_order_tolerance), never a figure recorded on one CPU. Top-1 counts are argmaxes, which
may flip on a near-tie of two logits; they are compared on the final model wherever no near-tie
exists. The activation is smooth (SiLU): a ReLU's kink is such a tie at every position (see
tests/train/test_tdlrt_ddp.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from ddp_util import (
    clear_winners,
    join_as_rank,
    rel_diff,
    spawn_ranks,
    spy_writes,
    sum_order_tolerance,
    torchrun,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tensorcut import distributed as tdist
from tensorcut.errors import TensorcutError
from tensorcut.train.config import FitConfig
from tensorcut.train.loop import _wrap, fit, resolve_device


def _net() -> nn.Module:
    torch.manual_seed(123)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 5),
    )


def _data() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 3, 8, 8, generator=g)
    y = torch.randint(0, 5, (64,), generator=g)
    tr = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    va = DataLoader(
        TensorDataset(x[:27], y[:27]), batch_size=10
    )  # 27: ranks hold 14 and 13 samples
    return tr, va


CFG = dict(epochs=2, optimizer="sgd", lr=0.2, momentum=0.9, scheduler="cosine", seed=3)
# 4.9e-4; the longest reduction whose order differs: the conv's weight gradient, batch 16 x 8 x 8
# positions
TOL = sum_order_tolerance(16 * 8 * 8, CFG["epochs"] * 64 // 16)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank: join via torchrun-style environment, fit, report weights, history, file writes."""
    join_as_rank(rank, world, port)
    writes = spy_writes()
    net = _net()
    tr, va = _data()
    meta = {"model": {"name": "custom", "kwargs": {}}}
    try:
        hist = fit(
            net,
            tr,
            va,
            FitConfig(**CFG),
            device="cpu",
            out_dir=Path(out) / "ck",
            meta=meta,
            progress=False,
        )
        torch.save(
            {k: v.clone() for k, v in net.state_dict().items()}, Path(out) / f"rank{rank}.pt"
        )
        (Path(out) / f"rank{rank}.json").write_text(json.dumps({"history": hist, "writes": writes}))
    except BaseException:
        tdist.cleanup(together=False)  # a peer may never reach a barrier
        raise
    tdist.cleanup()  # together, at a barrier
    tdist.exit_process(0)  # past gloo's teardown race, as `python -m tensorcut` does


def test_two_cpu_ranks_match_one_process_on_the_same_global_batch(
    tmp_path: Path, one_thread: None
) -> None:
    """``one_thread``: the 1-process reference at the ranks' thread count (same reduction order)."""
    assert spawn_ranks(_worker, tmp_path) == [0, 0]

    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "ranks disagree after DDP training"
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert (
        r0["history"][-1]["val_loss"] == r1["history"][-1]["val_loss"]
    )  # reduced metrics: identical on all ranks
    assert (
        r1["writes"] == [] and "train_state.pt" in r0["writes"]
    )  # rank 0 alone writes, atomically

    single = _net()
    tr, va = _data()
    hist = fit(single, tr, va, FitConfig(**CFG), device="cpu", progress=False, distributed=False)
    for a, b in zip(hist, r0["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=TOL)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=TOL)
    for k, v in single.state_dict().items():
        assert rel_diff(v, w0[k]) <= TOL, k
    twin = _net()
    twin.load_state_dict(w0)
    x = va.dataset.tensors[0]
    with torch.no_grad():
        out, out_ddp = single.eval()(x), twin.eval()(x)
    clear = clear_winners(out, TOL)
    assert torch.equal(out.argmax(1)[clear], out_ddp.argmax(1)[clear])
    if bool(clear.all()):
        assert hist[-1]["val_top1"] == r0["history"][-1]["val_top1"]
    assert r0["history"][-1]["val_loss"] != pytest.approx(hist[0]["val_loss"])  # it did train


def test_torchrun_cli_train_two_processes(tmp_path: Path) -> None:
    """The documented `torchrun --nproc_per_node=2 -m tensorcut train ...` on CPU (gloo)."""
    out = tmp_path / "ck"
    r = torchrun(
        [
            "train",
            "--model",
            "vanilla-cnn",
            "--width",
            "0.125",
            "--dataset",
            "synthetic",
            "--subset",
            "96",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    reports = re.findall(r"test: loss [^(]*\(n=\d+\)", r.stdout)
    assert len(reports) == 1, r.stdout  # rank 0 alone prints the (all-reduced) metrics
    from tensorcut.checkpoint import io as tio

    ck = tio.load_checkpoint(out)
    assert ck.meta["epoch"] == 1 and ck.meta["metrics"]["test"]["n"] == 200
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json",
        "model.safetensors",
        "train_state.pt",
    ]


# ---------------------------------------------------------------------------- single-process checks


def test_backend_is_gloo_on_cpu_and_nccl_on_cuda() -> None:
    assert tdist.backend_for("cpu") == "gloo"
    assert (
        tdist.backend_for("cuda") == "nccl" and tdist.backend_for(torch.device("cuda", 1)) == "nccl"
    )


def test_cuda_under_torchrun_uses_nccl_and_the_local_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path, checked without a GPU: the right backend, device and rank reach PyTorch."""
    calls: dict[str, Any] = {}
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.setdefault("set_device", i))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(
        torch.distributed,
        "init_process_group",
        lambda backend, **kw: calls.update(backend=backend, **kw),
    )
    assert resolve_device("cuda") == torch.device("cuda")
    ctx = tdist.init(resolve_device("auto"))
    monkeypatch.setitem(tdist._state, "owned", False)
    assert calls["backend"] == "nccl" and calls["set_device"] == 1
    assert calls["rank"] == 3 and calls["world_size"] == 4 and calls["init_method"] == "env://"
    assert ctx.device == torch.device("cuda", 1) and ctx.rank == 3 and not ctx.is_main

    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(TensorcutError, match="LOCAL_RANK=2 but this machine has 2 CUDA GPU"):
        tdist.init("cuda")


def test_cpu_under_torchrun_uses_gloo(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict[str, Any] = {}
    for k, v in dict(
        WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1"
    ).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(
        torch.distributed, "init_process_group", lambda backend, **kw: calls.update(backend=backend)
    )
    ctx = tdist.init("cpu")
    monkeypatch.setitem(tdist._state, "owned", False)
    assert (
        calls["backend"] == "gloo"
        and ctx.device == torch.device("cpu")
        and ctx.is_main
        and ctx.enabled
    )


def test_plain_run_has_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    ctx = tdist.init("cpu")
    assert not ctx.enabled and ctx.is_main and tdist.is_main_process()
    assert tdist.all_reduce_sum([1.5, 2]) == [1.5, 2.0]
    assert tdist.run_on_main(lambda: 7) == 7


def test_world_without_master_address_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(
        TensorcutError, match="MASTER_ADDR, MASTER_PORT is not set; launch with `torchrun"
    ):
        tdist.init("cpu")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(TensorcutError, match="inconsistent torchrun environment"):
        tdist.init("cpu")


def test_global_batch_must_split_evenly() -> None:
    tr, _ = _data()
    with pytest.raises(
        TensorcutError, match="batch size 16 is the global batch and must be divisible by the 3"
    ):
        tdist.shard_train_loader(tr, tdist.DistContext(rank=0, world_size=3))
    two = tdist.shard_train_loader(tr, tdist.DistContext(rank=1, world_size=2))
    assert two.batch_size == 8 and len(two) == 4


def test_shard_sampler_covers_every_sample_once() -> None:
    for n in (0, 1, 7, 10):
        for world in (1, 2, 3, 4):
            got = sorted(i for r in range(world) for i in tdist.ShardSampler(n, r, world))
            assert got == list(range(n))
            assert sum(len(tdist.ShardSampler(n, r, world)) for r in range(world)) == n


def test_sync_batchnorm_on_cpu_is_refused_with_a_reason() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(TensorcutError, match="sync_batchnorm needs CUDA"):
        _wrap(
            net,
            FitConfig(sync_batchnorm=True),
            tdist.DistContext(world_size=2),
            torch.device("cpu"),
        )


def test_mixed_precision_option_trains_on_cpu() -> None:
    net = _net()
    tr, va = _data()
    hist = fit(
        net,
        tr,
        va,
        FitConfig(epochs=1, lr=0.05, optimizer="sgd", scheduler="none", amp=True),
        device="cpu",
        progress=False,
    )
    assert hist[0]["train_loss"] > 0 and hist[0]["val_loss"] == hist[0]["val_loss"]
    assert next(net.parameters()).dtype == torch.float32


# ----------------------------------------------------------------------------- sharded sweeps


SWEEP_ARGS = [
    "--subset",
    "40",
    "--bipartitions",
    "OUT",
    "IN",
    "--keep",
    "1,2",
    "--cp-ranks",
    "2",
    "--all-layers",
    "--all-layer-fractions",
    "0.5",
    "--no-progress",
]


def _rows(path: Path) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    """Key -> measured values of every row; also checks that no key occurs twice."""
    import sqlite3

    con = sqlite3.connect(path)
    try:
        cols = "fingerprint, data, split, kind, method, layer, bipartition, keep, epoch"
        rows = con.execute(f"SELECT {cols}, top1, loss, norm_loss_pct FROM results").fetchall()
    finally:
        con.close()
    keys = [r[:9] for r in rows]
    assert len(keys) == len(set(keys)), "a configuration was recorded twice"
    return {r[:9]: r[9:] for r in rows}


def _same(
    a: dict[tuple[Any, ...], tuple[Any, ...]], b: dict[tuple[Any, ...], tuple[Any, ...]]
) -> None:
    assert set(a) == set(b)
    for k in a:
        for x, y in zip(a[k], b[k], strict=True):
            assert (x is None and y is None) or x == pytest.approx(y, rel=1e-6, abs=1e-9), k


def test_units_are_dealt_once_each_and_balanced(tiny_checkpoint: Path) -> None:
    from tensorcut.checkpoint import io as tio
    from tensorcut.study.shard import assign, plan_units

    model = tio.load(tiny_checkpoint)
    units = plan_units(
        model, bipartitions=["OUT", "IN", "OUT-IN"], cp_ranks=[2, 4], all_layers=True, world_size=4
    )
    for world in (1, 2, 3, 4, 40):
        shards = assign(units, world)
        dealt = [u for s in shards for u in s]
        assert sorted(map(id, dealt)) == sorted(map(id, units)) and len(shards) == world
        assert shards == assign(units, world)  # every rank computes the same deal
    loads = [sum(u.cost for u in s) for s in assign(units, 2)]
    assert max(loads) <= sum(loads) / 2 + max(u.cost for u in units)


def test_sharded_sweep_in_process_gives_the_rows_of_one_run(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """Two shards (then the finishing pass) record exactly an unsharded sweep's rows and values."""
    from tensorcut import data as tdata
    from tensorcut.checkpoint import io as tio
    from tensorcut.study.shard import analyze_sharded
    from tensorcut.study.store import ResultsStore
    from tensorcut.study.sweep import analyze

    model = tio.load(tiny_checkpoint)
    loaders = {"val": tdata.make_loader(tdata.load_dataset("digits", "val", subset=40), 64)}
    kw = dict(
        bipartitions=["OUT", "IN"],
        keep=["1,2", "conv3:OUT=3"],
        cp_ranks=[2],
        all_layers=True,
        all_layer_fractions=[0.5],
        progress=False,
        csv=False,
    )
    ref = analyze(model, loaders, tmp_path / "one.sqlite", **kw)
    parts = [
        analyze_sharded(model, loaders, tmp_path / "sharded.sqlite", rank=r, world_size=2, **kw)
        for r in (1, 0)
    ]
    assert not any(p.final for p in parts) and sum(p.evaluated for p in parts) >= ref.evaluated
    fin = analyze(model, loaders, tmp_path / "sharded.sqlite", **kw)
    assert fin.evaluated == 0 and fin.skipped == ref.evaluated  # the shards left nothing to do
    _same(_rows(tmp_path / "one.sqlite"), _rows(tmp_path / "sharded.sqlite"))
    with ResultsStore(tmp_path / "one.sqlite") as a, ResultsStore(tmp_path / "sharded.sqlite") as b:
        key = f"model:{ref.fingerprint}"
        assert a.get_meta(key) == b.get_meta(
            key
        )  # the finishing pass restores the whole-study metadata
        assert len(a.spectra()) == len(b.spectra())


def test_torchrun_analyze_two_ranks_with_recovery(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """`torchrun --nproc_per_node=2 -m tensorcut analyze ...`: the rows of one process.

    The recovery is retrained by DDP.
    """
    from tensorcut.cli import main

    args = [str(tiny_checkpoint), *SWEEP_ARGS, "--recover", "1", "--recover-subset", "64"]
    assert main(["analyze", *args, "--out", str(tmp_path / "one.sqlite")]) == 0
    r = torchrun(["analyze", *args, "--out", str(tmp_path / "two.sqlite")], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (
        "shard 2/2:" in r.stdout and r.stdout.count("baseline val:") == 1
    )  # rank 0 alone reports the study
    one, two = _rows(tmp_path / "one.sqlite"), _rows(tmp_path / "two.sqlite")
    assert set(one) == set(two) and any(k[3] == "recovery" for k in two)
    _same(
        {k: v for k, v in one.items() if k[3] != "recovery"},
        {k: v for k, v in two.items() if k[3] != "recovery"},
    )
    assert (tmp_path / "two.csv").read_text().count("\n") == len(two) + 1


def test_independent_workers_run_recovery_locally(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RANK/WORLD_SIZE without MASTER_ADDR: no process group.

    The worker that gets the recovery unit trains alone.
    """
    from tensorcut import data as tdata
    from tensorcut.checkpoint import io as tio
    from tensorcut.study.shard import analyze_sharded
    from tensorcut.study.store import ResultsStore

    model = tio.load(tiny_checkpoint)
    loaders = {"val": tdata.make_loader(tdata.load_dataset("digits", "val", subset=30), 64)}
    train = tdata.make_loader(tdata.load_dataset("digits", "train", subset=64), 32, shuffle=True)
    kw = dict(
        bipartitions=["OUT"],
        keep=["1"],
        recover_epochs=1,
        train_loader=train,
        progress=False,
        csv=False,
        layers=["conv2", "conv3"],
    )
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for r in (0, 1):
        monkeypatch.setenv("RANK", str(r))
        rep = analyze_sharded(model, loaders, tmp_path / "r.sqlite", **kw)
        assert not rep.final and rep.world_size == 2
    with ResultsStore(tmp_path / "r.sqlite") as s:
        kinds = sorted({row["kind"] for row in s.rows()})
        assert kinds == ["baseline", "recovery", "single"]


@pytest.mark.parametrize("together, calls", [(True, ["barrier", "destroy"]), (False, ["destroy"])])
def test_cleanup_leaves_at_a_barrier_unless_on_an_error_path(
    monkeypatch: pytest.MonkeyPatch, together: bool, calls: list[str]
) -> None:
    """A rank that tore down its gloo pairs while its peer was still working made the peer abort
    (exit -6 in CI); a normal exit waits for every rank first, an error path must not wait."""
    seen: list[str] = []
    monkeypatch.setattr(tdist, "_dist_ready", lambda: True)
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: seen.append("barrier"))
    monkeypatch.setattr(
        torch.distributed, "destroy_process_group", lambda *a, **k: seen.append("destroy")
    )
    monkeypatch.setitem(tdist._state, "owned", True)
    tdist.cleanup(together=together)
    assert seen == calls
    assert tdist._state["owned"] is False
    tdist.cleanup()  # a second call does nothing
    assert seen == calls


@pytest.mark.parametrize("joined, code", [(True, 3), (False, 4)])
def test_exit_process_keeps_the_code_and_flushes_output(joined: bool, code: int) -> None:
    """After joining a group the process leaves with os._exit (no interpreter teardown, where
    gloo's threads aborted finished torchrun runs with exit -6), still flushing its streams."""
    import subprocess
    import sys

    prog = (
        "import sys; from tensorcut import distributed as d\n"
        f"d._state['joined'] = {joined}\n"
        "print('out', end=''); print('err', end='', file=sys.stderr)\n"
        "import atexit; atexit.register(lambda: print('ATEXIT', end=''))\n"
        f"d.exit_process({code})\n"
    )
    r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=60)
    assert r.returncode == code
    assert r.stderr == "err"
    # os._exit skips atexit handlers (the teardown); SystemExit runs them
    assert r.stdout == ("out" if joined else "outATEXIT")
