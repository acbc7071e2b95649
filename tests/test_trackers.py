"""Experiment tracking (``--log``): what each tracker receives, read back with the tracker's own
reader (TensorBoard's EventAccumulator, W&B's transaction-log reader, MLflow's client), offline;
the training-loss curve the records now keep; a missing library, a sweep file's ``log:``, and a
tracker that fails in the middle of a sweep without costing a record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from cfbench import cli, trackers
from cfbench.cli import main
from cfbench.records import RunRecord, parse_record, read_records
from cfbench.store import Store
from cfbench.train import _chunk_means
from tests.test_batched import one_thread  # noqa: F401 (an autouse fixture)

CFBENCH = str(Path(sys.executable).parent / "cfbench")
ITERATIONS = 60  # more steps than curve points: each point is the mean of a chunk of steps


def run_args(out: Path, root: Path, *extra: str, strategy: str = "naive") -> list[str]:
    return ["run", "--scenario", "split-digits", "--setting", "task", "--strategy", strategy,
            "--iterations", str(ITERATIONS), "--out", str(out), "--data-root", str(root),
            "--quiet", *extra]


def loss_points(record: RunRecord) -> list[tuple[int, float]]:
    """The record's loss curve as (optimizer steps at the chunk's end, loss): 50 equal chunks
    of 60 steps per task end at ceil(1.2 (j + 1)) within each task."""
    points, start = [], 0
    for task, curve in zip(record.tasks, record.curves["train_loss"], strict=True):
        points += [(start + -(-(j + 1) * task["steps"] // len(curve)), v)
                   for j, v in enumerate(curve)]
        start += task["steps"]
    return points


def same_points(logged: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    """The same steps, and values equal to float32 rounding (TensorBoard keeps float32)."""
    return ([step for step, _ in logged] == [step for step, _ in expected]
            and [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6))


def events(directory: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0, "images": 0,
                                                                  "tensors": 0})
    accumulator.Reload()
    return accumulator


# --- the loss curve in records ---------------------------------------------------------------

def test_a_curve_point_is_the_mean_loss_of_its_chunk_of_steps():
    sums = torch.tensor([[3.0, 30.0], [2.0, 20.0], [4.0, 40.0]])  # 3 chunks x 2 members
    # 7 steps in 3 chunks: steps 0-2, 3-4, 5-6.
    assert _chunk_means(sums, steps=7, done=7) == ((1.0, 1.0, 2.0), (10.0, 10.0, 20.0))
    # Stopped after 4 steps: the second chunk holds one step, the third none.
    assert _chunk_means(sums, steps=7, done=4) == ((1.0, 2.0), (10.0, 20.0))


def test_records_keep_a_bounded_loss_curve_per_task_and_old_records_read(tmp_path, digits_root):
    out = tmp_path / "runs"
    assert main(run_args(out, digits_root)) == 0
    (record,) = read_records(out)
    curves = record.curves["train_loss"]
    assert [len(c) for c in curves] == [50] * 5  # 60 steps per task, 50 points
    assert all(0 < v < 10 for c in curves for v in c)
    assert sum(curves[0][-5:]) < sum(curves[0][:5])  # it learns
    old = json.loads(record.to_json())
    del old["curves"]  # a record written before curves were kept
    assert parse_record(json.dumps(old), "old.json").curves == {}


# --- TensorBoard ------------------------------------------------------------------------------

def test_tensorboard_gets_config_loss_curve_R_rows_metrics_and_a_figure(tmp_path, digits_root):
    out = tmp_path / "runs"
    assert main(run_args(out, digits_root, "--log", "tensorboard")) == 0
    (record,) = read_records(out)
    where = tmp_path / "logs" / "tensorboard" / "cfbench-run" / record.run_id  # beside runs/
    tb = events(where)
    loss = [(e.step, e.value) for e in tb.Scalars("train/loss")]
    assert same_points(loss, loss_points(record))
    assert loss[-1][0] == 5 * ITERATIONS and len(loss) == 250
    for i in range(5):  # column i of R, one value per row (after t tasks trained)
        column = [(e.step, e.value) for e in tb.Scalars(f"R/task_{i + 1}")]
        assert same_points(column, [(t, row[i]) for t, row in enumerate(record.R)])
    assert tb.Scalars("metrics/acc")[0].value == pytest.approx(record.metrics["acc"])
    assert tb.Scalars("cost/steps")[0].value == 5 * ITERATIONS
    (image,) = tb.Images("R")
    assert image.encoded_image_string.startswith(b"\x89PNG") and image.width > 300
    config = json.loads(tb.Tensors("config/text_summary")[0].tensor_proto.string_val[0])
    assert config == record.config
    start = HParamsPluginData.FromString(
        tb.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["protocol.iterations"].number_value == ITERATIONS
    assert start.hparams["strategy"].string_value == "naive"


# --- W&B --------------------------------------------------------------------------------------

def wandb_records(run_file: Path) -> list[dict]:
    """The records of a W&B run's transaction log (run-ID.wandb), as W&B's own reader
    (`wandb leet inspect --json`) prints them."""
    proc = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect",
                           "--json", str(run_file)], capture_output=True, text=True,
                          timeout=120, check=True)
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_wandb_logs_offline_by_default_and_wandb_reads_it_back(tmp_path, digits_root):
    out = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    proc = subprocess.run([CFBENCH, *run_args(out, digits_root, "--log", "wandb", "--log-dir",
                                              str(tmp_path / "tracked"))],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr + proc.stdout
    (record,) = read_records(out)
    (run_file,) = (tmp_path / "tracked" / "wandb").glob("offline-run-*/run-*.wandb")
    log = wandb_records(run_file)
    (run,) = [r["run"] for r in log if r["type"] == "run"]
    assert run["display_name"] == record.run_id and run["run_group"] == "cfbench-run"
    config = {k: v for k, v in run["config"]["update"].items() if k != "_wandb"}
    assert config == record.config
    history = [r["history"]["item"] for r in log if r["type"] == "history"]
    loss = [(h["train/step"], h["train/loss"]) for h in history if "train/loss" in h]
    assert same_points(loss, loss_points(record))
    rows = [h for h in history if "tasks_trained" in h]
    assert [[h[f"R/task_{i + 1}"] for i in range(5)] for h in rows] == record.R
    (figure,) = [h for h in history if "R._type" in h]
    assert figure["R._type"] == "image-file"
    assert (run_file.parent / "files" / figure["R.path"]).stat().st_size > 1000
    summary = {}
    for r in log:
        if r["type"] == "summary":
            summary.update(r["summary"]["update"])
    assert summary["metrics/acc"] == pytest.approx(record.metrics["acc"])
    assert summary["cost/steps"] == 5 * ITERATIONS
    (exit_record,) = [r["exit"] for r in log if r["type"] == "exit"]
    assert exit_record.get("exit_code", 0) == 0


# --- MLflow -----------------------------------------------------------------------------------

def test_mlflow_logs_to_a_local_sqlite_store_or_to_MLFLOW_TRACKING_URI(
        tmp_path, digits_root, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "runs"
    assert main(run_args(out, digits_root, "--log", "mlflow")) == 0
    (record,) = read_records(out)
    db = tmp_path / "logs" / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("cfbench-run")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == record.run_id and run.info.status == "FINISHED"
    assert run.data.params["protocol.iterations"] == str(ITERATIONS)
    assert run.data.params["strategy"] == "naive"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert same_points(sorted((m.step, m.value) for m in history), loss_points(record))
    column = client.get_metric_history(run.info.run_id, "R/task_1")
    assert same_points(sorted((m.step, m.value) for m in column),
                       [(t, row[0]) for t, row in enumerate(record.R)])
    assert run.data.metrics["metrics/acc"] == pytest.approx(record.metrics["acc"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"R.png", "config.json"}
    artifacts = tmp_path / "logs" / "mlflow-artifacts"  # not the working directory's mlruns/
    assert (next(artifacts.rglob("R.png"))).read_bytes().startswith(b"\x89PNG")

    # MLFLOW_TRACKING_URI, when set, is where runs go (the store above, another --log-dir).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    assert main(run_args(tmp_path / "more", digits_root, "--log", "mlflow", "--log-dir",
                         str(tmp_path / "elsewhere"), strategy="ewc")) == 0
    assert not (tmp_path / "elsewhere" / "mlflow.db").exists()
    names = {r.info.run_name for r in client.search_runs([experiment.experiment_id])}
    assert names == {record.run_id, read_records(tmp_path / "more")[0].run_id}


# --- sweeps, stacked jobs, failures, a missing library ----------------------------------------

SWEEP = """\
name: tracked
scenarios: split-digits
settings: [task]
strategies: [naive]
seeds: 3
protocol: {iterations: 8}
log: tensorboard
"""


def test_a_sweep_files_log_key_logs_each_member_of_a_stacked_job_as_its_own_run(
        tmp_path, digits_root):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(SWEEP)
    store = tmp_path / "results" / "tracked.sqlite"
    assert main(["sweep", str(sweep), "--executor", "serial", "--stack", "--store", str(store),
                 "--data-root", str(digits_root), "--quiet"]) == 0
    with Store(store) as opened:
        records = opened.records()
    assert len(records) == 3 and all(r.cost["stacked_runs"] == 3 for r in records)
    group = tmp_path / "results" / "logs" / "tensorboard" / "tracked"  # beside the store
    assert sorted(p.name for p in group.iterdir()) == sorted(r.run_id for r in records)
    curves = []
    for record in records:
        loss = [(e.step, e.value) for e in events(group / record.run_id).Scalars("train/loss")]
        assert same_points(loss, loss_points(record))
        curves.append(loss)
    assert curves[0] != curves[1] != curves[2]  # each member's own curve


def test_a_tracker_failing_mid_sweep_is_a_warning_and_every_record_is_kept(
        tmp_path, digits_root, capsys):
    from cfbench.sweep import plan
    from cfbench.sweepfile import load_sweep

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(SWEEP)
    runs = plan(load_sweep(sweep), digits_root)
    blocked = runs[1].config.run_id
    group = tmp_path / "logs" / "tensorboard" / "tracked"
    group.mkdir(parents=True)
    (group / blocked).write_text("a file where the run's event folder would go")
    store = tmp_path / "tracked.sqlite"
    assert main(["sweep", str(sweep), "--executor", "serial", "--store", str(store),
                 "--data-root", str(digits_root), "--quiet"]) == 0
    with Store(store) as opened:
        assert {r.run_id: r.status for r in opened.records()} == {
            r.config.run_id: "ok" for r in runs}
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: tensorboard did not log "
                                                         f"run {blocked}: ")
    for run in runs:
        if run.config.run_id != blocked:
            assert events(group / run.config.run_id).Scalars("train/loss")


BLOCKED = """\
import sys
class Missing:  # the tracker libraries are not installed
    def find_spec(self, name, path=None, target=None):
        if name.partition('.')[0] in ('tensorboard', 'wandb', 'mlflow'):
            raise ModuleNotFoundError(f'No module named {name!r}')
