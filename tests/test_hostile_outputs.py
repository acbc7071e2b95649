"""Hostile and careless input (issue 18, defects 2-5), as a table: each case is one command
line over files it builds, and what it must give: exit 2 with one line on stderr naming the
problem and nothing written; or, for input that is valid but hostile (names that are paths,
fields with newlines and markup), exit 0 with every file inside --out and outputs that carry
the text inertly. A case that does otherwise is a traceback (an exception escaped `main`) or
silent (bad input accepted, or an injection that got through)."""

from __future__ import annotations

import copy
import io
import json
import math
import re
import sqlite3
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from cfbench.cli import main
from cfbench.errors import CfbenchError
from cfbench.records import RunRecord, read_record, write_record
from cfbench.scenario import Protocol
from cfbench.store import Store

RUN = ["run", "--scenario", "split-digits", "--setting", "task", "--quiet"]
HOSTILE = "x\n\\immediate\\write18{touch pwned}%|<script>alert(1)</script>`$^^5c[/]~\x1b[31m"
"""Newlines, TeX's backslash, comment and ^^ escape, Markdown's pipe, HTML, backticks, maths,
rich markup, a terminal escape: everything a field of a record must not smuggle into an output."""


def good_record(run_id: str = "0123456789abcdef", seed: int = 0, **config: Any) -> dict:
    """A valid record as `RunRecord.to_json` writes it (two tasks)."""
    return {
        "run_id": run_id, "status": "ok", "error": None, "traceback": None,
        "config": {"scenario": "split-digits", "setting": "task", "strategy": "naive",
                   "hparams": {"naive": {}}, "scenario_options": {}, "scenario_seed": 0,
                   "seed": seed, "protocol": {"model": "mlp:400,400", "epochs": 1.0,
                                              "iterations": None, "batch_size": 128,
                                              "optimizer": "adam", "lr": 0.001,
                                              "eval_batch_size": 4096, "class_scope": "seen",
                                              "reset_optimizer": True},
                   "device": "cpu", **config},
        "tasks": [{"name": "0/1", "classes": [0, 1]}, {"name": "2/3", "classes": [2, 3]}],
        "R": [[0.5, 0.5], [0.99, 0.4], [0.9, 0.98]], "matrices": {},
        "metrics": {"acc": 0.94, "bwt": -0.09, "fwt": None},
        "cost": {"train_seconds": 1.5, "peak_gpu_bytes": None},
        "env": {"cfbench": "0.1.0", "torch": "2", "device_name": "cpu", "threads": 1},
        "started_at": "2026-01-01T00:00:00+00:00", "finished_at": "2026-01-01T00:00:01+00:00",
        "command": "cfbench run --scenario split-digits", "strategy_log": {}, "selection": None,
        "schema_version": 1,
    }


def changed(path: str, value: Any, delete: bool = False) -> dict:
    """A good record with the field at dotted `path` set to `value` (or deleted)."""
    record = good_record(run_id="fedcba9876543210", seed=1)
    *parents, last = path.split(".")
    node = record
    for key in parents:
        node = node[key]
    if delete:
        del node[last]
    else:
        node[last] = value
    return record


