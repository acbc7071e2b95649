"""The SQLite results store: round trips, concurrent writers, kill -9, JSON-lines exchange."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from cfbench.cli import main
from cfbench.errors import CfbenchError
from cfbench.records import RunRecord
from cfbench.store import Store


def record(run_id: str, *, scenario: str = "split-digits", strategy: str = "naive",
           seed: int = 0, status: str = "ok", acc: float = 0.5) -> RunRecord:
    return RunRecord(
        run_id=run_id, status=status,
        config={"scenario": scenario, "setting": "task", "strategy": strategy, "seed": seed,
                "hparams": {strategy: {}}, "scenario_options": {}, "scenario_seed": 0,
                "protocol": {}, "device": "cpu"},
        R=[[0.1, 0.1], [acc, 0.2], [acc, acc]], metrics={"acc": acc, "bwt": float("nan")},
        cost={"train_seconds": 1.0}, finished_at="2026-11-22T00:00:00+00:00")


def test_round_trip_filters_and_replacement(tmp_path):
    with Store(tmp_path / "runs.db") as store:
        store.put(record("a" * 16))
        store.put(record("b" * 16, scenario="split-mnist", status="failed"))
        store.put(record("c" * 16, acc=0.7))
        assert len(store) == 3
        assert store.finished_ids() == {"a" * 16, "c" * 16}
        assert [r.run_id for r in store.records(scenario="split-mnist")] == ["b" * 16]
        assert [r.run_id for r in store.records(status="ok")] == ["a" * 16, "c" * 16]
        again = store.find("ccc")
        assert again.R == [[0.1, 0.1], [0.7, 0.2], [0.7, 0.7]]
        assert again.metrics["bwt"] != again.metrics["bwt"]  # NaN survives as NaN
        store.put(record("b" * 16, scenario="split-mnist", status="ok"))  # a rerun replaces
        assert len(store) == 3 and "b" * 16 in store.finished_ids()
        assert store.integrity() == "ok"


def test_a_file_that_is_not_a_store_is_a_clear_error(tmp_path):
    bogus = tmp_path / "notes.db"
    bogus.write_text("these are my notes, not a database " * 50)
    with pytest.raises(CfbenchError, match="is not a cfbench store"):
        Store(bogus)


def test_find_needs_a_unique_prefix(tmp_path):
    with Store(tmp_path / "runs.db") as store:
        store.put_many([record("ab" + "0" * 14), record("ab" + "1" * 14)])
        with pytest.raises(CfbenchError, match="2 runs with id 'ab'"):
            store.find("ab")
        with pytest.raises(CfbenchError, match="no run with id 'ff'"):
            store.find("ff")


def _write_many(path: str, writer: int, count: int) -> None:
    with Store(path) as store:
        for i in range(count):
            store.put(record(f"{writer:08x}{i:08x}", seed=i))


def test_concurrent_writers_lose_nothing_and_duplicate_nothing(tmp_path):
    path = str(tmp_path / "runs.db")
    writers, each = 4, 40
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_write_many, args=(path, w, each))
                 for w in range(writers)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=120)
        assert p.exitcode == 0
    with Store(path) as store:
        ids = [r.run_id for r in store.records()]
        assert len(ids) == writers * each == len(set(ids))
        assert store.integrity() == "ok"


WRITER = textwrap.dedent("""
    import sys
    from tests.test_store import record
    from cfbench.store import Store
    store = Store(sys.argv[1])
    i = 0
    while True:
        store.put(record(f"{i:016x}", seed=i))
        print(i, flush=True)  # only after the commit returned
        i += 1
""")


def test_kill_9_keeps_every_committed_record(tmp_path):
    path = tmp_path / "runs.db"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                              text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    committed = -1
    for line in writer.stdout:
        committed = int(line)
        if committed >= 30:
            break
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    with Store(path) as store:
        ids = {r.run_id for r in store.records()}
        assert {f"{i:016x}" for i in range(committed + 1)} <= ids
        assert store.integrity() == "ok"


def test_json_lines_export_and_import_merge(tmp_path):
    with Store(tmp_path / "a.db") as a:
        a.put_many([record("1" * 16), record("2" * 16, acc=0.9)])
        assert a.export_jsonl(tmp_path / "a.jsonl") == 2
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(line.startswith("{") for line in lines)
    with Store(tmp_path / "b.db") as b:
        b.put(record("3" * 16))
        assert b.import_jsonl(tmp_path / "a.jsonl") == 2
        assert len(b) == 3 and b.find("2222").metrics["acc"] == 0.9
        (tmp_path / "bad.jsonl").write_text(lines[0] + "\n{not json\n")
        with pytest.raises(CfbenchError, match="bad.jsonl:2: not a run record: not JSON"):
            b.import_jsonl(tmp_path / "bad.jsonl")
        assert len(b) == 3  # nothing of the bad file was written


def test_cli_run_writes_the_store_and_leaderboard_and_show_read_it(tmp_path, capsys):
    db = tmp_path / "runs.db"
    assert main(["run", "--scenario", "split-digits", "--setting", "task", "--strategy",
                 "naive", "--seeds", "2", "--epochs", "1", "--quiet", "--out",
                 str(tmp_path / "json"), "--store", str(db)]) == 0
    with Store(db) as store:
        stored = store.records()
    assert len(stored) == 2 and all(r.command.startswith("cfbench run") for r in stored)
    capsys.readouterr()
    assert main(["leaderboard", "--store", str(db), "--format", "csv"]) == 0
    rows = capsys.readouterr().out.splitlines()  # the CSV alone: header, then rows
    assert len(rows) == 2 and rows[1].startswith("split-digits,task,naive,")
    assert main(["show", stored[0].run_id[:8], "--store", str(db)]) == 0
    assert stored[0].run_id in capsys.readouterr().out
    assert main(["leaderboard", "--store", str(tmp_path / "missing.db")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "missing.db").exists()
