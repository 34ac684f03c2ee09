"""TDLRT under several processes: 2 CPU ranks (gloo on 127.0.0.1) against one process.

The equivalence check uses a model without BatchNorm or dropout. Under several processes
each rank normalises only its own share of the batch (as under DDP without SyncBatchNorm),
so a BatchNorm model is not expected to match one process step for step; for it the test
checks only that the ranks agree (running statistics are averaged over the ranks every
step). A global batch of 16 is split 8 + 8 by the DistributedSampler; the rank-averaged
gradients are then those of the single-process batch of 16, so losses, ranks and weights
agree to float rounding.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ddp_util import join_as_rank, spawn_ranks, spy_writes, torchrun
from tensorcut import distributed as tdist
from tensorcut.train import tdlrt
from tensorcut.train.tdlrt import TDLRTOptimizer, train_tdlrt, tuckerize

# HOSVD start at full rank 8 / 12; tau prunes the first Tucker layer to rank 2 within the first epoch
RUN = dict(tau=0.2, rmin=2, epochs=2, optimizer="adam", lr=0.02, scheduler="cosine", from_pretrained=True,
           grad_clip=5.0, device="cpu", seed=3)


def _net(bn: bool = False) -> nn.Module:
    torch.manual_seed(123)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), *([nn.BatchNorm2d(8)] if bn else []), nn.ReLU(),
                         nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4))


def _data() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(5)
    protos = torch.randn(4, 3, 6, 6, generator=g)
    y = torch.randint(0, 4, (64,), generator=g)
    x = protos[y] + 0.7 * torch.randn(64, 3, 6, 6, generator=g)
    tr = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    va = DataLoader(TensorDataset(x[:27], y[:27]), batch_size=10)  # 27: ranks hold 14 and 13 samples
    return tr, va


def _kernel(layer: nn.Module) -> torch.Tensor:
    U_out, C, U_in = tdlrt._factors(layer)
    return torch.einsum("oa,abhw,ib->oihw", U_out, C, U_in)


def _ce(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    return loss


def _worker(rank: int, world: int, port: int, out: str) -> None:
    join_as_rank(rank, world, port)
    from tensorcut.train.tdlrt_verb import train_tdlrt_checkpoint

    checks: list[bool] = []
    real_check = TDLRTOptimizer.check_sync

    def spy_check(self: TDLRTOptimizer) -> bool:
        checks.append(real_check(self))
        return checks[-1]

    TDLRTOptimizer.check_sync = spy_check  # type: ignore[method-assign]
    writes = spy_writes()
    report: dict[str, Any] = {}
    try:
        tdist.init("cpu")
        # A: the training loop, no BatchNorm (compared with one process by the test)
        net = _net()
        tr, va = _data()
        report["history"] = train_tdlrt(net, tr, va, **RUN)
        report["checks"] = list(checks)
        torch.save({k: v.clone() for k, v in net.state_dict().items()}, Path(out) / f"A{rank}.pt")

        # B: the optimiser alone, BatchNorm and SGD with momentum, each rank on its own batch
        bn = tuckerize(_net(bn=True), from_pretrained=False, init_rank=4)
        opt = TDLRTOptimizer(bn, 0.2, base="sgd", lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(100 + rank)
        x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 4, (8,), generator=g)
        for _ in range(3):
            opt.step(lambda: _ce(bn, x, y))
        report["bn_resyncs"] = opt.resyncs
        if rank == 1:  # inject a divergence: drop a direction of a layer and nudge the classifier
            layer = opt.layers["2"]
            U_out, C, U_in = tdlrt._factors(layer)
            tdlrt._write_factors(layer, U_out[:, :-1], C[:-1], U_in)
            with torch.no_grad():
                bn[-1].weight.add_(1e-3)
        report["repaired"] = not opt.check_sync() and opt.resyncs == 1
        opt.step(lambda: _ce(bn, x, y))  # the ranks run on together after the repair
        report["bn_ranks"] = opt.ranks()
        torch.save({k: v.clone() for k, v in bn.state_dict().items()}, Path(out) / f"B{rank}.pt")

        # C: the verb, writing its checkpoint from rank 0 only
        writes.clear()
        ck = train_tdlrt_checkpoint("vanilla-cnn", "synthetic", Path(out) / "ck", tau=0.2, init_rank=3, epochs=1,
                                    width=0.125, batch_size=32, subset=64, device="cpu", progress=False)
        report["verb_writes"] = list(writes)
        report["verb_test"] = ck.meta["metrics"]["test"]
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        tdist.cleanup()


def test_two_ranks_stay_identical_and_match_one_process(tmp_path: Path) -> None:
    assert spawn_ranks(_worker, tmp_path) == [0, 0]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))

    # A: identical on both ranks, bitwise, without any repair; the same as one process
    a0, a1 = (torch.load(tmp_path / f"A{r}.pt", weights_only=True) for r in (0, 1))
    assert a0.keys() == a1.keys() and all(torch.equal(a0[k], a1[k]) for k in a0)
    untimed = [[{k: v for k, v in row.items() if k != "seconds"} for row in r["history"]] for r in (r0, r1)]
    assert untimed[0] == untimed[1]  # reduced metrics, same ranks, same lr on every rank
    assert len(r0["checks"]) == 1 + 2 * 4 and all(r0["checks"]) and all(r1["checks"])  # construction + every step
    single = _net()
    tr, va = _data()
    same_order = tdist.shard_train_loader(tr, tdist.DistContext(), seed=RUN["seed"])  # the DistributedSampler's shuffle
    hist = train_tdlrt(single, same_order, va, **RUN, distributed=False)
    for a, b in zip(hist, r0["history"]):
        assert a["ranks"] == b["ranks"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4, abs=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4, abs=1e-6)
        assert a["train_top1"] == b["train_top1"] and a["val_top1"] == b["val_top1"]
    # same function: a basis inside a nearly degenerate singular subspace may turn a little with rounding, so
    # the Tucker layers are compared by their kernels, everything else weight by weight, and the outputs
    twin = copy.deepcopy(single)
    twin.load_state_dict(a0)  # the ranks agree, hence the shapes
    for name, m in single.named_modules():
        if tdlrt.is_tucker_layer(m):
            assert torch.allclose(_kernel(m), _kernel(twin.get_submodule(name)), rtol=1e-3, atol=1e-4), name
    for (k, v), w in zip(single.named_parameters(), twin.parameters()):
        if not k.endswith(("first.weight", "core.weight", "last.weight")):
            assert torch.allclose(v, w, rtol=1e-3, atol=1e-4), k
    x = va.dataset.tensors[0]
    assert torch.allclose(single.eval()(x), twin.eval()(x), rtol=1e-3, atol=1e-4)
    assert hist[-1]["val_loss"] < hist[0]["val_loss"] and hist[-1]["ranks"]["2"] == [2, 2]  # it trained and pruned

    # B: BatchNorm statistics averaged, ranks equal; an injected divergence is repaired from rank 0
    b0, b1 = (torch.load(tmp_path / f"B{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(b0[k], b1[k]) for k in b0), "ranks disagree (BatchNorm model)"
    assert r0["bn_resyncs"] == r1["bn_resyncs"] == 0
    assert r0["repaired"] and r1["repaired"] and r0["bn_ranks"] == r1["bn_ranks"]

    # C: one checkpoint, written by rank 0 alone, with metrics reduced over the ranks
    assert r1["verb_writes"] == [] and r0["verb_writes"].count("meta.json") == 2  # after the epoch, and at the end
    assert r0["verb_test"] == r1["verb_test"] and r0["verb_test"]["n"] == 200
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["meta.json", "model.safetensors"]


def test_torchrun_cli_train_method_tdlrt(tmp_path: Path) -> None:
    """The documented command: `torchrun --nproc_per_node=2 -m tensorcut train --method tdlrt ...` on CPU."""
    out = tmp_path / "ck"
    r = torchrun(["train", "--model", "vanilla-cnn", "--width", "0.125",
           "--dataset", "synthetic", "--subset", "64", "--epochs", "1", "--batch-size", "32", "--method", "tdlrt",
           "--tau", "0.2", "--init-rank", "3", "--device", "cpu", "--out", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("epoch 1:") == 1  # progress from rank 0 only
    assert r.stdout.count("test: loss") == 1 and r.stdout.count("checkpoint:") == 1  # rank 0 alone prints
    from tensorcut import io as tio

    ck = tio.load_checkpoint(out)
    assert ck.meta["epoch"] == 1 and ck.meta["metrics"]["test"]["n"] == 200
    assert ck.meta["recipe"]["method"] == "tdlrt" and ck.meta["tdlrt"]["final_ranks"]
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "model.safetensors"]
