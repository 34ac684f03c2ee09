"""Faults of long runs: kill -9 during training, a sweep, compression and export; full disks;
read-only folders.

Kills are injected deterministically: a small launcher runs the real CLI in a child
process and sends itself SIGKILL at a chosen point — the k-th training step, or just
before the k-th fsync of a given output's temporary file (the data are written, the
rename has not happened). Afterwards no output file may be half-written, and the next
run must resume (training, sweeps) or redo (compression, export) cleanly.
The sweep test kills a real worker process from outside, mid-sweep, with SIGKILL.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tensorcut.checkpoint import io as tio
from tensorcut.cli import main
from tensorcut.errors import TensorcutError

PY = sys.executable

LAUNCHER = r"""
import json, os, signal, sys, time
spec = json.loads(sys.argv[1])
calls = {"n": 0}

def hit():
    calls["n"] += 1
    if calls["n"] == spec["at"]:
        os.kill(os.getpid(), signal.SIGKILL)

if spec["where"] == "fsync":  # just before the k-th fsync of OUTPUT's temporary file
    real_fsync = os.fsync
    tmp_prefix = "." + spec["name"] + "."
    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(tmp_prefix):
            hit()
        return real_fsync(fd)
    os.fsync = fsync
elif spec["where"] == "step":
    # at the k-th loss computation (training steps and evaluation batches)
    import torch.nn.functional as F
    real_ce = F.cross_entropy
    def ce(*a, **k):
        hit()
        return real_ce(*a, **k)
    F.cross_entropy = ce
elif spec["where"] == "slow-rows":
    # a slower worker, so that it can be killed from outside mid-sweep
    from tensorcut.study import store
    real_add = store.ResultsStore.add
    def add(self, row):
        time.sleep(spec["sleep"])
        return real_add(self, row)
    store.ResultsStore.add = add
import torch
torch.set_num_threads(1)
from tensorcut.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _launch(
    tmp: Path,
    spec: dict[str, Any],
    argv: list[str],
    env: dict[str, str] | None = None,
    wait: bool = True,
) -> Any:
    script = tmp / "launcher.py"
    script.write_text(LAUNCHER)
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env or {}))
    cmd = [PY, str(script), json.dumps(spec), *argv]
    if not wait:
        return subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e, cwd=tmp
        )
    return subprocess.run(cmd, capture_output=True, text=True, env=e, cwd=tmp, timeout=170)


def _digest(d: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.iterdir())
        if p.is_file()
    }


def _finals(d: Path) -> list[str]:
    """Output files, leaving out temporary files a kill may leave behind (hidden, never read)."""
    return sorted(
        p.name for p in d.iterdir() if not (p.name.startswith(".") and p.name.endswith(".tmp"))
    )


def _one_line_error(capsys: pytest.CaptureFixture[str], verb: str, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"tensorcut {verb}: error: "), err
    for n in needles:
        assert n in err, err
    return err


# ----------------------------------------------------------------------------- training

