"""Rank-adaptive Tucker training (TDLRT): convolutions trained directly in Tucker format.

Implements the integrator of Zangrando, Schotthöfer, Ceruti, Kusch and Tudisco,
"Geometry-aware training of factorized layers in tensor Tucker format" (arXiv 2305.19059,
first titled "Rank-adaptive spectral pruning of convolutional layers during training"),
which extends matrix DLRT ("Low-rank lottery tickets", NeurIPS 2022) to Tucker tensors.

Every :class:`~tensorcut.layers.tucker.TuckerConv2d` (Tucker-2: the OUT and IN channel modes
are dynamic, the spatial modes stay in the core) is stored as ``first`` (1x1, weight
``U_in^T``), ``core`` (the core ``C``, carrying stride and dilation) and ``last`` (1x1, weight
``U_out``, bias), so the result of training is the same layer class the compression verbs
produce, and save / load / export / inspect work unchanged. The integrator rewrites those
three weights in place; their shapes change when the ranks do.

Entry points: :func:`tuckerize` (dense convs -> Tucker layers, by HOSVD of pretrained
kernels or a random orthonormal start), :class:`TDLRTOptimizer` (one integrator step per
``step(closure)``), :func:`train_tdlrt` (an epoch loop with logging of ranks and
compression) and :func:`rank_report`.

Under ``torchrun`` (any initialised process group of world size > 1) both the optimiser and
the loop are data-parallel with DistributedDataParallel semantics, without DDP itself (whose
gradient buckets cannot follow parameters that change shape every step): see
:class:`TDLRTOptimizer` ("Several processes") and :func:`train_tdlrt`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeGuard

import torch
import torch.nn.functional as F
from torch import nn

from tensorcut import distributed as tdist
from tensorcut.console import say
from tensorcut.decompose.svd import small_lapack
from tensorcut.errors import TensorcutError
from tensorcut.layers.base import ConvGeometry, FactorizedConv2d
from tensorcut.train.loop import FitConfig, TrainStep
from tensorcut.train.tdlrt_ops import (
    augment_basis,
    galerkin_core,
    k_step_gradient,
    mode_spectrum,
    transport_state,
    truncation_rank,
)

__all__ = ["TDLRTOptimizer", "is_tucker_layer", "rank_report", "train_tdlrt", "tuckerize"]

BASES = ("sgd", "adam")
SCHEDULERS = ("none", "cosine", "plateau", "onecycle")
ConvFilter = Callable[[str, nn.Conv2d], bool]
RankArg = int | tuple[int, int] | Mapping[str, int | tuple[int, int]] | None


# --------------------------------------------------------------------------- layer access


class TuckerView(nn.Module):
    """The static type of a layer that passes :func:`is_tucker_layer` (never instantiated):
    three convolutions, ``first`` (1x1, IN -> r_in), ``core`` (r_out x r_in x KH x KW) and
    ``last`` (1x1, r_out -> OUT)."""

    first: nn.Conv2d
    core: nn.Conv2d
    last: nn.Conv2d


def is_tucker_layer(m: nn.Module) -> TypeGuard[TuckerView]:
    """True for an ungrouped layer of a method the integrator trains (``tdlrt_trainable``: the
    ``first`` / ``core`` / ``last`` Tucker-2 structure).

    Grouped Tucker layers (block-diagonal factors) and full-Tucker layers are not trained by
    the integrator; they stay ordinary parameters of the base optimiser.
    """
    return (
        getattr(type(m), "tdlrt_trainable", False) is True
        and getattr(getattr(m, "geometry", None), "groups", 1) == 1
        and all(isinstance(getattr(m, a, None), nn.Conv2d) for a in ("first", "core", "last"))
    )


def _tucker_layers(model: nn.Module) -> dict[str, TuckerView]:
    return {name: m for name, m in model.named_modules() if is_tucker_layer(m)}


def _factors(layer: TuckerView) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_out, C, U_in)`` of a Tucker layer, detached views."""
    U_out = layer.last.weight.detach()[:, :, 0, 0]
    U_in = layer.first.weight.detach()[:, :, 0, 0].mT
    return U_out, layer.core.weight.detach(), U_in


def _set_conv_weight(conv: nn.Conv2d, w: torch.Tensor) -> None:
    conv.weight.data = w.contiguous()
    conv.weight.grad = None
    conv.out_channels, conv.in_channels = int(w.shape[0]), int(w.shape[1])


def _write_factors(
    layer: TuckerView, U_out: torch.Tensor, C: torch.Tensor, U_in: torch.Tensor
) -> None:
    """Store new factors in the layer's three convolutions (same Parameter objects, new data)."""
    dt = layer.core.weight.dtype
    _set_conv_weight(layer.last, U_out.to(dt)[:, :, None, None])
    _set_conv_weight(layer.core, C.to(dt))
    _set_conv_weight(layer.first, U_in.mT.to(dt)[:, :, None, None])
    if hasattr(layer, "_ranks"):  # layers that cache their ranks (a plain attribute)
        vars(layer)["_ranks"] = (int(C.shape[0]), int(C.shape[1]))


