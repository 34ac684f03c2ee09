"""Results store: insert-or-ignore, several writers, corrupt files left untouched."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
from pathlib import Path

import pytest

from tensorcut.errors import TensorcutError
from tensorcut.study.store import ResultsStore


def _row(i: int, **kw: object) -> dict[str, object]:
    row = {
        "fingerprint": "f",
        "data": "d",
        "split": "val",
        "kind": "single",
        "method": "svd",
        "layer": "conv2",
        "bipartition": "OUT",
        "keep": str(i),
        "epoch": -1,
        "top1": 0.5,
        "norm_loss_pct": float(i),
    }
    row.update(kw)
    return row


def test_insert_or_ignore_and_csv(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    with ResultsStore(path) as st:
        assert st.add(_row(1)) and st.add(_row(2))
        assert not st.add(_row(1, top1=0.9))  # same key: ignored, first value kept
        assert st.count() == 2
        assert st.rows(keep="1")[0]["top1"] == 0.5
        assert st.has(_row(2)) and not st.has(_row(3))
        st.export_csv(tmp_path / "r.csv", spectra_path=tmp_path / "s.csv")
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("fingerprint,data,split,kind")
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _writer(path: str, start: int) -> None:
    with ResultsStore(path) as st:
        for i in range(start, start + 30):
            st.add(_row(i))


def test_two_processes_same_file(tmp_path: Path) -> None:
    path = str(tmp_path / "r.sqlite")
    ResultsStore(path).close()
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, s)) for s in (0, 15)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with ResultsStore(path) as st:
        assert st.count() == 45  # keys 0..44, the overlap 15..29 written once


def test_corrupt_file_reported_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    junk = b"this is not a database at all" * 100
    path.write_bytes(junk)
    with pytest.raises(TensorcutError) as e:
        ResultsStore(path)
    assert str(e.value).startswith(
        f"results file {str(path)!r} is corrupt or not an SQLite database ("
    )
    assert str(e.value).endswith("it was left untouched: move it away or choose another --out")
    assert path.read_bytes() == junk


def test_foreign_sqlite_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    before = path.read_bytes()
    with pytest.raises(TensorcutError) as e:
        ResultsStore(path)
    assert str(e.value) == (
        f"{str(path)!r} is an SQLite file but not a tensorcut results store; "
        "it was left untouched: choose another --out"
    )
    assert path.read_bytes() == before


def test_truncated_store_reported(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    with ResultsStore(path) as st:
        for i in range(200):
            st.add(_row(i, extra={"pad": "x" * 200}))
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TensorcutError) as e:
        ResultsStore(path)
    assert "left untouched" in str(e.value)
    assert path.read_bytes() == data[: len(data) // 2]


def test_store_being_created_by_another_worker_is_joined_not_refused(tmp_path: Path) -> None:
    """A second worker that opens the file between its creation and the first worker's schema commit
    sees an SQLite file with no tables yet: it must wait and join, not refuse it as a foreign
    file."""
    p = tmp_path / "r.sqlite"
    first = sqlite3.connect(str(p), isolation_level=None)
    first.execute("PRAGMA journal_mode = WAL")  # the file exists (non-empty), no tables yet
    assert p.stat().st_size > 0
    s = ResultsStore(p)  # the second worker
    s.close()
    first.close()
    s2 = ResultsStore(
        p, create=False
    )  # a complete store: tables and identity rows, committed together
    s2.close()
    con = sqlite3.connect(str(p))
    meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
    con.close()
    assert meta["app"] and meta["schema_version"]
