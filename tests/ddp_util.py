"""Helpers for the multi-process tests: free ports, spawned ranks, the torchrun CLI, write spies."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

PY = sys.executable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def join_as_rank(rank: int, world: int, port: int) -> None:
    """Inside a spawned worker: the environment torchrun would set, and one torch thread."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)


def spawn_ranks(
    worker: Callable[..., None], out: Path, world: int = 2, timeout: float = 150
) -> list[int | None]:
    """Run ``worker(rank, world, port, str(out))`` in ``world`` spawned processes; their exit codes
    (a process still running after ``timeout`` is killed and reports None)."""
    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(r, world, port, str(out))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.exitcode is None:
            p.kill()
    return codes


def torchrun(
    args: list[str], cwd: Path, nproc: int = 2, timeout: float = 170
) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc_per_node=N -m tensorcut ARGS`` on this machine, one thread per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [
        str(Path(PY).with_name("torchrun")),
        "--nnodes=1",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "tensorcut",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def spy_writes() -> list[str]:
    """File names passed to ``tensorcut.checkpoint.io.atomic_write_bytes`` in this process (still
    writing)."""
    from tensorcut.checkpoint import io as tio

    writes: list[str] = []
    real = tio.atomic_write_bytes

    def spy(path: Any, data: bytes) -> None:
        writes.append(Path(path).name)
        real(path, data)

    tio.atomic_write_bytes = spy  # type: ignore[assignment]
    return writes


# -------------------------------------------------------- tolerances for "several processes vs one"

U32 = torch.finfo(torch.float32).eps / 2  # float32 unit roundoff, 2**-24


def sum_order_tolerance(n_terms: int, steps: int, u: float = U32) -> float:
    """Relative drift allowed between a data-parallel run and one process after ``steps`` steps.

    The ranks sum their shares and the all-reduce adds the rank means; one process sums the whole
    batch: the same gradient summed in another order. A sum of ``n_terms`` terms carries relative
    error at most ``gamma_n = n u / (1 - n u)``; ``steps`` such perturbations add up to first order
    when training does not amplify them (a step that does is a defect the comparison should catch).
    ``n_terms`` is the longest reduction whose order differs (e.g. batch x output positions of the
    first convolution's weight gradient).
    """
    gamma = n_terms * u / (1 - n_terms * u)
    return steps * gamma


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||a||`` (Frobenius)."""
    return float((a.detach() - b.detach()).norm() / a.detach().norm().clamp_min(1e-30))


def clear_winners(logits: torch.Tensor, tol: float) -> torch.Tensor:
    """Rows whose top logit leads the runner-up by more than ``2 tol max|logits|``: their argmax
    cannot flip under a relative perturbation ``tol`` (the others are near-ties, which may)."""
    top2 = logits.topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1]) > 2 * tol * float(logits.abs().max())
