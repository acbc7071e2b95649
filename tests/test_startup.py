"""Reading results never imports torch: `cfbench leaderboard` and `cfbench show` tabulate and
print JSON records, so they start in the time of pandas and scipy, not of torch (importing
torch alone takes seconds). Each command runs in a fresh interpreter, as a user runs it.
`cfbench list` does import torch: it imports the strategy modules to read their registered
names and typed hyperparameters, and those modules define their classes on torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cfbench.records import RunRecord
from cfbench.store import Store
from tests.test_hostile_outputs import good_record

PROBE = ("import json, sys\nfrom cfbench.cli import main\ncode = main(sys.argv[1:])\n"
         "print(code, json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')))")


def torch_modules_after(*argv: str) -> list[str]:
    """The torch modules imported by `cfbench ARGV`, run in a fresh interpreter; it must
    succeed."""
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    code, modules = proc.stdout.splitlines()[-1].split(" ", 1)
    assert code == "0", proc.stdout + proc.stderr
    return json.loads(modules)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("records") / "runs"
    folder.mkdir()
    for seed, run_id in enumerate(["0123456789abcdef", "00000000000000ff"]):
        record = good_record(run_id=run_id, seed=seed)
        record["selection"] = {"by": "cfbench tune", "criterion": "acc", "candidates": 2,
                               "chosen": {}, "validation_acc": 0.9, "tuning_seeds": [5],
                               "validation": {"fraction": 0.1, "seed": 0}}
        (folder / f"{run_id}.json").write_text(json.dumps(record))
    return folder


@pytest.mark.parametrize("command", [
    ["leaderboard", "--records", "{runs}"],
    ["leaderboard", "--records", "{runs}", "--format", "csv", "--format", "html", "--format",
     "json", "--plots", "--out", "{tmp}"],
    ["leaderboard", "--store", "{store}", "--format", "md"],
    ["show", "0123", "--out", "{runs}"],
    ["show", "0123", "--store", "{store}"],
], ids=["leaderboard", "leaderboard files", "leaderboard store", "show", "show store"])
def test_reading_commands_do_not_import_torch(command, runs, tmp_path):
    store = tmp_path / "runs.sqlite"
    with Store(store) as db:
        db.put_many(RunRecord.from_dict(json.loads(p.read_text())) for p in runs.glob("*.json"))
    argv = [part.format(runs=runs, store=store, tmp=tmp_path / "out") for part in command]
    assert torch_modules_after(*argv) == []
