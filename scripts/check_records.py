"""Rerun committed records and compare them bitwise: does the code still give what results/ says?

For every folder of records under ``results/`` this takes, per (scenario, strategy), the cheapest
finished record, rebuilds its configuration, checks that the configuration still hashes to the
record's run id, runs it on the CPU with the threads the record ran with, and compares R
exactly (every float, bit for bit). A run id that changed means the configuration's schema or
a protocol default moved; an R that changed means the arithmetic or the order of random draws
moved. Either is reported, with the record.

    python scripts/check_records.py                 # every folder (about 30 CPU-minutes)
    python scripts/check_records.py --folder mnist-to-fashion --workers 2

Exit status: 0 when every rerun matches, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results"


@dataclass(frozen=True)
class Check:
    """One committed record to rerun."""

    path: Path
    label: str
    seconds: float


def _ignored(folder: Path) -> bool:
    """True for a folder git ignores: records a user made (`make leaderboard`'s
    results/quick-look), not committed ones."""
    try:
        return subprocess.run(["git", "check-ignore", "-q", str(folder)], cwd=RESULTS,
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def committed_checks(folders: Iterable[str] | None) -> list[Check]:
    """Per results folder and (scenario, strategy), the finished record that ran fastest."""
    chosen: dict[tuple[str, str, str], Check] = {}
    for runs in sorted(RESULTS.glob("*/runs")):
        if (folders and runs.parent.name not in folders) or _ignored(runs):
            continue
        for path in sorted(runs.glob("*.json")):
            record = json.loads(path.read_text())
            if record["status"] != "ok":
                continue
            c = record["config"]
            seconds = record["cost"]["train_seconds"] + record["cost"]["eval_seconds"]
            key = (runs.parent.name, c["scenario"], c["strategy"])
            label = (f"{runs.parent.name}: {c['scenario']}/{c['setting']}/{c['strategy']} "
                     f"seed {c['seed']} ({record['run_id']})")
            if key not in chosen or seconds < chosen[key].seconds:
                chosen[key] = Check(path, label, seconds)
    return sorted(chosen.values(), key=lambda c: c.seconds)


def rerun(check: Check) -> tuple[Check, str | None, float]:
    """(the check, None if the rerun matches else what differs, seconds taken)."""
    import torch

    from cfbench.data import data_root
    from cfbench.experiment import execute
    from cfbench.records import RunConfig

    record = json.loads(check.path.read_text())
    # CPU kernels split reductions by thread count, so a record reproduces bitwise with the
    # threads it ran with (recorded in its environment).
    torch.set_num_threads(record["env"].get("threads") or 1)
    config = RunConfig.from_dict({**record["config"], "device": "cpu"})
    if config.run_id != record["run_id"]:
        return check, f"run id is now {config.run_id}", 0.0
    start = time.perf_counter()
    fresh = execute(config, data_root())
    seconds = time.perf_counter() - start
    if fresh.status != "ok":
        return check, f"the rerun failed: {fresh.error}", seconds
    if record["R"] != fresh.R:
        rows = [t for t, (a, b) in enumerate(zip(fresh.R, record["R"], strict=True)) if a != b]
        worst = max(abs(x - y) for t in rows
                    for x, y in zip(fresh.R[t], record["R"][t], strict=True))
        return check, f"R differs in rows {rows} (largest difference {worst:.3g})", seconds
    return check, None, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", action="append", help="a folder of results/ (repeatable)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes, each with the threads its record ran with")
    args = parser.parse_args(argv)
    checks = committed_checks(args.folder)
    if not checks:
        print("no committed records found", file=sys.stderr)
        return 2
    print(f"rerunning {len(checks)} committed records "
          f"(recorded cost {sum(c.seconds for c in checks):.0f} s)", flush=True)
    mismatches = 0
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(args.workers, mp_context=context) as pool:
        for check, problem, seconds in pool.map(rerun, checks):
            mismatches += problem is not None
            verdict = "same run id, same R" if problem is None else f"MISMATCH: {problem}"
            print(f"{check.label}: {verdict} [{seconds:.0f} s]", flush=True)
    print(f"{len(checks) - mismatches} of {len(checks)} records reproduced bitwise")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
