# `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-slow lint demo bench bench-worker clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Synthesizes a T1 from the shipped demo tissue map with the shipped `demo` model (demo-output/).
demo: $(STAMP)
	$(PY) training/demo.py

# Worker wall time against model forward time, start-up time; memory-guard calibration.
bench-worker: $(STAMP)
	$(PY) bench/bench_worker.py
	$(PY) bench/bench_memory.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