def _mode_bounds(n: int, rmin: int, rmax: int | None) -> tuple[int, int]:
    """``(lo, hi)`` allowed ranks for a mode of size ``n``."""
    hi = n if rmax is None else min(int(rmax), n)
    return min(int(rmin), hi), hi


def _layer_sizes(layer: TuckerView) -> tuple[int, int]:
    return int(layer.last.weight.shape[0]), int(layer.first.weight.shape[1])


# --------------------------------------------------------------------------- the integrator


class TDLRTOptimizer:
    """One rank-adaptive TDLRT step per :meth:`step` for every Tucker layer of ``model``.

    A step, for each Tucker layer with core ``C`` and orthonormal factors ``U_out``, ``U_in``
    (dynamic modes i = OUT, IN; the spatial modes are left in the core):

    1. **K-step** (all modes at once): ``K_i = U_i S_i`` with ``Mat_i(C)^T = Q_i S_i^T``;
       ``K_i <- K_i - lr * dL/dK_i``. ``dL/dK_i = dL/dU_i R_i^{-1}`` comes from the factor
       gradients of one forward + backward pass (see
       :func:`~tensorcut.train.tdlrt_ops.k_step_gradient`).
    2. **Augment**: ``U_i_hat = orth[U_i | K_i(lr)]``, rank ``min(2 r_i, n_i)``. Since
       ``K_i(0)`` lies in ``span U_i``, this span equals ``span[U_i | dL/dK_i]`` for every
       ``lr != 0``; it is formed from the gradient directly, which is exact and avoids the
       cancellation of subtracting a small step from a large ``K_i``. The K-step is therefore
       a plain gradient step: momentum / Adam act on the core only.
    3. **Galerkin S-step**: ``C_hat = C x_i (U_i_hat^T U_i)`` (the same kernel, now in the
       augmented bases); a second forward + backward pass gives ``dL/dC_hat`` and the base
       optimiser (SGD with momentum or Adam) updates ``C_hat``, together with every
       non-Tucker parameter (BatchNorm, the first conv, the classifier, the Tucker biases).
       The kernel is unchanged by step 2, so the second pass evaluates the same function:
       the RNG is rewound before it (same dropout masks) and buffers (BatchNorm running
       statistics) are restored after it, so each batch counts once.
    4. **Truncate**: HOSVD of ``C_hat``; per mode keep the smallest rank whose discarded
       singular values have norm below ``tau * ||C_hat||_F``, clipped to
       ``[rmin, min(rmax, n_i)]``; ``U_i <- U_i_hat P_i``, ``C <- C_hat x_i P_i^T``.
       ``tau = 0`` truncates nothing (ranks grow to ``min(rmax, n_i)``).

    **Cost against dense training.** Dense training takes 1 forward + 1 backward pass per
    batch. A TDLRT step takes 2 forward + 2 backward passes of the (smaller) factorised
    network -- one shared by the K-steps of all modes, one for the S-step -- which is the
    count of the paper's Algorithm 1 and of the authors' DLRT reference optimiser -- plus per
    layer a QR of an ``n_i x 2 r_i`` matrix and an eigendecomposition of a ``2 r_i x 2 r_i``
    Gram matrix. The first pass runs at ranks ``r``, the second at the augmented ranks
    ``2 r`` (its core convolutions cost about 4x those at ``r``). The backward of the first
    pass computes no parameter gradients besides the factors'; that of the second none for
    the factors.

    **Optimiser state across basis changes.** As in the authors' reference implementation,
    the core's state is carried along with it: SGD's momentum buffer and Adam's first
    moment are transported like the core (``m x_i M_i`` with ``M_i = U_i_hat^T U_i`` at
    augmentation, ``P_i^T`` at truncation); Adam's second moment as ``(sqrt(v) x_i |M_i|)^2``
    (the reference code's signed ``M_i`` can cancel and break Adam's step bound; see
    :func:`~tensorcut.train.tdlrt_ops.transport_state`).
    New directions therefore start with zero moments. Non-Tucker parameters keep ordinary
    state.

    Use the base optimiser ``.base`` (a ``torch.optim`` instance) for learning-rate
    schedulers. Weight decay applies to cores and non-Tucker parameters, not to the
    orthonormal factors. ``grad_clip`` clips the gradient norm after each backward pass
    (after the cross-rank average when there are several processes; clip here, not in the
    closure, under ``torchrun``).

    **Several processes** (``distributed=None``: whenever a process group of world size > 1
    is initialised, e.g. under ``torchrun``; ``False`` opts out). Each rank's closure sees its
    share of the global batch. After each of the two backward passes every gradient is
    averaged over the ranks (one flat ``all_reduce`` per pass; the first also carries the
    loss, so a divergence stops every rank, and the running statistics of BatchNorm layers
    in training mode, which become the rank average: for the running mean exactly that of
    the global batch; each rank still normalises by its own share's batch statistics, as
    under DDP without SyncBatchNorm). Every rank then runs the same integrator on bitwise
    identical inputs (the all-reduce hands every rank the same sums). QR and
    eigendecompositions are deterministic for identical inputs with the same LAPACK build and
    thread count, so ranks, factors and cores stay bitwise identical -- observed in the tests
    -- but that is not guaranteed across machines or BLAS builds, and a rank that kept a
    different rank would break the next all-reduce. So after truncation the optimiser checks: an
    exact integer hash of the bits of every parameter and buffer plus the layer ranks is
    all-gathered (one tiny collective); on any mismatch rank 0's layers, parameters, buffers and
    optimiser state are broadcast to all ranks (counted in ``resyncs``). The same check runs at
    construction, so ranks that start from different weights start from rank 0's, as under DDP.
    """

    def __init__(
        self,
        model: nn.Module,
        tau: float,
        *,
        rmin: int = 2,
        rmax: int | None = None,
        base: str = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        grad_clip: float | None = None,
        distributed: bool | None = None,
    ) -> None:
        _check_hparams(tau, rmin, rmax, lr)
        if base not in BASES:
            raise TensorcutError(
                f"unknown base optimizer {base!r}; choose one of: {', '.join(BASES)}"
            )
        if not 0.0 <= momentum < 1.0:
            raise TensorcutError(f"momentum must be in [0, 1); got {momentum}")
        self.model = model
        self.tau = float(tau)
        self.rmin = int(rmin)
        self.rmax = None if rmax is None else int(rmax)
        self.layers = _tucker_layers(model)
        if not self.layers:
            raise TensorcutError(
                "the model has no Tucker layers to train; convert its convolutions with "
                "tuckerize(model) first"
            )
        self._factor_params: list[torch.Tensor] = []
        for layer in self.layers.values():
            layer.core.weight.requires_grad_(True)
            for p in (layer.first.weight, layer.last.weight):
                p.requires_grad_(True)
                self._factor_params.append(p)
        fid = {id(p) for p in self._factor_params}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in fid]
        if base == "adam":
            self.base: torch.optim.Optimizer = torch.optim.Adam(
                others, lr=lr, betas=betas, weight_decay=weight_decay
            )
        else:
            self.base = torch.optim.SGD(
                others,
                lr=lr,
                momentum=momentum,
                weight_decay=weight_decay,
                nesterov=nesterov and momentum > 0,
            )
        self.steps = 0
        self.grad_clip = float(grad_clip) if grad_clip else None
        self.dist = tdist.active() if distributed is not False else tdist.DistContext()
        self.resyncs = 0  # times rank 0's state had to be broadcast because the ranks disagreed
        if self.dist.enabled:
            self.check_sync()

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The base optimiser's parameter groups (learning rate lives here)."""
        return self.base.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of every model parameter."""
        for p in self.model.parameters():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def ranks(self) -> dict[str, tuple[int, int]]:
        """Current ``(r_out, r_in)`` of every Tucker layer."""
        return {
            name: (int(layer.core.weight.shape[0]), int(layer.core.weight.shape[1]))
            for name, layer in self.layers.items()
        }

    def state_dict(self) -> dict[str, Any]:
        """Base optimiser state plus the integrator's settings (load the model's weights first)."""
        return {
            "base": self.base.state_dict(),
            "tau": self.tau,
            "rmin": self.rmin,
            "rmax": self.rmax,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`; the model must already hold the matching ranks."""
        self.base.load_state_dict(state["base"])
        self.tau, self.rmin, self.rmax = float(state["tau"]), int(state["rmin"]), state["rmax"]
        self.steps = int(state.get("steps", 0))

    # -- one step -------------------------------------------------------------------------

    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run one integrator step; ``closure`` computes the batch loss, calls ``backward()`` and
        returns it.

        The closure is called twice (K-step pass, S-step pass) on the same batch; gradients
        are cleared before each call. Returns the loss of the first call (before the update;
        this rank's loss when there are several processes).
        """
        if closure is None:
            raise TensorcutError(
                "TDLRTOptimizer.step needs a closure that computes the loss, calls backward() and "
                "returns the loss"
            )
        params = list(self.model.parameters())
        flags = [p.requires_grad for p in params]
        fid = {id(p) for p in self._factor_params}
        rng = _rng_state()
        try:
            for p in params:  # pass 1: only the factors need gradients
                p.requires_grad_(id(p) in fid)
            self.zero_grad()
            with torch.enable_grad():
                loss = closure()
            _check_loss(loss, self.steps, local=self.dist.enabled)
            _check_loss(self._after_backward(loss), self.steps)
            with (
                torch.no_grad(),
                small_lapack(loss, limit=None),
            ):  # small factorizations: one thread
                for layer in self.layers.values():
                    self._augment(layer)
            # pass 2: cores and the other trainable parameters
            for p, f in zip(params, flags, strict=True):
                p.requires_grad_(f and id(p) not in fid)
            self.zero_grad()
            buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
            _set_rng_state(rng)
            with torch.enable_grad():
                closure()
            self._after_backward(None)
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            self.base.step()
            with torch.no_grad(), small_lapack(loss, limit=None):
                for layer in self.layers.values():
                    self._truncate(layer)
            if self.dist.enabled:
                self.check_sync()
        finally:
            for p, f in zip(params, flags, strict=True):
                p.requires_grad_(f)
            for factor in self._factor_params:
                factor.requires_grad_(True)
                factor.grad = None
        self.steps += 1
        return loss.detach()

    def _after_backward(self, loss: torch.Tensor | None) -> torch.Tensor | None:
        """Average gradients (pass 1: also the loss and BatchNorm running statistics) over the
        ranks, then clip.

        Returns the rank-averaged loss (``loss`` itself for one process).
        """
        if self.dist.enabled:
            tensors = [p.grad for p in self.model.parameters() if p.grad is not None]
            if (
                loss is not None
            ):  # pass 1 (the one that counts for BatchNorm: pass 2's buffers are restored)
                loss = loss.detach().reshape(-1).clone()
                tensors.append(loss)
                tensors += _bn_statistics(self.model)
            _all_reduce_mean(tensors, self.dist.world_size)
        if self.grad_clip:
            nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.grad is not None], self.grad_clip
            )
        return loss

    def check_sync(self) -> bool:
        """Collective: True if every rank holds bitwise the same ranks, parameters and buffers.

        Otherwise broadcast rank 0's Tucker layers (shapes first), parameters, buffers and base
        optimiser state to every rank, count it in ``resyncs`` and return False. Every rank
        must call it; with one process it returns True.
        """
        if not self.dist.enabled:
            return True
        mine = self._fingerprint()
        every = [torch.empty_like(mine) for _ in range(self.dist.world_size)]
        torch.distributed.all_gather(every, mine)
        if all(torch.equal(every[0], f) for f in every[1:]):
            return True
        self._broadcast_from_main()
        self.resyncs += 1
        return False

    def _fingerprint(self) -> torch.Tensor:
        """Layer ranks and an exact hash of the bits of every parameter and buffer (int64)."""
        vals = [torch.tensor([s for r in self.ranks().values() for s in r], dtype=torch.int64)]
        vals += [
            _bits_hash(t).cpu().reshape(1)
            for t in [*self.model.parameters(), *self.model.buffers()]
        ]
        return torch.cat(vals).to(self.dist.device)

    def _broadcast_from_main(self) -> None:
        """Give every rank rank 0's layers (whose shapes may differ here), weights and optimiser
        state."""
        payload: dict[str, list[torch.Tensor]] | None = None
        if self.dist.is_main:
            payload = {
                name: [t.cpu() for t in _factors(layer)] for name, layer in self.layers.items()
            }
        payload = tdist.broadcast_object(payload)
        assert payload is not None  # rank 0 always sends its layers
        with torch.no_grad():
            for name, (U_out, C, U_in) in payload.items():
                dev = self.layers[name].core.weight.device
                _write_factors(self.layers[name], U_out.to(dev), C.to(dev), U_in.to(dev))
        tdist.broadcast_module(self.model)  # shapes agree now: every parameter and buffer
        state = tdist.broadcast_object(self.base.state_dict() if self.dist.is_main else None)
        assert state is not None  # rank 0 always sends its state
        self.base.load_state_dict(state)  # replaces this rank's state (the cores' moments included)

    def _augment(self, layer: TuckerView) -> None:
        """K-step of both channel modes, basis augmentation and Galerkin projection of the core."""
        U_out, C, U_in = _factors(layer)
        g_out = layer.last.weight.grad
        g_in = layer.first.weight.grad
        grads = (
            None if g_out is None else g_out[:, :, 0, 0],
            None if g_in is None else g_in[:, :, 0, 0].mT,
        )
        maps, new = [], []
        for mode, U, g in ((0, U_out, grads[0]), (1, U_in, grads[1])):
            n, r = U.shape
            if g is None or not bool(torch.isfinite(g).all()):
                U_hat = U.clone()
            else:
                U_hat = augment_basis(U, k_step_gradient(C, g, mode), min(2 * r, n))
            maps.append((mode, U_hat.mT @ U))
            new.append(U_hat)
        self._move_core(layer, C, maps)
        _write_factors(layer, new[0], galerkin_core(C, maps), new[1])

    def _truncate(self, layer: TuckerView) -> None:
        """HOSVD truncation of the augmented core with tolerance ``tau * ||C_hat||``."""
        U_out, C, U_in = _factors(layer)
        tol = self.tau * float(torch.linalg.vector_norm(C, dtype=torch.float64))
        maps, new = [], []
        for mode, U in ((0, U_out), (1, U_in)):
            n, r_aug = U.shape
            lo, hi = _mode_bounds(n, self.rmin, self.rmax)
            P, sigma = mode_spectrum(C, mode)
            r = truncation_rank(sigma, tol, min(lo, r_aug), min(hi, r_aug))
            Pk = P[:, :r].to(C.dtype)
            maps.append((mode, Pk.mT))
            new.append(U @ Pk)
        self._move_core(layer, C, maps)
        _write_factors(layer, new[0], galerkin_core(C, maps), new[1])

    def _move_core(
        self, layer: TuckerView, C: torch.Tensor, maps: list[tuple[int, torch.Tensor]]
    ) -> None:
        state = self.base.state.get(layer.core.weight)
        if state:
            transport_state(state, C.shape, maps)


def _check_hparams(tau: float, rmin: int, rmax: int | None, lr: float) -> None:
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and 0.0 <= tau < 1.0):
        raise TensorcutError(f"tau must be a relative tolerance in [0, 1); got {tau!r}")
    if int(rmin) < 1:
        raise TensorcutError(f"rmin must be >= 1; got {rmin}")
    if rmax is not None and int(rmax) < int(rmin):
        raise TensorcutError(f"rmax ({rmax}) must be >= rmin ({rmin})")
    if not lr > 0:
        raise TensorcutError(f"learning rate must be > 0; got {lr}")


def _check_loss(loss: Any, step: int, *, local: bool = False) -> None:
    """The closure returned a tensor, and (unless ``local``: the finiteness check waits for the rank
    average) a finite one."""
    if not isinstance(loss, torch.Tensor):
        raise TensorcutError(
            "the closure must return the loss tensor (after calling loss.backward())"
        )
    if not local and not bool(torch.isfinite(loss.detach()).all()):
        raise TensorcutError(
            f"TDLRT training diverged at step {step} (loss {float(loss.detach().mean())}); lower "
            "the learning rate"
        )


def _all_reduce_mean(tensors: list[torch.Tensor], world_size: int) -> None:
    """Average ``tensors`` over the ranks in place: one flat ``all_reduce`` per (dtype, device).

    Every rank must pass tensors of the same shapes in the same order. gloo's and NCCL's
    all-reduce hand every rank the same sum, so the averages agree bitwise
    (:meth:`TDLRTOptimizer.check_sync` verifies the outcome every step).
    """
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    with torch.no_grad():
        for ts in groups.values():
            flat = torch.cat([t.reshape(-1) for t in ts])
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
            flat.div_(world_size)
            off = 0
            for t in ts:
                t.copy_(flat[off : off + t.numel()].view_as(t))
                off += t.numel()


def _bn_statistics(model: nn.Module) -> list[torch.Tensor]:
    """Running mean and variance of the BatchNorm layers this pass updated (training mode)."""
    out: list[torch.Tensor] = []
    for m in model.modules():
        if (
            isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.training
            and m.running_mean is not None
            and m.running_var is not None
        ):
            out += [m.running_mean, m.running_var]
    return out


_INT_OF_SIZE = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def _bits_hash(t: torch.Tensor) -> torch.Tensor:
    """An exact int64 hash of a tensor's bits: position-weighted sum of its words, in wrapping
    integer arithmetic."""
    flat = t.detach().contiguous().reshape(-1)
    ity = _INT_OF_SIZE.get(flat.element_size())
    bits = (
        flat.view(ity) if ity is not None and not flat.is_complex() else flat.view(torch.uint8)
    ).to(torch.int64)
    weights = torch.arange(1, bits.numel() + 1, dtype=torch.int64, device=bits.device)
    return (bits * weights).sum()


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    cuda = (
        torch.cuda.get_rng_state_all()
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else None
    )
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


# --------------------------------------------------------------------------- conversion


def _dense_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """Plain ``nn.Conv2d`` modules, in module order, not counting those inside factorized layers."""
    out: list[tuple[str, nn.Conv2d]] = []

    def walk(mod: nn.Module, prefix: str) -> None:
        for name, child in mod.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, FactorizedConv2d) or is_tucker_layer(child):
                continue
            if isinstance(child, nn.Conv2d):
                out.append((full, child))
            else:
                walk(child, full)

    walk(model, "")
    return out


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _layer_rank(init_rank: RankArg, name: str) -> int | tuple[int, int] | None:
    """The ``init_rank`` entry for layer ``name`` (a mapping gives per-layer values; absent =
    default)."""
    if isinstance(init_rank, Mapping):
        r = init_rank.get(name)
        return None if r is None else (r if isinstance(r, int) else (int(r[0]), int(r[1])))
    return init_rank


def _target_ranks(
    sizes: tuple[int, int],
    init_rank: int | tuple[int, int] | None,
    rmin: int,
    rmax: int | None,
    default_half: bool,
) -> tuple[int, int]:
    if init_rank is None:
        req: tuple[int | None, int | None] = (None, None)
    elif isinstance(init_rank, int):
        req = (init_rank, init_rank)
    else:
        t = tuple(init_rank)
        if len(t) != 2:
            raise TensorcutError(f"init_rank is an int or a pair (r_out, r_in); got {init_rank!r}")
        req = (int(t[0]), int(t[1]))
    out = []
    for n, r in zip(sizes, req, strict=True):
        lo, hi = _mode_bounds(n, rmin, rmax)
        if r is None:
            r = math.ceil(n / 2) if default_half else hi
        if r < 1:
            raise TensorcutError(f"init_rank must be >= 1; got {init_rank!r}")
        out.append(max(lo, min(int(r), hi)))
    return out[0], out[1]


def _tucker_class() -> type[nn.Module]:
    try:
        from tensorcut.layers.tucker import TuckerConv2d
    except ImportError as e:  # pragma: no cover - only while the layer module is missing
        raise TensorcutError(
            f"TDLRT needs tensorcut.layers.tucker.TuckerConv2d, which failed to import ({e})"
        ) from None
    return TuckerConv2d


def _build_layer(
    conv: nn.Conv2d, U_out: torch.Tensor, C: torch.Tensor, U_in: torch.Tensor
) -> TuckerView:
    geom = ConvGeometry.from_conv(conv)
    cls, ranks = _tucker_class(), (int(C.shape[0]), int(C.shape[1]))
    try:
        layer = cls(geom, ranks, device=conv.weight.device, dtype=conv.weight.dtype)
    except TypeError:  # a layer class without device / dtype arguments
        layer = cls(geom, ranks).to(device=conv.weight.device, dtype=conv.weight.dtype)
    if not is_tucker_layer(layer):
        raise TensorcutError(f"{cls.__name__} is not a Tucker-2 layer of first / core / last")
    with torch.no_grad():
        _write_factors(layer, U_out, C, U_in)
        if conv.bias is not None:
            bias = layer.last.bias
            assert bias is not None  # the geometry carries the dense layer's bias flag
            bias.copy_(conv.bias.detach())
    layer.train(conv.training)
    return layer


def _random_orthonormal(n: int, r: int, like: torch.Tensor) -> torch.Tensor:
    Q = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64)).Q
    return Q.to(device=like.device, dtype=like.dtype)


@torch.no_grad()
def _normalise_tucker(layer: TuckerView, targets: tuple[int, int]) -> None:
    """Make an existing Tucker layer's factors orthonormal and bring its ranks to ``targets``.

    Orthonormalisation is exact (``U = Q R``, ``C <- C x R``); lower targets truncate the core by
    HOSVD, higher ones pad with random orthonormal directions and a zero core block (exact).
    """
    U_out, C, U_in = _factors(layer)
    Us, maps = [], []
    for mode, U in ((0, U_out), (1, U_in)):
        Q, R = torch.linalg.qr(U.double())
        Us.append(Q)
        maps.append((mode, R))
    Cd = galerkin_core(C.double(), maps)
    maps = []
    for mode, t in enumerate(targets):
        U = Us[mode]
        n, r = U.shape
        if t < r:
            P = mode_spectrum(Cd, mode)[0][:, :t]
            Us[mode] = U @ P
            maps.append((mode, P.mT))
        elif t > r:
            fill = augment_basis(U, torch.randn(n, t - r, dtype=U.dtype), t)
            Us[mode] = fill
            maps.append((mode, fill.mT @ U))
    Cd = galerkin_core(Cd, maps)
    _write_factors(layer, Us[0], Cd, Us[1])


@torch.no_grad()
def tuckerize(
    model: nn.Module,
    init_rank: RankArg = None,
    *,
    from_pretrained: bool = True,
    rmin: int = 2,
    rmax: int | None = None,
    filter: ConvFilter | None = None,
    skip_first: bool = True,
) -> nn.Module:
    """Convert ``model``'s convolutions to Tucker-2 layers ready for TDLRT, in place; returns
    ``model``.

    ``from_pretrained=True``: each kernel is decomposed by HOSVD (channel modes), keeping its
    function exactly at full rank; ``init_rank`` (int, ``(r_out, r_in)``, or a mapping from
    layer name to either, e.g. the final ranks of another run) truncates, default
    ``min(n_i, rmax)`` (lossless unless ``rmax`` is smaller). ``from_pretrained=False``: a fresh
    start, random orthonormal factors and a Gaussian core scaled to the norm of the layer's
    default initialisation, ranks ``init_rank`` or ``ceil(n_i / 2)`` by default (the reference
    code's choice, so the first augmentation can reach full rank). Ranks are clipped to
    ``[rmin, min(rmax, n_i)]``.

    Converted: plain ``nn.Conv2d`` with ``groups == 1``, except the model's first convolution
    (``skip_first``) and those ``filter(name, conv)`` rejects. Tucker layers already present
    (a Tucker-compressed model) are kept, their factors orthonormalised exactly and their
    ranks brought into the bounds (and to ``init_rank`` when it is given).
    """
    if not isinstance(model, nn.Module):
        raise TensorcutError(f"tuckerize needs an nn.Module; got {type(model).__name__}")
    _check_hparams(0.0, rmin, rmax, 1.0)
    existing = _tucker_layers(model)
    convs = _dense_convs(model)
    first = convs[0][0] if convs else None
    for name, conv in convs:
        if (
            (skip_first and name == first)
            or conv.groups != 1
            or (filter is not None and not filter(name, conv))
        ):
            continue
        sizes = (conv.out_channels, conv.in_channels)
        r_out, r_in = _target_ranks(
            sizes, _layer_rank(init_rank, name), rmin, rmax, default_half=not from_pretrained
        )
        W = conv.weight.detach()
        if from_pretrained:
            from tensorcut.decompose.tucker import hosvd

            res = hosvd(W, [r_out, r_in, None, None])
            f_out, f_in, C = res.factors[0], res.factors[1], res.core
            assert f_out is not None and f_in is not None  # both channel modes were given ranks
            U_out, U_in = f_out, f_in
            if (
                U_out.shape[1] < r_out or U_in.shape[1] < r_in
            ):  # clamped to the useful rank: pad exactly
                layer = _build_layer(conv, U_out, C, U_in)
                _normalise_tucker(layer, (r_out, r_in))
                _set_submodule(model, name, layer)
                continue
        else:
            U_out = _random_orthonormal(sizes[0], r_out, W)
            U_in = _random_orthonormal(sizes[1], r_in, W)
            C = torch.randn(r_out, r_in, *W.shape[2:], dtype=W.dtype, device=W.device)
            C *= torch.linalg.vector_norm(W) / torch.linalg.vector_norm(C).clamp_min(1e-30)
        _set_submodule(model, name, _build_layer(conv, U_out, C, U_in))
    for name, layer in existing.items():  # still in the model: only plain convs were replaced
        U_out, C, U_in = _factors(layer)
        sizes = _layer_sizes(layer)
        wanted = _layer_rank(init_rank, name)
        if wanted is None:
            targets = tuple(
                max(lo, min(r, hi))
                for r, (lo, hi) in zip(
                    C.shape[:2], (_mode_bounds(n, rmin, rmax) for n in sizes), strict=True
                )
            )
        else:
            targets = _target_ranks(sizes, wanted, rmin, rmax, default_half=False)
        _normalise_tucker(layer, (int(targets[0]), int(targets[1])))
    return model


# --------------------------------------------------------------------------- reporting


def rank_report(model: nn.Module) -> dict[str, Any]:
    """Per-layer ranks and parameter counts, and conv-layer totals.

    ``conv_cr`` = dense conv parameters / stored conv parameters over all convolutions
    (dense ones count the same on both sides; biases included); ``conv_compression_pct`` =
    ``100 (1 - 1/conv_cr)``, the paper's "compression rate".
    """
    layers: dict[str, Any] = {}
    dense_total, stored_total = 0, 0
    for name, m in model.named_modules():
        if is_tucker_layer(m):
            n_out, n_in = _layer_sizes(m)
            kh, kw = m.core.weight.shape[2:]
            dense = n_out * n_in * kh * kw + (n_out if m.last.bias is not None else 0)
            stored = sum(p.numel() for p in m.parameters())
            layers[name] = {
                "ranks": [int(m.core.weight.shape[0]), int(m.core.weight.shape[1])],
                "sizes": [n_out, n_in],
                "params": stored,
                "dense_params": dense,
                "cr": dense / max(stored, 1),
            }
            dense_total += dense
            stored_total += stored
        elif isinstance(m, FactorizedConv2d):
            dense, stored = m.geometry.dense_params(), m.num_params()
            dense_total += dense
            stored_total += stored
    for _, conv in _dense_convs(model):
        k = sum(p.numel() for p in conv.parameters())
        dense_total += k
        stored_total += k
    cr = dense_total / max(stored_total, 1)
    return {
        "layers": layers,
        "conv_dense_params": dense_total,
        "conv_params": stored_total,
        "conv_cr": cr,
        "conv_compression_pct": 100.0 * (1.0 - 1.0 / cr) if stored_total else 0.0,
    }


# --------------------------------------------------------------------------- training loop


class TDLRTStep(TrainStep):
    """The TDLRT integrator as :func:`~tensorcut.train.loop.fit`'s step: each batch augments the
    Tucker bases, updates them and the core with the recipe's optimiser, and truncates the ranks
    at ``tau`` (:class:`TDLRTOptimizer`). The integrator averages gradients over processes
    itself, so ``fit`` does not wrap the model in DDP.

    Args:
        tau: relative truncation tolerance.
        rmin, rmax: rank bounds per mode.
        nesterov: Nesterov momentum for the SGD base (off, as in the reference code).

    Example:
        >>> from tensorcut.train import FitConfig, fit
        >>> from tensorcut.train.tdlrt import TDLRTStep, rank_callback, tuckerize
        >>> tuckerize(model, init_rank=16)  # doctest: +SKIP
        >>> fit(model, train, val, FitConfig(optimizer="sgd", lr=0.05, scheduler="none"),
        ...     step=TDLRTStep(tau=0.1), callbacks=[rank_callback])  # doctest: +SKIP
    """

    syncs_ranks = True
    label = "tdlrt "

    def __init__(
        self, tau: float, *, rmin: int = 2, rmax: int | None = None, nesterov: bool = False
    ) -> None:
        self.tau, self.rmin, self.rmax, self.nesterov = tau, rmin, rmax, nesterov

    def setup(
        self,
        model: nn.Module,
        cfg: FitConfig,
        ctx: tdist.DistContext,
        device: torch.device,
        teacher: nn.Module | None,
    ) -> None:
        if cfg.amp:
            raise TensorcutError("TDLRT trains in full precision; drop amp")
        if teacher is not None and cfg.distill_alpha > 0:
            raise TensorcutError("TDLRT has no distillation term; drop the teacher")
        self.model = model
        self.integrator = TDLRTOptimizer(
            model,
            self.tau,
            rmin=self.rmin,
            rmax=self.rmax,
            base=cfg.optimizer,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=self.nesterov,
            grad_clip=cfg.grad_clip,
            distributed=ctx.enabled,
        )
        self.optimizer = self.integrator.base

    def __call__(
        self, net: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        seen: dict[str, torch.Tensor] = {}

        def closure() -> torch.Tensor:
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            seen.setdefault("logits", logits.detach())
            return loss

        loss = self.integrator.step(closure)
        return loss.detach(), seen["logits"]

    def state_dict(self) -> dict[str, Any]:
        return self.integrator.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.integrator.load_state_dict(state)

    def report(self, row: dict[str, Any]) -> None:
        say(format_row(row))


def rank_callback(row: dict[str, Any], model: nn.Module) -> None:
    """``fit`` callback: add the epoch's Tucker ranks and conv compression to its history row."""
    rep = rank_report(model)
    row.update(
        ranks={k: v["ranks"] for k, v in rep["layers"].items()},
        conv_params=rep["conv_params"],
        conv_dense_params=rep["conv_dense_params"],
        conv_cr=rep["conv_cr"],
        conv_compression_pct=rep["conv_compression_pct"],
    )


def train_tdlrt(
    model: nn.Module,
    train_loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    val_loader: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    *,
    tau: float,
    init_rank: RankArg = None,
    rmin: int = 2,
    rmax: int | None = None,
    epochs: int = 10,
    optimizer: str = "sgd",
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    scheduler: str = "none",
    from_pretrained: bool = True,
    convert: bool = True,
    filter: ConvFilter | None = None,
    skip_first: bool = True,
    grad_clip: float | None = None,
    device: str | torch.device = "auto",
    log: Callable[[dict[str, Any]], None] | None = None,
    distributed: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train ``model`` with TDLRT (converting its convolutions first) and return one row per epoch.

    A convenience over the one epoch loop: :func:`tuckerize`, then
    :func:`~tensorcut.train.loop.fit` with a :class:`TDLRTStep` and :func:`rank_callback`
    (the recipe arguments become its :class:`~tensorcut.train.loop.FitConfig`).

    ``progress``: a progress bar over each epoch's batches (shown only on a terminal, as
    :func:`~tensorcut.train.loop.fit` does) and one line per epoch (loss, validation top-1,
    conv compression, ranks) through the ``tensorcut`` logger; rank 0 alone under ``torchrun``.

    ``convert=True`` runs :func:`tuckerize` (``init_rank``, ``from_pretrained``, ``filter``,
    ``skip_first``); with ``convert=False`` the model must already hold Tucker layers. The
    model is changed in place. Each history row has ``epoch``, ``train_loss``,
    ``train_top1``, ``lr``, ``seconds`` (wall time of the epoch's training), with a
    validation loader ``val_loss`` / ``val_top1`` / ``val_top5``, and ``ranks``
    (``{layer: [r_out, r_in]}``), ``conv_params``, ``conv_dense_params``, ``conv_cr`` and
    ``conv_compression_pct``; ``log(row)`` is called after every epoch.

    Under ``torchrun`` (or any initialised process group; ``distributed=False`` opts out) the
    loader's batch size is the *global* batch: a plain DataLoader is split over the ranks by a
    DistributedSampler (shuffle seeded by ``seed`` and the epoch), gradients are averaged by
    :class:`TDLRTOptimizer`, and the history's metrics are reduced over all ranks, so every
    rank returns the same rows (but for ``seconds``) and holds the same model. ``log`` runs on
    every rank (write files through :func:`tensorcut.distributed.run_on_main`). Each rank seeds
    its RNG with ``seed + rank`` after the model is converted (as ``fit`` does), so dropout
    masks differ per rank.
    """
    from tensorcut.train.loop import fit, resolve_device

    _check_hparams(tau, rmin, rmax, lr)
    if epochs < 0:
        raise TensorcutError(f"epochs must be >= 0; got {epochs}")
    if scheduler not in SCHEDULERS:
        raise TensorcutError(
            f"unknown scheduler {scheduler!r}; choose one of: {', '.join(SCHEDULERS)}"
        )
    if optimizer not in BASES:
        raise TensorcutError(
            f"unknown base optimizer {optimizer!r}; choose one of: {', '.join(BASES)}"
        )
    if not 0.0 <= momentum < 1.0:
        raise TensorcutError(f"momentum must be in [0, 1); got {momentum}")
    cfg = FitConfig(
        epochs=epochs,
        optimizer=optimizer,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        scheduler=scheduler,
        seed=seed,
        grad_clip=grad_clip,
    )
    dev = resolve_device(device)
    ctx = tdist.init(dev) if distributed else tdist.DistContext(device=dev)
    if ctx.enabled:
        dev = ctx.device
    model.to(dev)
    if convert:
        tuckerize(
            model,
            init_rank,
            from_pretrained=from_pretrained,
            rmin=rmin,
            rmax=rmax,
            filter=filter,
            skip_first=skip_first,
        )
    return fit(
        model,
        train_loader,  # type: ignore[arg-type]
        val_loader,  # type: ignore[arg-type]
        cfg,
        device=dev,
        progress=progress,
        on_epoch=log,
        distributed=distributed,
        step=TDLRTStep(tau, rmin=rmin, rmax=rmax),
        callbacks=[rank_callback],
    )


def format_row(row: dict[str, Any]) -> str:
    """One console line for a :func:`train_tdlrt` history row."""
    ranks = " ".join(f"{a}/{b}" for a, b in row["ranks"].values())
    return (
        f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} | "
        f"val loss {row.get('val_loss', float('nan')):.4f} "
        f"top1 {row.get('val_top1', float('nan')):.4f} | "
        f"conv compression {row['conv_compression_pct']:.1f}% | ranks {ranks} | "
        f"{row['seconds']:.1f}s"
    )
