"""Per-layer planning (``compression/_builder.py``): rule -> ranks, the layer cache, entries that
count what the built layer holds, and the size guard."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tensorcut.compression._builder import (
    Builder,
    decide_one,
    dense_entry,
    finalize,
    make_entry,
    ranks_for,
    warn_poor,
)
from tensorcut.compression.config import CompressConfig
from tensorcut.compression.rank import RankRule
from tensorcut.errors import TensorcutError
from tensorcut.geometry import ConvGeometry
from tensorcut.layers import get_method

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def _builder(cfg: CompressConfig | None = None, conv: nn.Conv2d | None = None) -> Builder:
    torch.manual_seed(0)
    conv = conv or nn.Conv2d(16, 24, 3, padding=1)
    return Builder("c", conv, cfg or CompressConfig(ratio=0.3), [(8, 8)])


def test_ranks_for_each_rule() -> None:
    b = _builder()
    mx = get_method("tucker2").max_ranks(b.geom)
    assert ranks_for(b, "tucker2", RankRule(rank="full")) == (tuple(mx), "", {})
    assert ranks_for(b, "tucker2", RankRule(rank=(5, 4))) == ((5, 4), "", {})
    assert ranks_for(b, "tucker2", RankRule(eps=0.2)) == (None, "", {"eps": 0.2})
    assert ranks_for(b, "tucker2", RankRule(energy=0.9)) == (None, "", {"energy": 0.9})
    r, note, kw = ranks_for(b, "tucker2", RankRule(ratio=0.3))
    assert b.params("tucker2", r) <= 0.3 * b.geom.dense_params() and note == "" and kw == {}
    r, note, _ = ranks_for(b, "tucker2", RankRule(rank=999))
    assert r == tuple(mx) and note.startswith("ranks (999, 999) clamped to ")
    with pytest.raises(TensorcutError) as e:
        ranks_for(b, "tt", RankRule(rank=(4, 4)))
    assert str(e.value) == "tt takes 3 ranks (r0, r1, r2), got 2: (4, 4)"


def test_build_caches_by_method_and_ranks() -> None:
    b = _builder()
    a = b.build("tucker2", (4, 4))
    assert b.build("tucker2", (4, 4)) is a and b.build("tucker2", (4, 3)) is not a
    assert b.build("tucker2", (4, 4), fast=True) is not a


def test_align_rounds_ranks_down_for_size_and_up_for_error_rules() -> None:
    b = _builder(CompressConfig(ratio=0.3, align=8))
    assert b.build("tucker2", (13, 11)).ranks == (8, 8)
    up = b.build("tucker2", eps=0.5)
    assert all(r % 8 == 0 or r == m for r, m in zip(up.ranks, (24, 16), strict=True))


def test_entry_counts_are_the_built_layers() -> None:
    b = _builder()
    layer = b.build("tucker2", (6, 5))
    e = make_entry("c", b, (8, 8), "tucker2", "factorize", "", layer=layer)
    assert e.ranks == [6, 5] and e.params_after == layer.num_params()
    assert e.macs_after == layer.macs((8, 8)) and e.macs_before == b.geom.dense_macs((8, 8))
    w = b.conv.weight.detach().double()
    err = float((w - layer.reconstruct_weight().detach().double()).norm() / w.norm())
    assert e.error == pytest.approx(err, rel=1e-9)


def test_a_form_that_is_not_smaller_stays_dense() -> None:
    conv = nn.Conv2d(8, 8, 1)  # a tiny 1x1: full-rank Tucker-2 is larger than dense
    b = _builder(CompressConfig(rank=(8, 8)), conv)
    e, layer = decide_one("c", b, (8, 8), b.cfg, b.cfg.rule)
    e = finalize(e, b, layer, b.cfg, (8, 8))
    assert e.status == "dense"
    assert e.reason == f"tucker2 form would not be smaller ({e.params_after:,} >= 72 params)"
    full = CompressConfig(rank="full")
    e, layer = decide_one("c", b, (8, 8), full, full.rule)
    e = finalize(e, b, layer, full, (8, 8))
    assert e.status == "factorize" and "rank='full': exact but not smaller" in e.note


def test_a_method_that_cannot_factorize_gives_a_dense_entry_with_its_reason() -> None:
    conv = nn.Conv2d(8, 8, 3, groups=8)
    b = _builder(CompressConfig(method="cp", rank=2), conv)
    e, layer = decide_one("dw", b, (8, 8), b.cfg, b.cfg.rule)
    assert layer is None and e.status == "dense" and e.reason.startswith("cp: ")
    d = dense_entry("dw", conv, "why", "nn.Conv2d", None)
    assert (d.status, d.reason, d.params_before, d.macs_before) == ("dense", "why", 80, 0)
    assert d.geometry == ConvGeometry.from_conv(conv).to_dict()


def test_warn_poor_notes_and_warns() -> None:
    b = _builder()
    e = make_entry("c", b, (8, 8), "tucker2", "factorize", "", layer=b.build("tucker2", (1, 1)))
    e.error = 0.95
    with pytest.warns(UserWarning, match=r"^1 layer\(s\) keep almost nothing of their kernel"):
        warn_poor([e], "rank")
    assert e.note == "kernel error 0.950: almost nothing of the kernel is kept"
