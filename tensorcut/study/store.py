"""The results store: one SQLite row per evaluated configuration, written as it completes.

Safe for several processes writing the same file (sweeps sharded across ranks): the
database runs in WAL mode, every row is its own committed ``INSERT OR IGNORE`` on a
unique key, so a re-run (or a second writer) skips configurations already recorded.
A file that is not a tensorcut results store is reported and never overwritten.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tensorcut.errors import TensorcutError

SCHEMA_VERSION = "1"
APP_ID = "tensorcut-results"

KEY_COLUMNS: tuple[str, ...] = (
    "fingerprint",
    "data",
    "split",
    "kind",
    "method",
    "layer",
    "bipartition",
    "keep",
    "epoch",
)
VALUE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("model", "TEXT"),
    ("depth", "INTEGER"),
    ("keep_int", "INTEGER"),
    ("n_values", "INTEGER"),
    ("norm_loss_pct", "REAL"),
    ("rel_error", "REAL"),
    ("entropy_before", "REAL"),
    ("entropy_after", "REAL"),
    ("corr_loss_pct", "REAL"),
    ("compression_ratio", "REAL"),
    ("entropy_form", "TEXT"),
    ("loss", "REAL"),
    ("top1", "REAL"),
    ("top5", "REAL"),
    ("n", "INTEGER"),
    ("eval_seconds", "REAL"),
    ("prep_seconds", "REAL"),
    ("fast_path", "INTEGER"),
    ("extra", "TEXT"),
    ("created", "REAL"),
)
COLUMNS: tuple[str, ...] = KEY_COLUMNS + tuple(c for c, _ in VALUE_COLUMNS)
SPECTRUM_COLUMNS: tuple[str, ...] = (
    "fingerprint",
    "model",
    "layer",
    "depth",
    "bipartition",
    "shape",
    "singular_values",
    "entropy_vn",
    "entropy_literal",
)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
  id INTEGER PRIMARY KEY,
  fingerprint TEXT NOT NULL, data TEXT NOT NULL, split TEXT NOT NULL, kind TEXT NOT NULL,
  method TEXT NOT NULL, layer TEXT NOT NULL, bipartition TEXT NOT NULL, keep TEXT NOT NULL,
  epoch INTEGER NOT NULL,
  {", ".join(f"{c} {t}" for c, t in VALUE_COLUMNS)},
  UNIQUE ({", ".join(KEY_COLUMNS)})
);
CREATE TABLE IF NOT EXISTS spectra (
  fingerprint TEXT NOT NULL, model TEXT, layer TEXT NOT NULL, depth INTEGER,
  bipartition TEXT NOT NULL,
  shape TEXT, singular_values TEXT NOT NULL, entropy_vn REAL, entropy_literal REAL,
  UNIQUE (fingerprint, layer, bipartition)
);
"""


def _sqlite_header(path: Path) -> bool:
    """True when the file starts with SQLite's 16-byte magic string."""
    with open(path, "rb") as f:
        return f.read(16) == b"SQLite format 3\x00"


