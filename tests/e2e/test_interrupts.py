"""Runs that end before their last step, through the CLI (slow: each run starts Ray).

- A second `submit` of a running job (same name, same storage) is refused with one line (exit 2) by the run's lease,
  and the first run finishes undisturbed. That first run is also the uninterrupted reference for the others.
- SIGTERM or Ctrl-C (SIGINT) mid-run: exit 143 / 130 with one line naming the step reached and the step a re-submit
  resumes from; no process the run started is left; the re-submit resumes there and ends with the reference's adapter,
  bitwise (CPU fp32, RNG states restored: as `test_resume.py` checks a stopped run).
- A disk that fills up while a checkpoint is written (a small tmpfs as `checkpoint.storage`, so root only): the run
  fails with one `error:` line saying so, and the checkpoints before it stay complete.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from lorafleet.runstore.checkpoint import INFO_FILE, is_complete
from lorafleet.runstore.lease import LEASE_FILE
from lorafleet.runstore.location import RunLocation
from lorafleet.train.driver import last_complete_step

from helpers.cli import Submitted, submit_small
from helpers.runs import adapter, losses

# Long enough to interrupt after the first checkpoint with many steps to go, short enough to stay cheap.
STEPS, EVERY = 60, 10
LONG = [f"training.steps={STEPS}", f"checkpoint.every_n_steps={EVERY}"]


def process_tree(root: int) -> dict[tuple[int, str], str]:
    """`root`'s descendants now, as (pid, start time) -> command line (the start time tells a reused pid apart)."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except (OSError, IndexError):
                continue
            stats[int(entry.name)] = (int(fields[1]), fields[19], cmdline)  # ppid, starttime, command
    tree, frontier = {}, {root}
    while frontier:
        frontier = {pid for pid, (ppid, _, _) in stats.items() if ppid in frontier and pid != root}
        frontier -= {pid for pid, _ in tree}
        tree.update({(pid, stats[pid][1]): stats[pid][2] for pid in frontier})
    return tree


def still_running(processes: dict[tuple[int, str], str], wait_s: float = 15) -> list[str]:
    """Those of `processes` (from [`process_tree`]) still alive after up to `wait_s` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = []
        for (pid, started), cmdline in processes.items():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[19] == started and fields[0] != "Z":
                alive.append(f"{pid} {cmdline[:160]}")
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("interrupt-runs")


@pytest.fixture(scope="module")
def contended(storage):
    """A run, and a second submit of it once the first trains; the first is the reference run of this module."""
    first = Submitted("ref", storage, *LONG)
    first.wait_for_step(1)
    second, _ = submit_small("ref", storage, *LONG)
    first_was_running = first.proc.poll() is None
    code, stderr, summary = first.finish()
    return {"first": (first.proc.pid, code, stderr, summary), "second": second, "overlapped": first_was_running}


@pytest.fixture(scope="module")
def reference(contended):
    _, code, stderr, summary = contended["first"]
    assert code == 0, stderr[-3000:]
    return summary


def test_second_submit_of_a_running_job_is_refused(contended, storage):
    pid, code, stderr, summary = contended["first"]
    assert contended["overlapped"], "the first run ended before the second was refused: make it longer"
    second = contended["second"]
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
    # Refused after the command's opening line (job, workers, storage), before anything started.
    (line,) = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert second.stderr.splitlines()[-1] == line and "[ref] step" not in second.stderr, second.stderr
    run_dir = storage / "ref"
    assert line.startswith(
        f"error: name: run 'ref' is already being trained in {run_dir}, by lorafleet on host {socket.gethostname()} "
        f"(pid {pid}) since "
    ), line
    assert f"delete {run_dir}/{LEASE_FILE}" in line
    # The first run went on alone: from step 0 to the end, and gave its lease back.
    assert code == 0, stderr[-3000:]
    assert summary["status"] == "succeeded" and summary["start_step"] == 0 and summary["steps"] == STEPS
    assert not (run_dir / LEASE_FILE).exists()


# Both failed now and then (start_step 0 instead of the announced step) until resume read the run's complete
# checkpoint folders: the signal had come between a checkpoint's upload and Ray Train registering it.
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly_and_resubmit_resumes(signum, storage, reference):
    name = f"stopped-{signum.name.lower()}"
    run = Submitted(name, storage, *LONG)
    run.wait_for_step(EVERY + 2)  # past the first checkpoint (the progress lines come every STEPS // 20 steps)
    started = process_tree(run.proc.pid)
    assert any("raylet" in c for c in started.values()) and any("gcs_server" in c for c in started.values()), started
    sent = time.monotonic()
    run.proc.send_signal(signum)
    code, stderr, summary = run.finish(timeout=120)
    stop_s = time.monotonic() - sent
    assert code == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if "interrupted" in line]
    assert len(lines) == 1, stderr[-3000:]
    match = re.fullmatch(
        rf"lorafleet: {name}: interrupted at step (\d+); re-submit the same command to resume from step (\d+)", lines[0]
    )
    assert match, lines
    reached, resume = int(match.group(1)), int(match.group(2))
    assert EVERY <= resume <= reached < STEPS and resume % EVERY == 0, (reached, resume)
    assert summary["status"] == "interrupted" and summary["steps"] == reached and summary["resume_step"] == resume
    assert stop_s < 60, stop_s
    assert still_running(started) == []
    assert not (storage / name / LEASE_FILE).exists()

    again, resumed = submit_small(name, storage, *LONG)
    assert again.returncode == 0, again.stderr[-3000:]
    assert resumed["start_step"] == resume and resumed["steps"] == STEPS
    assert losses(storage, name) == losses(storage, "ref")
    ref_adapter, got = adapter(reference), adapter(resumed)
    assert ref_adapter.keys() == got.keys()
    for key in ref_adapter:
        assert torch.equal(ref_adapter[key], got[key]), key


# A tmpfs that holds the run's first two checkpoints but not the third (measured: a checkpoint of SMALL_RUN is
# 1,840,125 bytes; the lease and Ray Train's snapshot are about a KB).
CHECKPOINT_BYTES = 1_840_125
DISK_BYTES = int(2.5 * CHECKPOINT_BYTES) // 4096 * 4096


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of `DISK_BYTES` mounted for the test (skipped unless this process may mount one)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_disk_fails_with_one_line_and_keeps_the_last_checkpoint(small_disk):
    # keep=10: nothing is pruned, so the disk fills up; uploads give up after 3 s instead of 5 minutes.
    proc, summary = submit_small("full", small_disk, "training.steps=12", "checkpoint.every_n_steps=2",
                                 "checkpoint.keep=10", env={"LORAFLEET_UPLOAD_RETRY_S": "3"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], proc.stderr[-3000:]
    assert errors[0].startswith("error: full: run failed: "), errors
    assert "Traceback" not in proc.stderr
    assert summary["status"] == "failed"
    run_dir = small_disk / "full"
    folders = sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    complete = [p for p in folders if is_complete(p)]
    steps = [json.loads((p / INFO_FILE).read_text())["step"] for p in complete]
    # The checkpoints written before the disk filled are whole; those it filled on (training went on while the
    # upload retried, so possibly several) are not, and resume would skip them.
    assert steps and steps == list(range(2, 2 * len(steps) + 1, 2)), steps
    assert complete == folders[: len(complete)] and len(folders) > len(complete), folders
    assert last_complete_step(RunLocation(str(small_disk), "full")) == steps[-1]
    assert not (run_dir / LEASE_FILE).exists()
