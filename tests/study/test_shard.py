"""Sharded sweeps (``analysis/shard.py``): units, the deal, and shards that together record what
one run records (the torchrun path is tested in test_distributed.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from analysis_helpers import batches, tiny_cnn

from tensorcut.errors import TensorcutError
from tensorcut.study.shard import (
    RECOVERY_EPOCH_COST,
    ShardReport,
    Unit,
    analyze_sharded,
    assign,
    plan_units,
)
from tensorcut.study.store import ResultsStore
from tensorcut.study.sweep import analyze

STUDY = {"layers": ["conv2", "conv3"], "bipartitions": ["OUT", "IN"], "keep": ["1,2"]}


def test_units_by_layer_or_by_bipartition() -> None:
    model = tiny_cnn()
    per_layer = plan_units(model, granularity="layer", cp_ranks=[2], **STUDY)
    assert [(u.kind, u.layers, u.bipartitions, u.with_cp) for u in per_layer] == [
        ("single", ("conv2",), ("OUT", "IN"), True),
        ("single", ("conv3",), ("OUT", "IN"), True),
    ]
    fine = plan_units(model, granularity="bipartition", cp_ranks=[2], **STUDY)
    assert [(u.layers, u.bipartitions, u.with_cp) for u in fine] == [
        (("conv2",), ("OUT",), True),
        (("conv2",), ("IN",), False),
        (("conv3",), ("OUT",), True),
        (("conv3",), ("IN",), False),
    ]
    # the same work either way: the costs add up
    assert sum(u.cost for u in fine) == pytest.approx(sum(u.cost for u in per_layer))
    more = plan_units(model, all_layers=True, recover_epochs=2, world_size=2, **STUDY)
    kinds = [u.kind for u in more]
    assert kinds.count("all-layers") == 2 and kinds[-1] == "recovery"
    assert more[-1].cost == 2 * RECOVERY_EPOCH_COST
    assert more[0].label() == "single:conv2:OUT"


def test_assign_deals_every_unit_once_longest_first() -> None:
    units = [Unit("single", (f"c{i}",), ("OUT",), False, c) for i, c in enumerate([5, 1, 4, 2, 3])]
    shards = assign(units, 2)  # 5 -> r0, 4 -> r1, 3 -> r1, 2 -> r0, 1 -> r0 (tie: lower rank)
    assert [[u.layers[0] for u in s] for s in shards] == [["c0", "c1", "c3"], ["c2", "c4"]]
    assert shards == assign(units, 2)
    assert [len(s) for s in assign(units, 7)] == [1, 1, 1, 1, 1, 0, 0]


def test_refusals() -> None:
    with pytest.raises(TensorcutError) as e:
        plan_units(tiny_cnn(), granularity="kernel")
    assert str(e.value) == "unknown shard granularity 'kernel'; use auto, layer or bipartition"
    with pytest.raises(TensorcutError) as e:
        assign([], 0)
    assert str(e.value) == "world size must be >= 1, got 0"
    with pytest.raises(TensorcutError) as e:
        analyze_sharded(tiny_cnn(), batches(), "x.sqlite", rank=2, world_size=2)
    assert str(e.value) == "rank 2 outside 0..1"


def test_two_shards_record_the_rows_of_one_run(tmp_path: Path) -> None:
    kw = dict(STUDY, cp_ranks=[2], progress=False, csv=False)
    model = tiny_cnn()
    ref = analyze(model, batches(), tmp_path / "one.sqlite", **kw)
    parts = [
        analyze_sharded(model, batches(), tmp_path / "two.sqlite", rank=r, world_size=2, **kw)
        for r in (0, 1)
    ]
    assert all(isinstance(p, ShardReport) and not p.final for p in parts)
    assert sorted(lbl for p in parts for lbl in p.units) == [
        "single:conv2:IN",
        "single:conv2:OUT+cp",
        "single:conv3:IN",
        "single:conv3:OUT+cp",
    ]
    fin = analyze(model, batches(), tmp_path / "two.sqlite", **kw)
    assert fin.evaluated == 0 and fin.skipped == ref.evaluated  # nothing was left to do

    def rows(p: Path) -> dict[tuple, float]:
        with ResultsStore(p) as st:
            return {
                (r["kind"], r["layer"], r["bipartition"], r["keep"]): r["top1"] for r in st.rows()
            }

    one, two = rows(tmp_path / "one.sqlite"), rows(tmp_path / "two.sqlite")
    assert set(one) == set(two)
    assert all(one[k] == pytest.approx(two[k]) for k in one)
