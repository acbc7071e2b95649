"""Helpers shared by the tests: run one experiment, read parts of R."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cfbench.experiment import execute, plan_runs
from cfbench.records import RunRecord


def run_one(root: Path, scenario: str, setting: str, strategy: str, *, seed: int = 0,
            hparams: dict[str, dict[str, Any]] | None = None, **protocol: Any) -> RunRecord:
    """Plan and execute a single run; fails the test if the run did not finish."""
    (config,) = plan_runs(scenario=scenario, settings=[setting], strategies=[strategy],
                          hparams=hparams or {}, seeds=[seed], protocol_overrides=protocol,
                          data_root=root)
    record = execute(config, root)
    assert record.status == "ok", record.error
    return record


def final_row(record: RunRecord) -> np.ndarray:
    return np.asarray(record.R[-1])


def diagonal(record: RunRecord) -> np.ndarray:
    R = np.asarray(record.R)
    return np.diag(R[1:])
