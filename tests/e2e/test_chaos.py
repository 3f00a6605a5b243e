"""Chaos: one default-length run to S3 (moto on 127.0.0.1) that meets every fault at once (slow: three runs).

The default job (120 steps, checkpoints every 40, `keep: 2`, 2 DDP workers) with `scaling.max_failures=1`:

1. worker 1 SIGKILLs itself before step 50: Ray Train restarts the group from the step-40 checkpoint;
2. the S3 server goes down at the first upload of the next checkpoint (step 80) and comes back 3 s later: the
   upload is retried;
3. `lorafleet submit` gets SIGTERM at step 90 or later: exit 143, one line naming the step a re-submit resumes from.

The re-submit resumes from that step and ends with the adapter of an undisturbed run of the same job (same
tolerances as the ZeRO resume tests), and the storage holds only complete checkpoints, no more than `keep`.
"""

from __future__ import annotations

import re
import signal
import time

import pyarrow.fs as fs
import pytest
import torch
from safetensors.torch import load as load_safetensors

from lorafleet.runstore.checkpoint import checkpoint_problem
from lorafleet.runstore.location import RunLocation

from helpers.cli import Submitted

PREFIX = "chaos"
FAULTS = ["scaling.max_failures=1"]  # lets Ray Train restart the killed worker's group (no effect on the numbers)


def finished(run: Submitted) -> dict:
    code, stderr, summary = run.finish()
    assert code == 0, stderr[-3000:]
    return summary


def s3_adapter(s3_server, uri: str) -> dict[str, torch.Tensor]:
    key = uri.removeprefix(f"s3://{s3_server.bucket}/") + "/adapter_model.safetensors"
    return load_safetensors(s3_server.client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read())


@pytest.fixture(scope="module")
def storage(s3_server) -> str:
    return f"s3://{s3_server.bucket}/{PREFIX}"


@pytest.fixture(scope="module")
def undisturbed(storage) -> dict:
    return finished(Submitted("undisturbed", storage, *FAULTS, small=False))


@pytest.fixture(scope="module")
def chaos(storage, s3_server, tmp_path_factory) -> dict:
    marker = tmp_path_factory.mktemp("chaos") / "killed-once"

    def next_checkpoint_upload(method: str, path: str) -> bool:
        # The first checkpoint file written after the kill (the restarted group's first checkpoint: step 80).
        return method == "PUT" and marker.exists() and re.search(r"/chaos-run/checkpoint_[^/]+/.", path) is not None

    outage = s3_server.stop_at(next_checkpoint_upload)
    run = Submitted("chaos-run", storage, *FAULTS, small=False,
                    faults=["--kill-at", "50", "--kill-rank", "1", "--kill-once-file", str(marker)])
    try:
        down = outage.wait(timeout=600)
        if down:
            time.sleep(3)
            s3_server.start()
        run.wait_for_step(90)
        run.proc.send_signal(signal.SIGTERM)
        code, stderr, summary = run.finish()
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
        s3_server.stop_at(lambda method, path: False)  # disarmed, should the outage never have started
    again = Submitted("chaos-run", storage, *FAULTS, small=False)
    return {"outage": down, "marker": marker.exists(), "code": code, "stderr": stderr, "summary": summary,
            "resumed": finished(again)}


def test_chaos_run_stops_cleanly_and_resumes(chaos):
    assert chaos["marker"], "the worker was never killed"
    assert chaos["outage"], "the S3 server never went down"
    stderr = chaos["stderr"]
    assert chaos["code"] == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    (line,) = [line for line in stderr.splitlines() if "interrupted at step" in line]
    resume = int(line.rsplit(" ", 1)[1])
    assert resume in (40, 80), line
    assert chaos["summary"]["resume_step"] == resume
    resumed = chaos["resumed"]
    assert resumed["start_step"] == resume and resumed["steps"] == 120


def test_chaos_run_ends_with_the_undisturbed_adapter(chaos, undisturbed, s3_server):
    expected = s3_adapter(s3_server, undisturbed["adapter_uri"])
    got = s3_adapter(s3_server, chaos["resumed"]["adapter_uri"])
    assert expected.keys() == got.keys() and expected
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)


def test_chaos_run_leaves_only_complete_checkpoints(chaos, storage, tmp_path):
    location = RunLocation(storage, "chaos-run")
    folders = location.checkpoint_dirs()
    assert 1 <= len(folders) <= 2, folders  # keep: 2; the interrupted run's unregistered folders were removed
    for folder in folders:
        local = tmp_path / folder.rsplit("/", 1)[-1]
        local.mkdir()
        fs.copy_files(folder, str(local), source_filesystem=location.filesystem,
                      destination_filesystem=fs.LocalFileSystem())
        assert checkpoint_problem(local) is None, folder