def records_dir(tmp: Path, *bad: dict | str | bytes, good: int = 2) -> Path:
    """`good` good records and the given bad ones (a dict as JSON, text or bytes as the file's
    content; the first named 0000000000000002.json)."""
    d = tmp / "runs"
    d.mkdir()
    goods = [good_record(), good_record(run_id="00000000000000ff", seed=2)][:good]
    for i, r in enumerate([*goods, *bad], start=2 - good):
        name = r["run_id"] if isinstance(r, dict) and re.fullmatch(
            "[0-9a-f]{16}", str(r.get("run_id"))) else f"{i:016x}"
        text = json.dumps(r) if isinstance(r, dict) else r
        (d / f"{name}.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    return d


def board(*bad: dict | str | bytes, extra: tuple[str, ...] = ()) -> Callable[[Path], list[str]]:
    return lambda tmp: ["leaderboard", "--records", str(records_dir(tmp, *bad)), *extra]


def show(run_id: str, *bad: dict | str | bytes) -> Callable[[Path], list[str]]:
    return lambda tmp: ["show", run_id, "--out", str(records_dir(tmp, *bad))]


def stored(bad: str) -> Callable[[Path], list[str]]:
    """`leaderboard --store` over a store holding one good record and one row of `bad` text."""
    def build(tmp: Path) -> list[str]:
        db = tmp / "runs.db"
        Store(db).close()
        con = sqlite3.connect(db)
        for run_id, text in (("0123456789abcdef", json.dumps(good_record())),
                             ("fedcba9876543210", bad)):
            con.execute("INSERT INTO runs VALUES (?, 'split-digits', 'task', 'naive', 0, 'ok', "
                        "'', ?)", (run_id, text))
        con.commit()
        con.close()
        return ["leaderboard", "--store", str(db)]
    return build


def sweep(text: str) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        (tmp / "s.yaml").write_text("scenarios: split-digits\nsettings: task\nseeds: 1\n" + text)
        return ["sweep", str(tmp / "s.yaml"), "--store", str(tmp / "out" / "s.db"), "--executor",
                "serial", "--quiet"]
    return build


def run(*args: str) -> Callable[[Path], list[str]]:
    budget = [] if "--epochs" in args else ["--iterations", "1"]
    return lambda tmp: [*RUN, *budget, "--out", str(tmp / "out"), *args]


# --- what a hostile but valid leaderboard must give -----------------------------------------

def hostile_board(fmt: str) -> Callable[[Path], list[str]]:
    """Records whose every free-text field is HOSTILE, tabulated as `fmt` into out/."""
    def build(tmp: Path) -> list[str]:
        records = []
        for i, strategy in enumerate(["naive", "=" + HOSTILE]):
            r = good_record(run_id=f"{i:016x}", seed=i, strategy=strategy,
                            hparams={strategy: {"lam": HOSTILE}})
            r["command"] = r["env"]["device_name"] = HOSTILE
            records.append(r)
        records[1]["config"]["scenario"] = HOSTILE
        return ["leaderboard", "--records", str(records_dir(tmp, *records)), "--format", fmt,
                "--out", str(tmp / "out")]
    return build


def inert_latex(text: str) -> str | None:
    lines = text.splitlines()
    body = [line for line in lines if not line.startswith("%")]  # a comment ends at its line
    if any(s in line for line in body for s in ("\\immediate", "\\write18", "^^")):
        return "a live TeX control sequence"
    if any(re.search(r"(?<!\\)[%$#~^]", re.sub(r"\$(\\pm|>|<)\$", "", line)) for line in body):
        return "an unescaped TeX special character"
    return None


def inert_csv(text: str) -> str | None:
    lines = text.splitlines()
    try:
        table = pd.read_csv(io.StringIO(text))
    except pd.errors.ParserError as exc:
        return f"the table does not parse: {exc}"
    if len(lines) != 1 + len(table):
        return "a field spans lines, or a line is not a row"
    cells = [c for column in table for c in table[column] if isinstance(c, str)]
    if any(c.startswith(("=", "+", "-", "@")) for c in cells):
        return "a cell a spreadsheet would run as a formula"
    return None


def inert_md(text: str) -> str | None:
    cells = set()
    for line in text.splitlines():
        if not line.startswith(("### ", "|", "- ", "Mean ± 95% CI")) and line:
            return f"a stray line: {line!r}"
        if line.startswith("|"):
            cells.add(len(re.findall(r"(?<!\\)\|", line)))
    if len(cells) != 1:
        return f"table rows with different numbers of cells: {sorted(cells)}"
    if re.search(r"(?<!\\)[<`$]", text):
        return "unescaped HTML, code or maths"
    return None


def inert_html(text: str) -> str | None:
    if text.count("<script") != 1 or "\x1b" in text:
        return "a script or control character from a record"
    return None


def inert_json(text: str) -> str | None:
    def constant(name: str) -> None:
        raise ValueError(name)

    data = json.loads(text, parse_constant=constant)
    return None if HOSTILE in data["provenance"]["run_commands"] else "the command was altered"


def hostile_plots(tmp: Path) -> list[str]:
    """A scenario named by an absolute path, whose figures would be written there (relative
    paths and other names: the fuzz test of `file_stem`). No costs: one figure fewer."""
    (tmp / "outside").mkdir()
    record = good_record(scenario=str(tmp / "outside" / "abs"))
    record["cost"] = {}
    return ["leaderboard", "--records", str(records_dir(tmp, record, good=0)), "--plots",
            "--out", str(tmp / "out")]


# --- the table -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    argv: Callable[[Path], list[str]]
    expect: str | tuple[str, ...] = ()
    """Substrings of the one-line error (exit 2); for exit 0, of stderr (a warning)."""
    code: int = 2
    output: Callable[[str], str | None] | None = None
    """For exit 0: what is wrong with the file out/<name>, or None."""
    name: str = ""


BAD = "fedcba9876543210.json"
"""The file `changed` records are written to; every error about one must name it."""
TEXT = "0000000000000002.json"
"""The file a record given as text is written to."""


def bad(where: str) -> tuple[str, str]:
    return BAD, where


CASES: dict[str, Case] = {
    # 2. path traversal through a record, and run ids that are not ids
    "plots: scenario names that are paths": Case(hostile_plots, code=0),
    "show: run id with ../": Case(show("../x/0123"), "bad run id '../x/0123'"),
    "show: run id *": Case(show("*"), "bad run id '*'"),
    "show: run id ?": Case(show("0123456789abcde?"), "bad run id"),
    "show: run id with a slash": Case(show("/etc/passwd"), "bad run id"),
    "show: store run id %": Case(lambda tmp: ["show", "%", "--store", stored("{}")(tmp)[-1]],
                                 "bad run id '%'"),
    # 3. injection into the output formats
    **{f"{fmt}: hostile fields": Case(hostile_board(fmt), code=0, output=check,
                                      name=f"leaderboard.{ext}")
       for fmt, ext, check in [("latex", "tex", inert_latex), ("csv", "csv", inert_csv),
                               ("md", "md", inert_md), ("html", "html", inert_html),
                               ("json", "json", inert_json)]},
    "text: hostile fields": Case(lambda tmp: hostile_board("text")(tmp)[:-2], code=0),
    # 4. malformed records: one line naming the file and the field
    "record: a JSON list": Case(board("[1, 2]"), (TEXT, "a JSON object")),
    "record: not JSON": Case(board("{nope"), (TEXT, "not JSON")),
    "record: empty file": Case(board(""), (TEXT, "not JSON")),
    "record: not UTF-8": Case(board(b'{"run_id": "\xff"}'), (TEXT, "UTF-8")),
    "record: Infinity in R": Case(board(json.dumps(good_record(run_id="fedcba9876543210"))
                                        .replace("0.98", "Infinity")), (TEXT, "Infinity")),
    "record: metrics null": Case(board(changed("metrics", None)), bad("'metrics'")),
    "record: metric a string": Case(board(changed("metrics.acc", "high")), bad("'metrics")),
    "record: ragged R": Case(board(changed("R", [[0.5, 0.5], [0.9], [0.9, 0.9]])), bad("'R'")),
    "record: R a string": Case(board(changed("R", "[[1]]")), bad("'R'")),
    "record: R of strings": Case(board(changed("R", [["a", "b"], ["c", "d"], ["e", "f"]])),
                                 bad("'R'")),
    "record: R empty but ok": Case(board(changed("R", [])), bad("'R'")),
    "record: R square": Case(board(changed("R", [[0.5, 0.5], [0.9, 0.9]])), bad("'R'")),
    "record: R nested deeper": Case(board(changed("R", [[[0.5]], [[0.5]]])), bad("'R'")),
    "record: missing config": Case(board(changed("config", None, delete=True)),
                                   bad("'config'")),
    "record: config a list": Case(board(changed("config", [])), bad("'config'")),
    "record: missing scenario": Case(board(changed("config.scenario", None, delete=True)),
                                     bad("'config.scenario'")),
    "record: scenario a number": Case(board(changed("config.scenario", 7)),
                                      bad("'config.scenario'")),
    "record: protocol a string": Case(board(changed("config.protocol", "fast")),
                                      bad("'config.protocol'")),
    "record: hparams a list": Case(board(changed("config.hparams", [1])),
                                   bad("'config.hparams'")),
    "record: seed a string": Case(board(changed("config.seed", "0")), bad("'config.seed'")),
    "record: cost a string": Case(board(changed("cost.train_seconds", "fast")), bad("'cost")),
    "record: cost a list": Case(board(changed("cost", [1])), bad("'cost'")),
    "record: unknown status": Case(board(changed("status", "great")), bad("'status'")),
    "record: tasks a mapping": Case(board(changed("tasks", {"a": 1})), bad("'tasks'")),
    "record: task without a name": Case(board(changed("tasks", [{}, {}])), bad("'tasks")),
    "record: env a list": Case(board(changed("env", [])), bad("'env'")),
    "record: command a number": Case(board(changed("command", 3)), bad("'command'")),
    "record: selection without keys": Case(board(changed("selection", {"by": 1})),
                                           bad("'selection")),
    "record: unknown field": Case(board(changed("surprise", 1)), bad("'surprise'")),
    "record: run id a path": Case(board(changed("run_id", "../../../etc/x")),
                                  (TEXT, "'run_id'")),
    "record: schema version 2": Case(board(changed("schema_version", 2)), bad("schema 2")),
    "record: schema version missing": Case(board(changed("schema_version", None,
                                                         delete=True)), bad("schema")),
    "record: matrices a string": Case(board(changed("matrices", "x")), bad("'matrices'")),
    "record: curves a list": Case(board(changed("curves", [1])), bad("'curves'")),
    "record: a curve of text": Case(board(changed("curves", {"train_loss": [["low"]]})),
                                    bad("'curves.train_loss'")),
    "show: a malformed record": Case(show("fedcba98", changed("R", "x")), bad("'R'")),
    "store: a malformed row": Case(stored(json.dumps(changed("metrics", None))),
                                   ("runs.db", "fedcba9876543210", "'metrics'")),
    "store: a row that is not JSON": Case(stored("{nope"),
                                          ("runs.db", "fedcba9876543210", "not JSON")),
    "skip-bad: bad records skipped with a warning": Case(
        board(changed("R", "x"), "[]", extra=("--skip-bad",)),
        (f"skipped {{tmp}}/runs/{BAD}: field 'R'", "0000000000000003.json: not a run record"),
        code=0),
    # 5. non-finite numbers
    "run: --hp ewc.lam=inf": Case(run("--strategy", "ewc", "--hp", "ewc.lam=inf"), "'lam'"),
    "run: --hp lam=-inf": Case(run("--strategy", "ewc", "--hp", "lam=-inf"), "lam"),
    "run: --hp lam=1e400": Case(run("--strategy", "ewc", "--hp", "lam=1e400"), "'lam'"),
    "run: --lr inf": Case(run("--strategy", "naive", "--lr", "inf"), "lr"),
    "run: --epochs inf": Case(run("--strategy", "naive", "--epochs", "inf"), "epochs"),
    "run: --timeout inf": Case(run("--strategy", "naive", "--timeout", "inf"), "timeout"),
    "run: --option test_fraction=inf": Case(run("--strategy", "naive", "--option",
                                                "test_fraction=inf"), "test_fraction"),
    "sweep: lam .inf": Case(sweep("strategies:\n  ewc: {lam: .inf}\n"), "lam"),
    "sweep: lam -.inf in a grid": Case(sweep("strategies:\n  ewc: {lam: [1, -.inf]}\n"), "lam"),
    "sweep: lr .inf": Case(sweep("strategies: naive\nprotocol: {lr: .inf}\n"), "protocol.lr"),
    "sweep: epochs .inf": Case(sweep("strategies: naive\nprotocol: {epochs: .inf}\n"),
                               "protocol.epochs"),
    "sweep: timeout 1e400": Case(sweep("strategies: naive\ntimeout: 1e400\n"), "timeout"),
    "sweep: cpus .inf": Case(sweep("strategies: naive\nresources: {cpus: .inf}\n"),
                             "resources.cpus"),
}


@dataclass
class Result:
    code: int | None
    err: str
    failure: str | None  # the traceback of an exception that escaped main


def drive(argv: list[str], capsys: pytest.CaptureFixture) -> Result:
    capsys.readouterr()
    try:
        code, failure = main(argv), None
    except SystemExit as exc:  # argparse
        code, failure = exc.code if isinstance(exc.code, int) else 2, None
    except Exception:
        code, failure = None, traceback.format_exc()
    return Result(code, capsys.readouterr().err, failure)


def tree(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def expected(case: Case, tmp: Path) -> list[str]:
    """The case's substrings, "{tmp}" standing for its folder."""
    wanted = (case.expect,) if isinstance(case.expect, str) else case.expect
    return [s.replace("{tmp}", str(tmp)) for s in wanted]


def verdict(case: Case, result: Result, new: set[Path], tmp: Path) -> str:
    """"clean", or what went wrong: "traceback: ..." or "silent: ..."."""
    if result.failure is not None or "Traceback" in result.err:
        last = (result.failure or result.err).strip().splitlines()[-1]
        return f"traceback: {last}"
    if case.code == 2:
        lines = result.err.splitlines()
        if result.code != 2:
            return f"silent: exit {result.code}"
        if len(lines) != 1 or not lines[0].startswith("cfbench: error: "):
            return f"silent: not one error line but {len(lines)}: {result.err[:200]!r}"
        missing = [s for s in expected(case, tmp) if s not in lines[0]]
        if missing:
            return f"silent: {missing} not in {lines[0]!r}"
        if new:
            return f"silent: wrote {sorted(map(str, new))[:3]}"
        return "clean"
    if result.code != 0:
        return f"silent: exit {result.code}: {result.err[:300]!r}"
    outside = [p for p in new if not p.is_relative_to(tmp / "out")]
    if outside:
        return f"silent: wrote outside --out: {sorted(map(str, outside))[:3]}"
    missing = [s for s in expected(case, tmp) if s not in result.err]
    if missing:
        return f"silent: {missing} not in stderr {result.err[:200]!r}"
    if case.output is not None:
        problem = case.output((tmp / "out" / case.name).read_text())
        if problem:
            return f"silent: {problem}"
    return "clean"


@pytest.mark.parametrize("name", CASES)
def test_hostile_input(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    case = CASES[name]
    argv = case.argv(tmp_path)
    before = tree(tmp_path)
    result = drive(argv, capsys)
    outcome = verdict(case, result, tree(tmp_path) - before, tmp_path)
    assert outcome == "clean", outcome


def test_text_output_escapes_markup_and_control_characters(tmp_path, capsys):
    argv = hostile_board("text")(tmp_path)[:-2]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "[/]" in out  # rich markup printed as text, not interpreted
    assert all(not line.startswith("\\immediate") for line in out.splitlines())


def test_records_are_strict_json_even_when_a_run_diverged(tmp_path):
    record = RunRecord.from_dict(copy.deepcopy(good_record()), "test")
    record.metrics = {"acc": float("nan"), "drift": float("inf")}
    record.cost = {"train_seconds": float("nan")}
    path = write_record(record, tmp_path)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = read_record(path)
    assert back.metrics["acc"] != back.metrics["acc"]  # undefined stays undefined
    assert back.metrics["drift"] != back.metrics["drift"]


@pytest.mark.parametrize("field", ["epochs", "lr"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_protocol_refuses_non_finite_numbers_whoever_plans(field: str, value: float) -> None:
    with pytest.raises(CfbenchError, match=f"--{field} must be"):
        Protocol(**{field: value})
