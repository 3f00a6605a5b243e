"""Checkpoints on `gs://bucket/prefix` against a real GCS-protocol server (fake-gcs-server on 127.0.0.1).

The fast test drives lorafleet's storage functions on gs:// the way a run does, without starting Ray: checkpoint
folders uploaded as a worker uploads them, listed, verified and deleted. The slow test runs the CLI: a run with
`keep: 2` leaves exactly its two newest checkpoints in the bucket, the adapter loads with PEFT, and a re-submit
with more steps resumes from the bucket.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gcs_server import gcs_server  # noqa: F401
from test_checkpoint import _write
from test_resume import submit

from lorafleet.runstore.checkpoint import is_complete, load_training_state
from lorafleet.runstore.storage import _persist, _verify_upload, delete_run, list_checkpoint_dirs, resolve_storage, run_location

PREFIX = "runs/team-g"


def _download(filesystem, remote_dir: str, local_dir: Path) -> Path:
    """A local copy of a stored checkpoint folder, as Ray Train makes one for `Checkpoint.as_directory`."""
    from pyarrow import fs

    local_dir.mkdir(parents=True)
    fs.copy_files(remote_dir, str(local_dir), source_filesystem=filesystem, destination_filesystem=fs.LocalFileSystem())
    return local_dir


def _upload_like_workers(checkpoint: Path, storage, name: str, scratch: Path) -> str:
    """Upload a two-worker checkpoint the way `upload_checkpoint` does: each worker its own files, then verified."""
    shares = {0: scratch / name / "rank0", 1: scratch / name / "rank1"}
    for share in shares.values():
        share.mkdir(parents=True)
    for path in checkpoint.iterdir():
        rank = 1 if path.name.endswith("rank1.pt") else 0
        (shares[rank] / path.name).write_bytes(path.read_bytes())
    for share in shares.values():
        persisted = _persist(SimpleNamespace(path=str(share), filesystem=None), name, storage)
        _verify_upload(str(share), storage.storage_filesystem, persisted.path)
    return persisted.path


def test_storage_functions_work_on_gs(gcs_server, tmp_path, monkeypatch):  # noqa: F811
    from pyarrow import fs

    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    uri, endpoint = f"gs://{gcs_server.bucket}/{PREFIX}", gcs_server.endpoint
    path, filesystem = resolve_storage(uri, endpoint)
    assert path == f"{gcs_server.bucket}/{PREFIX}" and filesystem.type_name == "gcs"
    # Checked before any request: with Google's default credentials the client would go looking for a token on
    # the metadata server (minutes of retries) instead of talking to the emulator.
    options = filesystem.__reduce__()[1][0]
    assert options["anonymous"] is True and options["endpoint_override"] == endpoint.split("://")[1]

    run_path, run_fs = run_location(uri, "gcs-job", endpoint)
    assert run_path == f"{gcs_server.bucket}/{PREFIX}/gcs-job"
    run_fs.create_dir(run_path)  # as Ray Train's StorageContext does when the run starts
    assert list_checkpoint_dirs(run_fs, run_path) == []

    adapter = _write(tmp_path / "local")
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
    gcs_server.delete(f"{PREFIX}/gcs-job/{names[1]}/optimizer_rank1.pt")
    assert f"{run_path}/{names[1]}" in list_checkpoint_dirs(run_fs, run_path)
    local = _download(run_fs, f"{run_path}/{names[1]}", tmp_path / "copy-missing")
    assert "optimizer_rank1.pt" not in {p.name for p in local.iterdir()} and not is_complete(local)

    # Without checkpoint.endpoint, STORAGE_EMULATOR_HOST (host:port, as Google's clients take it) points at the server.
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint.split("://")[1])
    env_path, env_fs = run_location(uri, "gcs-job")
    assert env_fs.__reduce__()[1][0]["anonymous"] is True
    assert list_checkpoint_dirs(env_fs, env_path) == [f"{run_path}/{name}" for name in sorted(names)]

    assert delete_run(uri, "gcs-job", endpoint) is True
    assert gcs_server.objects(f"{PREFIX}/gcs-job") == {}
    assert run_fs.get_file_info(run_path).type == fs.FileType.NotFound
    assert list_checkpoint_dirs(run_fs, run_path) == []
    assert delete_run(uri, "gcs-job", endpoint) is False


@pytest.mark.slow
def test_cli_run_checkpoints_to_gs_and_resumes(gcs_server, tmp_path):  # noqa: F811
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lorafleet.infer.generate import load_adapter

    storage, endpoint, run = f"gs://{gcs_server.bucket}/{PREFIX}", gcs_server.endpoint, f"{PREFIX}/gcs-e2e"

    def stored_checkpoints() -> dict[str, dict[str, bytes]]:
        """Checkpoint folder -> file -> content, read through the JSON API (not pyarrow)."""
        folders: dict[str, dict[str, bytes]] = {}
        for key in gcs_server.objects(f"{run}/"):
            parts = key[len(run) + 1 :].split("/")
            if len(parts) == 2 and parts[0].startswith("checkpoint_"):
                files = folders.setdefault(parts[0], {})
                if parts[1]:  # "" is the folder marker
                    files[parts[1]] = gcs_server.download(key)
        return folders

    def saved_steps(folders: dict[str, dict[str, bytes]]) -> list[int]:
        steps = []
        for folder, files in folders.items():
            local = tmp_path / f"{len(steps)}-{folder}"
            local.mkdir()
            for name, data in files.items():
                (local / name).write_bytes(data)
            assert is_complete(local), (folder, sorted(files))
            steps.append(json.loads(files["lorafleet.json"])["step"])
        return sorted(steps)

    proc, summary = submit("gcs-e2e", storage, f"checkpoint.endpoint={endpoint}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert summary["status"] == "succeeded" and summary["steps"] == 6 and summary["start_step"] == 0, summary
    assert summary["adapter_uri"].startswith(f"gs://{gcs_server.bucket}/{run}/checkpoint_"), summary

    # keep: 2 with checkpoints every 2 steps over 6: Ray Train pruned the step-2 folder, marker included.
    folders = stored_checkpoints()
    assert len(folders) == 2 and saved_steps(folders) == [4, 6], sorted(folders)
    newest = sorted(folders)[-1]
    assert summary["adapter_uri"] == f"gs://{gcs_server.bucket}/{run}/{newest}"
    _, filesystem = resolve_storage(storage, endpoint)
    assert [p.rsplit("/", 1)[-1] for p in list_checkpoint_dirs(filesystem, f"{gcs_server.bucket}/{run}")] == sorted(folders)

    # The adapter as stored loads with plain PEFT, and trained; lorafleet's own gs:// loader gets the same weights.
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (adapter_dir / name).write_bytes(folders[newest][name])
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b.values()), "some lora_B never trained"
    loaded, _ = load_adapter(summary["adapter_uri"], dtype="float32", endpoint=endpoint)
    stored, from_gs = load_file(adapter_dir / "adapter_model.safetensors"), get_peft_model_state_dict(loaded)
    assert stored.keys() == from_gs.keys() and len(stored) == 2 * len(lora_b)
    assert all(torch.equal(from_gs[k], stored[k]) for k in stored)

    # Re-submitted with more steps: resumes from the bucket's latest checkpoint, and keep still holds.
    proc, resumed = submit("gcs-e2e", storage, "training.steps=8", f"checkpoint.endpoint={endpoint}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert resumed["status"] == "succeeded" and resumed["start_step"] == 6 and resumed["steps"] == 8, resumed
    folders = stored_checkpoints()
    assert len(folders) == 2 and saved_steps(folders) == [6, 8], sorted(folders)
    assert newest in folders
