# The two commands of the README. Each creates .venv and installs what it needs on first use.
#   make leaderboard   naive, joint and EWC on Split MNIST, all three settings
#   make test          the test suite (what CI runs through .ci/run)
PYTHON ?= python3
VENV ?= .venv
# This machine's pip serves these CPU-capable builds from local disk; override elsewhere,
# e.g. make test TORCH="torch torchvision".
TORCH ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install leaderboard test bench lint

$(STAMP): pyproject.toml
	@echo "Installing cfbench and torch into $(VENV) (first run only; torch is large)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(STAMP)

leaderboard: $(STAMP)
	$(BIN)/cfbench data fetch mnist
	$(BIN)/cfbench run --scenario split-mnist --setting all --strategy naive,joint,ewc \
		--out results/split-mnist/runs
	$(BIN)/cfbench leaderboard --records results/split-mnist/runs --format md \
		> results/split-mnist/leaderboard.md

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks -s --benchmark-only --benchmark-columns=min,median,max,rounds

lint: $(STAMP)
	$(BIN)/ruff check .
