"""Start-up cost: `import cfbench` and `cfbench --help`, each in a fresh interpreter (its own
start included; `python -c pass` alone is shown for scale), best of `ROUNDS`. Target: under
1.5 s each.
Neither may import torch (the heavy parts are imported by the commands that need them).

    pytest benchmarks/test_import_time.py -s
"""

from __future__ import annotations

import subprocess
import sys
import time

ROUNDS = 5
COMMANDS = {
    "interpreter": "pass",
    "import cfbench": "import sys, cfbench; assert 'torch' not in sys.modules",
    "cfbench --help": ("import sys, contextlib, io\nfrom cfbench.cli import main\n"
                       "with contextlib.redirect_stdout(io.StringIO()):\n"
                       "    try: main(['--help'])\n    except SystemExit: pass\n"
                       "assert 'torch' not in sys.modules"),
}


def best_seconds(code: str) -> float:
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - start)
    return min(times)


def test_import_and_help_start_fast_without_torch(benchmark):
    seconds = {}
    benchmark.pedantic(lambda: seconds.update({k: best_seconds(c) for k, c in COMMANDS.items()}),
                       rounds=1, iterations=1)
    benchmark.extra_info.update(seconds=seconds)
    print("\n" + ", ".join(f"{k}: {v:.2f} s" for k, v in seconds.items()))
    assert all(v < 1.5 for v in seconds.values())
