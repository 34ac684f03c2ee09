"""Evaluation with an activation cache: run only the part of a network a truncation changes.

A sweep evaluates one model hundreds of times with a single layer's weight replaced.
Everything upstream of that layer is the same every time, so it is computed once.

How (generic, any ``nn.Module``): the model is traced with ``torch.fx``. Every graph
node that depends on the target layer (its call, or a read of its parameters) is
*tainted*; the untainted, input-dependent nodes that tainted nodes read form the
*frontier*. A prefix graph computes the frontier values for every evaluation batch
once (for a sequential model: the layer's input; for a ResNet also the skip tensors
that bypass the layer); a suffix graph recomputes only the tainted nodes from them.
The suffix calls the very same modules as the model, on the same batches, so the
result equals a full forward pass bit for bit. A model that ``torch.fx`` cannot trace
(data-dependent control flow) falls back to full evaluation, and the runner says why.

Memory is bounded: cached batches stay in memory up to ``budget_bytes`` and are spilled
to disk (safetensors, in a temporary directory removed on ``close``) beyond it.
"""

from __future__ import annotations

import operator
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from tensorcut.errors import TensorcutError
from tensorcut.study.grid import conv_weight

DEFAULT_CACHE_BYTES = 1 << 30  # 1 GiB


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class BatchStore:
    """A list of batches (each a tuple of tensors) kept in memory up to a byte budget,
    spilled to safetensors files on disk beyond it. Iteration preserves order."""

    def __init__(
        self, budget_bytes: int = DEFAULT_CACHE_BYTES, spill_dir: str | Path | None = None
    ) -> None:
        self.budget_bytes = int(budget_bytes)
        self._spill_parent = None if spill_dir is None else str(spill_dir)
        self._dir: str | None = None
        self._items: list[tuple[torch.Tensor, ...] | str] = []
        self.memory_bytes = 0
        self.disk_bytes = 0
        self._finalizer: weakref.finalize | None = None

    def _spill_path(self) -> str:
        if self._dir is None:
            if self._spill_parent is not None:
                Path(self._spill_parent).mkdir(parents=True, exist_ok=True)
            self._dir = tempfile.mkdtemp(prefix="tensorcut-cache-", dir=self._spill_parent)
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._dir, True)
        return str(Path(self._dir) / f"{len(self._items):06d}.safetensors")

    def append(self, tensors: Sequence[torch.Tensor]) -> None:
        """Add one batch; spill it to disk if it would push memory past the budget."""
        tensors = tuple(t.detach() for t in tensors)
        size = sum(_nbytes(t) for t in tensors)
        if self.memory_bytes + size <= self.budget_bytes:
            self._items.append(tensors)
            self.memory_bytes += size
            return
        from safetensors.torch import save_file

        path = self._spill_path()
        save_file({str(i): t.contiguous().cpu() for i, t in enumerate(tensors)}, path)
        self._items.append(path)
        self.disk_bytes += size

    @property
    def spilled(self) -> bool:
        """Whether any batch lives on disk."""
        return self.disk_bytes > 0

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        from safetensors.torch import load_file

        for item in self._items:
            if isinstance(item, str):
                loaded = load_file(item)
                yield tuple(loaded[str(i)] for i in range(len(loaded)))
            else:
                yield item

    def close(self) -> None:
        """Drop the batches and delete spilled files."""
        self._items = []
        self.memory_bytes = self.disk_bytes = 0
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
            self._dir = None

    def __enter__(self) -> BatchStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass(frozen=True)
class EvalResult:
    """Loss (mean cross entropy), top-1 and top-5 accuracy (fractions), count and wall time."""

    loss: float
    top1: float
    top5: float
    n: int
    seconds: float