TRAIN = [
    "train",
    "--model",
    "vanilla-cnn",
    "--width",
    "0.125",
    "--dataset",
    "digits",
    "--subset",
    "128",
    "--batch-size",
    "32",
    "--epochs",
    "3",
    "--device",
    "cpu",
    "--optimizer",
    "sgd",
    "--lr",
    "0.05",
]
# per epoch: 4 training steps + 1 validation batch = 5 loss computations


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Weights after three epochs without any fault (same thread count as the killed runs)."""
    out = tmp_path_factory.mktemp("train") / "ck"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*TRAIN, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(n)
    return tio.load(out).state_dict()


@pytest.mark.parametrize(
    "spec",
    [
        {"where": "step", "at": 8},  # epoch 2, third step
        {"where": "fsync", "name": "train_state.pt", "at": 2},
    ],  # writing epoch 2's state
    ids=["kill-mid-epoch", "kill-mid-checkpoint"],
)
def test_training_killed_resumes_to_the_uninterrupted_weights(
    tmp_path: Path, spec: dict[str, Any], uninterrupted: dict[str, torch.Tensor]
) -> None:
    out = tmp_path / "ck"
    r = _launch(tmp_path, spec, [*TRAIN, "--out", str(out)])
    assert r.returncode == -signal.SIGKILL, r.stderr[-1500:]
    ck = tio.load_checkpoint(out)  # what is there is complete and loadable
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["epoch"] == 1 and ck.meta["epoch"] in (1, 2)
    assert _finals(out) == ["meta.json", "model.safetensors", "train_state.pt"]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*TRAIN, "--out", str(out), "--resume"]) == 0
    finally:
        torch.set_num_threads(n)
    resumed = tio.load(out).state_dict()
    for k, v in uninterrupted.items():
        assert torch.allclose(v, resumed[k], rtol=1e-5, atol=1e-6), k
    assert tio.read_meta(out)["epoch"] == 3


def test_train_without_resume_refuses_a_killed_run_and_keeps_it(
    tmp_path: Path, capsys: Any
) -> None:
    out = tmp_path / "ck"
    r = _launch(tmp_path, {"where": "step", "at": 8}, [*TRAIN, "--out", str(out)])
    assert r.returncode == -signal.SIGKILL
    before = _digest(out)
    assert main([*TRAIN, "--out", str(out)]) == 2
    _one_line_error(capsys, "train", "already holds a checkpoint; pass --resume")
    assert _digest(out) == before


# --------------------------------------------------------------------------- compression and export


@pytest.mark.parametrize("name", ["model.safetensors", "plan.json"])
def test_compress_killed_then_redone(tiny_checkpoint: Path, tmp_path: Path, name: str) -> None:
    out = tmp_path / "small"
    argv = [
        "compress",
        str(tiny_checkpoint),
        "--method",
        "tucker2",
        "--ratio",
        "0.5",
        "--out",
        str(out),
    ]
    src = _digest(tiny_checkpoint)
    r = _launch(tmp_path, {"where": "fsync", "name": name, "at": 1}, argv)
    assert r.returncode == -signal.SIGKILL, r.stderr[-1500:]
    assert name not in _finals(out)  # never a half-written file under the real name
    if name == "plan.json":
        tio.load_checkpoint(out)  # the checkpoint written before the kill is whole
    assert main(argv) == 0
    assert {"meta.json", "model.safetensors", "plan.json"} <= set(_finals(out))
    tio.load_checkpoint(out)
    assert json.loads((out / "plan.json").read_text())
    assert _digest(tiny_checkpoint) == src  # the source is never touched


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_export_killed_keeps_the_previous_file_then_redone(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ck)
    target = tmp_path / "m.pt"
    argv = ["export", str(ck), "--format", "torchscript", "--out", str(target)]
    assert main(argv) == 0
    old = target.read_bytes()
    r = _launch(tmp_path, {"where": "fsync", "name": "m.pt", "at": 1}, argv)
    assert r.returncode == -signal.SIGKILL, r.stderr[-1500:]
    assert target.read_bytes() == old  # the earlier export is intact, not half-overwritten
    target.unlink()
    r = _launch(tmp_path, {"where": "fsync", "name": "m.pt", "at": 1}, argv)
    assert r.returncode == -signal.SIGKILL and not target.exists()
    assert main(argv) == 0
    torch.jit.load(str(target))


# ----------------------------------------------------------------------------- sweeps


SWEEP = [
    "--subset",
    "40",
    "--bipartitions",
    "OUT",
    "IN",
    "OUT-IN",
    "--keep",
    "1,2",
    "--cp-ranks",
    "2",
    "--no-progress",
]


def _keys(db: Path) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(db, timeout=30)
    try:
        return con.execute(
            "SELECT fingerprint, data, split, kind, method, layer, bipartition, keep, epoch "
            "FROM results"
        ).fetchall()
    finally:
        con.close()


def test_sweep_worker_killed_mid_sweep_then_resumed_has_every_row_exactly_once(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """Two workers (RANK/WORLD_SIZE) share a store; one is SIGKILLed; a plain re-run finishes."""
    ref_db = tmp_path / "reference.sqlite"
    assert main(["analyze", str(tiny_checkpoint), *SWEEP, "--out", str(ref_db)]) == 0
    expected = set(_keys(ref_db))
    db = tmp_path / "shared.sqlite"
    argv = ["analyze", str(tiny_checkpoint), *SWEEP, "--out", str(db)]
    workers = [
        _launch(
            tmp_path,
            {"where": "slow-rows", "sleep": 0.25},
            argv,
            env={"RANK": str(r), "WORLD_SIZE": "2"},
            wait=False,
        )
        for r in range(2)
    ]
    victim = workers[1]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill worker 1 once the sweep is well under way
        try:
            if db.exists() and len(_keys(db)) >= 6:
                break
        except sqlite3.OperationalError:  # the store is being created
            pass
        time.sleep(0.1)
    if victim.poll() is not None:
        out1, err1 = victim.communicate()
        raise AssertionError(
            f"worker 1 finished before it could be killed (exit {victim.returncode}): {err1[-800:]}"
        )
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    out0, err0 = workers[0].communicate(timeout=150)
    assert workers[0].returncode == 0, err0[-1500:]
    assert "shard 1/2:" in out0
    partial = _keys(db)
    assert (
        len(partial) == len(set(partial)) and set(partial) < expected
    )  # rows were lost with the worker
    assert (
        main(["analyze", str(tiny_checkpoint), *SWEEP, "--out", str(db)]) == 0
    )  # the resumed sweep
    final = _keys(db)
    assert len(final) == len(set(final)) == len(expected) and set(final) == expected
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()


# -------------------------------------------------------------------- full disks, read-only folders


def _enospc(*_: Any, **__: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ck)
    before = _digest(ck)
    monkeypatch.setattr(os, "fsync", _enospc)
    argv = [
        "train",
        "--model",
        "vanilla-cnn",
        "--width",
        "0.125",
        "--dataset",
        "digits",
        "--subset",
        "64",
        "--batch-size",
        "32",
        "--epochs",
        "2",
        "--device",
        "cpu",
        "--out",
        str(ck),
        "--resume",
    ]
    assert main(argv) == 2
    _one_line_error(capsys, "train", "cannot write", "No space left on device")
    assert _digest(ck) == before and _finals(ck) == sorted(before)


def test_disk_full_during_a_sweep_is_one_line_and_keeps_recorded_rows(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """SQLite's own 'database or disk is full', provoked by capping the file at its current size."""
    from tensorcut.study import store

    db = tmp_path / "r.sqlite"
    real_add = store.ResultsStore.add
    state = {"n": 0}

    def add(self: Any, row: Any) -> bool:
        state["n"] += 1
        if state["n"] == 4:
            pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
            self.conn.execute(f"PRAGMA max_page_count = {pages}")
            row = dict(row, extra={"pad": "x" * 20000})  # needs new pages: the 'disk' is full
        return real_add(self, row)

    monkeypatch.setattr(store.ResultsStore, "add", add)
    assert main(["analyze", str(tiny_checkpoint), *SWEEP, "--out", str(db)]) == 2
    _one_line_error(capsys, "analyze", "database or disk is full", "rows already recorded are kept")
    assert len(_keys(db)) == 3
    monkeypatch.setattr(store.ResultsStore, "add", real_add)
    assert main(["analyze", str(tiny_checkpoint), *SWEEP, "--out", str(db)]) == 0  # and it resumes
    assert len(_keys(db)) > 3


