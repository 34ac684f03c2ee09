"""The docs' examples run (at tiny scale) and the generated CLI reference is current."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_example_runs(script, tmp_path):
    args = [sys.executable, str(ROOT / "examples" / script)]
    if script == "study_compressibility.py":
        args.append(str(tmp_path / "study"))
    r = subprocess.run(args + ["--tiny"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip()


def test_cli_reference_is_current():
    from tensorcut.cli.reference import cli_reference

    assert (ROOT / "docs" / "cli.md").read_text() == cli_reference(), (
        "docs/cli.md is stale: run `python -m tensorcut.cli.reference > docs/cli.md`"
    )
