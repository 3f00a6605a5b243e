"""`RunLocation`: one run's folder on local disk and on S3 (moto on 127.0.0.1), the driver's uses of it, and
`fetch_files` (the adapter download behind `load_adapter` and `lorafleet pull`)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from pyarrow import fs

from lorafleet.infer.generate import fetch_adapter
from lorafleet.remote.client import RemoteError, copy_adapter
from lorafleet.runstore.checkpoint import ADAPTER_FILES, INFO_FILE, STATE_NAME, state_files
from lorafleet.runstore.location import RunLocation, fetch_files
from lorafleet.runstore.monitoring import read_metrics, write_run_artifacts
from lorafleet.spec import load_spec
from lorafleet.train import driver
from lorafleet.train.driver import _storage_reachable, remove_orphan_checkpoints

from helpers.checkpoints import write_checkpoint
from helpers.cli import TEST_JOB

# Ray Train names checkpoint folders by time; name order is creation order. The run snapshot is a file whose name
# also starts with checkpoint_.
FOLDERS = ["checkpoint_2026-01-01_00-00-03.0", "checkpoint_2026-01-01_00-00-01.0", "checkpoint_2026-01-01_00-00-02.0"]
SNAPSHOT = "checkpoint_manager_snapshot.json"


def test_reachable_probes_the_default_storage_of_a_spec_without_one(tmp_path, monkeypatch):
    # The spec leaves checkpoint.storage out: the probe between fit() retries must use $LORAFLEET_HOME/runs, as
    # the run itself does, not the missing value.
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    spec = load_spec(TEST_JOB)
    assert spec.checkpoint.storage is None
    assert _storage_reachable(spec) is True
    assert RunLocation.of(spec).path == str(tmp_path / "home" / "runs" / "llama-tasks")


def test_local_default_storage_from_lorafleet_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    location = RunLocation.of(load_spec(TEST_JOB, ["name=loc-default"]))
    root = tmp_path / "home" / "runs"
    assert (location.storage, location.name, location.endpoint) == (str(root), "loc-default", None)
    assert location.path == location.uri == str(root / "loc-default")
    assert isinstance(location.filesystem, fs.LocalFileSystem)
    assert not root.exists()  # nothing is created before Ray Train needs it
    assert location.ray_storage() == (str(root), None)  # Ray Train handles local paths itself
    assert root.is_dir()


@pytest.mark.parametrize("form", ["path", "relative", "file"])
def test_local_explicit_storage(tmp_path, monkeypatch, form):
    monkeypatch.chdir(tmp_path)
    storage = {"path": str(tmp_path / "runs"), "relative": "runs", "file": f"file://{tmp_path}/runs"}[form]
    location = RunLocation(storage, "job-a")
    assert location.scheme == ""
    assert location.path == str(tmp_path / "runs" / "job-a")
    assert location.ray_storage() == (str(tmp_path / "runs"), None)
    ray_path = f"{tmp_path}/runs/job-a/{FOLDERS[0]}"
    assert location.display_uri(ray_path) == ray_path
    assert location.artifacts() == {
        "run_dir": f"{tmp_path}/runs/job-a",
        "metrics": f"{tmp_path}/runs/job-a/metrics.jsonl",
        "plot": f"{tmp_path}/runs/job-a/loss.png",
    }


def test_object_store_uris_and_paths():
    location = RunLocation("s3://bucket/team/runs/", "job-a", "http://127.0.0.1:9000")
    assert (location.scheme, location.path) == ("s3", "bucket/team/runs/job-a")
    assert location.display_uri(f"bucket/team/runs/job-a/{FOLDERS[0]}") == f"s3://bucket/team/runs/job-a/{FOLDERS[0]}"
    assert location.artifacts() == {
        "run_dir": "s3://bucket/team/runs/job-a",
        "metrics": "s3://bucket/team/runs/job-a/metrics.jsonl",
        "plot": "s3://bucket/team/runs/job-a/loss.png",
    }
    gs = RunLocation("gs://bucket/runs", "job-b")
    assert gs.uri == "gs://bucket/runs/job-b" and gs.artifacts()["plot"] == "gs://bucket/runs/job-b/loss.png"
    # The endpoint configures the filesystem; it is never part of a path or URI.
    assert "127.0.0.1" not in json.dumps([location.path, location.uri, location.artifacts()])


def test_local_checkpoint_dirs_delete_and_files(tmp_path):
    location = RunLocation(str(tmp_path), "job-a")
    assert location.checkpoint_dirs() == [] and location.read("metrics.jsonl") is None
    assert location.reachable() is True  # a run that has not started yet: reachable, nothing there
    for name in FOLDERS:
        (tmp_path / "job-a" / name).mkdir(parents=True)
    (tmp_path / "job-a" / SNAPSHOT).write_text("{}")
    location.write("metrics.jsonl", b'{"step": 1}\n')
    assert (tmp_path / "job-a" / "metrics.jsonl").read_bytes() == b'{"step": 1}\n'
    assert location.read("metrics.jsonl") == b'{"step": 1}\n'
    assert location.checkpoint_dirs() == [f"{tmp_path}/job-a/{name}" for name in sorted(FOLDERS)]
    assert location.delete() is True
    assert not (tmp_path / "job-a").exists() and tmp_path.is_dir()
    assert location.delete() is False


def test_write_creates_the_run_folder(tmp_path):
    location = RunLocation(str(tmp_path / "runs"), "new-job")
    location.write("loss.png", b"png")
    assert (tmp_path / "runs" / "new-job" / "loss.png").read_bytes() == b"png"


def test_s3_run_folder(s3_server):
    location = RunLocation(f"s3://{s3_server.bucket}/runs/team-a", "job-s3")
    path, filesystem = location.ray_storage()
    assert path == f"{s3_server.bucket}/runs/team-a" and filesystem.type_name == "s3"
    assert location.filesystem is filesystem  # created once
    assert location.path == f"{s3_server.bucket}/runs/team-a/job-s3"
    assert location.checkpoint_dirs() == [] and location.delete() is False
    prefix = "runs/team-a/job-s3"
    for name in FOLDERS:
        s3_server.client.put_object(Bucket=s3_server.bucket, Key=f"{prefix}/{name}/{INFO_FILE}", Body=b"{}")
    s3_server.client.put_object(Bucket=s3_server.bucket, Key=f"{prefix}/{SNAPSHOT}", Body=b"{}")
    assert location.checkpoint_dirs() == [f"{location.path}/{name}" for name in sorted(FOLDERS)]

    history = [{"step": 1, "loss": 3.0, "lr": 1e-3}, {"step": 2, "loss": 2.5, "lr": 1e-3}]
    assert write_run_artifacts(location, history) == {
        "run_dir": f"s3://{s3_server.bucket}/{prefix}",
        "metrics": f"s3://{s3_server.bucket}/{prefix}/metrics.jsonl",
        "plot": f"s3://{s3_server.bucket}/{prefix}/loss.png",
    }
    assert [r["step"] for r in read_metrics(location)] == [1, 2]
    # Object stores get the files only: no empty "folder/" marker objects.
    assert all(not key.endswith("/") for key in s3_server.keys(prefix))

    assert location.reachable() is True
    s3_server.stop()
    try:
        assert location.reachable() is False
    finally:
        s3_server.start()
    assert location.reachable() is True

    assert location.delete() is True
    assert s3_server.keys(prefix) == []
    assert location.delete() is False


def _ray_result(location: RunLocation, latest: str, kept: list[str]) -> SimpleNamespace:
    """What the driver reads of a `ray.train.Result`: the latest checkpoint and the kept ones, by storage path."""
    checkpoint = lambda name: SimpleNamespace(path=f"{location.path}/{name}")  # noqa: E731
    return SimpleNamespace(checkpoint=checkpoint(latest), best_checkpoints=[(checkpoint(n), {}) for n in kept])


def test_remove_orphan_checkpoints_keeps_what_ray_keeps(tmp_path):
    location = RunLocation(str(tmp_path), "job-a")
    for name in FOLDERS:
        (tmp_path / "job-a" / name).mkdir(parents=True)
    (tmp_path / "job-a" / SNAPSHOT).write_text("{}")
    newest, middle, oldest = sorted(FOLDERS, reverse=True)
    assert remove_orphan_checkpoints(_ray_result(location, newest, [middle, newest]), location) == 1
    assert location.checkpoint_dirs() == [f"{location.path}/{middle}", f"{location.path}/{newest}"]
    assert (tmp_path / "job-a" / SNAPSHOT).is_file()
    # No kept set (a run without checkpoints to keep): nothing is touched.
    assert remove_orphan_checkpoints(SimpleNamespace(checkpoint=None, best_checkpoints=[]), location) == 0
    assert len(location.checkpoint_dirs()) == 2


def test_remove_orphan_checkpoints_keeps_the_newest_complete_folders_ray_did_not_register(tmp_path):
    # A retried fit resumed from the middle folder, which Ray Train never registered: with `keep: 2` (newest kept) it
    # stays beside the latest; the incomplete oldest goes, whatever Ray Train's kept set says.
    location = RunLocation(str(tmp_path), "job-a")
    oldest, middle, newest = sorted(FOLDERS)
    (tmp_path / "job-a" / oldest).mkdir(parents=True)  # no files: an upload that never finished
    for name in (middle, newest):
        write_checkpoint(tmp_path / "job-a" / name, world_size=1, shards=False)
    assert remove_orphan_checkpoints(_ray_result(location, newest, [newest]), location, keep=2) == 1
    assert location.checkpoint_dirs() == [f"{location.path}/{middle}", f"{location.path}/{newest}"]
    # keep: 1 leaves the latest alone.
    assert remove_orphan_checkpoints(_ray_result(location, newest, [newest]), location, keep=1) == 1
    assert location.checkpoint_dirs() == [f"{location.path}/{newest}"]


def test_remove_orphan_checkpoints_keeps_a_final_folder_ray_never_registered(tmp_path):
    # The controller lost the storage while registering the middle checkpoint; the workers had already uploaded the
    # newest (the last step). The retried fit resumed there with nothing left to run, so Ray Train's latest is still
    # the oldest: the final adapter is the newest complete folder, and `keep: 2` keeps it and the one before.
    location = RunLocation(str(tmp_path), "job-a")
    for name in FOLDERS:
        write_checkpoint(tmp_path / "job-a" / name, world_size=1, shards=False)
    oldest, middle, newest = sorted(FOLDERS)
    final, step = driver.newest_complete_checkpoint(location)
    assert final == f"{location.path}/{newest}" and step == 7
    assert remove_orphan_checkpoints(_ray_result(location, oldest, [oldest]), location, keep=2, final=final) == 1
    assert location.checkpoint_dirs() == [f"{location.path}/{middle}", final]
    # Ranked by a metric (keep=None): what Ray Train keeps stays, and the final folder in place of Ray's latest.
    assert remove_orphan_checkpoints(_ray_result(location, oldest, [middle]), location, final=final) == 0
    assert driver.newest_complete_checkpoint(RunLocation(str(tmp_path), "never-ran")) is None


def test_fetch_local_checkpoint(tmp_path):
    checkpoint = tmp_path / "runs" / "job-a" / FOLDERS[0]
    write_checkpoint(checkpoint)
    dest = tmp_path / "dest"
    assert fetch_files(str(checkpoint), [*ADAPTER_FILES, INFO_FILE], dest) == [*ADAPTER_FILES, INFO_FILE]
    assert sorted(p.name for p in dest.iterdir()) == sorted([*ADAPTER_FILES, INFO_FILE])
    for name in (*ADAPTER_FILES, INFO_FILE):
        assert (dest / name).read_bytes() == (checkpoint / name).read_bytes()
    assert fetch_adapter(f"file://{checkpoint}") == checkpoint  # local adapters are used where they are

    (checkpoint / INFO_FILE).unlink()
    assert copy_adapter(str(checkpoint), tmp_path / "pulled") == list(ADAPTER_FILES)
    with pytest.raises(FileNotFoundError) as missing:
        fetch_files(str(checkpoint), [INFO_FILE], tmp_path / "other")
    assert missing.value.filename == f"{checkpoint}/{INFO_FILE}"
    with pytest.raises(RemoteError, match="is not reachable from this machine"):
        copy_adapter(str(tmp_path / "cluster-only"), tmp_path / "pulled-2")
    (checkpoint / ADAPTER_FILES[1]).unlink()
    with pytest.raises(RemoteError, match=f"has no {ADAPTER_FILES[1]}$"):
        copy_adapter(str(checkpoint), tmp_path / "pulled-3")


def test_fetch_s3_checkpoint(s3_server, tmp_path):
    checkpoint = tmp_path / "local" / FOLDERS[0]
    write_checkpoint(checkpoint)
    key = f"runs/fetch/job-a/{FOLDERS[0]}"
    for name in (*ADAPTER_FILES, *state_files(STATE_NAME)):
        s3_server.client.upload_file(str(checkpoint / name), s3_server.bucket, f"{key}/{name}")
    uri = f"s3://{s3_server.bucket}/{key}"

    adapter = fetch_adapter(uri)
    assert sorted(p.name for p in adapter.iterdir()) == sorted(ADAPTER_FILES)
    for name in ADAPTER_FILES:
        assert (adapter / name).read_bytes() == (checkpoint / name).read_bytes()

    # lorafleet.json is informational: `pull` goes on without it.
    assert copy_adapter(uri, tmp_path / "pulled") == list(ADAPTER_FILES)
    with pytest.raises(FileNotFoundError) as missing:
        fetch_files(uri, [INFO_FILE], tmp_path / "other")
    assert missing.value.filename == f"{uri}/{INFO_FILE}"
    with pytest.raises(RemoteError, match=f"adapter {uri}-gone has no adapter_config.json"):
        copy_adapter(f"{uri}-gone", tmp_path / "pulled-2")
