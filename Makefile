# Two commands a user needs: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export NO_MKDOCS_2_WARNING := 1
export DISABLE_MKDOCS_2_WARNING := true
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: demo test lint docs serve-docs bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit("Python >= 3.11 is required, found " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,docs]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/birdnet-stm32 demo --out demo_output

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check birdnet_stm32 tests scripts bench docs

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

serve-docs: $(STAMP)
	$(BIN)/mkdocs serve

bench: $(STAMP)
	$(BIN)/python bench/data_pipeline.py
	$(BIN)/python bench/lr_finder.py
	$(BIN)/python bench/training.py
	$(BIN)/python bench/export.py
	$(BIN)/python bench/evaluation.py

clean:
	rm -rf $(VENV) demo_output site .pytest_cache
