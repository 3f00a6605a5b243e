"""`lorafleet submit` deciding where it runs, and refusing what would lose data, end to end (slow: Ray jobs).

- Without an address, a job starts a Ray instance of its own even when a `ray start` cluster runs on the machine
  (one whose address plain `ray.init()` picks up), and nothing of it runs there.
- With `RAY_ADDRESS`, it joins that cluster, says so in one line, and this shell's storage settings reach the
  cluster's workers in the job's runtime environment: the cluster was started without them, and the job checkpoints to
  S3 (moto). The secret key shows nowhere in the output or the stored objects.
- Storage that cannot be written (a path under a file; a bucket the S3 server does not have) is refused with one
  `error:` line, exit 2, before anything starts. moto accepts any credentials, so wrong ones are not tested here.
- A re-submit whose data file changed is refused with one line, its checkpoints left as they were; `--fresh` starts it
  over from step 0 on the new data.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests

from lorafleet.runstore.location import PROBE_PREFIX
from lorafleet.train.driver import data_fingerprint

from helpers.cli import JOBS, SMALL_RUN, run_cli, submit_small
from helpers.ray_cluster import LocalRayCluster
from helpers.s3_server import SECRET_KEY

TASKS = JOBS / "data" / "tasks.jsonl"


@pytest.fixture(scope="module")
def cluster(shared_ray):
    """A `ray start` cluster whose processes have none of the storage settings (as one started in another shell):
    the session's (tests/conftest.py), which other modules' runs may have used before."""
    return shared_ray


def cluster_state(cluster: LocalRayCluster, what: str) -> list[dict]:
    """The cluster's jobs (`jobs`: the Jobs API's list, drivers included) or actors (`actors`: the state API's)."""
    headers = {"Authorization": f"Bearer {cluster.token}"} if cluster.token else {}
    url = f"{cluster.address}/api/jobs/" if what == "jobs" else f"{cluster.address}/api/v0/actors?limit=10000"
    reply = requests.get(url, headers=headers, timeout=30)
    reply.raise_for_status()
    body = reply.json()
    return body if what == "jobs" else body["data"]["result"]["result"]


def train_controllers(cluster: LocalRayCluster) -> list[dict]:
    return [a for a in cluster_state(cluster, "actors") if "TrainController" in a.get("class_name", "")]


def submit(name: str, storage, *sets: str, flags: tuple[str, ...] = (), env: dict | None = None):
    """`lorafleet submit jobs/llama.yaml --json FLAGS` with the small run's overrides (`submit_small` with flags)."""
    args = [a for s in [f"name={name}", f"checkpoint.storage={storage}", *SMALL_RUN, *sets] for a in ("--set", s)]
    proc = run_cli("submit", "tests/jobs/llama.yaml", "--json", *flags, *args, env=env)
    lines = proc.stdout.strip().splitlines()
    return proc, json.loads(lines[-1]) if lines else {}


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The `error:` lines of a refused submit, after checking it started nothing: exit 2, no traceback, and only
    lorafleet's own lines (the banner, the error) on stderr."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stdout == "", proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert all(line.startswith(("lorafleet: ", "error: ")) for line in lines), proc.stderr
    return [line for line in lines if line.startswith("error: ")]


def test_without_an_address_a_job_never_lands_on_a_running_cluster(cluster, tmp_path):
    # Where `ray start` leaves the address of the cluster it started (here in a private temp dir, so that no one
    # else's Ray on this machine is affected): plain ray.init() joins that cluster.
    temp = Path(tempfile.mkdtemp(prefix="lfrt", dir="/tmp"))  # short: Ray's socket paths have a length limit
    try:
        (temp / "ray").mkdir()
        (temp / "ray" / "ray_current_cluster").write_text(cluster.gcs_address)
        env = {**cluster.client_env(), "RAY_TMPDIR": str(temp)}
        joined = subprocess.run(
            [sys.executable, "-c", "import ray; ray.init(); print(ray.get_runtime_context().gcs_address)"],
            env=env, capture_output=True, text=True, timeout=180,
        )
        # Ray names the cluster by this machine's address, not 127.0.0.1: the port tells it apart.
        assert joined.stdout.strip().splitlines()[-1].endswith(f":{cluster.gcs_port}"), joined.stderr[-2000:]
        jobs_before, controllers_before = len(cluster_state(cluster, "jobs")), len(train_controllers(cluster))

        proc, summary = submit_small("pf-local", tmp_path / "runs", env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert summary["status"] == "succeeded" and summary["steps"] == 6
        assert "joined the Ray cluster" not in proc.stderr
        assert len(cluster_state(cluster, "jobs")) == jobs_before
        assert len(train_controllers(cluster)) == controllers_before
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_joining_is_announced_and_takes_the_storage_settings_along(cluster, s3_server):
    assert not [k for k in cluster.env if k.startswith("AWS_")]  # the cluster cannot have them from its own env
    # With an explicit address Ray sends the token only when told that the cluster wants one.
    env = {**cluster.client_env(), "RAY_ADDRESS": cluster.gcs_address, "RAY_AUTH_MODE": "token"}
    controllers_before = len(train_controllers(cluster))
    proc, summary = submit_small("pf-joined", f"s3://{s3_server.bucket}/runs/joined", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["status"] == "succeeded" and summary["steps"] == 6

    (line,) = [line for line in proc.stderr.splitlines() if "joined the Ray cluster" in line]
    assert line.startswith("lorafleet: joined the Ray cluster at "), line
    assert f":{cluster.gcs_port} (RAY_ADDRESS={cluster.gcs_address}): 1 node, 2 CPUs; this shell's storage settings " \
           "go to its workers (" in line, line
    assert "AWS_SECRET_ACCESS_KEY" in line and "AWS_ENDPOINT_URL" in line
    assert len(train_controllers(cluster)) > controllers_before, "the run's Train controller did not run on the cluster"
    drivers = [job for job in cluster_state(cluster, "jobs") if job.get("type") == "DRIVER"]
    carried = [set(((job.get("runtime_env") or {}).get("env_vars") or {})) for job in drivers]
    assert any({"AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= names for names in carried), carried

    keys = s3_server.keys("runs/joined/pf-joined/")
    assert any(k.endswith("/lorafleet.json") for k in keys) and not [k for k in keys if PROBE_PREFIX in k]
    assert SECRET_KEY not in proc.stdout and SECRET_KEY not in proc.stderr
    for key in keys:
        assert SECRET_KEY.encode() not in s3_server.client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
    # Not asserted (Ray's own logs, not lorafleet's): whether Ray's runtime-env agent logged the secret on the cluster.
    leaked = [p.name for p in Path(cluster.temp_dir).rglob("*.log") if SECRET_KEY.encode() in p.read_bytes()]
    print(f"cluster log files holding the secret: {leaked}")


@pytest.mark.parametrize("kind", ["under-a-file", "missing-bucket"])
def test_storage_that_cannot_be_written_is_refused_before_anything_starts(kind, tmp_path, request):
    if kind == "under-a-file":
        (tmp_path / "file.txt").write_text("not a folder")
        storage, run, cause = tmp_path / "file.txt" / "runs", f"{tmp_path}/file.txt/runs/pf-nowrite", "Not a directory"
    else:
        request.getfixturevalue("s3_server")
        storage = "s3://no-such-bucket-lorafleet/runs"
        run, cause = f"{storage}/pf-nowrite", "NO_SUCH_BUCKET: The specified bucket does not exist"
    proc, _ = submit_small("pf-nowrite", storage)
    assert error_lines(proc) == [f"error: checkpoint.storage: cannot write to {run} ({cause})"]


def test_resubmit_over_changed_data_is_refused_and_fresh_starts_over(tmp_path):
    data = Path(shutil.copy(TASKS, tmp_path / "tasks.jsonl"))
    storage = tmp_path / "runs"
    first, summary = submit_small("pf-data", storage, f"data.path={data}")
    assert first.returncode == 0, first.stderr[-3000:]
    assert summary["status"] == "succeeded" and summary["steps"] == 6
    original = data_fingerprint(data)
    assert json.loads((Path(summary["adapter_uri"]) / "lorafleet.json").read_text())["data"] == original

    # One record's output edited, the file otherwise the same.
    lines = data.read_text().splitlines(keepends=True)
    record = json.loads(lines[3])
    record["output"] += " (edited)"
    lines[3] = json.dumps(record) + "\n"
    data.write_text("".join(lines))
    run = storage / "pf-data"
    stored = sorted(str(p.relative_to(run)) for p in run.rglob("*"))

    refused, _ = submit_small("pf-data", storage, f"data.path={data}")
    assert error_lines(refused) == [
        f"error: data.path: {data} is not the data run 'pf-data' was trained on up to step 6 "
        f"(size {original['size']} -> {data.stat().st_size} bytes); start over with --fresh, or use another name"
    ]
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == stored  # the checkpoints are as they were

    fresh, summary = submit("pf-data", storage, f"data.path={data}", flags=("--fresh",))
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert summary["status"] == "succeeded" and (summary["start_step"], summary["steps"]) == (0, 6)
    info = json.loads((Path(summary["adapter_uri"]) / "lorafleet.json").read_text())
    assert info["data"] == data_fingerprint(data) != original