def test_read_only_output_directory_is_one_line(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """Simulated: tests run as root in CI, where chmod does not stop writes (see the next test)."""
    import tempfile

    def denied(*_: Any, **__: Any) -> Any:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    out = tmp_path / "ro"
    assert main(["compress", str(tiny_checkpoint), "--ratio", "0.5", "--out", str(out)]) == 2
    _one_line_error(
        capsys, "compress", "cannot write", "Permission denied", "writable output directory"
    )
    monkeypatch.setattr(
        "sqlite3.connect",
        lambda *a, **k: (_ for _ in ()).throw(
            sqlite3.OperationalError("attempt to write a readonly database")
        ),
    )
    assert main(["analyze", str(tiny_checkpoint), *SWEEP, "--out", str(tmp_path / "r.sqlite")]) == 2
    _one_line_error(capsys, "analyze", "cannot open results file", "writable --out")


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root ignores directory permissions; covered by the simulated test"
)
def test_read_only_output_directory_for_real(
    tiny_checkpoint: Path, tmp_path: Path, capsys: Any
) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert (
            main(["compress", str(tiny_checkpoint), "--ratio", "0.5", "--out", str(ro / "x")]) == 2
        )
        _one_line_error(capsys, "compress", "cannot write")
        assert main(["analyze", str(tiny_checkpoint), *SWEEP, "--out", str(ro / "r.sqlite")]) == 2
        _one_line_error(capsys, "analyze", "results file")
    finally:
        ro.chmod(0o755)


def test_atomic_write_failure_mid_write_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(TensorcutError, match="No space left on device"):
        tio.atomic_write_bytes(target, b"new" * 1000)
    assert (
        target.read_bytes() == b"old"
        and _finals(tmp_path) == ["f.bin"]
        and len(list(tmp_path.iterdir())) == 1
    )


# ----------------------------------------------------------------------------- memory


def test_decomposition_memory_stays_within_the_stated_bound() -> None:
    """Full Tucker of a 256x256x3x3 kernel, in a fresh process.

    The hungriest method in benchmarks/results/memory.md.
    """
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_memory.py"
    spec = {"kind": "decompose", "layer": "test", "shape": [256, 256, 3, 3], "method": "tucker"}
    r = subprocess.run(
        [PY, str(bench), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=170,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"),
    )
    assert r.returncode == 0, r.stderr[-1500:]
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["within_bound"], row
    if row["peak_source"].startswith(
        "VmHWM"
    ):  # a resettable peak: the multiple of the kernel is meaningful
        assert row["rss_peak_delta_mb"] < 24 * row["kernel_mb"] + 64
