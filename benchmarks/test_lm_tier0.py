"""What a tier-0 language-model run costs at its defaults: textgenrnn's pretrained character
LSTM fine-tuned on code (lm-general-to-code) and on three domains in sequence
(lm-general-to-bible-docs-code), naive, one seed, the whole `cfbench run` process on 2 threads.

Target (issue 15): at most 5 minutes of wall time on 2 CPU cores for the default run. The
table splits each run into training, evaluation and the rest (start-up, reading the corpora,
cutting windows, loading the pretrained weights).

    pytest benchmarks/test_lm_tier0.py -s
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cfbench.data import data_root
from cfbench.data.text import fetch_corpus
from cfbench.data.textgenrnn import fetch_textgenrnn

TARGET_SECONDS = 300
SCENARIOS = {"lm-general-to-code": ("fortunes", "python-code"),
             "lm-general-to-bible-docs-code": ("fortunes", "bible-kjv", "python-docs",
                                               "python-code")}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_default_tier0_run_fits_five_minutes_on_two_cores(benchmark, scenario, tmp_path):
    root = data_root()
    fetch_textgenrnn(root)
    for corpus in SCENARIOS[scenario]:
        fetch_corpus(corpus, root)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "CFBENCH_DATA": str(root)}
    walls: list[float] = []

    def one_run() -> None:
        out = tmp_path / f"runs-{len(walls)}"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cfbench.cli", "run", "--scenario", scenario,
                        "--strategy", "naive", "--out", str(out), "--quiet"], env=env,
                       check=True, capture_output=True)
        walls.append(time.perf_counter() - start)

    benchmark.pedantic(one_run, rounds=1, iterations=1)
    (record,) = (json.loads(p.read_text()) for p in Path(tmp_path, "runs-0").glob("*.json"))
    cost, wall = record["cost"], walls[0]
    train, evaluation = cost["train_seconds"], cost["eval_seconds"]
    print(f"\n{scenario}, naive, defaults, 2 threads: wall {wall:.0f} s = training {train:.0f} s "
          f"+ evaluation {evaluation:.0f} s + the rest {wall - train - evaluation:.0f} s; "
          f"source log-perplexity {record['metrics']['source_logppl_increase']:+.3f} nats")
    assert wall <= TARGET_SECONDS, f"{scenario} took {wall:.0f} s, target {TARGET_SECONDS} s"
