"""The command line as a user drives it: runs, records, show, leaderboard, and every bad input
answered by one line on stderr, exit code 2, and nothing written."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cfbench.cli import main
from cfbench.data import IDX_FILES
from cfbench.records import read_records

CFBENCH = str(Path(sys.executable).parent / "cfbench")
DIGITS = ["run", "--scenario", "split-digits", "--quiet"]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CFBENCH, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_run_writes_one_record_per_run_and_prints_the_leaderboard(tmp_path):
    out = tmp_path / "records"
    proc = cli(*DIGITS, "--setting", "class", "--strategy", "ewc,naive", "--seeds", "2",
               "--epochs", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    assert len(records) == 4
    for record in records:
        assert len(record["R"]) == 6 and len(record["R"][0]) == 5
        assert record["cost"]["train_seconds"] > 0 and record["cost"]["eval_seconds"] > 0
        assert set(record["metrics"]) >= {"acc", "bwt", "fwt", "fm", "rem", "la", "drift"}
        assert record["config"]["protocol"]["epochs"] == 1
        assert record["schema_version"] == 1 and record["status"] == "ok"
    assert sorted(r["config"]["seed"] for r in records) == [0, 0, 1, 1]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("split-digits — class setting")
    header = next(line for line in lines if "strategy" in line)
    assert header.split()[1:6:2] == ["strategy", "ACC", "BWT"]
    assert any("ewc" in line and "│     2 │" in line for line in lines)  # 2 seeds
    assert "Traceback" not in proc.stderr


def test_show_and_leaderboard_read_the_records_back(tmp_path, capsys):
    out = tmp_path / "records"
    assert main([*DIGITS, "--setting", "task", "--strategy", "naive", "--out", str(out)]) == 0
    (record_file,) = out.glob("*.json")
    run_id = record_file.stem
    capsys.readouterr()
    assert main(["show", run_id[:8], "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    assert run_id in shown and "t=5" in shown and "split-digits / task / naive" in shown
    assert main(["leaderboard", "--records", str(out), "--format", "csv"]) == 0
    table = capsys.readouterr().out.splitlines()  # the CSV alone: header, then rows
    assert table[0].startswith("scenario,setting,strategy,hparams,protocol,acc")
    assert table[1].startswith("split-digits,task,naive,")
    # A leaderboard written next to the records is not mistaken for a run the next time.
    assert main(["leaderboard", "--records", str(out), "--format", "json", "--out",
                 str(out)]) == 0
    assert main(["leaderboard", "--records", str(out), "--format", "json", "--out",
                 str(out)]) == 0


def test_default_output_directory_is_results_runs(tmp_path):
    proc = cli(*DIGITS, "--setting", "domain", "--strategy", "naive", "--iterations", "5",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "results" / "runs").glob("*.json"))) == 1


def test_plugin_strategy_runs_from_the_command_line(tmp_path):
    plugin = tmp_path / "my_method.py"
    plugin.write_text(
        "from cfbench import Strategy, register_strategy\n\n"
        "@register_strategy('my-method', family='demo', reference='me 2026')\n"
        "class MyMethod(Strategy):\n"
        "    '''Naive with an L2 pull to zero.'''\n"
        "    def __init__(self, *, weight: float = 0.1) -> None:\n"
        "        self.weight = weight\n\n"
        "    def penalty(self, ctx, batch, logits):\n"
        "        return self.weight * sum(p.pow(2).sum() for p in ctx.model.parameters())\n")
    out = tmp_path / "records"
    proc = cli(*DIGITS, "--plugin", str(plugin), "--setting", "task", "--strategy",
               "my-method", "--hp", "weight=0.01", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    (record,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert record["config"]["strategy"] == "my-method"
    assert record["config"]["hparams"] == {"my-method": {"weight": 0.01}}


@pytest.fixture(scope="module")
def corrupt_root(mnist_root, tmp_path_factory):
    """A copy of the real MNIST files with one byte of the test labels changed."""
    root = tmp_path_factory.mktemp("corrupt")
    (root / "mnist").mkdir()
    for name in IDX_FILES:
        shutil.copy(mnist_root / "mnist" / name, root / "mnist" / name)
    labels = root / "mnist" / "t10k-labels-idx1-ubyte"
    raw = bytearray(labels.read_bytes())
    raw[100] = (raw[100] + 1) % 10
    labels.write_bytes(bytes(raw))
    return root


BAD_INPUTS = {
    "unknown strategy": (["--strategy", "ewk"], "unknown strategy 'ewk'; did you mean ewc"),
    "unknown scenario": (["--strategy", "naive", "--scenario", "split-mnsit"],
                         "unknown scenario 'split-mnsit'; did you mean split-mnist"),
    "unknown setting": (["--strategy", "naive", "--setting", "online"],
                        "has no setting 'online'"),
    "unknown hyperparameter": (["--strategy", "ewc", "--hp", "ewc.lamda=3"],
                               "unknown hyperparameter 'lamda' for strategy 'ewc' (did you "
                               "mean lam"),
    "ill-typed hyperparameter": (["--strategy", "ewc", "--hp", "lam=strong"],
                                 "bad value 'strong' for hyperparameter 'lam'"),
    "out-of-range hyperparameter": (["--strategy", "ewc", "--hp", "lam=-1"],
                                    "lam must be >= 0"),
    "hyperparameter nobody declares": (["--strategy", "naive", "--hp", "lam=1"],
                                       "unknown hyperparameter 'lam'"),
    "bad model": (["--strategy", "naive", "--model", "mlp:wide"], "bad model spec"),
    "tasks for a fixed sequence": (["--strategy", "naive", "--tasks", "3"],
                                   "--tasks does not apply"),
    "missing plugin": (["--strategy", "naive", "--plugin", "nowhere.py"],
                       "plugin file nowhere.py does not exist"),
    "unknown protocol field": (["--strategy", "naive", "--protocol", "clas_scope=all"],
                               "unknown protocol field 'clas_scope'; valid: model, epochs"),
    "protocol without a value": (["--strategy", "naive", "--protocol", "class_scope"],
                                 "bad --protocol 'class_scope': write KEY=VALUE"),
    "bad protocol value": (["--strategy", "naive", "--protocol", "init=he"],
                           "bad --protocol init=he: unknown init 'he'"),
    "protocol field set twice": (["--strategy", "naive", "--lr", "0.1", "--protocol",
                                  "lr=0.2"], "protocol field 'lr' is set twice"),
    "protocol setting a model cannot be scored in": (
        ["--strategy", "naive", "--setting", "domain", "--protocol", "also_evaluate=class"],
        "a domain-setting model cannot be scored in the class setting"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys):
    args, expected = BAD_INPUTS[case]
    out = tmp_path / "records"
    base = ["run", "--scenario", "split-digits", "--quiet", "--out", str(out)]
    assert main([*base, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cfbench: error: ") and err.count("\n") == 1
    assert expected in err
    assert not out.exists()


def test_missing_data_names_the_fetch_command(tmp_path, capsys):
    out = tmp_path / "records"
    code = main(["run", "--scenario", "split-mnist", "--strategy", "naive", "--data-root",
                 str(tmp_path / "empty"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "not found" in err and "cfbench data fetch mnist" in err
    assert not out.exists()


def test_corrupt_data_is_a_checksum_error(corrupt_root, tmp_path, capsys):
    out = tmp_path / "records"
    code = main(["run", "--scenario", "split-mnist", "--strategy", "naive", "--data-root",
                 str(corrupt_root), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "checksum mismatch" in err and "t10k-labels-idx1-ubyte" in err
    assert not out.exists()


def test_argument_errors_exit_2_without_a_traceback():
    proc = cli("run", "--scenario", "split-digits", "--strategy", "naive", "--epochs", "-1")
    assert proc.returncode == 2
    assert "expected a positive number" in proc.stderr and "Traceback" not in proc.stderr


def test_real_cli_reports_bad_input_without_a_traceback(tmp_path):
    proc = cli(*DIGITS, "--strategy", "nope", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("cfbench: error: unknown strategy 'nope'")
    assert "Traceback" not in proc.stderr


def test_show_unknown_run_is_exit_2(tmp_path, capsys):
    assert main(["show", "deadbeef", "--out", str(tmp_path)]) == 2
    assert "no run with id 'deadbeef'" in capsys.readouterr().err


def test_show_finds_a_run_in_the_usual_folders_and_prints_it_as_the_tables_do(
        tmp_path, monkeypatch, capsys):
    """After `make leaderboard` (records in results/quick-look/runs) `show ID` needs no folder;
    the same run recorded twice is shown from its newest record; numbers read as the
    leaderboard's: percent and seconds with the tables' decimals, sizes in MB."""
    monkeypatch.chdir(tmp_path)
    run = [*DIGITS, "--setting", "task", "--strategy", "naive", "--iterations", "5"]
    assert main([*run, "--out", "results/quick-look/runs"]) == 0
    assert main(run) == 0  # the same run again, into the default folder
    (run_id,) = {p.stem for p in Path("results").glob("*/runs/*.json")}
    capsys.readouterr()
    assert main(["show", run_id[:6]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == (f"record: results/runs/{run_id}.json (the newest; also in "
                        "results/quick-look/runs)")
    metrics = next(line for line in lines if line.startswith("metrics: "))
    cost = next(line for line in lines if line.startswith("cost: "))
    assert re.fullmatch(r"metrics: ACC \d+\.\d%, BWT -?\d+\.\d%, FWT -?\d+\.\d%, FM \d+\.\d%, "
                        r"REM \d+\.\d%, LA \d+\.\d%, drift \S+", metrics), metrics
    assert re.fullmatch(r"cost: train s \d+\.\d, peak RSS MB \d+, GFLOPs \d+\.\d, state MB "
                        r"\d+\.\d\d, eval s \d+\.\d, steps 25", cost), cost
    assert all(re.fullmatch(r"t=\d +( +\d+\.\d)+", line) for line in lines if line[:2] == "t=")
    assert main(["show", run_id, "--records", "results/quick-look/runs"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == \
        f"record: results/quick-look/runs/{run_id}.json"


def test_help_lists_the_commands():
    proc = cli("--help")
    assert proc.returncode == 0
    for command in ("list", "run", "show", "leaderboard", "data"):
        assert command in proc.stdout


def test_readme_plugin_example_runs_as_documented(tmp_path):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = readme.split("```python\n# my_method.py\n", 1)[1].split("```", 1)[0]
    plugin = tmp_path / "my_method.py"
    plugin.write_text(code)
    out = tmp_path / "records"
    proc = cli(*DIGITS, "--plugin", str(plugin), "--setting", "task", "--strategy",
               "l2-init,naive", "--hp", "weight=0.1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    records = {r["config"]["strategy"]: r for r in
               (json.loads(p.read_text()) for p in out.glob("*.json"))}
    assert records["l2-init"]["config"]["hparams"] == {"l2-init": {"weight": 0.1}}
    assert records["l2-init"]["cost"]["state_bytes"] > 0
    # The pull toward the start keeps the parameters closer to it than naive's.
    assert records["l2-init"]["metrics"]["drift"] < records["naive"]["metrics"]["drift"]


def test_scenario_options_on_the_command_line(digits_root, tmp_path, capsys):
    base = ["run", "--scenario", "split-digits", "--setting", "task", "--strategy", "naive",
            "--iterations", "2", "--data-root", str(digits_root), "--out", str(tmp_path),
            "--quiet"]
    assert main([*base, "--option", "test_fraction=0.5"]) == 0
    (record,) = read_records(tmp_path)
    assert record.config["scenario_options"] == {"test_fraction": 0.5}
    for option, message in (("test_fraction=half", "bad value 'half' for option "
                                                   "'test_fraction' of scenario 'split-digits'"),
                            ("fraction=0.5", "unknown option 'fraction' for scenario "
                                             "'split-digits' (did you mean test_fraction?)"),
                            ("test_fraction", "bad --option 'test_fraction': write KEY=VALUE")):
        capsys.readouterr()
        assert main([*base, "--option", option]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_data_fetch_medmnist_without_its_package_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "medmnist", None)  # not installed
    assert main(["data", "fetch", "medmnist", "--size", "64", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install medmnist" in err and "pathmnist_64.npz" in err


def test_any_protocol_field_and_a_per_seed_sequence_from_the_command_line(
        digits_root, tmp_path):
    """A class-setting protocol run from the command line trains as asked (unmasked, Adam's
    state kept), not silently with masked logits; the same field as a sweep file sets it."""
    base = ["run", "--scenario", "split-digits", "--setting", "class", "--strategy", "naive",
            "--iterations", "5", "--data-root", str(digits_root), "--quiet", "--seeds", "2",
            "--scenario-seed", "seed"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert main([*base, "--out", str(tmp_path / "set"), "--protocol", "class_scope=all",
                 "--protocol", "reset_optimizer=false", "--protocol", "also_evaluate=task"]) == 0
    plain = {r.config["seed"]: r for r in read_records(tmp_path / "plain")}
    records = {r.config["seed"]: r for r in read_records(tmp_path / "set")}
    for seed, record in records.items():
        protocol = record.config["protocol"]
        assert (protocol["class_scope"], protocol["reset_optimizer"],
                protocol["also_evaluate"]) == ("all", False, ["task"])
        assert record.config["scenario_seed"] == seed
        assert "R@task" in record.matrices and record.R != plain[seed].R


def test_batch_seeds_gives_the_records_of_seed_by_seed_runs(digits_root, tmp_path, capsys):
    base = ["run", "--scenario", "split-digits", "--setting", "class", "--seeds", "2",
            "--iterations", "10", "--data-root", str(digits_root), "--quiet"]
    assert main([*base, "--strategy", "naive,si", "--batch-seeds",
                 "--out", str(tmp_path / "batched")]) == 0
    assert "si: runs one at a time" in capsys.readouterr().err
    assert main([*base, "--strategy", "naive,si", "--out", str(tmp_path / "single")]) == 0
    batched = {r.run_id: r for r in read_records(tmp_path / "batched")}
    single = {r.run_id: r for r in read_records(tmp_path / "single")}
    assert batched.keys() == single.keys() and len(single) == 4
    for run_id, record in single.items():
        assert batched[run_id].R == record.R
    assert sorted(str(r.cost.get("stacked_runs")) for r in batched.values()) == \
        ["2", "2", "None", "None"]


def test_import_and_help_do_not_import_torch():
    # Start-up stays fast: torch-heavy modules are imported by the commands that need them
    # (benchmarks/test_import_time.py measures it).
    code = ("import sys, contextlib, io\nfrom cfbench.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: main(['--help'])\n    except SystemExit: pass\n"
            "print(sorted(m for m in ('torch', 'pandas', 'matplotlib') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
