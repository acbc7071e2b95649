"""The lm-* scenarios: textgenrnn's pretrained character LSTM fine-tuned on text domains, with
the source's forgetting measured in perplexity."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cfbench import cli, registry
from cfbench.experiment import execute, plan_runs
from cfbench.leaderboard import records_frame
from cfbench.records import RunRecord

SMALL = {"train_chars": 4000, "heldout_chars": 1000, "span": 200}


def small_scenario(root: Path, seed: int = 0):
    return registry.scenarios.get("lm-general-to-code").factory(data_root=root, seed=seed,
                                                                **SMALL)


def test_tasks_are_windows_of_real_text_drawn_by_the_scenario_seed(language_root):
    scenario = small_scenario(language_root)
    english, code = scenario.tasks
    assert (english.name, code.name) == ("english", "code")
    assert scenario.settings == ("domain",) and scenario.source is not None
    for task in scenario.tasks:
        assert task.x_train.dtype == torch.int16 and task.x_train.shape[1:] == (40,)
        assert len(task.y_train) == SMALL["train_chars"]
        assert len(task.y_test) == SMALL["heldout_chars"]
        assert int(task.y_train.min()) > 0 and int(task.y_train.max()) < 465
    assert english.x_val is not None and len(english.y_val) == SMALL["heldout_chars"]
    again, other = small_scenario(language_root), small_scenario(language_root, seed=1)
    assert torch.equal(again.tasks[1].x_train, code.x_train)
    assert not torch.equal(other.tasks[1].x_train, code.x_train)


def lm_run(root: Path, strategy: str, hparams: dict | None = None, **protocol) -> RunRecord:
    (config,) = plan_runs(scenario="lm-general-to-code", settings=["domain"],
                          strategies=[strategy], hparams=hparams or {}, seeds=[0],
                          scenario_options=SMALL, protocol_overrides=protocol, data_root=root)
    record = execute(config, root)
    assert record.status == "ok", record.error
    return record


@pytest.mark.parametrize("strategy, reason", [
    ("generative-replay", "draws images"),
    ("icarl", "does not support the domain setting"),
    ("ewc+generative-replay", "draws images"),
    ("agem", "use --hp selection=per-task"),
])
def test_strategies_whose_mechanism_does_not_apply_are_refused_at_planning(
        language_root, tmp_path, capsys, strategy, reason):
    code = cli.main(["run", "--scenario", "lm-general-to-code", "--strategy", strategy,
                     "--data-root", str(language_root), "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and reason in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def fine_tuned(language_root: Path) -> dict[str, RunRecord]:
    """naive, replay of the source's whole training set, and l2-sp, fine-tuned on code for a
    small budget at a high rate, so forgetting stands far above the noise of 1,000 held-out
    characters."""
    hparams = {"naive": {}, "l2-sp": {},
               "replay": {"replay": {"selection": "per-task", "fraction": 1.0, "memory": None}}}
    return {s: lm_run(language_root, s, h, iterations=40, lr=1e-2) for s, h in hparams.items()}


def test_row_one_is_the_pretrained_model_and_the_leaderboard_shows_perplexity(fine_tuned):
    record = fine_tuned["naive"]
    loss = record.matrices["loss"]
    assert loss[0][0] > 5.5  # untrained: about ln(465) = 6.1 nats
    assert 2.0 < loss[1][0] / math.log(2) < 3.3  # pretrained on held-out English, bits/char
    assert 0.35 < record.R[1][0] < 0.65
    row = records_frame([record]).iloc[0]
    assert row["source_ppl_before"] == pytest.approx(math.exp(loss[1][0]))
    assert row["source_logppl_increase"] == pytest.approx(loss[2][0] - loss[1][0])
    assert record.metrics["target_ppl_after"] == pytest.approx(math.exp(loss[2][1]))


def test_naive_fine_tuning_forgets_english_and_replay_and_l2_sp_forget_less(fine_tuned):
    """Fine-tuning on code raises the perplexity of held-out general English; mixing the
    source's English back in, or anchoring the pretrained weights, raises it less."""
    rise = {s: r.metrics["source_logppl_increase"] for s, r in fine_tuned.items()}
    assert rise["naive"] > 0.3
    assert rise["replay"] < rise["naive"] / 2 and rise["l2-sp"] < rise["naive"] / 2


def test_the_plots_add_learning_against_forgetting(fine_tuned, tmp_path):
    from cfbench.leaderboard import summarize
    from cfbench.plots import plot_all

    records = list(fine_tuned.values())
    written = plot_all(records, summarize(records), tmp_path)
    (figures,) = written.values()
    assert any(f.png.name.endswith("-learning-forgetting.png") and f.png.stat().st_size > 10_000
               for f in figures)
