"""Checkpoints streamed to a real S3 server (moto on 127.0.0.1), through the CLI (slow: one run starts Ray).

One run with checkpoints every 2 steps and `keep: 2`, and two outages that start at exact requests. First the
server goes down at a worker's first upload of the second checkpoint, once the first is registered, and comes back
once the worker has logged a failed attempt; then it goes down when the controller next writes the run snapshot
(registering a checkpoint), and comes back once lorafleet has logged that it will start the run again. The run must
finish and leave exactly the two newest checkpoints, each complete. Credentials never show up in the output or in
any stored object.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lorafleet.runstore.checkpoint import is_complete

from helpers.cli import REPO, SMALL_RUN
from helpers.s3_server import SECRET_KEY


@pytest.fixture(scope="module")
def s3_run(s3_server, tmp_path_factory):
    prefix = "runs/team-a"
    args = [sys.executable, "-m", "lorafleet.cli", "submit", "tests/jobs/llama.yaml", "--json", "--verbose"]
    for item in ["name=s3-job", f"checkpoint.storage=s3://{s3_server.bucket}/{prefix}", *SMALL_RUN]:
        args += ["--set", item]
    snapshot = f"/{s3_server.bucket}/{prefix}/s3-job/checkpoint_manager_snapshot.json"
    registered = threading.Event()
    folders: list[str] = []

    def second_checkpoint_upload(method: str, path: str) -> bool:
        # Ray Train registers a checkpoint (and writes the run snapshot) once every worker uploaded it, in report
        # order. Holding the first upload of the second checkpoint until the first is registered means that while the
        # server is down the controller has nothing to write: only the worker's upload fails. Without the hold, steps
        # of this small run are so short that every checkpoint may be uploaded before the first registration.
        if method != "PUT":
            return False
        if path == snapshot:
            registered.set()
            return False
        match = re.search(r"/s3-job/(checkpoint_[^/]+)/", path)
        if match is None:
            return False
        if match.group(1) not in folders:
            folders.append(match.group(1))
        if folders.index(match.group(1)) == 0:
            return False
        registered.wait(timeout=60)
        return True

    worker_outage = s3_server.stop_at(second_checkpoint_upload)
    proc = subprocess.Popen(args, cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr_lines: list[str] = []
    upload_retry, fit_retry = threading.Event(), threading.Event()

    def read_stderr():
        for line in proc.stderr:
            stderr_lines.append(line)
            if "upload failed (attempt" in line:
                upload_retry.set()
            if "storage unreachable" in line:
                fit_retry.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    outages = []
    # 1. Down while a worker uploads: its upload retries until the server is back, training goes on meanwhile.
    if worker_outage.wait(timeout=300):
        outages.append({"retried": upload_retry.wait(timeout=120)})
        time.sleep(1.0)
        # 2. Down when the controller next writes the run snapshot: the Train run fails and lorafleet starts it again
        #    from the last complete checkpoint once the storage answers. Armed before the restart, because the
        #    retried upload completes a checkpoint whose registration comes next.
        controller_outage = s3_server.stop_at(lambda method, path: method == "PUT" and path == snapshot)
        s3_server.start()
        if controller_outage.wait(timeout=300):
            outages.append({"retried": fit_retry.wait(timeout=120)})
            time.sleep(1.0)
            s3_server.start()
    stdout, _ = proc.communicate(timeout=600)
    reader.join(timeout=10)
    lines = stdout.strip().splitlines()
    return {
        "returncode": proc.returncode,
        "stdout": stdout,
        "stderr": "".join(stderr_lines),
        "summary": json.loads(lines[-1]) if lines else {},
        "prefix": f"{prefix}/s3-job",
        "outages": outages,
        "download": tmp_path_factory.mktemp("s3-download"),
    }


def _story(stderr: str) -> str:
    """lorafleet's own lines and errors from the whole run, which the tail of a long stderr can cut off."""
    return "\n".join(line for line in stderr.splitlines() if "lorafleet" in line or "Error" in line)[-8000:]


def test_run_survives_server_outage(s3_run):
    assert s3_run["returncode"] == 0, _story(s3_run["stderr"])
    assert s3_run["outages"] == [{"retried": True}, {"retried": True}], _story(s3_run["stderr"])
    summary = s3_run["summary"]
    assert summary["status"] == "succeeded" and summary["steps"] == 6
    assert summary["adapter_uri"].startswith("s3://lorafleet-test-bucket/runs/team-a/s3-job/checkpoint_")


def test_keep_prunes_and_checkpoints_are_complete(s3_run, s3_server):
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


def test_credentials_never_leak(s3_run, s3_server):
    assert SECRET_KEY not in s3_run["stdout"]
    assert SECRET_KEY not in s3_run["stderr"]
    assert SECRET_KEY not in json.dumps(s3_run["summary"])
    for key in s3_server.keys():
        body = s3_server.client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
        assert SECRET_KEY.encode() not in body, key
