# The two commands of the README. Each creates .venv and installs what it needs on first use.
#   make leaderboard   naive, joint and EWC on Split MNIST, all three settings, into
#                      results/quick-look/ (ignored by git)
#   make test          the test suite (what CI runs through .ci/run; installs the ray extra,
#                      which the sweep tests use, the peers extra (Avalanche, peft), which the
#                      adapter's tests use, and the lm extra (transformers, datasets), which the
#                      language-model tests use, and the tracker extras (tensorboard, wandb,
#                      mlflow), which test_trackers.py reads back)
#   make check-records reruns committed records and compares them bitwise (scripts/check_records.py)
#   make reference     the reference leaderboard in results/reference: every strategy, tuned on
#                      validation, 5 seeds (about 7 hours on 2 cores from scratch; with the
#                      runs already stored it only tabulates)
#   make hsu           Hsu et al. 2018's table, 5 seeds per row (results/hsu2018-split-mnist)
PYTHON ?= python3
VENV ?= .venv
# This machine's pip serves these CPU-capable builds from local disk; override elsewhere,
# e.g. make test TORCH="torch torchvision".
TORCH ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install browser leaderboard reference hsu transfer lm peers test bench lint check-records
STRATEGIES ?= naive,joint,ewc
REF := results/reference

$(STAMP): pyproject.toml
	@echo "Installing cfbench and torch into $(VENV) (first run only; torch is large)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,ray,peers,lm,tensorboard,wandb,mlflow]'
	touch $@

install: $(STAMP)

# Headless Chromium and its driver for the HTML leaderboard test (Debian packages).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		chromium chromium-driver)

# Your own run of what results/split-mnist/ holds (the same runs), into a folder git ignores:
# the committed records and table stay as they are.
QUICK := results/quick-look
leaderboard: $(STAMP)
	$(BIN)/cfbench data fetch mnist
	$(BIN)/cfbench run --scenario split-mnist --setting all --strategy $(STRATEGIES) \
		--out $(QUICK)/runs
	$(BIN)/cfbench leaderboard --records $(QUICK)/runs --format md --out $(QUICK)

# The tune files in results/reference, cheapest and most read first; each keeps its runs in
# $(REF)/NAME.sqlite (validation runs: NAME.validation.sqlite) and writes one JSON record per run
# to $(REF)/runs. --resume skips the runs stored ok. A file whose runs partly failed (exit 1) does
# not stop the others; bad input (2) or Ctrl-C (130) stops the target.
REF_TUNES := split split-memory200 split-memory1000 permuted-rotated permuted-rotated-memory200 \
	permuted-rotated-memory1000 mnist-to-fashion mnist-to-fashion-memory200 \
	mnist-to-fashion-memory1000
reference: $(STAMP)
	$(BIN)/cfbench data fetch mnist
	$(BIN)/cfbench data fetch fashion-mnist
	for name in $(REF_TUNES); do \
		$(BIN)/cfbench tune $(REF)/$$name.yaml --resume --quiet --store $(REF)/$$name.sqlite \
			--out $(REF)/runs; \
		status=$$?; [ $$status -le 1 ] || exit $$status; \
	done
	$(BIN)/cfbench leaderboard --records $(REF)/runs --plots --out $(REF) \
		--format md --format summary --format html --format csv --format json --format latex
	$(BIN)/python scripts/readme_table.py

# Hsu et al. 2018's Split-MNIST table at 5 seeds per row (results/hsu2018-split-mnist; the runs
# already there are kept, so it continues where it stopped; hours on 2 cores, the DGR rows about
# 10 minutes per run).
HSU_SEEDS ?= 5
hsu: $(STAMP)
	$(BIN)/cfbench data fetch mnist
	$(BIN)/cfbench reproduce hsu2018-split-mnist --seeds $(HSU_SEEDS) --executor process \
		--workers 2 --quiet

# The transfer leaderboard in results/mnist-to-fashion (every strategy, 3 seeds; ~45 min on 2 cores).
transfer: $(STAMP)
	$(BIN)/cfbench data fetch mnist
	$(BIN)/cfbench data fetch fashion-mnist
	$(BIN)/cfbench sweep results/mnist-to-fashion/sweep.yaml --resume --quiet \
		--store results/mnist-to-fashion/runs.sqlite --out results/mnist-to-fashion/runs
	$(BIN)/cfbench leaderboard --records results/mnist-to-fashion/runs --plots \
		--out results/mnist-to-fashion --format md --format html --format csv --format json

# The language-model leaderboard in results/lm-general-to-code (tier 0, every applicable
# strategy, 3 seeds): the defaults (about an hour on 2 cores), then values tuned on validation
# (tune.yaml; 1.3-2 hours more: the default point's reported runs are the sweep's, reused).
# The tuned reported records join the defaults in runs/, the validation ones go to
# runs/validation/, which the leaderboard does not read.
lm: $(STAMP)
	$(BIN)/cfbench data fetch textgenrnn
	$(BIN)/cfbench data fetch fortunes
	$(BIN)/cfbench data fetch python-code
	$(BIN)/cfbench sweep results/lm-general-to-code/sweep.yaml --resume --quiet \
		--executor process --workers 2 \
		--store results/lm-general-to-code/runs.sqlite --out results/lm-general-to-code/runs
	$(BIN)/cfbench tune results/lm-general-to-code/tune.yaml --resume --quiet \
		--executor process --workers 2 \
		--store results/lm-general-to-code/tuned.sqlite --out results/lm-general-to-code/runs
	$(BIN)/cfbench leaderboard --records results/lm-general-to-code/runs --plots \
		--out results/lm-general-to-code --format md --format summary --format html --format csv \
		--format json --format latex

# cfbench next to Avalanche 0.6.0 (results/performance/vs_avalanche.json; ~10 min).
peers: $(STAMP)
	$(BIN)/cfbench data fetch mnist
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.vs_avalanche --seeds 1 --rounds 1

# The suite runs in TEST_WORKERS processes (pytest-xdist; a file's tests stay in one, so its
# fixtures are built once) of one thread each, so they do not oversubscribe the cores.
TEST_WORKERS ?= 2
test: $(STAMP) browser
	$(BIN)/ruff check .
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# Rerun one committed record per results folder, scenario and strategy; compare run id and R
# bitwise (about 30 CPU-minutes; WORKERS=2 halves the wall time on 2 cores).
WORKERS ?= 1
check-records: $(STAMP)
	$(BIN)/cfbench data fetch mnist
	$(BIN)/cfbench data fetch fashion-mnist
	$(BIN)/python scripts/check_records.py --workers $(WORKERS)

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks -s --benchmark-only --benchmark-columns=min,median,max,rounds

lint: $(STAMP)
	$(BIN)/ruff check .