def _retry_locked(fn: Any, timeout: float) -> None:
    """Call ``fn`` until it does not fail with SQLite's 'locked' / 'busy'.

    Gives up (re-raising) after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            fn()
            return
        except sqlite3.OperationalError as exc:
            msg = str(exc).lower()
            if ("locked" not in msg and "busy" not in msg) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _key(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(row[c] for c in KEY_COLUMNS)


class ResultsStore:
    """An open results file. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | Path, *, create: bool = True, timeout: float = 60.0) -> None:
        self.path = Path(path)
        if not create and not self.path.exists():
            raise TensorcutError(
                f"results file {str(self.path)!r} does not exist; run `tensorcut analyze` first"
            )
        if self.path.exists() and self.path.is_dir():
            raise TensorcutError(
                f"results path {str(self.path)!r} is a directory; give a file name such as "
                f"{str(self.path / 'results.sqlite')!r}"
            )
        try:
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._check_existing()
            self.conn = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None)
            self.conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            if create:
                _retry_locked(lambda: self._create_schema(), timeout)
        except (OSError, sqlite3.OperationalError) as exc:  # read-only folder or file, full disk
            raise TensorcutError(
                f"cannot open results file {str(self.path)!r} for writing ({exc}); "
                "choose a writable --out or free disk space"
            ) from None

    def _write(self, sql: str, args: Sequence[Any]) -> sqlite3.Cursor:
        """One committed write.

        A full disk or read-only file is one clear error, and earlier rows stay.
        """
        try:
            return self.conn.execute(sql, args)
        except sqlite3.OperationalError as exc:
            raise TensorcutError(
                f"cannot write to results file {str(self.path)!r} ({exc}); free disk space or make "
                "it writable, then re-run: rows already recorded are kept and skipped"
            ) from None

    def _create_schema(self) -> None:
        """WAL mode and the tables.

        BEGIN IMMEDIATE takes the write lock up front: several workers may create the same file
        at once, and a deferred transaction's lock upgrade fails without waiting.
        """
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = NORMAL")
        # tables and identity rows in one transaction: another worker never sees a store half-made
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            for stmt in (x.strip() for x in _SCHEMA.split(";")):
                if stmt:
                    self.conn.execute(stmt)
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('app', ?)", (APP_ID,))
            self.conn.execute(
                "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
            )
            self.conn.execute("COMMIT")
        except sqlite3.OperationalError:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

    def _check_existing(self) -> None:
        """Refuse (without writing) a file that is not an intact tensorcut results store."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        where = str(self.path)
        try:
            conn = sqlite3.connect(f"file:{where}?mode=ro", uri=True, timeout=10.0)
            try:
                tables = {
                    r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
                }
                check = conn.execute("PRAGMA quick_check").fetchone()
                meta = (
                    dict(conn.execute("SELECT key, value FROM meta").fetchall())
                    if "meta" in tables
                    else {}
                )
            finally:
                conn.close()
        except sqlite3.DatabaseError as exc:
            raise TensorcutError(
                f"results file {where!r} is corrupt or not an SQLite database ({exc}); "
                "it was left untouched: move it away or choose another --out"
            ) from exc
        if not tables and _sqlite_header(self.path):
            # a valid, empty SQLite database (another worker is creating the store right now):
            # join it
            return
        if check is None or check[0] != "ok":
            raise TensorcutError(
                f"results file {where!r} failed its integrity check "
                f"({check[0] if check else '?'}); "
                "it was left untouched: move it away or choose another --out"
            )
        if meta.get("app") != APP_ID or "results" not in tables:
            raise TensorcutError(
                f"{where!r} is an SQLite file but not a tensorcut results store; "
                "it was left untouched: choose another --out"
            )
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise TensorcutError(
                f"results file {where!r} has schema version {meta.get('schema_version')!r}, "
                f"this tensorcut writes {SCHEMA_VERSION!r}; choose another --out"
            )

    # -- writing -----------------------------------------------------------------------

    def add(self, row: Mapping[str, Any]) -> bool:
        """Insert one configuration (committed at once); False when its key was already there."""
        missing = [c for c in KEY_COLUMNS if c not in row]
        if missing:
            raise TensorcutError(f"result row lacks key column(s) {missing}")
        unknown = [c for c in row if c not in COLUMNS]
        if unknown:
            raise TensorcutError(
                f"result row has unknown column(s) {unknown}; known: {', '.join(COLUMNS)}"
            )
        data = dict(row)
        data.setdefault("created", time.time())
        if isinstance(data.get("extra"), (dict, list)):
            data["extra"] = json.dumps(data["extra"], sort_keys=True)
        cols = list(data)
        cur = self._write(
            f"INSERT OR IGNORE INTO results ({', '.join(cols)}) "
            f"VALUES ({', '.join('?' * len(cols))})",
            [data[c] for c in cols],
        )
        return cur.rowcount == 1

    def add_spectrum(
        self,
        *,
        fingerprint: str,
        model: str,
        layer: str,
        depth: int,
        bipartition: str,
        shape: Sequence[int],
        singular_values: Sequence[float],
        entropy_vn: float,
        entropy_literal: float,
    ) -> bool:
        """Record one layer's spectrum along one bipartition."""
        cur = self._write(
            "INSERT OR IGNORE INTO spectra VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                fingerprint,
                model,
                layer,
                depth,
                bipartition,
                json.dumps(list(shape)),
                json.dumps([float(s) for s in singular_values]),
                entropy_vn,
                entropy_literal,
            ),
        )
        return cur.rowcount == 1

    def set_meta(self, key: str, value: Any) -> None:
        """Store a JSON value under ``key`` (last writer wins)."""
        self._write(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value, sort_keys=True))
        )

    # -- reading -----------------------------------------------------------------------

    def get_meta(self, key: str, default: Any = None) -> Any:
        """The JSON value stored under ``key``."""
        r = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if r is None:
            return default
        try:
            return json.loads(r[0])
        except json.JSONDecodeError:
            return r[0]

    def keys(self, **where: Any) -> set[tuple[Any, ...]]:
        """Keys of the rows already recorded (optionally filtered by column values)."""
        sql, args = self._where(where)
        return {
            tuple(r)
            for r in self.conn.execute(f"SELECT {', '.join(KEY_COLUMNS)} FROM results{sql}", args)
        }

    def has(self, row: Mapping[str, Any]) -> bool:
        """Whether a row with this key exists."""
        sql, args = self._where({c: row[c] for c in KEY_COLUMNS})
        return self.conn.execute(f"SELECT 1 FROM results{sql} LIMIT 1", args).fetchone() is not None

    @staticmethod
    def _where(where: Mapping[str, Any]) -> tuple[str, list[Any]]:
        bad = [c for c in where if c not in COLUMNS]
        if bad:
            raise TensorcutError(f"unknown column(s) {bad}; known: {', '.join(COLUMNS)}")
        if not where:
            return "", []
        return " WHERE " + " AND ".join(f"{c} = ?" for c in where), list(where.values())

    def rows(self, **where: Any) -> list[dict[str, Any]]:
        """All result rows (dicts, ``extra`` decoded), in insertion order."""
        sql, args = self._where(where)
        cur = self.conn.execute(f"SELECT {', '.join(COLUMNS)} FROM results{sql} ORDER BY id", args)
        out = []
        for r in cur:
            d = dict(zip(COLUMNS, r, strict=True))
            if d.get("extra"):
                d["extra"] = json.loads(d["extra"])
            out.append(d)
        return out

    def spectra(self, **where: Any) -> list[dict[str, Any]]:
        """All recorded spectra (``shape`` and ``singular_values`` decoded)."""
        bad = [c for c in where if c not in SPECTRUM_COLUMNS]
        if bad:
            raise TensorcutError(f"unknown spectrum column(s) {bad}")
        sql = (" WHERE " + " AND ".join(f"{c} = ?" for c in where)) if where else ""
        cur = self.conn.execute(
            f"SELECT {', '.join(SPECTRUM_COLUMNS)} FROM spectra{sql} ORDER BY rowid",
            list(where.values()),
        )
        out = []
        for r in cur:
            d = dict(zip(SPECTRUM_COLUMNS, r, strict=True))
            d["shape"] = json.loads(d["shape"])
            d["singular_values"] = json.loads(d["singular_values"])
            out.append(d)
        return out

    def count(self) -> int:
        """Number of result rows."""
        return int(self.conn.execute("SELECT COUNT(*) FROM results").fetchone()[0])

    # -- export ------------------------------------------------------------------------

    def results_csv(self) -> str:
        """The results table as CSV text."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(COLUMNS)
        for d in self.rows():
            extra = d.get("extra")
            d["extra"] = (
                json.dumps(extra, sort_keys=True) if isinstance(extra, (dict, list)) else extra
            )
            w.writerow([_fmt(d[c]) for c in COLUMNS])
        return buf.getvalue()

    def spectra_csv(self) -> str:
        """The spectra in long form (one singular value per line) as CSV text."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(
            [
                "fingerprint",
                "model",
                "layer",
                "depth",
                "bipartition",
                "shape",
                "index",
                "singular_value",
                "entropy_vn",
                "entropy_literal",
            ]
        )
        for d in self.spectra():
            for i, s in enumerate(d["singular_values"]):
                w.writerow(
                    [
                        d["fingerprint"],
                        d["model"],
                        d["layer"],
                        d["depth"],
                        d["bipartition"],
                        "x".join(str(x) for x in d["shape"]),
                        i + 1,
                        repr(s),
                        d["entropy_vn"],
                        d["entropy_literal"],
                    ]
                )
        return buf.getvalue()

    def export_csv(self, path: str | Path, *, spectra_path: str | Path | None = None) -> Path:
        """Write the results (and optionally spectra) as CSV, atomically."""
        from tensorcut.checkpoint.io import atomic_write_text

        atomic_write_text(Path(path), self.results_csv())
        if spectra_path is not None:
            atomic_write_text(Path(spectra_path), self.spectra_csv())
        return Path(path)

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _fmt(v: Any) -> Any:
    return "" if v is None else (repr(v) if isinstance(v, float) else v)


def open_results(results: str | Path | ResultsStore) -> tuple[ResultsStore, bool]:
    """(store, owned): open a path read-only-ish, or pass an open store through."""
    if isinstance(results, ResultsStore):
        return results, False
    return ResultsStore(results, create=False), True


__all__ = ["ResultsStore", "open_results", "KEY_COLUMNS", "COLUMNS", "SCHEMA_VERSION"]
