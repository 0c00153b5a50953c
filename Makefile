# The two entry points: `make demo` (compare methods on MiniLM and the embedded data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0  # the CPU wheel; never a CUDA build
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev,demo]"
	touch $@

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/loraplex compare --methods lora,dora,c3a,miss,singlora --budget-like lora:8 \
		--epochs 1 --out runs/demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python tools/size.py --check  # the size budget: total code lines, method files over 250 lines

test: lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

docs: $(STAMP)  # the documentation site, offline, into site/ (strict: a warning fails)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[docs]"
	HF_HUB_OFFLINE=1 NO_MKDOCS_2_WARNING=1 $(BIN)/python docs/gen.py
	HF_HUB_OFFLINE=1 NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/speed.py --markdown benchmarks/results/speed.md

clean:
	rm -rf $(VENV) runs site docs/generated .pytest_cache .ruff_cache .mypy_cache
