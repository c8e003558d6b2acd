# Two commands do all the set-up: `make demo` runs the main job, `make test` runs lint, types, docs and tests.
# Both create and fill .venv themselves; a second run reinstalls nothing unless pyproject.toml changed.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch build to install. The default takes the pinned wheels; GPU or CPU-only users can override it,
# e.g. make demo TORCH_PACKAGES="torch torchvision --index-url https://download.pytorch.org/whl/cpu"
TORCH_PACKAGES ?= torch==2.14.1 torchvision==0.29.1
PIP := $(BIN)/python -m pip --disable-pip-version-check
STAMP := $(VENV)/.stamp
LINT_PATHS := $(wildcard lightning_hybridcomp tests benchmarks examples)

.PHONY: demo test lint typecheck docs pytest install install-dev docs-results clean

# The main job on the embedded default: baseline -> 4 pruned int8 experts -> MoE (k=1, 2) -> report.
# Re-running resumes from runs/pipeline; add FORCE=--force to redo everything.
demo: $(STAMP)-base
	$(BIN)/hybridcomp pipeline --run_dir runs/pipeline $(FORCE)

test: lint typecheck docs pytest

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP)-torch: | $(BIN)/python
	$(PIP) install -q $(TORCH_PACKAGES)
	@touch $@

$(STAMP)-base: pyproject.toml $(STAMP)-torch
	$(PIP) install -q -e ".[edge]"
	@touch $@

$(STAMP)-dev: pyproject.toml $(STAMP)-base
	$(PIP) install -q -e ".[dev]"
	@touch $@

install: $(STAMP)-base
install-dev: $(STAMP)-dev

lint: $(STAMP)-dev
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

typecheck: $(STAMP)-dev
	$(BIN)/mypy

docs: $(STAMP)-dev
	$(BIN)/mkdocs build --strict --quiet --site-dir $(VENV)/site

# Tests run single-threaded (tests/conftest.py), so two workers use the two cores of a small machine; each
# test file runs in one worker, so its module-scoped fixtures are built once.
PYTEST_WORKERS ?= 2
pytest: $(STAMP)-dev
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile --durations=25

# Regenerate the measured table and plot shown in docs/results.md from a fresh default run.
docs-results: $(STAMP)-base
	$(BIN)/hybridcomp pipeline --run_dir runs/docs-results --force
	cp runs/docs-results/pareto.png docs/pareto.png
	sed -e '1s/.*/# Measured: the embedded default pipeline run/' runs/docs-results/report.md > docs/results.md

clean:
	rm -rf $(VENV) site .pytest_cache .mypy_cache .ruff_cache runs
