"""Metrics against matrices computed by hand (DESIGN.md's definitions)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cfbench import metrics

# Three tasks. Row 0 before training, row t after task t.
R3 = [
    [0.10, 0.20, 0.30],
    [0.90, 0.25, 0.35],
    [0.70, 0.80, 0.40],
    [0.60, 0.50, 0.95],
]


def test_acc_and_learning_accuracy():
    assert metrics.acc(R3) == pytest.approx((0.60 + 0.50 + 0.95) / 3)
    assert metrics.learning_accuracy(R3) == pytest.approx((0.90 + 0.80 + 0.95) / 3)


def test_bwt_divides_by_t_minus_one():
    # (R[3,1]-R[1,1]) + (R[3,2]-R[2,2]) = (0.60-0.90) + (0.50-0.80) = -0.60 -> / 2
    assert metrics.bwt(R3) == pytest.approx(-0.30)


def test_fwt_uses_row_zero_as_baseline():
    # task 2: R[1,2]-R[0,2] = 0.25-0.20; task 3: R[2,3]-R[0,3] = 0.40-0.30 -> mean 0.075
    assert metrics.fwt(R3) == pytest.approx(0.075)


def test_forgetting_takes_max_over_rows_one_to_t_minus_one():
    # task 1: max(0.90, 0.70) - 0.60 = 0.30; task 2: max(0.25, 0.80) - 0.50 = 0.30
    assert metrics.forgetting(R3) == pytest.approx(0.30)


def test_forgetting_counts_a_peak_reached_after_the_task():
    R = [[0.0, 0.0], [0.5, 0.0], [0.2, 0.9]]
    assert metrics.forgetting(R) == pytest.approx(0.3)
    # BWT compares with R[i,i] only, so a later peak does not enter it.
    assert metrics.bwt(R) == pytest.approx(-0.3)


def test_remembering_is_percent_of_each_old_task_kept():
    # 100 * (0.60/0.90 + 0.50/0.80) / 2
    assert metrics.remembering(R3) == pytest.approx(100 * (0.60 / 0.90 + 0.50 / 0.80) / 2)


def test_single_task_leaves_transfer_metrics_undefined():
    R = [[0.1], [0.8]]
    assert metrics.acc(R) == pytest.approx(0.8)
    assert metrics.learning_accuracy(R) == pytest.approx(0.8)
    for fn in (metrics.bwt, metrics.fwt, metrics.forgetting, metrics.remembering):
        assert math.isnan(fn(R))


def test_zero_denominators_are_nan_not_errors():
    never_learned = [[0.0, 0.0], [0.0, 0.0], [0.0, 0.7]]
    assert math.isnan(metrics.remembering(never_learned))
    assert math.isnan(metrics.transfer_remembering([[0.3, 0.5], [0.0, 0.9], [0.1, 0.9]]))
    # A task never learned is left out; the others still count.
    partly = [[0, 0, 0], [0.0, 0, 0], [0.0, 0.8, 0], [0.0, 0.4, 0.9]]
    assert metrics.remembering(partly) == pytest.approx(50.0)


def test_transfer_remembering_uses_the_pretrained_row():
    # Row 0: untrained; row 1: the source learned (pretrained); row 2: after the target.
    R = [[0.10, 0.10], [0.70, 0.12], [0.14, 0.95]]
    assert metrics.transfer_remembering(R) == pytest.approx(20.0)


def test_perfect_memory_and_total_forgetting():
    perfect = np.vstack([np.zeros(4), np.tril(np.ones((4, 4)))])
    assert metrics.bwt(perfect) == 0 and metrics.forgetting(perfect) == 0
    assert metrics.remembering(perfect) == pytest.approx(100.0)
    forgets = np.vstack([np.zeros(4), np.eye(4)])
    assert metrics.bwt(forgets) == pytest.approx(-1.0)
    assert metrics.forgetting(forgets) == pytest.approx(1.0)
    assert metrics.remembering(forgets) == 0


def test_all_metrics_names_and_bad_shapes():
    assert set(metrics.all_metrics(R3)) == set(metrics.METRICS)
    with pytest.raises(ValueError, match="T\\+1 rows"):
        metrics.acc([[0.5, 0.5], [0.5, 0.5]])


def test_gem_convention_divides_bwt_and_fwt_by_t():
    assert metrics.bwt(R3, "gem") == pytest.approx(-0.60 / 3)
    assert metrics.fwt(R3, "gem") == pytest.approx(0.15 / 3)
    assert metrics.forgetting(R3, "gem") == metrics.forgetting(R3)


def test_mammoth_convention_takes_forgetting_max_over_every_row():
    # A task that improves after the last-but-one row: cfbench counts negative forgetting
    # (-0.2), Mammoth's max over rows 1..T makes it 0.
    R = [[0.0, 0.0], [0.5, 0.0], [0.7, 0.9]]
    assert metrics.forgetting(R) == pytest.approx(-0.2)
    assert metrics.forgetting(R, "mammoth") == 0.0
    assert metrics.bwt(R, "mammoth") == metrics.bwt(R)


def test_unknown_convention_is_an_error():
    with pytest.raises(ValueError, match="unknown metric convention"):
        metrics.all_metrics(R3, "avalanche")


def test_language_metrics_read_perplexity_from_the_loss_matrix():
    # Held-out nats per token: column 1 the source, columns 2-3 downstream domains.
    loss = [[6.0, 6.0, 6.0],
            [2.0, 4.0, 3.0],   # the pretrained model
            [2.5, 1.0, 3.5],
            [3.0, 2.0, 1.0]]
    m = metrics.language_metrics(loss)
    assert m["source_ppl_before"] == pytest.approx(math.exp(2.0))
    assert m["source_ppl_after"] == pytest.approx(math.exp(3.0))
    assert m["source_logppl_increase"] == pytest.approx(1.0)
    assert m["target_ppl_before"] == pytest.approx(math.exp(3.5))
    assert m["target_ppl_after"] == pytest.approx(math.exp(1.5))
    diverged = metrics.language_metrics([[6.0, 6.0], [2.0, 4.0], [1e4, 1.0]])
    assert diverged["source_ppl_after"] == math.inf
