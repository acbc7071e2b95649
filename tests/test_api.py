"""The Python API (`cfbench.run`, `cfbench.load_records`, `cfbench.tabulate`): the README's
example runs as printed, and the API is the command line's path: the same run ids, the same R
bitwise, the same table, the same refusals."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import cfbench
from cfbench.cli import main
from cfbench.errors import CfbenchError
from cfbench.records import read_records

README = Path(__file__).resolve().parents[1] / "README.md"
DIGITS = dict(scenario="split-digits", setting="task", iterations=5)
COSTS = ("train_seconds", "peak_rss_mb", "peak_gpu_mb", "train_gflops", "state_mb")


def readme_example() -> str:
    """The first Python block of the README's "Python API" section."""
    section = README.read_text().split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    (first, *_) = re.findall(r"```python\n(.*?)```", section, re.S)
    return first


def test_the_readme_example_runs(mnist_root, tmp_path):
    proc = subprocess.run([sys.executable, "-c", readme_example()], cwd=tmp_path, text=True,
                          capture_output=True, timeout=600,
                          env={**os.environ, "CFBENCH_DATA": str(mnist_root),
                               "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert len(read_records(tmp_path / "my-runs")) == 4
    lines = proc.stdout.splitlines()
    assert sum(line.startswith(("naive 0 ok", "naive 1 ok", "ewc 0 ok", "ewc 1 ok"))
               for line in lines) == 4
    assert lines[-1] == "4 records"


def test_the_api_is_the_command_lines_path(digits_root, tmp_path, capsys):
    argv = ["run", "--scenario", "split-digits", "--setting", "task", "--strategy", "naive,ewc",
            "--hp", "ewc.lam=50", "--seeds", "2", "--iterations", "5", "--quiet",
            "--data-root", str(digits_root), "--out", str(tmp_path / "cli")]
    assert main(argv) == 0
    capsys.readouterr()
    records = cfbench.run(strategies="naive,ewc", hparams={"ewc": {"lam": 50}}, seeds=2,
                          data_root=digits_root, out=tmp_path / "api", **DIGITS)
    cli = {r.run_id: r for r in read_records(tmp_path / "cli")}
    assert sorted(r.run_id for r in records) == sorted(cli) and len(cli) == 4
    for record in records:
        assert record.R == cli[record.run_id].R  # bitwise
        assert record.command is None and cli[record.run_id].command.startswith("cfbench run")
    table = cfbench.tabulate(records)
    same = [c for c in table if not c.startswith(COSTS)]  # costs are measured anew
    pd.testing.assert_frame_equal(table[same], cfbench.tabulate(tmp_path / "cli")[same])
    assert sorted(table["strategy"]) == ["ewc", "naive"] and set(table["seeds"]) == {2}
    assert main(["leaderboard", "--records", str(tmp_path / "api"), "--format", "csv"]) == 0
    printed = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(printed["acc"]) == pytest.approx(list(table["acc"]))


def test_load_records_reads_a_folder_or_a_store_and_filters_by_scenario(digits_root, tmp_path):
    store = tmp_path / "runs.sqlite"
    cfbench.run(strategies=["naive"], data_root=digits_root, out=tmp_path / "runs",
                store=store, **DIGITS)
    (from_folder,) = cfbench.load_records(tmp_path / "runs")
    (from_store,) = cfbench.load_records(store)
    assert from_folder.to_json() == from_store.to_json()
    assert cfbench.load_records(store, scenario="split-mnist") == []
    assert cfbench.load_records(tmp_path / "runs", scenario="split-mnist") == []
    for source in (store, tmp_path / "runs"):  # several scenarios: any of them
        assert cfbench.load_records(source, scenario=["split-mnist", "split-digits"]) != []
        assert cfbench.load_records(source, scenario=["split-mnist", "permuted-mnist"]) == []


@pytest.mark.parametrize("call, message", [
    (lambda root, out: cfbench.run(strategies="nope", data_root=root, out=out, **DIGITS),
     "unknown strategy 'nope'"),
    (lambda root, out: cfbench.run(strategies="naive", data_root=root, out=out, lr=-1,
                                   **DIGITS), "--lr must be positive"),
    (lambda root, out: cfbench.run(strategies="naive", data_root=root, out=out, speed=3,
                                   **DIGITS), "speed"),
    (lambda root, out: cfbench.tabulate([]), "no successful run records"),
    (lambda root, out: cfbench.tabulate(out), "does not exist"),
])
def test_bad_input_is_one_line_and_writes_nothing(call, message, digits_root, tmp_path):
    with pytest.raises(CfbenchError, match=re.escape(message)) as error:
        call(digits_root, tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()
