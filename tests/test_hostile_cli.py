"""Bad input as a careless user or an attacker gives it (issue 18): each case is one line on
stderr naming the problem and the fix, exit code 2, no traceback, and nothing written, before
anything trains. Driven in-process: a subprocess would import torch again for every case."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from cfbench import data, runs
from cfbench.cli import main
from tests.test_sweep import one_thread  # noqa: F401 (an autouse fixture)

NO_BUDGET = ["run", "--scenario", "split-digits", "--strategy", "naive", "--quiet", "--data-root",
             "{tmp}/root"]
DIGITS = [*NO_BUDGET, "--iterations", "1"]
SWEEP = ["sweep", "{tmp}/sweep.yaml", "--executor", "serial", "--quiet", "--data-root",
         "{tmp}/root"]
SMALL_SWEEP = "scenarios: split-digits\nsettings: task\nstrategies: naive\n" \
              "protocol: {iterations: 1}\n"
HUGE_SWEEP = ("scenarios: split-digits\nsettings: task\nstrategies: naive\nprotocol:\n"
              f"  lr: {[round(0.001 * (i + 1), 3) for i in range(1000)]}\n"
              f"  batch_size: {list(range(1, 1001))}\n")


def a_file(name: str, text: str = "precious\n") -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(text)
    return make


def a_directory(name: str) -> Callable[[Path], None]:
    return lambda tmp: (tmp / name).mkdir(parents=True)


def mnist_with_a_directory(tmp: Path) -> None:
    """MNIST's files in a root, one of them a directory (a bad unpack or a user's mistake)."""
    target = tmp / "root" / "mnist"
    target.mkdir(parents=True)
    for name in data.IDX_FILES[:-1]:
        (target / name).symlink_to(data.data_root() / "mnist" / name)
    (target / data.IDX_FILES[-1]).mkdir()


def serving_real_mnist(scratch: Path) -> Path:
    """A fetch source that serves the real MNIST files (no network)."""
    return data.data_root() / "mnist"


@dataclass(frozen=True)
class Case:
    args: list[str]
    expected: str
    """A substring of the one line on stderr."""
    setup: Callable[[Path], None] | None = None
    code: int = 2
    mnist: bool = False
    """Needs the real MNIST files (``$CFBENCH_DATA``)."""


CASES = {
    # argparse's own errors: one line naming the flag, not a 12-line usage block.
    "epochs 0": Case([*NO_BUDGET, "--epochs", "0"], "argument --epochs: expected a positive"),
    "epochs inf": Case([*NO_BUDGET, "--epochs", "inf"], "argument --epochs: expected a positive"),
    "lr nan": Case([*DIGITS, "--lr", "nan"], "argument --lr: expected a positive number"),
    "seeds 0": Case([*DIGITS, "--seeds", "0"], "argument --seeds: expected a positive integer"),
    "batch size -1": Case([*DIGITS, "--batch-size", "-1"], "argument --batch-size"),
    "tasks 0": Case([*DIGITS, "--tasks", "0"], "argument --tasks: expected a positive integer"),
    "iterations 1.5": Case([*DIGITS, "--iterations", "1.5"], "argument --iterations"),
    "workers 0": Case([*DIGITS, "--workers", "0"], "argument --workers"),
    "timeout -5": Case([*DIGITS, "--timeout", "-5"], "argument --timeout"),
    "unknown flag": Case([*DIGITS, "--epoks", "3"], "unrecognized arguments: --epoks 3"),
    "missing value": Case([*DIGITS, "--seeds"], "argument --seeds: expected one argument"),
    "missing required": Case(["run", "--scenario", "split-digits"],
                             "required: --strategy (see `cfbench run --help`)"),
    "invalid choice": Case([*DIGITS, "--optimizer", "rmsprop"],
                           "argument --optimizer: invalid choice: 'rmsprop'"),
    "two budgets": Case([*DIGITS, "--epochs", "1"], "not allowed with argument --iterations"),
    "no command": Case([], "required: command (see `cfbench --help`)"),
    "sweep without file": Case(["sweep"], "required: file"),
    "scenario seed -1": Case([*DIGITS, "--scenario-seed", "-1"],
                             "argument --scenario-seed: expected a seed >= 0 or 'seed', got '-1'"),
    # Outputs are checked before anything trains.
    "out is a file": Case([*DIGITS, "--out", "{tmp}/taken"], "--out {tmp}/taken is a file",
                          a_file("taken")),
    "store under a file": Case([*DIGITS, "--store", "{tmp}/taken/s.db"],
                               "{tmp}/taken is a file, not a directory", a_file("taken")),
    "store is a directory": Case([*SWEEP, "--store", "{tmp}/db"],
                                 "--store {tmp}/db is a directory", a_directory("db")),
    "sweep out is a file": Case([*SWEEP, "--store", "{tmp}/s.db", "--out", "{tmp}/taken"],
                                "--out {tmp}/taken is a file", a_file("taken")),
    "reproduce out is a file": Case(["reproduce", "hsu2018-split-mnist", "--out", "{tmp}/taken",
                                     "--row", "Adam", "--setting", "task", "--seeds", "1",
                                     "--epochs", "0.01"],
                                    "{tmp}/taken is a file, not a directory", a_file("taken"),
                                    mnist=True),
    "leaderboard out is a file": Case(["leaderboard", "--records", "{tmp}/root", "--out",
                                       "{tmp}/taken"], "--out {tmp}/taken is a file",
                                      a_file("taken")),
    # Sizes: refused with the numbers, before anything is built.
    "tasks beyond memory": Case(["run", "--scenario", "permuted-mnist", "--strategy", "naive",
                                 "--tasks", "100000", "--setting", "task"],
                                "100000 tasks need about 5", mnist=True),
    "too many seeds": Case([*DIGITS, "--setting", "task", "--seeds", "20000"], "20000 runs"),
    "huge sweep grid": Case([*SWEEP, "--store", "{tmp}/s.db"], "1000000 runs",
                            a_file("sweep.yaml", HUGE_SWEEP)),
    # Data: a directory where a file belongs says so; a failed fetch rewrites nothing.
    "data file is a directory": Case(["run", "--scenario", "split-mnist", "--strategy", "naive",
                                      "--data-root", "{tmp}/root"],
                                     "t10k-labels-idx1-ubyte is a directory",
                                     mnist_with_a_directory, mnist=True),
    "fetch over a directory": Case(["data", "fetch", "mnist", "--data-root", "{tmp}/root"],
                                   "t10k-labels-idx1-ubyte is a directory",
                                   mnist_with_a_directory, mnist=True),
}


def snapshot(tmp: Path) -> dict[str, tuple]:
    """Every path under `tmp` with its kind, size, inode and modification time."""
    return {str(p.relative_to(tmp)): (p.is_dir(), p.lstat().st_size, p.lstat().st_ino,
                                      p.lstat().st_mtime_ns) for p in tmp.rglob("*")}


@pytest.mark.parametrize("name", CASES, ids=list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, tmp_path, monkeypatch, capsys,
                                                        request):
    case = CASES[name]
    if case.mnist:
        request.getfixturevalue("mnist_root")
    monkeypatch.chdir(tmp_path)  # default outputs (results/...) would land here
    monkeypatch.setitem(data.SOURCES, "mnist", (serving_real_mnist,))
    (tmp_path / "root").mkdir(exist_ok=True)
    a_file("sweep.yaml", SMALL_SWEEP)(tmp_path)
    if case.setup:
        case.setup(tmp_path)
    before = snapshot(tmp_path)
    capsys.readouterr()
    code = main([arg.format(tmp=tmp_path) for arg in case.args])
    err = capsys.readouterr().err
    assert code == case.code, err
    assert err.startswith("cfbench: error: ") and err.count("\n") == 1, err
    assert case.expected.format(tmp=tmp_path) in err
    assert snapshot(tmp_path) == before


def test_many_runs_proceed_with_yes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runs, "MOST_RUNS", 1)
    sweep = a_file("sweep.yaml", SMALL_SWEEP.replace("naive", "[naive, ewc]"))
    sweep(tmp_path)
    args = [arg.format(tmp=tmp_path) for arg in [*SWEEP, "--store", "{tmp}/s.db", "--dry-run"]]
    (tmp_path / "root").mkdir()
    assert main(args) == 2
    assert "2 runs" in capsys.readouterr().err
    assert main([*args, "--yes"]) == 0

