# Quick start: `make demo` (set-up, then the offline pipeline) and `make test` (set-up, then the tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_VIDEOS ?= 1000

.PHONY: setup test demo bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $@

test: setup
	$(PY) -m pytest -q

# Synthetic set -> cache with the shipped tiny encoder -> reranker -> metrics; re-running resumes/skips work.
demo: setup
	$(PY) cli.py make-synthetic --out data/synthetic --videos $(DEMO_VIDEOS)
	$(PY) cli.py extract --dataset synthetic --data-root data/synthetic --cache cache/synthetic/demo.zarr
	$(PY) cli.py train-reranker --cache cache/synthetic/demo.zarr --run runs/demo $(if $(wildcard runs/demo/last.pt),--resume,)
	$(PY) cli.py evaluate --cache cache/synthetic/demo.zarr --run runs/demo --split test
	@echo "demo: cache cache/synthetic/demo.zarr, run runs/demo, report runs/demo/eval_test.json"

# Benchmarks (bench/, docs/benchmarks.md): ratios measured side by side; never part of `make test`.
bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) cache/*/ runs/ data/synthetic
