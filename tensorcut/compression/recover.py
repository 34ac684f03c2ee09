"""Recover a compressed model before fine-tuning: match each factorized layer to its dense original.

Why: truncating every kernel at once compounds the errors through the network; fitting each
factorized layer's output to what the dense layer computed, on a few batches of calibration
images, removes much of that drift cheaply (no labels, only the factors train). The dense
reference sees its own activations and the compressed model its own, so a layer also learns to
correct what the layers before it got wrong.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tensorcut.errors import TensorcutError
from tensorcut.layers.base import FactorizedConv2d

__all__ = ["match_layers"]


def _pairs(compressed: nn.Module, reference: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, factorized layer, the reference's conv of that name) for each factorized conv."""
    ref = dict(reference.named_modules())
    out: list[tuple[str, nn.Module, nn.Module]] = []
    for name, m in compressed.named_modules():
        if isinstance(m, FactorizedConv2d):
            if name not in ref or not isinstance(ref[name], nn.Conv2d):
                raise TensorcutError(
                    f"layer {name!r} is factorized but the reference model has no Conv2d of that "
                    "name; pass the dense model the compressed one was made from"
                )
            out.append((name, m, ref[name]))
    return out


def match_layers(
    compressed: nn.Module,
    reference: nn.Module,
    loader: Iterable[Any],
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    max_batches: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, float]:
    """Fit the factors of every factorized conv so its output matches the dense conv's.

    Both models run in eval mode (BatchNorm uses its running statistics, which should be
    re-estimated afterwards: the conv outputs change); only the factorized layers' parameters
    train, with Adam on the mean over layers of the relative squared error
    ``||y_compressed - y_dense||^2 / ||y_dense||^2`` of each conv's output.

    Args:
        compressed: the model after :func:`tensorcut.compress` (changed in place).
        reference: the dense model it was compressed from (not changed).
        loader: calibration batches, ``images`` or ``(images, labels)``; labels are not used.
        epochs: passes over ``loader`` (an integer >= 1).
        lr: Adam's learning rate (a finite number > 0).
        max_batches: at most this many batches per pass (None: all).
        device: where to run both models.
        progress: show a progress bar.

    Returns:
        ``{"before": e0, "after": e1, "steps": n}``: the matching loss (mean over layers of the
        relative squared error), averaged over ``loader``'s batches, before and after the
        ``n`` Adam steps.

    Raises:
        TensorcutError: no factorized layer, a layer the reference lacks, bad ``epochs``/``lr``,
            an empty loader, or a loss that stops being finite.

    Example:
        >>> cfg = tc.CompressConfig(method="tucker2", ratio=0.3)
        >>> small, plan = tc.compress(copy.deepcopy(dense), cfg)
        >>> match_layers(small, dense, calib_loader, epochs=1)["after"]  # doctest: +SKIP
    """
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise TensorcutError(f"epochs must be an integer >= 1, got {epochs!r}")
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise TensorcutError(f"lr must be a finite number > 0, got {lr!r}")
    pairs = _pairs(compressed, reference)
    if not pairs:
        raise TensorcutError(
            "the model has no factorized layer to match; compress it first (tensorcut.compress)"
        )
    dev = torch.device(device)
    before = _mean_error(compressed, reference, pairs, loader, dev, max_batches)
    params = [p for _, fact, _ in pairs for p in fact.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    ids = {id(p) for p in params}
    frozen = [p for p in compressed.parameters() if p.requires_grad and id(p) not in ids]
    was_c = compressed.training
    compressed.eval()
    for p in frozen:  # only the factors learn; the rest gets no gradient (nor a stale .grad)
        p.requires_grad_(False)
    n = 0
    try:
        with _Capture(pairs) as cap:
            for epoch in range(epochs):
                bar = tqdm(
                    loader,
                    desc=f"match layers {epoch + 1}/{epochs}",
                    disable=not progress,
                    leave=False,
                )
                for i, batch in enumerate(bar):
                    if max_batches is not None and i >= max_batches:
                        break
                    x = _images(batch).to(dev)
                    with torch.no_grad():
                        reference(x)
                    compressed(x)
                    loss = cap.loss()
                    if not torch.isfinite(loss):
                        raise TensorcutError(
                            f"layer matching diverged (loss {float(loss)}); use a smaller lr"
                        )
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    n += 1
    finally:
        compressed.train(was_c)
        for p in frozen:
            p.requires_grad_(True)
    after = _mean_error(compressed, reference, pairs, loader, dev, max_batches)
    return {"before": before, "after": after, "steps": float(n)}


def _images(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


class _Capture:
    """Forward hooks keeping each factorized layer's and its dense twin's latest output."""

    def __init__(self, pairs: list[tuple[str, nn.Module, nn.Module]]) -> None:
        self.pairs = pairs
        self.outs_c: dict[str, torch.Tensor] = {}
        self.outs_d: dict[str, torch.Tensor] = {}
        self.hooks: list[Any] = []

    def __enter__(self) -> _Capture:
        for name, fact, dense in self.pairs:
            self.hooks.append(fact.register_forward_hook(_keep(self.outs_c, name)))
            self.hooks.append(dense.register_forward_hook(_keep(self.outs_d, name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.hooks:
            h.remove()

    def loss(self) -> torch.Tensor:
        """Mean over layers of ``||y_c - y_d||^2 / ||y_d||^2`` for the last forward passes."""
        terms = [
            (self.outs_c[k] - self.outs_d[k]).pow(2).sum()
            / self.outs_d[k].pow(2).sum().clamp_min(1e-30)
            for k, _, _ in self.pairs
        ]
        return torch.stack(terms).mean()


def _keep(store: dict[str, torch.Tensor], name: str) -> Any:
    def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        store[name] = out

    return hook


def _mean_error(
    compressed: nn.Module,
    reference: nn.Module,
    pairs: list[tuple[str, nn.Module, nn.Module]],
    loader: Iterable[Any],
    dev: torch.device,
    max_batches: int | None,
) -> float:
    """The matching loss with the current factors (no update), averaged over the batches."""
    was_c, was_d = compressed.training, reference.training
    compressed.eval()
    reference.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad(), _Capture(pairs) as cap:
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                x = _images(batch).to(dev)
                reference(x)
                compressed(x)
                total += float(cap.loss())
                count += 1
    finally:
        compressed.train(was_c)
        reference.train(was_d)
    if count == 0:
        raise TensorcutError("layer matching got no batches; give a non-empty calibration loader")
    return total / count
