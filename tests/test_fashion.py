"""Fashion-MNIST through its offline source (Debian's dataset-fashion-mnist) and its scenario."""

from __future__ import annotations

import numpy as np
import pytest

from cfbench.data import load_idx_dataset
from tests.helpers import run_one


@pytest.fixture(scope="module")
def fashion_root(transfer_root):
    return transfer_root


def test_fashion_mnist_is_the_verified_real_dataset(fashion_root):
    data = load_idx_dataset("fashion-mnist", fashion_root)
    assert data.x_train.shape == (60000, 28, 28) and data.x_test.shape == (10000, 28, 28)
    assert np.bincount(data.y_train).tolist() == [6000] * 10
    assert np.bincount(data.y_test).tolist() == [1000] * 10
    assert data.y_train[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]


def test_split_fashion_mnist_runs_and_learns_each_task(fashion_root):
    record = run_one(fashion_root, "split-fashion-mnist", "task", "naive", iterations=60)
    assert [t["classes"] for t in record.tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert all(t["n_train"] == 12000 and t["n_test"] == 2000 for t in record.tasks)
    assert min(record.R[i + 1][i] for i in range(5)) > 0.75
