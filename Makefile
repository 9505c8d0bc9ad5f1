# The README's two commands: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint install sample-corpus bench cluster-up cluster-down clean gpu-wheels gpu-check gpu-check-cpu

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
	$(PY) benchmarks/pruning_decode.py --quick

# The GPU check (benchmarks/gpu_check.py). `make gpu-check OUT=DIR` on a CUDA machine whose
# python has torch (no Ray needed); the wheels of `make gpu-wheels`, where present in .whl/, are
# installed first into a scratch folder (for a machine without DeepSpeed and no network).
GPU_PYTHON ?= python3
OUT ?= runs/gpu-check
GPU_SITE ?= /tmp/gpthf-gpu-site
GPU_CHECK_ARGS ?=
# DeepSpeed and what it needs beyond a CUDA machine's usual torch image, for CPython 3.12.
GPU_WHEELS := hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
	typing-inspection==0.4.5

gpu-wheels: $(STAMP)
	mkdir -p .whl
	$(PY) -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	@ls -la .whl

gpu-check:
	@if ls .whl/*.whl >/dev/null 2>&1; then \
		$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
			--upgrade --target $(GPU_SITE) .whl/*.whl || exit 1; fi
	PYTHONPATH=$(GPU_SITE)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) benchmarks/gpu_check.py --out $(OUT) $(GPU_CHECK_ARGS)

gpu-check-cpu: $(STAMP)
	$(PY) benchmarks/gpu_check.py --cpu --out $(OUT)-cpu $(GPU_CHECK_ARGS)

cluster-up: $(STAMP)
	infra/local/up.sh

cluster-down:
	infra/local/down.sh

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
