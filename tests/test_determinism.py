"""Same seeds, same R, bitwise, on the CPU; and the two seeds really are independent."""

from __future__ import annotations

from tests.helpers import run_one


def test_same_seed_gives_bitwise_identical_R_on_real_mnist(mnist_root):
    a = run_one(mnist_root, "split-mnist", "class", "ewc", iterations=30)
    b = run_one(mnist_root, "split-mnist", "class", "ewc", iterations=30)
    assert a.R == b.R
    assert a.metrics["drift"] == b.metrics["drift"]
    assert a.run_id == b.run_id


def test_training_seed_changes_the_result_and_the_run_id(digits_root):
    a = run_one(digits_root, "split-digits", "domain", "naive", seed=0)
    b = run_one(digits_root, "split-digits", "domain", "naive", seed=1)
    assert a.R != b.R
    assert a.run_id != b.run_id


def test_strategy_randomness_does_not_change_the_minibatch_order(digits_root):
    # EWC with lam=0 samples Fisher labels from its own generator but adds no penalty: its
    # trajectory must equal naive's exactly, so comparisons share minibatch order.
    naive = run_one(digits_root, "split-digits", "class", "naive")
    ewc = run_one(digits_root, "split-digits", "class", "ewc", hparams={"ewc": {"lam": 0.0}})
    assert naive.R == ewc.R
