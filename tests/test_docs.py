"""Every fenced code block in README.md and docs/*.md runs, at tiny scale.

How a block is run (the files are read when the tests are collected, so the README as it is
now is what gets tested):

* ```` ```python ```` blocks run as a script with this Python. A name the block reads before
  defining it (``model``, ``train_loader``, ``conv`` ...) is provided by a prelude from
  :data:`GIVEN`; a name missing there fails the test with its name.
* ```` ```sh ````/```` ```bash ````/```` ```shell ```` blocks run as a bash script (``set -e``),
  ```` ```console ```` blocks the same with their ``$ `` lines. ``tensorcut``, ``python`` and
  ``torchrun`` resolve to this virtual environment. Lines starting with a command in
  :data:`NOT_RUN` (``make``, ``pip`` ...) are not run; a block left with nothing is skipped.
* ```` ```text ```` blocks (diagrams, formulas, usage text) are not code. A fence without a
  language fails :func:`test_every_block_names_its_language`.
* Before running, the text of each block is rewritten by :data:`SH_SUBSTITUTIONS` /
  :data:`PY_SUBSTITUTIONS` (one epoch, the embedded 8x8 ``digits`` data instead of files,
  narrow models, two processes) and options in :data:`SH_APPENDED` are added to verbs that
  lack them.
* The blocks of one page run in order in one directory, like a reader following the page;
  it starts with ``runs/dense``, a tiny trained ``vanilla-cnn`` on ``digits``.
* The line just before a fence may hold a directive:
  ``<!-- docs-test: skip (needs 4 GPUs) -->`` skips the block with that reason (for GPUs,
  several machines, data files or hours only); ``<!-- docs-test: slow -->`` marks it slow.
  Shell blocks matching :data:`SLOW_SHELL` (several processes, the whole pipeline, recovery
  training) are slow anyway. Measured once: the rest (``pytest -m "not slow"``) used 1.6 minutes
  of CPU time (one thread per process), the whole file 5.5.

Test ids are ``FILE:LINE`` of the opening fence.
"""

from __future__ import annotations

import ast
import builtins
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_LANGS = {"python", "sh", "bash", "shell", "console"}
TEXT_LANGS = {"text"}

#: (pattern, replacement, why) applied to shell blocks before running them.
SH_SUBSTITUTIONS: list[tuple[str, str, str]] = [
    (r"--epochs[ =]\d+", "--epochs 1", "one epoch"),
    (r"--finetune-epochs[ =]\d+", "--finetune-epochs 1", "one fine-tuning epoch"),
    (
        r"--dataset[ =](?:fashion-mnist|cifar100|cifar10)\b",
        "--dataset digits",
        "the embedded 8x8 data, no files",
    ),
    (r"[ \t]+--data-dir[ =]\S+", "", "no data files"),
    (r"--width[ =][\d.]+", "--width 0.125", "a narrow model"),
    (r"--model[ =]resnet56\b", "--model resnet20", "a shallower ResNet"),
    (r"--nproc_per_node=\d+", "--nproc_per_node=2", "two processes"),
    (r"--recover[ =]\d+", "--recover 1", "one recovery epoch"),
    (r"--batch-size[ =]\d+", "--batch-size 64", "a batch digits' splits fill"),
    (r"\bWORLD_SIZE=4\b", "WORLD_SIZE=2", "two shards"),
    (r"\bfor i in 0 1 2 3;", "for i in 0 1;", "two shards"),
]

#: Options added to a verb's command line when the block does not give them (tiny scale).
SH_APPENDED: dict[str, list[tuple[str, str]]] = {
    "train": [("--width", "0.125"), ("--epochs", "1")],
    "run": [
        ("--calib-subset", "32"),
        ("--finetune-epochs", "1"),
        ("--probe-epochs", "0"),
        ("--epochs", "1"),
        ("--width", "0.125"),
    ],
    "finetune": [("--epochs", "1")],
    "analyze": [("--subset", "64")],
}

#: (pattern, replacement, why) applied to Python blocks before running them.
PY_SUBSTITUTIONS: list[tuple[str, str, str]] = [
    (r'"(?:fashion-mnist|cifar100|cifar10)"', '"digits"', "the embedded 8x8 data, no files"),
    (r"\bepochs=\d+", "epochs=1", "one epoch"),
    (r"\binput_size=28\b", "input_size=8", "digits are 8x8"),
    (r'device="cuda"', 'device="cpu"', "no GPU"),
]

#: Names a Python block may use without defining them (the page says what they stand for).
GIVEN: dict[str, str] = {
    "model": "from tensorcut import models as _m\n"
    "model = _m.create('resnet20', num_classes=10, in_channels=3, width=0.25, input_size=32)",
    "conv": "import torch.nn as _nn\nconv = _nn.Conv2d(16, 32, 3, padding=1)",
    "train_loader": "train_loader = _loader(0, shuffle=True)",
    "val_loader": "val_loader = _loader(1)",
    "test_loader": "test_loader = _loader(2)",
    "loader": "loader = _loader(3)",
}
_LOADER = (
    "import torch as _t\n"
    "from torch.utils.data import DataLoader as _DL, TensorDataset as _TD\n"
    "def _loader(seed, shuffle=False):\n"
    "    g = _t.Generator().manual_seed(seed)\n"
    "    return _DL(_TD(_t.randn(64, 3, 32, 32, generator=g), _t.randint(0, 10, (64,), "
    "generator=g)), batch_size=32, shuffle=shuffle)\n"
)

