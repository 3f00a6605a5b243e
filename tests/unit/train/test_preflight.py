"""The driver's pre-flight, without Ray: the data fingerprint and its comparison with a run's latest checkpoint, the
writability probe of the run's storage (local disk, and S3 on moto), the storage settings a joined cluster's workers
get, and what `submit --help` says of where a job runs (`start_ray` itself: tests/unit/train/test_cluster.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from lorafleet.cli.main import cli as lorafleet_cli
from lorafleet.runstore.checkpoint import INFO_FILE
from lorafleet.runstore.location import PROBE_PREFIX, RunLocation, storage_env
from lorafleet.spec import SpecError
from lorafleet.train.driver import Prepared, data_change, data_fingerprint, preflight

from helpers.cli import JOBS, TEST_JOB

TASKS = JOBS / "data" / "tasks.jsonl"


def changed_copy(source: Path, dest: Path, same_size: bool = False) -> Path:
    """`source` copied to `dest` with one record's output changed (to text of the same length if `same_size`)."""
    lines = source.read_text().splitlines(keepends=True)
    record = json.loads(lines[7])
    output = record["output"]
    record["output"] = output[::-1] if same_size and output != output[::-1] else output + " (edited)"
    lines[7] = json.dumps(record) + "\n"
    dest.write_text("".join(lines))
    return dest


# -- the fingerprint ---------------------------------------------------------------------------------------------


def test_file_fingerprint_is_size_and_sha256_of_the_content_whatever_the_name(tmp_path):
    fingerprint = data_fingerprint(TASKS)
    assert fingerprint == {"size": TASKS.stat().st_size, "sha256": hashlib.sha256(TASKS.read_bytes()).hexdigest()}
    # A remote job trains on a copy under another name: the same data.
    assert data_fingerprint(shutil.copy(TASKS, tmp_path / "renamed.jsonl")) == fingerprint


def test_one_changed_record_changes_the_fingerprint(tmp_path):
    longer = data_fingerprint(changed_copy(TASKS, tmp_path / "longer.jsonl"))
    size = TASKS.stat().st_size
    assert data_change(data_fingerprint(TASKS), longer) == f"size {size} -> {size + len(' (edited)')} bytes"
    same = data_fingerprint(changed_copy(TASKS, tmp_path / "same.jsonl", same_size=True))
    assert same["size"] == size and same["sha256"] != data_fingerprint(TASKS)["sha256"]
    assert data_change(data_fingerprint(TASKS), same).startswith("same size, different content (sha256 ")


def test_folder_fingerprint_covers_each_file(tmp_path):
    folder = tmp_path / "saved"
    (folder / "train").mkdir(parents=True)
    (folder / "state.json").write_text("{}")
    (folder / "train" / "data-00000.arrow").write_bytes(b"\x00" * 64)
    (folder / ".cache").write_text("ignored")
    before = data_fingerprint(folder)
    assert sorted(before["files"]) == ["state.json", "train/data-00000.arrow"]
    assert before["files"]["state.json"] == {"size": 2, "sha256": hashlib.sha256(b"{}").hexdigest()}
    (folder / "train" / "data-00000.arrow").write_bytes(b"\x01" * 64)
    (folder / "train" / "data-00001.arrow").write_bytes(b"\x00")
    (folder / "state.json").unlink()
    assert data_change(before, data_fingerprint(folder)) == (
        "train/data-00000.arrow changed, train/data-00001.arrow added, state.json removed"
    )
    assert data_change(before, data_fingerprint(TASKS)) == "was a folder, now a file"


# -- the storage probe -------------------------------------------------------------------------------------------


def test_probe_of_writable_local_storage_leaves_only_the_run_folder(tmp_path):
    location = RunLocation(str(tmp_path / "runs"), "job")
    assert location.write_problem() is None
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["job"]
    assert list((tmp_path / "runs" / "job").iterdir()) == []


@pytest.mark.parametrize("below", ["file.txt/runs", "file.txt"])
def test_probe_of_a_path_under_a_file_names_the_cause(tmp_path, below):
    # Tests run as root here, where a chmod-ed folder stays writable; a path under a file cannot be written by anyone.
    (tmp_path / "file.txt").write_text("not a folder")
    assert RunLocation(str(tmp_path / below), "job").write_problem() == "Not a directory"


def test_probe_of_s3(s3_server):
    location = RunLocation(f"s3://{s3_server.bucket}/runs/team", "probe-job")
    assert location.write_problem() is None
    assert not [k for k in s3_server.keys("runs/team/") if PROBE_PREFIX in k]
    missing = RunLocation("s3://no-such-bucket-lorafleet/runs", "probe-job").write_problem()
    assert missing == "NO_SUCH_BUCKET: The specified bucket does not exist"
    # moto's server accepts any credentials (it checks none unless told to), so wrong ones cannot be tested here.


