"""What the field knows about Split MNIST, checked on the real data with a reduced budget
(1 epoch per task instead of 4): naive forgets catastrophically in the class setting, joint
training does not, the task setting is easy, and every strategy learns each task it is given."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import diagonal, run_one

STRATEGIES = ("naive", "joint", "ewc")
SETTINGS = ("task", "domain", "class")


@pytest.fixture(scope="module")
def records(mnist_root):
    return {(strategy, setting): run_one(mnist_root, "split-mnist", setting, strategy,
                                         epochs=1)
            for strategy in STRATEGIES for setting in SETTINGS}


def test_naive_forgets_catastrophically_in_the_class_setting(records):
    m = records["naive", "class"].metrics
    assert m["acc"] < 0.25
    assert m["bwt"] < -0.6


def test_joint_training_is_the_upper_bound_in_the_class_setting(records):
    assert records["joint", "class"].metrics["acc"] > 0.90
    assert records["joint", "class"].metrics["acc"] > records["naive", "class"].metrics["acc"]


def test_task_setting_is_easy_even_for_naive(records):
    assert records["naive", "task"].metrics["acc"] > 0.85


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("setting", SETTINGS)
def test_every_strategy_learns_every_task(records, strategy, setting):
    assert diagonal(records[strategy, setting]).min() > 0.95


@pytest.mark.parametrize("setting", SETTINGS)
def test_ewc_holds_parameters_closer_to_old_tasks_than_naive(records, setting):
    # Same seed, same steps: only the penalty differs, so a no-op EWC would drift as far.
    assert records["ewc", setting].metrics["drift"] < 0.95 * records["naive", setting].metrics[
        "drift"]


def test_ewc_forgets_less_than_naive_in_the_domain_setting(records):
    assert records["ewc", "domain"].metrics["bwt"] > records["naive", "domain"].metrics["bwt"]


def test_row_zero_is_the_untrained_model(records):
    # Before training, a 2-way choice per task is at chance level, whatever the strategy.
    for (_, setting), record in records.items():
        if setting != "class":
            assert np.all(np.abs(np.asarray(record.R[0]) - 0.5) < 0.35)


def test_records_hold_what_users_read(records):
    record = records["ewc", "class"]
    assert len(record.R) == 6 and all(len(row) == 5 for row in record.R)
    assert record.cost["train_seconds"] > 0 and record.cost["eval_seconds"] > 0
    assert record.cost["peak_rss_bytes"] > 0
    assert record.cost["state_bytes"] > records["naive", "class"].cost["state_bytes"] == 0
    assert record.config["protocol"]["epochs"] == 1
    assert record.config["hparams"]["ewc"]["lam"] == 1000.0
    assert [t["classes"] for t in record.tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
