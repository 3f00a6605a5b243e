"""A real two-node Ray cluster on this machine (two raylets with different node IPs) that shares no local folder:
one job, one worker per node, everything it reads from storage the second node reaches.

`ray start --head` and `ray start --address ... --node-ip-address 127.0.0.2`, 1 CPU each, so the two Ray Train
workers (1 CPU each) cannot share a node. The second node has a `LORAFLEET_HOME` of its own and runs in a mount
namespace where the head's home and the test's local data folder are empty, as on another machine. The data is an
S3 prefix and the runs live on S3 (moto), so the tokenized cache is built into S3 and the second node copies it from
there; the demo base is materialized again on that node and checked against the driver's weights. The job goes
through the Jobs API (`submit --address ... --wait`), like a real cluster submission; the workers' nodes come from
Ray's state API. Auth is off on this throwaway cluster.
"""

from __future__ import annotations

import json

import pytest
import requests

from helpers.cli import JOBS, TEST_JOB, run_cli
from helpers.ray_cluster import LocalRayCluster, can_hide_folders

pytestmark = pytest.mark.skipif(not can_hide_folders(), reason="needs mount namespaces (unshare --mount) to give "
                                "the second node no view of the head's folders")


@pytest.fixture(scope="module")
def two_nodes(s3_server, tmp_path_factory):
    head_home, node_home = tmp_path_factory.mktemp("head-home"), tmp_path_factory.mktemp("node2-home")
    local_data = tmp_path_factory.mktemp("local-data")
    # The job's data: two shards on the head's disk, hidden from the second node, and the same two on S3.
    lines = (JOBS / "data" / "tasks.jsonl").read_text().splitlines(keepends=True)
    for k in range(2):
        shard = local_data / f"part-{k:03d}.jsonl"
        shard.write_text("".join(lines[k * 1500 : (k + 1) * 1500]))
        s3_server.client.upload_file(str(shard), s3_server.bucket, f"multinode/data/{shard.name}")
    cluster = LocalRayCluster(auth=False, num_cpus=1, lorafleet_home=str(head_home))
    try:
        cluster.add_node("127.0.0.2", num_cpus=1, lorafleet_home=str(node_home), hide=[str(head_home), str(local_data)])
        yield cluster, head_home, node_home, local_data
    finally:
        cluster.shutdown()


def _get(cluster: LocalRayCluster, path: str) -> list[dict]:
    body = requests.get(f"{cluster.address}{path}", timeout=30).json()
    return body["data"]["result"]["result"]


def test_two_workers_on_two_nodes_without_a_shared_folder(two_nodes, s3_server, tmp_path):
    cluster, head_home, node_home, _ = two_nodes
    nodes = {n["node_id"]: n["node_ip"] for n in _get(cluster, "/api/v0/nodes?limit=100") if n["state"] == "ALIVE"}
    assert len(nodes) == 2 and "127.0.0.2" in nodes.values(), nodes

    env = cluster.client_env()
    sets = ["name=multinode", "training.steps=3", "training.warmup=1", "kernels.enabled=false",
            "checkpoint.every_n_steps=3", "scaling.num_workers=2",
            f"data.path=s3://{s3_server.bucket}/multinode/data/", f"checkpoint.storage=s3://{s3_server.bucket}/runs"]
    result = run_cli("submit", str(TEST_JOB), *[a for s in sets for a in ("--set", s)],
                     "--address", cluster.address, "--wait", "--json", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["status"] == "SUCCEEDED" and out["steps"] == 3, out

    # Ray Train's worker actors of this job, and the nodes they ran on.
    actors = _get(cluster, "/api/v0/actors?limit=1000&detail=1")
    workers = [a for a in actors if a["class_name"].endswith("TrainWorker")]
    assert len(workers) == 2, [a["class_name"] for a in actors]
    worker_nodes = {a["node_id"] for a in workers}
    assert len(worker_nodes) == 2, f"both workers ran on one node: {worker_nodes}"
    assert {nodes[n] for n in worker_nodes} == set(nodes.values())

    # The second node read nothing from the head's disk: it materialized the base itself (same weights: checked by
    # its worker against the driver's digest) and copied the tokenized cache from S3 into its own home.
    driver_models = sorted(p.name for p in (head_home / "models").iterdir() if not p.name.startswith("."))
    node_models = sorted(p.name for p in (node_home / "models").iterdir() if not p.name.startswith("."))
    assert node_models == driver_models and len(node_models) == 1, (driver_models, node_models)
    keys = {k.split("/")[3] for k in s3_server.keys("runs/_cache/tokenized/")} - {""}  # "" : a folder marker
    assert len(keys) == 1
    assert list((node_home / "cache" / "tokenized" / keys.pop()).glob("shard-*.arrow"))
    assert any(k.startswith("runs/multinode/") for k in s3_server.keys("runs/"))

    # The adapter the two nodes trained together loads from the run's storage.
    dest = tmp_path / "adapter"
    pulled = run_cli("pull", out["job_id"], str(dest), "--address", cluster.address, "--json", env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert json.loads(pulled.stdout)["tensors"] > 0


def test_local_data_is_tokenized_on_the_drivers_node(two_nodes, tmp_path):
    """Data on the driver's disk is read by Ray Data tasks pinned to the driver's node: the second node, which does
    not see that folder, would fail every chunk it took (this cluster has a CPU on each node, and 30 chunks)."""
    cluster, _, _, local_data = two_nodes
    sets = [f"checkpoint.storage={tmp_path}", f"data.path={local_data}"]
    env = {**cluster.client_env(), "LORAFLEET_CACHE_INLINE_BYTES": "0", "LORAFLEET_CACHE_CHUNK_BYTES": "20000"}
    result = run_cli("data", "prepare", str(TEST_JOB), *[a for s in sets for a in ("--set", s)], "--json",
                     "--address", cluster.gcs_address, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["engine"] == "ray-data" and report["records"] == 3000, report
