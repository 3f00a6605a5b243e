"""A whole job checkpointing to `gs://bucket/prefix` on a real GCS-protocol server (fake-gcs-server on 127.0.0.1),
through the CLI: a run with `keep: 2` leaves exactly its two newest checkpoints in the bucket, the adapter loads with
PEFT, and a re-submit with more steps resumes from the bucket."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lorafleet.infer.generate import load_adapter
from lorafleet.runstore.checkpoint import is_complete
from lorafleet.runstore.location import RunLocation

from helpers.cli import submit_small

# Runs join the session's Ray cluster rather than each starting one (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("joined_ray")

PREFIX = "runs/team-g"


def test_cli_run_checkpoints_to_gs_and_resumes(gcs_server, tmp_path):
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

    proc, summary = submit_small("gcs-e2e", storage, f"checkpoint.endpoint={endpoint}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert summary["status"] == "succeeded" and summary["steps"] == 6 and summary["start_step"] == 0, summary
    assert summary["adapter_uri"].startswith(f"gs://{gcs_server.bucket}/{run}/checkpoint_"), summary

    # keep: 2 with checkpoints every 2 steps over 6: Ray Train pruned the step-2 folder, marker included.
    folders = stored_checkpoints()
    assert len(folders) == 2 and saved_steps(folders) == [4, 6], sorted(folders)
    newest = sorted(folders)[-1]
    assert summary["adapter_uri"] == f"gs://{gcs_server.bucket}/{run}/{newest}"
    location = RunLocation(storage, "gcs-e2e", endpoint)
    assert location.path == f"{gcs_server.bucket}/{run}"
    assert [p.rsplit("/", 1)[-1] for p in location.checkpoint_dirs()] == sorted(folders)

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
    proc, resumed = submit_small("gcs-e2e", storage, "training.steps=8", f"checkpoint.endpoint={endpoint}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert resumed["status"] == "succeeded" and resumed["start_step"] == 6 and resumed["steps"] == 8, resumed
    folders = stored_checkpoints()
    assert len(folders) == 2 and saved_steps(folders) == [6, 8], sorted(folders)
    assert newest in folders