class _Accumulator:
    def __init__(self) -> None:
        self.loss = 0.0
        self.c1 = 0
        self.c5 = 0
        self.n = 0

    def add(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        y = y.to(logits.device)
        self.loss += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == y[:, None]
        self.c1 += int(hit[:, 0].sum())
        self.c5 += int(hit.any(dim=1).sum())
        self.n += int(y.numel())

    def result(self, seconds: float) -> EvalResult:
        n = max(self.n, 1)
        return EvalResult(self.loss / n, self.c1 / n, self.c5 / n, self.n, seconds)


class EvalSet:
    """The evaluation inputs materialised once from a loader (same batches every time)."""

    def __init__(
        self,
        loader: Iterable[Any],
        *,
        budget_bytes: int = DEFAULT_CACHE_BYTES,
        spill_dir: str | Path | None = None,
        name: str = "eval",
    ) -> None:
        self.name = name
        self.inputs = BatchStore(budget_bytes, spill_dir)
        self.labels: list[torch.Tensor] = []
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise TensorcutError("the evaluation loader must yield (inputs, labels) batches")
            x, y = batch[0], batch[1]
            self.inputs.append((x,))
            self.labels.append(torch.as_tensor(y).long())
        if not self.labels:
            raise TensorcutError(
                f"the {name} loader yielded no batches; check the data set and --subset"
            )
        self.n = sum(int(y.numel()) for y in self.labels)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, labels) per batch, in loader order."""
        for (x,), y in zip(self.inputs, self.labels, strict=True):
            yield x, y

    def fingerprint_update(self, h: Any) -> None:
        """Feed labels and a sample of inputs into a hashlib object (identifies the data)."""
        for y in self.labels:
            h.update(y.numpy().tobytes())
        first = next(iter(self.inputs))[0]
        h.update(str(tuple(first.shape)).encode())
        h.update(first.detach().cpu().contiguous().float().numpy().tobytes())

    def close(self) -> None:
        """Free the inputs."""
        self.inputs.close()


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def evaluate_full(model: nn.Module, data: EvalSet) -> EvalResult:
    """Uncached evaluation: the whole model on every batch."""
    device = _device_of(model)
    acc = _Accumulator()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x, y in data.batches():
            acc.add(model(x.to(device)), y)
    return acc.result(time.perf_counter() - t0)


def trace(model: nn.Module) -> tuple[fx.GraphModule | None, str]:
    """``torch.fx`` trace of the model, or ``(None, reason)`` when it cannot be traced."""
    try:
        return fx.symbolic_trace(model), ""
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: use the slow path
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"model is not torch.fx-traceable ({type(exc).__name__}: {first[:160]})"


_INPLACE_OPERATORS = {
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    operator.imod,
    operator.ipow,
    operator.iand,
    operator.ior,
    operator.ixor,
    operator.ilshift,
    operator.irshift,
    operator.imatmul,
}


def _is_inplace(node: fx.Node, root: nn.Module) -> bool:
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_module":
        return bool(getattr(root.get_submodule(str(node.target)), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).endswith("__")
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            return True
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.endswith("__")
    return False


@dataclass
class _Split:
    prefix: fx.GraphModule
    suffix: fx.GraphModule
    frontier: list[str]
    clone: list[bool]


def _split_graph(gm: fx.GraphModule, layers: Sequence[str]) -> _Split | str:
    """Prefix / suffix graphs around the given layers, or a reason why not."""
    graph = gm.graph
    names = set(layers)

    def seeds(node: fx.Node) -> bool:
        if node.op not in ("call_module", "get_attr"):
            return False
        t = str(node.target)
        return any(t == n or t.startswith(n + ".") or n.startswith(t + ".") for n in names)

    found: set[str] = set()
    tainted: set[fx.Node] = set()
    input_dep: set[fx.Node] = set()
    for node in graph.nodes:
        ins = node.all_input_nodes
        if node.op == "placeholder" or any(i in input_dep for i in ins):
            input_dep.add(node)
        if seeds(node) or node.op == "output" or any(i in tainted for i in ins):
            tainted.add(node)
            if seeds(node):
                found.update(
                    n
                    for n in names
                    if str(node.target) == n
                    or str(node.target).startswith(n + ".")
                    or n.startswith(str(node.target) + ".")
                )
    missing = names - found
    if missing:
        return f"layer(s) {sorted(missing)} not called in the traced graph"

    frontier = [
        n
        for n in graph.nodes
        if n not in tainted and n in input_dep and any(u in tainted for u in n.users)
    ]
    clone = [
        any(u in tainted and _is_inplace(u, gm) and u.all_input_nodes[:1] == [f] for u in f.users)
        for f in frontier
    ]
    fset = set(frontier)
    for node in graph.nodes:
        if (
            node not in tainted
            and _is_inplace(node, gm)
            and node.all_input_nodes[:1]
            and node.all_input_nodes[0] in fset
        ):
            return f"in-place operation {node.name!r} changes a value the cache would hold"

    pre = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "output" or node in tainted:
            continue
        env[node] = pre.node_copy(node, lambda a: env[a])
    pre.output(tuple(env[f] for f in frontier))

    suf = fx.Graph()
    env = {}
    for i, f in enumerate(frontier):
        env[f] = suf.placeholder(f"frontier_{i}")
    for node in graph.nodes:
        if node in env or node.op == "placeholder":
            continue
        if node in tainted or node not in input_dep:
            env[node] = suf.node_copy(node, lambda a: env[a])
    prefix, suffix = fx.GraphModule(gm, pre), fx.GraphModule(gm, suf)
    for part in (prefix, suffix):
        part.graph.eliminate_dead_code()
        part.recompile()
    return _Split(prefix, suffix, [f.name for f in frontier], clone)


class LayerRunner:
    """Evaluates a model whose ``layers`` change between calls, re-running only what they affect.

    ``fast`` says whether the cached path is in use; ``reason`` says why not when it is not.
    The cache is built on construction (one prefix pass over the data). The model must be
    in eval mode and must not change outside ``layers`` while the runner is alive.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str],
        data: EvalSet,
        *,
        traced: fx.GraphModule | None = None,
        trace_reason: str = "",
        budget_bytes: int = DEFAULT_CACHE_BYTES,
        spill_dir: str | Path | None = None,
        enabled: bool = True,
    ) -> None:
        self.model = model
        self.layers = [layers] if isinstance(layers, str) else list(layers)
        self.data = data
        self.fast = False
        self.reason = ""
        self.cache_seconds = 0.0
        self._store: BatchStore | None = None
        self._split: _Split | None = None
        if not enabled:
            self.reason = "activation cache disabled"
            return
        if traced is None and not trace_reason:
            traced, trace_reason = trace(model)
        if traced is None:
            self.reason = trace_reason or "model could not be traced"
            return
        split = _split_graph(traced, self.layers)
        if isinstance(split, str):
            self.reason = split
            return
        self._split = split
        self._store = BatchStore(budget_bytes, spill_dir)
        device = _device_of(model)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for x, _ in data.batches():
                out = split.prefix(x.to(device))
                self._store.append(tuple(out))
        self.cache_seconds = time.perf_counter() - t0
        self.fast = True

    @property
    def cache_bytes(self) -> tuple[int, int]:
        """(bytes in memory, bytes spilled to disk) of the activation cache."""
        if self._store is None:
            return (0, 0)
        return (self._store.memory_bytes, self._store.disk_bytes)

    def evaluate(self) -> EvalResult:
        """Loss / top-1 / top-5 of the model with the current weights."""
        if not self.fast or self._split is None or self._store is None:
            return evaluate_full(self.model, self.data)
        suffix, clone = self._split.suffix, self._split.clone
        device = _device_of(self.model)
        acc = _Accumulator()
        t0 = time.perf_counter()
        with torch.inference_mode():
            for vals, y in zip(self._store, self.data.labels, strict=True):
                args = [
                    v.to(device).clone() if c else v.to(device)
                    for v, c in zip(vals, clone, strict=True)
                ]
                acc.add(suffix(*args), y)
        return acc.result(time.perf_counter() - t0)

    def close(self) -> None:
        """Free the activation cache."""
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> LayerRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextmanager
def swapped_weights(model: nn.Module, kernels: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily replace the ``weight`` of the named modules; restored exactly on exit."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for name, K in kernels.items():
                w = conv_weight(model, name)
                if tuple(w.shape) != tuple(K.shape):
                    raise TensorcutError(
                        f"kernel for {name!r} has shape {tuple(K.shape)}, expected {tuple(w.shape)}"
                    )
                saved.append((w, w.detach().clone()))
                w.copy_(K)
        yield
    finally:
        with torch.no_grad():
            for w, orig in saved:
                w.copy_(orig)


__all__ = [
    "DEFAULT_CACHE_BYTES",
    "BatchStore",
    "EvalResult",
    "EvalSet",
    "evaluate_full",
    "trace",
    "LayerRunner",
    "swapped_weights",
]
