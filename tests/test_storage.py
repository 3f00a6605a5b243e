"""Checkpoints streamed to a real S3 server (moto on 127.0.0.1), through the CLI (slow: one run starts Ray).

One run with checkpoints every 2 steps and `keep: 2`. After the step-2 checkpoint is registered the server is
stopped, and only started again once a worker has reported a failed upload attempt; the run must retry, finish
and leave exactly the two newest checkpoints, each complete. Credentials never show up in the output or in any
stored object.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, SMALL_RUN
from s3_server import SECRET_KEY, s3_server  # noqa: F401

from lorafleet.checkpoint import is_complete

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_run(s3_server, tmp_path_factory):  # noqa: F811
    import os

    prefix = "runs/team-a"
    args = [sys.executable, "-m", "lorafleet.cli", "submit", "jobs/llama.yaml", "--json", "--verbose"]
    for item in [f"name=s3-job", f"checkpoint.storage=s3://{s3_server.bucket}/{prefix}", *SMALL_RUN]:
        args += ["--set", item]
    proc = subprocess.Popen(args, cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr_lines: list[str] = []
    retry_seen = threading.Event()

    def read_stderr():
        for line in proc.stderr:
            stderr_lines.append(line)
            if "upload failed (attempt" in line:
                retry_seen.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    outage = {"stopped": False, "restarted": False}
    snapshot = f"{prefix}/s3-job/checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 600
    # Take the server down only between checkpoints: once the step-2 checkpoint is registered (the run snapshot
    # exists), the next storage access is a worker uploading the step-4 checkpoint.
    while proc.poll() is None and time.monotonic() < deadline:
        if snapshot in s3_server.keys(prefix):
            s3_server.stop()
            outage["stopped"] = True
            retry_seen.wait(timeout=120)
            time.sleep(1.0)
            s3_server.start()
            outage["restarted"] = True
            break
        time.sleep(0.2)
    stdout, _ = proc.communicate(timeout=max(10, deadline - time.monotonic()))
    reader.join(timeout=10)
    lines = stdout.strip().splitlines()
    return {
        "returncode": proc.returncode,
        "stdout": stdout,
        "stderr": "".join(stderr_lines),
        "summary": json.loads(lines[-1]) if lines else {},
        "prefix": f"{prefix}/s3-job",
        "outage": outage,
        "retried": retry_seen.is_set(),
        "download": tmp_path_factory.mktemp("s3-download"),
    }


def test_run_survives_server_outage(s3_run):
    assert s3_run["returncode"] == 0, s3_run["stderr"][-4000:]
    assert s3_run["outage"] == {"stopped": True, "restarted": True}
    assert s3_run["retried"], "no upload retry was logged while the server was down"
    summary = s3_run["summary"]
    assert summary["status"] == "succeeded" and summary["steps"] == 6
    assert summary["adapter_uri"].startswith("s3://lorafleet-test-bucket/runs/team-a/s3-job/checkpoint_")


def test_keep_prunes_and_checkpoints_are_complete(s3_run, s3_server):  # noqa: F811
    keys = s3_server.keys(s3_run["prefix"])
    # runs/team-a/s3-job/<checkpoint folder>/<file>; the run snapshot (checkpoint_manager_snapshot.json) is a file.
    folders = sorted({k.split("/")[3] for k in keys if k.count("/") == 4 and k.split("/")[3].startswith("checkpoint_")})
    assert len(folders) == 2, folders
    steps = []
    for folder in folders:
        local = Path(s3_run["download"]) / folder
        local.mkdir()
        # pyarrow writes an empty "folder/" marker object next to the files; it has no file to download.
        for key in (k for k in keys if k.split("/")[3] == folder and not k.endswith("/")):
            s3_server.client.download_file(s3_server.bucket, key, str(local / key.rsplit("/", 1)[-1]))
        assert is_complete(local), sorted(p.name for p in local.iterdir())
        steps.append(json.loads((local / "lorafleet.json").read_text())["step"])
    assert sorted(steps) == [4, 6]
    assert s3_run["summary"]["adapter_uri"].endswith(folders[-1])


def test_credentials_never_leak(s3_run, s3_server):  # noqa: F811
    assert SECRET_KEY not in s3_run["stdout"]
    assert SECRET_KEY not in s3_run["stderr"]
    assert SECRET_KEY not in json.dumps(s3_run["summary"])
    for key in s3_server.keys():
        body = s3_server.client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
        assert SECRET_KEY.encode() not in body, key
