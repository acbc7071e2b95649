"""What `cfbench run` tells a user while it works: on a terminal, the scenario being loaded
before its data is read, then a bar naming each run as it starts; in a log, one line per
finished run naming its strategy, setting and seed."""

from __future__ import annotations

import re

import pytest

from cfbench import registry
from cfbench.cli import main

# A scenario that says when its data is read: split-digits, announced on stderr.
MARKED = """
import sys

from cfbench import registry
from cfbench.registry import register_scenario


@register_scenario("marked-digits", family="test")
def marked_digits(*, data_root, seed):
    print("READING THE DATA", file=sys.stderr, flush=True)
    return registry.scenarios.get("split-digits").factory(data_root=data_root, seed=seed)
"""


@pytest.fixture
def marked(tmp_path):
    plugin = tmp_path / "marked.py"
    plugin.write_text(MARKED)
    yield str(plugin)
    registry.scenarios.unregister("marked-digits")


def test_on_a_terminal_the_scenario_is_named_before_its_data_loads_and_the_bar_names_each_run(
        marked, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: stderr is an interactive terminal
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    assert main(["run", "--scenario", "marked-digits", "--plugin", marked, "--setting", "task",
                 "--strategy", "naive", "--seeds", "2", "--iterations", "5",
                 "--out", str(tmp_path / "runs")]) == 0
    err = capsys.readouterr().err
    first = err.index("loading marked-digits (data root ")
    assert first < err.index("READING THE DATA")
    for seed in (0, 1):
        bar = err.index(f"running marked-digits/task/naive seed {seed}")
        line = re.search(rf"\[{seed + 1}/2\] ok [0-9a-f]{{16}} marked-digits/task/naive seed "
                         rf"{seed} \(\d+\.\d s training\)\n", err)
        assert line is not None and first < bar < line.start(), err


def test_in_a_log_each_finished_run_is_one_plain_line_and_nothing_comes_before(
        tmp_path, monkeypatch, capsys, digits_root):
    monkeypatch.setenv("TTY_COMPATIBLE", "0")  # a pipe or a file, even under FORCE_COLOR
    assert main(["run", "--scenario", "split-digits", "--setting", "task,class", "--strategy",
                 "naive", "--iterations", "5", "--data-root", str(digits_root),
                 "--out", str(tmp_path / "runs")]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3, lines
    for n, (line, setting) in enumerate(zip(lines, ("task", "class"), strict=False), 1):
        assert re.fullmatch(rf"\[{n}/2\] ok [0-9a-f]{{16}} split-digits/{setting}/naive seed 0 "
                            r"\(\d+\.\d s training\)", line), line
    assert lines[2].startswith("cfbench run: 2 ok, 0 failed")
