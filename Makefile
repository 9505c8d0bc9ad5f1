# The README's two commands: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint install sample-corpus bench cluster-up cluster-down clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 is pinned in pyproject: the CPU build installs from the local wheel cache.
	$(PY) -m pip install -q -e '.[dev,hf]'
	@touch $(STAMP)

install: $(STAMP)

sample-corpus: $(STAMP)
	$(PY) -m pipeline.sample_corpus

demo: $(STAMP)
	$(VENV)/bin/gpthf demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: $(STAMP) sample-corpus lint
	$(PY) -m pytest -q

bench: $(STAMP) sample-corpus
	$(PY) benchmarks/preprocess.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/generation.py --quick
	$(PY) benchmarks/train_step.py --quick
	$(PY) benchmarks/eval.py --quick

cluster-up: $(STAMP)
	infra/local/up.sh

cluster-down:
	infra/local/down.sh

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
