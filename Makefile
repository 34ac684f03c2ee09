# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

# Model code for the real-architecture tests (tests/real_networks): timm's and torchvision's model
# definitions. Installed --no-deps: pip would otherwise replace the CPU torch wheel, and torchvision's
# compiled operators do not load beside it anyway (tests/real_networks/_torchvision_ops.py defines
# their schemas before torchvision is imported). pyyaml is the one dependency timm's import needs.
REALNET_PINS := timm==1.0.31 torchvision==0.29.1
REALNET_DEPS := pyyaml

# The numerically sensitive tests, run a second time on PyTorch's portable (non-vectorised) CPU
# kernels: every tolerance must hold for any summation order, not just this CPU's.
PORTABLE_TESTS := tests/layers tests/decompose tests/compression tests/train tests/test_compress.py tests/test_property.py

# after a failed pytest: exit status 5 (nothing collected, i.e. a selection that matches no test) said in words
NOTHING_COLLECTED = { rc=$$?; [ $$rc -ne 5 ] || echo "make $@: pytest collected no tests (exit 5); the selection matches nothing" >&2; exit $$rc; }

.PHONY: demo test lint test-real test-portable venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(REALNET_PINS) && $(PY) -m pip install -q $(REALNET_DEPS)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tensorcut demo --out demo-out

test: $(STAMP)
	$(PY) -m pytest tests || $(NOTHING_COLLECTED)
	$(MAKE) --no-print-directory lint

# style and types, configured in pyproject.toml: ruff (lint + format, line length 100) and mypy
LINT_PATHS := tensorcut tests benchmarks examples
lint: $(STAMP)
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)
	$(PY) -m mypy

# every real architecture (`make test` runs the tier-1 subset of tests/real_networks)
test-real: $(STAMP)
	$(PY) -m pytest tests/real_networks -m real_full || $(NOTHING_COLLECTED)

test-portable: $(STAMP)
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest $(PORTABLE_TESTS) || $(NOTHING_COLLECTED)

clean:
	rm -rf $(VENV) demo-out