#: Commands in shell blocks that are not run (they set up machines, not tensorcut).
NOT_RUN = ("make", "pip", "apt-get", "sudo", "git")

DIRECTIVE = re.compile(r"<!--\s*docs-test:\s*(.*?)\s*-->")


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    code: str
    directive: str

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """Fenced blocks of a markdown page, with the docs-test directive on the line before each."""
    out: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(`{3,})\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group(1), m.group(2), m.group(3).lower()
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        code = (
            "\n".join(l[len(indent) :] if l.startswith(indent) else l for l in lines[i + 1 : j])
            + "\n"
        )
        prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        d = DIRECTIVE.search(prev)
        out.append(Block(page, i + 1, lang, code, d.group(1) if d else ""))
        i = j + 1
    return out


ALL = [b for p in PAGES for b in blocks(p)]
RUNNABLE = [b for b in ALL if b.lang in RUN_LANGS]


#: Shell commands that make a block slow: several processes (``torchrun``, a background ``&``),
#: the whole pipeline (``tensorcut run`` / ``demo``), recovery training in a study (``--recover``).
SLOW_SHELL = re.compile(r"\btorchrun\b|&\s*(done|$)|\btensorcut (run|demo)\b|--recover\b", re.M)


def is_slow(b: Block) -> bool:
    """Marked ``slow``, or a shell block matching :data:`SLOW_SHELL`."""
    return b.directive.startswith("slow") or (
        b.lang != "python" and bool(SLOW_SHELL.search(b.code))
    )


def _param(b: Block) -> object:
    marks = [pytest.mark.slow] if is_slow(b) else []
    return pytest.param(b, id=b.id, marks=marks)


def test_every_block_names_its_language() -> None:
    bad = [
        f"{b.id} ({b.lang or 'no language'})" for b in ALL if b.lang not in RUN_LANGS | TEXT_LANGS
    ]
    assert not bad, (
        "fenced blocks must say what they are (python / sh / bash / console to run, text for "
        "diagrams and formulas): " + ", ".join(bad)
    )


def test_skips_are_few_and_say_why() -> None:
    skips = [b for b in RUNNABLE if b.directive.startswith("skip")]
    for b in skips:
        assert re.fullmatch(r"skip \(.+\)", b.directive), (
            f"{b.id}: write the reason: <!-- docs-test: skip (why) -->"
        )
    assert len(skips) <= max(3, len(RUNNABLE) // 4), [b.id for b in skips]


def _sub(code: str, table: list[tuple[str, str, str]]) -> str:
    for pat, rep, _ in table:
        code = re.sub(pat, rep, code)
    return code


def shell_script(code: str, console: bool = False) -> str:
    """The block as a tiny-scale bash script (see the module docstring)."""
    if console:
        code = "\n".join(l[2:] for l in code.splitlines() if l.startswith("$ "))
    code = code.replace("\\\n", " ")
    out = []
    for line in code.splitlines():
        words = line.split()
        first = next((w for w in words if not re.match(r"^\w+=", w)), "")
        if not words or line.lstrip().startswith("#"):
            continue
        if first in NOT_RUN:
            out.append(f"# not run: {line}")
            continue
        line = _sub(line, SH_SUBSTITUTIONS)
        m = re.search(r"(?:tensorcut|-m tensorcut)\s+(\w+)", line)
        if m and m.group(1) in SH_APPENDED:
            verb_end = m.end()
            cmd_end = min(
                [i for i in (line.find(c, verb_end) for c in ("&", ";", "#", "|")) if i >= 0]
                or [len(line)]
            )
            cmd = line[:cmd_end].rstrip()
            extra = [
                f"{opt} {val}"
                for opt, val in SH_APPENDED[m.group(1)]
                if opt not in cmd
                and not (
                    opt in ("--epochs", "--width") and m.group(1) == "run" and "--model" not in cmd
                )
            ]
            line = " ".join([cmd, *extra]) + (" " + line[cmd_end:] if cmd_end < len(line) else "")
        out.append(line)
    return "\n".join(out) + "\n"


class _Free(ast.NodeVisitor):
    """Names read before they are defined, in evaluation order (good enough for examples)."""

    def __init__(self) -> None:
        self.defined: set[str] = set(dir(builtins))
        self.free: list[str] = []

    def visit_Import(self, node: ast.Import | ast.ImportFrom) -> None:
        for a in node.names:
            self.defined.add((a.asname or a.name).split(".")[0])

    visit_ImportFrom = visit_Import

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        for t in node.targets:
            self.visit(t)

    def visit_For(self, node: ast.For) -> None:
        self.visit(node.iter)
        self.visit(node.target)
        for s in node.body + node.orelse:
            self.visit(s)

    def _comp(self, node: ast.AST, elts: list[ast.AST]) -> None:
        for g in node.generators:  # type: ignore[attr-defined]
            self.visit(g)
        for e in elts:
            self.visit(e)

    def visit_ListComp(self, node: ast.ListComp) -> None:
        self._comp(node, [node.elt])

    visit_SetComp = visit_GeneratorExp = visit_ListComp  # type: ignore[assignment]

    def visit_DictComp(self, node: ast.DictComp) -> None:
        self._comp(node, [node.key, node.value])

    def visit_comprehension(self, node: ast.comprehension) -> None:
        self.visit(node.iter)
        self.visit(node.target)
        for c in node.ifs:
            self.visit(c)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.defined.add(node.name)
        self.defined.update(a.arg for a in node.args.args + node.args.kwonlyargs)
        for s in node.body:
            self.visit(s)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self.defined.update(a.arg for a in node.args.args + node.args.kwonlyargs)
        self.visit(node.body)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Store):
            self.defined.add(node.id)
        elif node.id not in self.defined and node.id not in self.free:
            self.free.append(node.id)


def python_script(code: str) -> str:
    """The block at tiny scale, with a prelude defining the names it uses but does not define."""
    code = _sub(code, PY_SUBSTITUTIONS)
    v = _Free()
    v.visit(ast.parse(code))
    missing = [n for n in v.free if n not in GIVEN]
    assert not missing, (
        f"the block uses {missing} without defining them; define them or add them to GIVEN"
    )
    prelude = (_LOADER if any(n.endswith("loader") for n in v.free) else "") + "\n".join(
        GIVEN[n] for n in v.free
    )
    return prelude + "\n" + code


@pytest.fixture(scope="module")
def workspaces(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[Path, Path]:
    """One directory per page, made on first use, holding ``runs/dense``."""

    class Spaces(dict):  # type: ignore[type-arg]
        def __missing__(self, page: Path) -> Path:
            d = tmp_path_factory.mktemp(page.stem)
            shutil.copytree(tiny_checkpoint, d / "runs" / "dense")
            self[page] = d
            return d

    return Spaces()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    env.pop("MASTER_ADDR", None)
    return env


@pytest.mark.parametrize("block", [_param(b) for b in RUNNABLE])
def test_block_runs(block: Block, workspaces: dict[Path, Path]) -> None:
    if block.directive.startswith("skip"):
        pytest.skip(block.directive[4:].strip(" ()") or "marked skip")
    ws = workspaces[block.page]
    if block.lang == "python":
        script = ws / f"block_{block.line}.py"
        script.write_text(python_script(block.code))
        cmd = [sys.executable, str(script)]
    else:
        text = shell_script(block.code, console=block.lang == "console")
        if not any(l.strip() and not l.startswith("#") for l in text.splitlines()):
            pytest.skip(
                "no tensorcut / python command in this block (only " + ", ".join(NOT_RUN) + ")"
            )
        script = ws / f"block_{block.line}.sh"
        script.write_text("set -euo pipefail\n" + text)
        cmd = ["bash", str(script)]
    r = subprocess.run(cmd, cwd=ws, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (
        f"{block.id} failed (exit {r.returncode}) running:\n{script.read_text()}\n"
        f"--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-4000:]}"
    )


def test_substitutions_make_commands_tiny() -> None:
    s = shell_script(
        "torchrun --nproc_per_node=4 -m tensorcut train --model resnet56 --dataset cifar10 \\\n"
        "    --data-dir ~/data/cifar10 --batch-size 512 --epochs 100 --device cpu --out runs/r56\n"
        "make demo\n"
    )
    assert s.splitlines()[0] == (
        "torchrun --nproc_per_node=2 -m tensorcut train --model resnet20 --dataset digits "
        "--batch-size 64 --epochs 1 --device cpu --out runs/r56 --width 0.125"
    )
    assert s.splitlines()[1] == "# not run: make demo"
    s = shell_script(
        "for i in 0 1 2 3; do RANK=$i WORLD_SIZE=4 tensorcut analyze runs/r56 --out s.sqlite & "
        "done; wait"
    )
    assert (
        s.strip()
        == "for i in 0 1; do RANK=$i WORLD_SIZE=2 tensorcut analyze runs/r56 --out s.sqlite "
        "--subset 64 & done; wait"
    )
    py = python_script(
        "from tensorcut.data import load_dataset\n"
        'load_dataset("fashion-mnist", "val")\ndict(epochs=10)'
    )
    assert 'load_dataset("digits", "val")' in py and "dict(epochs=1)" in py


def test_undefined_names_come_from_the_given_table() -> None:
    s = python_script("print(model, train_loader)\nloader = list(loader)\n")
    assert "model = " in s and "train_loader = _loader(0" in s and "loader = _loader(3)" in s
    with pytest.raises(AssertionError, match="without defining them"):
        python_script("print(undefined_thing)")
    assert python_script("x = [i for i in range(3)]\nprint(x)").startswith("\n")