def test_probe_of_an_endpoint_that_does_not_answer(monkeypatch):
    from helpers.net import free_port

    location = RunLocation("s3://bucket/runs", "job", endpoint=f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    assert location.write_problem().startswith("NETWORK_CONNECTION: ")


# -- preflight ---------------------------------------------------------------------------------------------------


def prepared_for(spec_overrides: list[str], source: dict) -> Prepared:
    from types import SimpleNamespace

    from lorafleet.spec import load_spec

    spec = load_spec(TEST_JOB, spec_overrides)
    return Prepared(spec=spec, base="unused", data=SimpleNamespace(source=source))


def write_checkpoint_info(run: Path, folder: str, **info) -> None:
    (run / folder).mkdir(parents=True)
    (run / folder / INFO_FILE).write_text(json.dumps(info))


def test_preflight_refuses_unwritable_storage_in_one_line(tmp_path):
    (tmp_path / "file.txt").write_text("")
    job = prepared_for(["name=pf"], data_fingerprint(TASKS))
    with pytest.raises(SpecError) as err:
        preflight(job, RunLocation(str(tmp_path / "file.txt" / "runs"), "pf"))
    assert err.value.problems == [f"checkpoint.storage: cannot write to {tmp_path}/file.txt/runs/pf (Not a directory)"]


def test_preflight_compares_the_data_with_the_latest_checkpoint(tmp_path):
    changed = data_fingerprint(changed_copy(TASKS, tmp_path / "changed.jsonl"))
    run = tmp_path / "runs" / "pf"
    location = RunLocation(str(tmp_path / "runs"), "pf")
    job = prepared_for(["name=pf", f"data.path={tmp_path / 'changed.jsonl'}"], changed)

    preflight(job, location)  # no checkpoint yet: nothing to compare with
    write_checkpoint_info(run, "checkpoint_2026-01-01_00-00-01.0", step=2, data=data_fingerprint(TASKS))
    write_checkpoint_info(run, "checkpoint_2026-01-01_00-00-02.0", step=4, data=data_fingerprint(TASKS))
    (run / "checkpoint_2026-01-01_00-00-03.0").mkdir()  # cut off before its lorafleet.json: not what resume uses
    with pytest.raises(SpecError) as err:
        preflight(job, location)
    size = TASKS.stat().st_size
    assert err.value.problems == [
        f"data.path: {tmp_path / 'changed.jsonl'} is not the data run 'pf' was trained on up to step 4 "
        f"(size {size} -> {changed['size']} bytes); start over with --fresh, or use another name"
    ]
    preflight(job, location, fresh=True)  # --fresh: the checkpoints are about to go
    preflight(prepared_for(["name=pf"], data_fingerprint(TASKS)), location)  # the same data resumes


def test_checkpoints_without_a_fingerprint_resume_unchecked(tmp_path):
    # Written before lorafleet recorded the data: nothing to compare with.
    write_checkpoint_info(tmp_path / "runs" / "old", "checkpoint_2026-01-01_00-00-01.0", step=2, loss=1.0)
    preflight(prepared_for(["name=old"], {"size": 1, "sha256": "x"}), RunLocation(str(tmp_path / "runs"), "old"))


def test_latest_checkpoint_json_on_s3(s3_server):
    prefix = "runs/latest/job"
    for folder, step in (("checkpoint_2026-01-01_00-00-01.0", 2), ("checkpoint_2026-01-01_00-00-02.0", 4)):
        s3_server.client.put_object(Bucket=s3_server.bucket, Key=f"{prefix}/{folder}/{INFO_FILE}",
                                    Body=json.dumps({"step": step}).encode())
    path, info = RunLocation(f"s3://{s3_server.bucket}/runs/latest", "job").latest_checkpoint_json(INFO_FILE)
    assert (path, info) == (f"{s3_server.bucket}/{prefix}/checkpoint_2026-01-01_00-00-02.0", {"step": 4})


def test_storage_env_takes_aws_and_gcs_settings_only(monkeypatch):
    monkeypatch.setenv("AWS_SESSION_TOKEN", "t")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/k.json")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "localhost:4443")
    monkeypatch.setenv("NOT_AWS_X", "no")
    env = storage_env()
    assert {"AWS_SESSION_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST"} <= env.keys()
    assert "NOT_AWS_X" not in env and "PATH" not in env


def test_submit_help_says_where_a_job_runs():
    text = " ".join(CliRunner().invoke(lorafleet_cli, ["submit", "--help"]).output.split())
    assert "never one already running here (ray start)" in text
    assert "HOST:PORT or auto: join that Ray cluster from here" in text
