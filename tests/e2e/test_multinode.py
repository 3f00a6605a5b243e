"""A real two-node Ray cluster on this machine (two raylets with different node IPs); one job, one worker per node.

`ray start --head` and `ray start --address ... --node-ip-address 127.0.0.2`, 1 CPU each, so the two Ray Train
workers (1 CPU each) cannot share a node. The job goes through the Jobs API (`submit --address ... --wait`), like a
real cluster submission; the workers' nodes come from Ray's state API. Auth is off on this throwaway cluster.
"""

from __future__ import annotations

import json

import pytest
import requests

from helpers.cli import run_cli, TEST_JOB
from helpers.ray_cluster import LocalRayCluster


@pytest.fixture(scope="module")
def two_nodes():
    cluster = LocalRayCluster(auth=False, num_cpus=1)
    try:
        cluster.add_node("127.0.0.2", num_cpus=1)
        yield cluster
    finally:
        cluster.shutdown()


def _get(cluster: LocalRayCluster, path: str) -> list[dict]:
    body = requests.get(f"{cluster.address}{path}", timeout=30).json()
    return body["data"]["result"]["result"]


def test_two_workers_on_two_nodes(two_nodes, tmp_path):
    nodes = {n["node_id"]: n["node_ip"] for n in _get(two_nodes, "/api/v0/nodes?limit=100") if n["state"] == "ALIVE"}
    assert len(nodes) == 2 and "127.0.0.2" in nodes.values(), nodes

    env = two_nodes.client_env()
    result = run_cli(
        "submit",
        str(TEST_JOB),
        *[a for s in ["name=multinode", "training.steps=3", "training.warmup=1", "kernels.enabled=false",
                      "checkpoint.every_n_steps=3", "scaling.num_workers=2"] for a in ("--set", s)],
        "--address", two_nodes.address, "--wait", "--json", env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["status"] == "SUCCEEDED" and out["steps"] == 3, out

    # Ray Train's worker actors of this job, and the nodes they ran on.
    actors = _get(two_nodes, "/api/v0/actors?limit=1000&detail=1")
    workers = [a for a in actors if a["class_name"].endswith("TrainWorker")]
    assert len(workers) == 2, [a["class_name"] for a in actors]
    worker_nodes = {a["node_id"] for a in workers}
    assert len(worker_nodes) == 2, f"both workers ran on one node: {worker_nodes}"
    assert {nodes[n] for n in worker_nodes} == set(nodes.values())

    # The adapter the two nodes trained together loads.
    dest = tmp_path / "adapter"
    pulled = run_cli("pull", out["job_id"], str(dest), "--address", two_nodes.address, "--json", env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert json.loads(pulled.stdout)["tensors"] > 0
