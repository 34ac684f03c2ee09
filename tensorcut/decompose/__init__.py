"""Pure tensor decompositions on torch tensors (no nn.Module)."""

from tensorcut.decompose.cp import CPResult, cp_als, cp_max_rank, cp_to_tensor, khatri_rao
from tensorcut.decompose.svd import RankClampWarning, clamp_rank, rank_from_spectrum, truncated_svd
from tensorcut.decompose.tr import TRCandidate, TRResult, rsdtr, tr_svd, tr_to_tensor
from tensorcut.decompose.tt import tt_max_ranks, tt_svd, tt_to_tensor
from tensorcut.decompose.tucker import (
    TuckerResult,
    hooi,
    hosvd,
    mode_dot,
    tucker2,
    tucker_to_tensor,
)

__all__ = [
    "CPResult",
    "RankClampWarning",
    "TRCandidate",
    "TRResult",
    "TuckerResult",
    "clamp_rank",
    "cp_als",
    "cp_max_rank",
    "cp_to_tensor",
    "hooi",
    "hosvd",
    "khatri_rao",
    "mode_dot",
    "rank_from_spectrum",
    "rsdtr",
    "tr_svd",
    "tr_to_tensor",
    "truncated_svd",
    "tt_max_ranks",
    "tt_svd",
    "tt_to_tensor",
    "tucker2",
    "tucker_to_tensor",
]