sys.meta_path.insert(0, Missing())
from cfbench.cli import main
print([main([*sys.argv[1:], '--log', tracker]) for tracker in ('tensorboard', 'wandb', 'mlflow')])
"""


def test_a_missing_tracker_library_is_one_line_naming_the_extra_before_anything_runs(
        tmp_path, digits_root):
    out = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-c", BLOCKED, *run_args(out, digits_root)],
                          capture_output=True, text=True, timeout=300)
    assert proc.stdout == "[2, 2, 2]\n"
    assert proc.stderr.splitlines() == [
        f"cfbench: error: logging to {tracker} needs the {tracker} package: pip install "
        f"'cfbench[{tracker}]'" for tracker in ("tensorboard", "wandb", "mlflow")]
    assert not out.exists() and not (tmp_path / "logs").exists()


def test_bad_tracking_input_is_one_line(tmp_path, digits_root, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(SWEEP.replace("log: tensorboard", "log: [tensorboard, neptune]"))
    assert main(["sweep", str(sweep), "--dry-run", "--store", str(tmp_path / "s.sqlite")]) == 2
    assert capsys.readouterr().err == (f"cfbench: error: {sweep}:7: log: unknown tracker "
                                       "'neptune'; use tensorboard, wandb, mlflow\n")
    assert main([*run_args(tmp_path / "runs", digits_root), "--log-dir", "x"]) == 2
    assert "--log-dir without --log" in capsys.readouterr().err
    assert main([*run_args(tmp_path / "runs", digits_root), "--log", "neptune"]) == 2
    assert "argument --log: invalid choice: 'neptune'" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    assert main([*run_args(tmp_path / "runs", digits_root), "--log", "tensorboard",
                 "--log-dir", str(tmp_path / "a-file")]) == 2
    assert f"--log-dir {tmp_path / 'a-file'} is a file" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_the_command_line_offers_every_tracker():
    assert tuple(trackers.TRACKERS) == cli.TRACKERS
