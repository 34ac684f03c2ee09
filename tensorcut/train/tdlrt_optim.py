"""The TDLRT integrator (:class:`TDLRTOptimizer`): one rank-adaptive step of every Tucker layer
per batch, data-parallel under ``torchrun``.

The tensor algebra of a step lives in :mod:`tensorcut.train.tdlrt_ops`, the access to a layer's
factors in :mod:`tensorcut.train.tdlrt_layers`; :mod:`tensorcut.train.tdlrt` runs the
integrator as a step of :func:`~tensorcut.train.loop.fit`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tensorcut import distributed as tdist
from tensorcut.decompose.svd import small_lapack
from tensorcut.errors import TensorcutError
from tensorcut.train.tdlrt_layers import (
    TuckerView,
    check_hparams,
    factors,
    mode_bounds,
    tucker_layers,
    write_factors,
)
from tensorcut.train.tdlrt_ops import (
    augment_basis,
    galerkin_core,
    k_step_gradient,
    mode_spectrum,
    transport_state,
    truncation_rank,
)

__all__ = ["BASES", "TDLRTOptimizer"]

#: base optimisers of the core and the non-Tucker parameters
BASES = ("sgd", "adam")


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
    augmentation, ``P_i^T`` at truncation); Adam's second moment, a mean square, as
    ``v x_i (M_i * M_i)`` (the reference code's ``(sqrt(v) x_i M_i)^2`` can cancel and break
    Adam's step bound; ``|M_i|`` in place of ``M_i * M_i`` inflates ``v`` at every rotation
    and stalls Adam; see :func:`~tensorcut.train.tdlrt_ops.transport_state`).
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
        check_hparams(tau, rmin, rmax, lr)
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
        self.layers = tucker_layers(model)
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
                name: [t.cpu() for t in factors(layer)] for name, layer in self.layers.items()
            }
        payload = tdist.broadcast_object(payload)
        assert payload is not None  # rank 0 always sends its layers
        with torch.no_grad():
            for name, (U_out, C, U_in) in payload.items():
                dev = self.layers[name].core.weight.device
                write_factors(self.layers[name], U_out.to(dev), C.to(dev), U_in.to(dev))
        tdist.broadcast_module(self.model)  # shapes agree now: every parameter and buffer
        state = tdist.broadcast_object(self.base.state_dict() if self.dist.is_main else None)
        assert state is not None  # rank 0 always sends its state
        self.base.load_state_dict(state)  # replaces this rank's state (the cores' moments included)

    def _augment(self, layer: TuckerView) -> None:
        """K-step of both channel modes, basis augmentation and Galerkin projection of the core."""
        U_out, C, U_in = factors(layer)
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
        write_factors(layer, new[0], galerkin_core(C, maps), new[1])

    def _truncate(self, layer: TuckerView) -> None:
        """HOSVD truncation of the augmented core with tolerance ``tau * ||C_hat||``."""
        U_out, C, U_in = factors(layer)
        tol = self.tau * float(torch.linalg.vector_norm(C, dtype=torch.float64))
        maps, new = [], []
        for mode, U in ((0, U_out), (1, U_in)):
            n, r_aug = U.shape
            lo, hi = mode_bounds(n, self.rmin, self.rmax)
            P, sigma = mode_spectrum(C, mode)
            r = truncation_rank(sigma, tol, min(lo, r_aug), min(hi, r_aug))
            Pk = P[:, :r].to(C.dtype)
            maps.append((mode, Pk.mT))
            new.append(U @ Pk)
        self._move_core(layer, C, maps)
        write_factors(layer, new[0], galerkin_core(C, maps), new[1])

    def _move_core(
        self, layer: TuckerView, C: torch.Tensor, maps: list[tuple[int, torch.Tensor]]
    ) -> None:
        state = self.base.state.get(layer.core.weight)
        if state:
            transport_state(state, C.shape, maps)


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
