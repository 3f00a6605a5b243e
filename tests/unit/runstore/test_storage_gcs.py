"""lorafleet's storage functions on `gs://bucket/prefix` against a real GCS-protocol server (fake-gcs-server on
127.0.0.1), the way a run uses them but without Ray: checkpoint folders uploaded as workers upload them, listed,
verified and deleted. tests/e2e/test_storage_gcs_job.py runs a whole job against the same server."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from pyarrow import fs

from lorafleet.runstore.checkpoint import is_complete, load_training_state
from lorafleet.runstore.location import RunLocation, list_checkpoint_dirs
from lorafleet.runstore.storage import _persist, _verify_upload

from helpers.checkpoints import write_checkpoint

PREFIX = "runs/team-g"


def _download(filesystem, remote_dir: str, local_dir: Path) -> Path:
    """A local copy of a stored checkpoint folder, as Ray Train makes one for `Checkpoint.as_directory`."""
    local_dir.mkdir(parents=True)
    fs.copy_files(remote_dir, str(local_dir), source_filesystem=filesystem, destination_filesystem=fs.LocalFileSystem())
    return local_dir


def _upload_like_workers(checkpoint: Path, storage, name: str, scratch: Path) -> str:
    """Upload a two-worker checkpoint the way `upload_checkpoint` does: each worker its own files, then verified."""
    shares = {0: scratch / name / "rank0", 1: scratch / name / "rank1"}
    for share in shares.values():
        share.mkdir(parents=True)
    for path in checkpoint.iterdir():
        rank = 1 if path.stem.endswith("rank1") else 0
        (shares[rank] / path.name).write_bytes(path.read_bytes())
    for share in shares.values():
        persisted = _persist(SimpleNamespace(path=str(share), filesystem=None), name, storage)
        _verify_upload(str(share), storage.storage_filesystem, persisted.path)
    return persisted.path


def test_storage_functions_work_on_gs(gcs_server, tmp_path, monkeypatch):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    uri, endpoint = f"gs://{gcs_server.bucket}/{PREFIX}", gcs_server.endpoint
    location = RunLocation(uri, "gcs-job", endpoint)
    path, filesystem = location.ray_storage()
    assert path == f"{gcs_server.bucket}/{PREFIX}" and filesystem.type_name == "gcs"
    # Checked before any request: with Google's default credentials the client would go looking for a token on
    # the metadata server (minutes of retries) instead of talking to the emulator.
    options = filesystem.__reduce__()[1][0]
    assert options["anonymous"] is True and options["endpoint_override"] == endpoint.split("://")[1]

    run_path, run_fs = location.path, location.filesystem
    assert run_path == f"{gcs_server.bucket}/{PREFIX}/gcs-job"
    run_fs.create_dir(run_path)  # as Ray Train's StorageContext does when the run starts
    assert list_checkpoint_dirs(run_fs, run_path) == []

    adapter = write_checkpoint(tmp_path / "local")
    storage = SimpleNamespace(storage_filesystem=run_fs, build_checkpoint_path_from_name=lambda name: f"{run_path}/{name}")
    names = ["checkpoint_2026-01-01_00-00-02.0", "checkpoint_2026-01-01_00-00-01.0"]
    for name in names:
        assert _upload_like_workers(tmp_path / "local", storage, name, tmp_path / "shares") == f"{run_path}/{name}"
    # Ray Train's run snapshot is a file whose name also starts with checkpoint_: not a checkpoint folder.
    with run_fs.open_output_stream(f"{run_path}/checkpoint_manager_snapshot.json") as out:
        out.write(b"{}")

    assert list_checkpoint_dirs(run_fs, run_path) == [f"{run_path}/{name}" for name in sorted(names)]
    stored = gcs_server.objects(f"{PREFIX}/gcs-job/{names[0]}/")
    assert {key.rsplit("/", 1)[-1]: size for key, size in stored.items() if not key.endswith("/")} == {
        p.name: p.stat().st_size for p in (tmp_path / "local").iterdir()
    }

    local = _download(run_fs, f"{run_path}/{names[0]}", tmp_path / "copy-whole")
    assert is_complete(local), sorted(p.name for p in local.iterdir())
    state = load_training_state(local, rank=1)
    assert state["step"] == 7 and torch.equal(state["adapter"]["a.lora_B.weight"], adapter["a.lora_B.weight"])

    # A worker's file missing in storage (deleted behind pyarrow's back): the folder is still listed, and a copy
    # of it is reported incomplete.
    gcs_server.delete(f"{PREFIX}/gcs-job/{names[1]}/optimizer_rank1.safetensors")
    assert f"{run_path}/{names[1]}" in list_checkpoint_dirs(run_fs, run_path)
    local = _download(run_fs, f"{run_path}/{names[1]}", tmp_path / "copy-missing")
    assert "optimizer_rank1.safetensors" not in {p.name for p in local.iterdir()} and not is_complete(local)

    # Without checkpoint.endpoint, STORAGE_EMULATOR_HOST (host:port, as Google's clients take it) points at the server.
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint.split("://")[1])
    from_env = RunLocation(uri, "gcs-job")
    assert from_env.filesystem.__reduce__()[1][0]["anonymous"] is True
    assert from_env.checkpoint_dirs() == [f"{run_path}/{name}" for name in sorted(names)]

    assert location.delete() is True
    assert gcs_server.objects(f"{PREFIX}/gcs-job") == {}
    assert run_fs.get_file_info(run_path).type == fs.FileType.NotFound
    assert list_checkpoint_dirs(run_fs, run_path) == []
    assert location.delete() is False
