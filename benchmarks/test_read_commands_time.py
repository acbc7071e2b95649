"""Wall time of the commands that only read results, `cfbench leaderboard` and `cfbench show`,
each in a fresh interpreter over the committed Split MNIST records, next to `import torch` alone,
best of `ROUNDS`. Neither imports torch, so each must take less than importing it does.

    pytest benchmarks/test_read_commands_time.py -s
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

RUNS = Path(__file__).resolve().parents[1] / "results" / "split-mnist" / "runs"
ROUNDS = 3
CLI = [sys.executable, "-m", "cfbench.cli"]


def best_seconds(argv: list[str]) -> float:
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return min(times)


def test_reading_commands_start_faster_than_torch_imports(benchmark):
    run_id = sorted(RUNS.glob("*.json"))[0].stem
    commands = {
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "cfbench leaderboard": [*CLI, "leaderboard", "--records", str(RUNS)],
        "cfbench show": [*CLI, "show", run_id[:8], "--out", str(RUNS)],
    }
    seconds: dict[str, float] = {}
    benchmark.pedantic(lambda: seconds.update({k: best_seconds(v) for k, v in commands.items()}),
                       rounds=1, iterations=1)
    benchmark.extra_info.update(seconds=seconds)
    print("\n" + ", ".join(f"{k}: {v:.2f} s" for k, v in seconds.items()))
    torch = seconds.pop("python -c 'import torch'")
    assert all(v < torch for v in seconds.values()), seconds
