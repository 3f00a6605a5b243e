"""The run lease (one submit per run folder) on local disk and on S3 (moto on 127.0.0.1), and what the driver and
`lorafleet submit` do around a run that stops early: refuse a held run before Ray starts, name the checkpoint a
re-submit resumes from, turn SIGINT/SIGTERM into a clean stop (fast: no Ray, no training)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import lorafleet.train.driver as driver
from lorafleet.cli.jobs import StopOnSignal
from lorafleet.runstore.checkpoint import ADAPTER_FILES, INFO_FILE, is_complete
from lorafleet.runstore.lease import LEASE_FILE, STALE_ENV, RunInUse, RunLease, _machine
from lorafleet.runstore.location import RunLocation
from lorafleet.spec import SpecError, load_spec

from helpers.checkpoints import write_checkpoint
from helpers.cli import TEST_JOB

FAST = dict(settle_s=0.05)


def stored(location: RunLocation) -> dict | None:
    """The lease file as JSON, read straight from storage (`None` when absent)."""
    try:
        with location.filesystem.open_input_stream(f"{location.path}/{LEASE_FILE}") as stream:
            return json.loads(stream.read())
    except FileNotFoundError:
        return None


def plant(location: RunLocation, **fields) -> dict:
    """Write a lease as another submit would have (by default a live one on another machine)."""
    now = time.time()
    record = {"job": location.name, "host": "other-host", "pid": 4242, "token": "f" * 32, "machine": "elsewhere",
              "created": now - 30, "renewed": now, **fields}
    if not location.scheme:
        Path(location.path).mkdir(parents=True, exist_ok=True)
    with location.filesystem.open_output_stream(f"{location.path}/{LEASE_FILE}") as out:
        out.write(json.dumps(record).encode())
    return record


def test_second_acquire_is_refused_with_holder_and_remedy(tmp_path):
    location = RunLocation(str(tmp_path / "runs"), "job-a")
    with RunLease(location, **FAST) as lease:
        record = stored(location)
        assert record["token"] == lease.token and record["pid"] == os.getpid() and record["job"] == "job-a"
        assert record["created"] <= record["renewed"] <= time.time()
        with pytest.raises(RunInUse) as refused:
            RunLease(location, **FAST).acquire()
        (line,) = refused.value.problems
        assert line.startswith(f"name: run 'job-a' is already being trained in {location.uri}, by lorafleet on host ")
        assert f"(pid {os.getpid()})" in line and "renewed 0 s ago" in line
        assert f"delete {location.uri}/{LEASE_FILE}" in line and "not renewed for 60 s" in line
        assert stored(location)["token"] == lease.token  # the refused submit left it alone
    # Released on leaving the block: gone from storage, and the next submit takes it.
    assert stored(location) is None
    with RunLease(location, **FAST) as again:
        assert stored(location)["token"] == again.token
    assert sorted(p.name for p in Path(location.path).iterdir()) == []  # no file written aside is left over


def test_release_leaves_another_holders_lease(tmp_path):
    location = RunLocation(str(tmp_path), "job-a")
    lease = RunLease(location, **FAST).acquire()
    planted = plant(location)  # e.g. ours went stale and was broken
    lease.release()
    assert stored(location) == planted


def test_stale_lease_is_broken_with_one_line(tmp_path, caplog):
    location = RunLocation(str(tmp_path), "job-a")
    plant(location, renewed=time.time() - 90)
    with caplog.at_level(logging.WARNING, logger="lorafleet.runstore.lease"):
        lease = RunLease(location, stale_s=60, **FAST).acquire()
    try:
        assert lease.broken["host"] == "other-host" and stored(location)["token"] == lease.token
        (message,) = [r.getMessage() for r in caplog.records]
        assert message.startswith(f"job-a: broke the stale lease {location.uri}/{LEASE_FILE} of host other-host (pid 4242)")
        assert message.endswith("not renewed for 90 s")
    finally:
        lease.release()


def test_stale_after_comes_from_the_environment(tmp_path, monkeypatch):
    location = RunLocation(str(tmp_path), "job-a")
    plant(location, renewed=time.time() - 5)
    with pytest.raises(RunInUse, match="not renewed for 60 s is broken"):
        RunLease(location, **FAST).acquire()
    monkeypatch.setenv(STALE_ENV, "2")
    lease = RunLease(location, **FAST)
    assert (lease.stale_s, lease.renew_s) == (2.0, pytest.approx(2 / 6))
    lease.acquire().release()
    assert lease.broken["pid"] == 4242


def test_holder_gone_from_this_machine_is_broken_at_once(tmp_path):
    location = RunLocation(str(tmp_path), "job-a")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    plant(location, machine=_machine(), pid=int(gone.stdout))  # renewed just now, but its process has exited
    with RunLease(location, **FAST) as lease:
        assert lease.broken["pid"] == int(gone.stdout)
    # The same pid on another machine cannot be checked from here: only staleness breaks it.
    plant(location, pid=int(gone.stdout))
    with pytest.raises(RunInUse):
        RunLease(location, **FAST).acquire()


def test_unreadable_lease_is_broken(tmp_path):
    location = RunLocation(str(tmp_path), "job-a")
    Path(location.path).mkdir(parents=True)
    (Path(location.path) / LEASE_FILE).write_text("{not json")
    with RunLease(location, **FAST) as lease:
        assert lease.broken == {} and stored(location)["token"] == lease.token


def test_renewal_keeps_a_live_holder(tmp_path):
    location = RunLocation(str(tmp_path), "job-a")
    with RunLease(location, stale_s=0.6, renew_s=0.1, **FAST):
        first = stored(location)["renewed"]
        time.sleep(1.0)  # longer than stale_s: only the renewals keep it live
        assert stored(location)["renewed"] > first + 0.5
        with pytest.raises(RunInUse):
            RunLease(location, stale_s=0.6, **FAST).acquire()


def test_holder_notices_a_takeover(tmp_path, caplog):
    location = RunLocation(str(tmp_path), "job-a")
    holder = RunLease(location, renew_s=0.5, **FAST).acquire()
    try:
        # Right after a renewal, so that the next one reads the planted lease rather than racing the write.
        first = stored(location)["renewed"]
        while stored(location)["renewed"] == first:
            time.sleep(0.01)
        with caplog.at_level(logging.WARNING, logger="lorafleet.runstore.lease"):
            planted = plant(location)  # another submit took it over, as if ours had gone stale
            deadline = time.monotonic() + 5
            while not holder.lost and time.monotonic() < deadline:
                time.sleep(0.05)
        assert holder.lost and stored(location) == planted
        (message,) = [r.getMessage() for r in caplog.records]
        assert message.startswith(f"job-a: the lease {location.uri}/{LEASE_FILE} was broken by another submit")
    finally:
        holder.release()
    assert stored(location) == planted  # not ours to delete


def test_concurrent_acquires_let_exactly_one_through(tmp_path):
    location = RunLocation(str(tmp_path), "job-a")
    outcomes: list[object] = []
    start = threading.Barrier(4)

    def contend():
        lease = RunLease(location, **FAST)
        start.wait()
        try:
            outcomes.append(lease.acquire())
        except RunInUse as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=contend) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = [o for o in outcomes if isinstance(o, RunLease)]
    assert len(held) == 1 and len(outcomes) == 4
    assert stored(location)["token"] == held[0].token
    held[0].release()


def test_fresh_deleting_the_folder_keeps_the_lease_held(tmp_path):
    location = RunLocation(str(tmp_path), "job-a")
    with RunLease(location, **FAST) as lease:
        location.delete()  # what --fresh does after taking the lease
        assert lease.renew() is True and stored(location)["token"] == lease.token


def test_storage_that_cannot_be_written_is_one_spec_line(tmp_path):
    (tmp_path / "file").write_text("")
    location = RunLocation(str(tmp_path / "file"), "job-a")  # the run folder would be under a regular file
    with pytest.raises(SpecError) as refused:
        RunLease(location, **FAST).acquire()
    (line,) = refused.value.problems
    assert line.startswith(f"checkpoint.storage: cannot write the run's lease {location.uri}/{LEASE_FILE} (")


def test_s3_lease(s3_server):
    location = RunLocation(f"s3://{s3_server.bucket}/runs", "job-s3")
    key = f"runs/job-s3/{LEASE_FILE}"
    with RunLease(location, settle_s=0.2) as lease:
        assert s3_server.keys("runs/job-s3") == [key]
        assert stored(location)["token"] == lease.token
        with pytest.raises(RunInUse) as refused:
            RunLease(location, settle_s=0.2).acquire()
        assert f"delete s3://{s3_server.bucket}/runs/job-s3/{LEASE_FILE}" in refused.value.problems[0]
    # Deleting a folder's last object, pyarrow leaves an empty "folder/" marker in its place (there are checkpoints
    # next to the lease of a run that trained).
    assert s3_server.keys("runs/job-s3") == ["runs/job-s3/"]
    plant(location, renewed=time.time() - 120)
    with RunLease(location, settle_s=0.2) as lease:
        assert lease.broken["host"] == "other-host" and stored(location)["token"] == lease.token
    assert s3_server.keys("runs/job-s3") == ["runs/job-s3/"]


def test_gcs_lease(gcs_server):
    location = RunLocation(f"gs://{gcs_server.bucket}/runs", "job-gs", gcs_server.endpoint)
    with RunLease(location, settle_s=0.2) as lease:
        assert list(gcs_server.objects("runs/job-gs")) == [f"runs/job-gs/{LEASE_FILE}"]
        assert stored(location)["token"] == lease.token
        with pytest.raises(RunInUse, match=f"delete gs://{gcs_server.bucket}/runs/job-gs/{LEASE_FILE}"):
            RunLease(location, settle_s=0.2).acquire()
    assert gcs_server.objects("runs/job-gs") == {}
    plant(location, renewed=time.time() - 120)
    with RunLease(location, settle_s=0.2) as lease:
        assert lease.broken["host"] == "other-host" and stored(location)["token"] == lease.token
    assert gcs_server.objects("runs/job-gs") == {}


def test_s3_simultaneous_writers_resolve_to_one(s3_server):
    # No create-if-absent on S3: both find no lease, both write, and the re-read after settle_s picks the last writer.
    location = RunLocation(f"s3://{s3_server.bucket}/runs", "job-race")
    leases = [RunLease(location, settle_s=0.5) for _ in range(2)]
    outcomes: list[object] = []
    start = threading.Barrier(2)

    def contend(lease):
        start.wait()
        try:
            outcomes.append(lease.acquire())
        except RunInUse as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=contend, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = [o for o in outcomes if isinstance(o, RunLease)]
    assert len(held) == 1 and len(outcomes) == 2, outcomes
    assert stored(location)["token"] == held[0].token
    held[0].release()


def test_run_job_refuses_a_held_run_before_ray_starts(tmp_path, monkeypatch):
    spec = load_spec(TEST_JOB, [f"checkpoint.storage={tmp_path}", "name=held"])
    monkeypatch.setattr(driver, "prepare", lambda spec, *_: driver.Prepared(spec=spec, base="unused", data=None))

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a refused run")

    monkeypatch.setattr(driver, "start_ray", no_ray)
    with RunLease(RunLocation.of(spec), **FAST):
        with pytest.raises(RunInUse, match="name: run 'held' is already being trained"):
            driver.run_job(spec, fresh=True)
        assert (tmp_path / "held" / LEASE_FILE).is_file()  # --fresh deleted nothing: it comes after the lease


def test_last_complete_step_skips_incomplete_checkpoints(tmp_path):
    location = RunLocation(str(tmp_path), "job-a")
    assert driver.last_complete_step(location) is None
    run = Path(location.path)
    write_checkpoint(run / "checkpoint_2026-01-01_00-00-01.0")  # step 7, both workers' files
    newer = run / "checkpoint_2026-01-01_00-00-02.0"
    write_checkpoint(newer)
    info = json.loads((newer / INFO_FILE).read_text())
    (newer / INFO_FILE).write_text(json.dumps({**info, "step": 9}))
    assert driver.last_complete_step(location) == 9
    weights = newer / ADAPTER_FILES[1]
    data = weights.read_bytes()
    weights.write_bytes(data[:-8])  # cut off (its size is recorded in lorafleet.json)
    assert driver.last_complete_step(location) == 7 and not is_complete(newer)
    (run / "checkpoint_2026-01-01_00-00-01.0" / ADAPTER_FILES[1]).unlink()  # an upload that never finished
    assert driver.last_complete_step(location) is None
    weights.write_bytes(data)
    assert driver.last_complete_step(location) == 9
    summary = driver.RunSummary(job="job-a", status="interrupted", steps=9, resume_step=7)
    assert summary.to_dict()["resume_step"] == 7
    assert "resume_step" not in driver.RunSummary(job="job-a", status="succeeded").to_dict()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_stop_on_signal_interrupts_once_and_restores_handlers(signum):
    before = {s: signal.getsignal(s) for s in StopOnSignal.SIGNALS}
    with StopOnSignal("demo") as stop:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler runs in this thread at the next instruction; never sleeps this long
    assert stop.signum == signum and stop.exit_code == 128 + signum
    assert {s: signal.getsignal(s) for s in StopOnSignal.SIGNALS} == before


def test_second_signal_exits_at_once():
    script = (
        "import os, signal, time\n"
        "from lorafleet.cli.jobs import StopOnSignal\n"
        "with StopOnSignal('demo'):\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n"
        "    except KeyboardInterrupt:\n"
        "        os.kill(os.getpid(), signal.SIGINT); time.sleep(5)\n"
        "print('not reached')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130 and proc.stdout == ""
    assert proc.stderr == "lorafleet: demo: second signal: exiting without cleaning up\n"
