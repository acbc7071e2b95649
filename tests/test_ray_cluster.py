"""Ray as users run it: a real two-node cluster on this machine (loopback only) that a sweep
joins with --address, records equal to the process pool's; and without --address a local
instance of its own, whatever RAY_ADDRESS points at; nothing of Ray's start-up on the terminal.

The cluster listens on 127.0.0.1 only. Ray replaces a loopback address it is given by the
machine's outward address unless it is told the machine is a single host, so the commands run
with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (Ray's switch for exactly that).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from cfbench.cli import main
from cfbench.records import read_records
from cfbench.store import Store

SWEEP = """name: two-nodes
scenarios: split-digits
settings: class
strategies: [naive, ewc]
seeds: 2
protocol: {iterations: 5}
resources: {cpus: 1}
"""


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node of one CPU each (so two runs at once take both), bound to
    127.0.0.1, in a temporary directory of their own; shut down however the tests end."""
    from ray.cluster_utils import Cluster  # `make test` installs the 'ray' extra: never skipped

    temp = tempfile.mkdtemp(prefix="cfbray-")  # short: Ray's socket paths live under it
    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False,
            "temp_dir": temp}
    # Ray writes the cluster's address to <RAY_TMPDIR>/ray/ray_current_cluster, where a later
    # ray.init() would find it: kept inside the temporary directory, not the machine's /tmp/ray.
    before = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp
    os.makedirs(os.path.join(temp, "ray"))
    cluster = Cluster()
    try:
        cluster.add_node(**node)
        cluster.add_node(**node)
        yield cluster
    finally:
        cluster.shutdown()
        if before is None:
            del os.environ["RAY_TMPDIR"]
        else:
            os.environ["RAY_TMPDIR"] = before
        shutil.rmtree(temp, ignore_errors=True)


def node_ids(cluster) -> set[str]:
    return {node.node_id for node in [cluster.head_node, *cluster.worker_nodes]}


def stored(db) -> dict:
    with Store(db) as store:
        return {r.run_id: r for r in store.records()}


def cfbench(args: list[str], **env: str) -> subprocess.CompletedProcess:
    """`cfbench ARGS` as a user runs it, in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "cfbench.cli", *args], capture_output=True, text=True,
        timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1",
                          "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **env})


def test_a_sweep_joins_a_cluster_with_address_and_both_nodes_run(cluster, tmp_path,
                                                                 digits_root):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(SWEEP)
    common = ["--data-root", str(digits_root), "--quiet"]
    assert main(["sweep", str(sweep), "--executor", "process", "--workers", "2", "--store",
                 str(tmp_path / "process.sqlite"), *common]) == 0
    proc = cfbench(["sweep", str(sweep), "--executor", "ray", "--address", cluster.address,
                    "--store", str(tmp_path / "ray.sqlite"), *common])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # none of Ray's start-up lines
    pooled, remote = stored(tmp_path / "process.sqlite"), stored(tmp_path / "ray.sqlite")
    assert len(remote) == 4 and sorted(remote) == sorted(pooled)
    assert {r.env["ray_node"] for r in remote.values()} == node_ids(cluster)
    for run_id, record in remote.items():
        assert record.status == "ok"
        assert record.R == pooled[run_id].R  # bitwise: floats compared exactly
        assert record.metrics == pooled[run_id].metrics
        assert record.env["strategy_sources"] == {record.config["strategy"]: "built-in"}
        assert "ray_node" not in pooled[run_id].env


def test_without_address_a_local_instance_starts_whatever_RAY_ADDRESS_says(
        cluster, tmp_path, digits_root):
    """RAY_ADDRESS names the cluster (as it would after `ray start`): the run must not join it.
    stderr holds cfbench's lines only: the dashboard asked for, the run, the summary."""
    out = tmp_path / "runs"
    proc = cfbench(["run", "--scenario", "split-digits", "--setting", "class", "--strategy",
                    "naive", "--iterations", "5", "--executor", "ray", "--ray-dashboard",
                    "--out", str(out), "--data-root", str(digits_root)],
                   RAY_ADDRESS=cluster.address)
    assert proc.returncode == 0, proc.stderr
    [record] = read_records(out)
    assert record.status == "ok" and record.env["ray_node"] not in node_ids(cluster)
    lines = proc.stderr.splitlines()
    assert len(lines) == 3, proc.stderr
    assert re.fullmatch(r"cfbench: Ray dashboard at http://127\.0\.0\.1:\d+", lines[0])
    assert lines[1].startswith(f"[1/1] ok {record.run_id} split-digits/class/naive seed 0")
    assert lines[2].startswith("cfbench run: 1 ok, 0 failed")
