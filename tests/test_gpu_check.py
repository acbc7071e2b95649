"""The prepared GPU check (benchmarks/gpu_check.sh) on a machine without CUDA: it falls back to
the CPU, says so, and writes every measurement it promises."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_falls_back_to_the_cpu_and_writes_its_json(mnist_root, tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "CFBENCH_DATA": str(mnist_root), "OMP_NUM_THREADS": "1"}
    subprocess.run(["bash", "benchmarks/gpu_check.sh", str(out), "--strategies", "naive,ewc",
                    "--iterations", "5", "--steps", "5"], cwd=REPO, env=env, check=True,
                   capture_output=True)
    result = json.loads(out.read_text())
    assert not torch.cuda.is_available()  # this test is the CPU fallback's
    assert result["device"] == "cpu" and result["fallback"] is True
    assert "cpu_reference" not in result  # nothing to compare the CPU with
    board = result["leaderboard"]
    assert board["runs"] == board["ok"] == 2 * 3  # two strategies, three settings, one seed
    assert board["wall_s"] > board["train_s"] > 0
    assert board["peak_gpu_bytes_max"] is None
    stacked = result["stacked"]["cpu"]
    assert stacked["single_wall_s"] > 0 and stacked["stacked_10_wall_s"] > 0
    assert result["total_wall_s"] >= board["wall_s"]
