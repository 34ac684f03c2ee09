"""Multi-process helpers on PyTorch's own engine (``torch.distributed``), launched by ``torchrun``.

Nothing here starts processes or opens sockets by itself at import time. :func:`init`
joins the process group that ``torchrun`` describes in the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), with the ``gloo``
backend on CPU and ``nccl`` on CUDA. A plain ``python -m tensorcut ...`` has no such
variables and runs as one process, exactly as before.

The training loop uses :func:`shard_train_loader` (a :class:`~torch.utils.data.DistributedSampler`
over a global batch), :func:`shard_eval_loader` (strided, no padding, so reduced metrics are
exact), :func:`all_reduce_sum` for metrics and :func:`run_on_main` for rank-0-only
checkpoint writes whose failure every rank learns about. :func:`all_reduce_grads` and
:func:`broadcast_module` are the hooks a custom loop (e.g. TDLRT) needs.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import torch
from torch import nn
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from tensorcut.errors import TensorcutError

__all__ = [
    "DistContext",
    "ShardSampler",
    "active",
    "all_gather_object",
    "all_reduce_grads",
    "all_reduce_sum",
    "backend_for",
    "barrier",
    "broadcast_module",
    "broadcast_object",
    "cleanup",
    "env_world",
    "init",
    "is_main_process",
    "local_only",
    "run_on_main",
    "session",
    "set_epoch",
    "shard_eval_loader",
    "shard_train_loader",
]

T = TypeVar("T")

#: Default collective timeout for training (a hung peer fails the run instead of blocking forever).
TRAIN_TIMEOUT = datetime.timedelta(minutes=30)

_state: dict[str, Any] = {"owned": False, "local_only": 0, "joined": False}


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the number of processes, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes files and prints."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise TensorcutError(
            f"environment variable {name}={raw!r} is not an integer; launch with torchrun"
        ) from None


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment; (0, 1, 0) without one."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise TensorcutError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return rank, world, local


def backend_for(device: torch.device | str) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def active() -> DistContext:
    """The context of an initialised process group.

    World size 1 when there is none, or inside :func:`local_only`.
    """
    if _state["local_only"] or not _dist_ready():
        return DistContext()
    dist = torch.distributed
    rank, world = dist.get_rank(), dist.get_world_size()
    local = _env_int("LOCAL_RANK", rank)
    dev = (
        torch.device("cuda", torch.cuda.current_device())
        if backend_for_group() == "nccl"
        else torch.device("cpu")
    )
    return DistContext(rank=rank, world_size=world, local_rank=local, device=dev)


def backend_for_group() -> str:
    """Backend of the default process group ('' when none)."""
    if not _dist_ready():
        return ""
    return str(torch.distributed.get_backend())


def init(
    device: str | torch.device = "cpu", *, timeout: datetime.timedelta | None = None
) -> DistContext:
    """Join the torchrun process group when the environment describes one (idempotent).

    ``device`` is the device the caller resolved ('cpu' or 'cuda'); under torchrun a CUDA
    run uses ``cuda:LOCAL_RANK`` and the ``nccl`` backend, a CPU run ``gloo``. Without
    ``WORLD_SIZE > 1`` in the environment nothing happens and a single-process context returns.
    """
    dev = torch.device(device)
    if _state["local_only"]:
        return DistContext(device=dev)
    if _dist_ready():
        ctx = active()
        return ctx if ctx.enabled else DistContext(device=dev)
    rank, world, local = env_world()
    if world == 1:
        return DistContext(device=dev)
    if not torch.distributed.is_available():
        raise TensorcutError("this PyTorch build has no torch.distributed; run a single process")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise TensorcutError(
            f"WORLD_SIZE={world} but {', '.join(missing)} is not set; launch with "
            "`torchrun --nproc_per_node=N -m tensorcut ...`"
        )
    backend = backend_for(dev)
    if backend == "nccl":
        n = torch.cuda.device_count()
        if local >= n:
            raise TensorcutError(
                f"LOCAL_RANK={local} but this machine has {n} CUDA GPU(s); "
                f"use --nproc_per_node={n} or fewer"
            )
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    try:
        torch.distributed.init_process_group(
            backend,
            init_method="env://",
            rank=rank,
            world_size=world,
            timeout=timeout or TRAIN_TIMEOUT,
        )
    except (RuntimeError, ValueError) as e:
        raise TensorcutError(
            f"cannot join the process group ({backend}, rank {rank}/{world}): "
            f"{str(e).splitlines()[0][:160]}"
        ) from None
    _state["owned"] = True
    _state["joined"] = True
    return DistContext(rank=rank, world_size=world, local_rank=local, device=dev)


@contextlib.contextmanager
def session(
    device: str | torch.device = "cpu", *, timeout: datetime.timedelta | None = None
) -> Iterator[DistContext]:
    """:func:`init` for the length of a block.

    Leaves the group afterwards only if this block joined it.
    """
    fresh = not _dist_ready()
    ctx = init(device, timeout=timeout)
    try:
        yield ctx
    except BaseException:
        if fresh and ctx.enabled:
            cleanup(together=False)
        raise
    if fresh and ctx.enabled:
        cleanup()  # at a barrier: see cleanup


def cleanup(*, together: bool = True) -> None:
    """Leave the process group if :func:`init` joined it (safe to call more than once).

    Args:
        together: wait at a barrier first so that every rank tears down its gloo pairs at the same
            time. A rank that destroyed its group and exited while a peer was still finishing its
            own work sometimes made that peer abort ("terminate called without an active
            exception", exit -6). Pass ``False`` on an error path, where a peer may never arrive.
    """
    if _state["owned"] and _dist_ready():
        if together:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    _state["owned"] = False


def exit_process(code: int) -> NoReturn:
    """End this process with ``code``; after a process group was joined, skip interpreter teardown.

    Why: with the group destroyed and every output written, gloo's background threads can still
    abort the process while the interpreter finalises ("terminate called without an active
    exception", exit -6), turning a finished ``torchrun`` run into a failure. So a process that
    joined a group flushes its streams and leaves with ``os._exit``; any other raises
    ``SystemExit`` as usual.
    """
    if not _state["joined"]:
        raise SystemExit(code)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    import logging

    logging.shutdown()
    os._exit(code)


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Within this block, :func:`active` reports one process: loops run locally even under torchrun.

    Used where only some ranks run a piece of work (e.g. the final pass of a sharded sweep),
    which must not enter collectives the other ranks never join.
    """
    _state["local_only"] += 1
    try:
        yield
    finally:
        _state["local_only"] -= 1


def is_main_process() -> bool:
    """True unless this is a non-zero rank of an initialised process group."""
    return active().is_main


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if active().enabled:
        torch.distributed.barrier()


def all_reduce_sum(values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64; identity for one process)."""
    ctx = active()
    if not ctx.enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=ctx.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return [float(v) for v in t.cpu()]


def all_gather_object(obj: T) -> list[T]:
    """``obj`` from every rank, in rank order (``[obj]`` for one process)."""
    ctx = active()
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank.

    Only for picklable objects built by tensorcut, never for user files.
    """
    if not active().enabled:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def run_on_main(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 only.

    If it raises :class:`TensorcutError`, every rank raises the same line.

    Rank-0-only file writes go through here so that, say, a full disk stops all ranks
    cleanly instead of leaving the others blocked in the next collective.
    """
    ctx = active()
    if not ctx.enabled:
        return fn()
    result: T | None = None
    error = ""
    if ctx.is_main:
        try:
            result = fn()
        except TensorcutError as e:
            error = str(e) or type(e).__name__
    error = broadcast_object(error)
    if error:
        raise TensorcutError(error)
    return result


def all_reduce_grads(model: nn.Module) -> None:
    """Average the gradients of ``model`` over all ranks (for loops that do not use DDP)."""
    ctx = active()
    if not ctx.enabled:
        return
    for p in model.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
            p.grad.div_(ctx.world_size)


def broadcast_module(model: nn.Module, src: int = 0, *, buffers_only: bool = False) -> None:
    """Copy rank ``src``'s parameters and buffers (or only buffers) into ``model`` on every rank.

    Shapes must already agree (after a rank change, rebuild the layers from a broadcast
    configuration first).
    """
    if not active().enabled:
        return
    tensors = (
        list(model.buffers()) if buffers_only else list(model.parameters()) + list(model.buffers())
    )
    with torch.no_grad():
        for t in tensors:
            torch.distributed.broadcast(t.data, src=src)


# ----------------------------------------------------------------------------- data sharding


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` of ``range(n)``.

    Every sample exactly once over all ranks.

    Unlike :class:`DistributedSampler` nothing is padded, so summed evaluation metrics are exact.
    """

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.n, self.rank, self.world_size = int(n), int(rank), int(world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return max(0, (self.n - self.rank + self.world_size - 1) // self.world_size)


def _plain(loader: Any) -> bool:
    """A DataLoader over a map-style dataset with the default random or sequential sampler."""
    return (
        isinstance(loader, DataLoader)
        and hasattr(loader.dataset, "__len__")
        and isinstance(loader.sampler, (RandomSampler, SequentialSampler))
        and loader.batch_size is not None
    )


def _rebuild(loader: DataLoader, sampler: Sampler[int], batch_size: int) -> DataLoader:
    return DataLoader(
        loader.dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=loader.drop_last,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers,
    )


def shard_train_loader(loader: Any, ctx: DistContext, *, seed: int = 0) -> Any:
    """This rank's share of a training loader whose batch size is the *global* batch.

    A plain DataLoader becomes one with a :class:`DistributedSampler` (shuffled when the
    original was, reseeded each epoch by ``sampler.set_epoch``) and a per-rank batch of
    ``batch_size / world_size``, so one step of all ranks together sees the same samples as
    one step of a single process would. With one process the result uses the same sampler,
    which makes the shuffle order a function of ``(seed, epoch)`` and resumes exact.
    A list of ready batches is dealt out round-robin (equal counts on every rank). Anything
    else is returned unchanged for one process and refused for several.
    """
    if _plain(loader):
        shuffle = isinstance(loader.sampler, RandomSampler)
        if ctx.world_size > 1 and loader.batch_size % ctx.world_size:
            raise TensorcutError(
                f"batch size {loader.batch_size} is the global batch and must be divisible by the "
                f"{ctx.world_size} processes; choose e.g. "
                f"{loader.batch_size // ctx.world_size * ctx.world_size or ctx.world_size}"
            )
        sampler: DistributedSampler[int] = DistributedSampler(
            loader.dataset,
            num_replicas=ctx.world_size,
            rank=ctx.rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=False,
        )
        return _rebuild(loader, sampler, loader.batch_size // ctx.world_size)
    if not ctx.enabled:
        return loader
    if isinstance(loader, (list, tuple)):
        per = len(loader) // ctx.world_size
        if per == 0:
            raise TensorcutError(
                f"{len(loader)} batches cannot be shared by {ctx.world_size} processes"
            )
        return list(loader[ctx.rank : per * ctx.world_size : ctx.world_size])
    raise TensorcutError(
        "distributed training needs a torch DataLoader over a map-style dataset "
        f"(got {type(loader).__name__}); run a single process or pass a DataLoader"
    )


def shard_eval_loader(loader: Any, ctx: DistContext) -> Any:
    """This rank's strided, unpadded share of an evaluation loader (unchanged for one process)."""
    if not ctx.enabled:
        return loader
    if _plain(loader) and isinstance(loader.sampler, SequentialSampler):
        return _rebuild(
            loader, ShardSampler(len(loader.dataset), ctx.rank, ctx.world_size), loader.batch_size
        )
    if isinstance(loader, (list, tuple)):
        return list(loader[ctx.rank :: ctx.world_size])
    return None  # not shardable: the caller evaluates everything on every rank without reducing


def set_epoch(loader: Any, epoch: int) -> None:
    """Tell a loader's DistributedSampler which epoch starts (its shuffle depends on it)."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
