"""Checkpoint layout, completeness and storage helpers (fast: no Ray, no training)."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import torch

from lorafleet.runstore.checkpoint import cpu_copy, expected_files, is_complete, load_training_state, read_info, rng_state, save_checkpoint, set_rng_state
from lorafleet.spec import load_spec
from lorafleet.runstore.location import RunLocation
from lorafleet.runstore.storage import _verify_upload

from helpers.checkpoints import FakePeft, write_checkpoint, write_legacy_checkpoint


def test_sharded_checkpoint_roundtrip(tmp_path):
    adapter = write_checkpoint(tmp_path)
    info = read_info(tmp_path)
    assert info["world_size"] == 2 and info["optimizer_shards"] is True and info["step"] == 7
    assert "optimizer_rank1.safetensors" in expected_files(info)
    assert is_complete(tmp_path)
    state = load_training_state(tmp_path, rank=1)
    assert state["step"] == 7 and state["optimizer"] == {"scheduler": {"last_epoch": 7}}
    assert torch.equal(state["optimizer_shard"]["state"][0]["exp_avg"], torch.ones(3))
    assert torch.equal(state["adapter"]["a.lora_B.weight"], adapter["a.lora_B.weight"])
    assert state["rng"] is not None


def test_replicated_checkpoint_has_no_shards(tmp_path):
    write_checkpoint(tmp_path, shards=False)
    assert is_complete(tmp_path)
    assert not list(tmp_path.glob("optimizer_rank*"))
    assert load_training_state(tmp_path, rank=0)["optimizer_shard"] is None


def test_rank0_writes_every_workers_rng_states(tmp_path):
    # Under DDP rank 0 writes the RNG states gathered from every worker into the training state, and the other workers
    # write nothing: the checkpoint is complete from rank 0's five files, and each rank resumes its own stream.
    states, draws = {}, {}
    for rank in range(2):
        torch.manual_seed(100 + rank)
        states[rank] = rng_state()
        draws[rank] = torch.rand(3)
    adapter = {"a.lora_A.weight": torch.randn(2, 4)}
    save_checkpoint(
        tmp_path, rank=0, step=4, adapter_state=adapter, peft_model=FakePeft(), optimizer_state={}, world_size=2,
        rng_states=states,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "lorafleet.json", "training_state.json",
        "training_state.safetensors",
    ]
    assert is_complete(tmp_path)
    for rank in (1, 0):
        set_rng_state(load_training_state(tmp_path, rank)["rng"])
        assert torch.equal(torch.rand(3), draws[rank])


def test_checkpoint_with_rng_files_of_older_versions_still_resumes(tmp_path):
    # Checkpoints written before the RNG states moved into the training state keep them in rng_rank{R}.pt.
    saved = write_legacy_checkpoint(tmp_path, shards=False, rng_files=True)
    set_rng_state(saved["rng"][1])
    expected = torch.rand(2)
    torch.manual_seed(0)
    set_rng_state(load_training_state(tmp_path, rank=1)["rng"])
    assert torch.equal(torch.rand(2), expected)
    (tmp_path / "rng_rank0.pt").unlink()
    assert load_training_state(tmp_path, rank=0)["rng"] is None


@pytest.mark.parametrize(
    "victim",
    [
        "optimizer_rank1.safetensors",
        "optimizer_rank1.json",
        "training_state.safetensors",
        "training_state.json",
        "adapter_model.safetensors",
        "lorafleet.json",
    ],
)
def test_missing_or_empty_file_is_incomplete(tmp_path, victim):
    write_checkpoint(tmp_path)
    (tmp_path / victim).unlink()
    assert not is_complete(tmp_path)
    (tmp_path / victim).write_bytes(b"")  # a cut-off upload
    assert not is_complete(tmp_path)


def test_state_copied_at_the_checkpoint_step_is_what_gets_written(tmp_path):
    # Files are written by a background thread while training goes on: what was copied at the checkpoint step, not
    # the live parameters, optimizer moments or later RNG states, must end up in them.
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.full((3,), 0.5)
    optimizer.step()
    adapter, state, rng = cpu_copy({"a.lora_A.weight": param}), cpu_copy({"optimizer": optimizer.state_dict()}), rng_state()
    expected_weight, expected_moment = param.detach().clone(), optimizer.state[param]["exp_avg"].clone()
    expected_draw = torch.rand(4)
    param.grad = torch.full((3,), -2.0)
    optimizer.step()  # the next training step updates the live tensors in place
    save_checkpoint(tmp_path, rank=0, step=1, adapter_state=adapter, peft_model=FakePeft(), optimizer_state=state, rng_states={0: rng})
    loaded = load_training_state(tmp_path, rank=0)
    assert torch.equal(loaded["adapter"]["a.lora_A.weight"], expected_weight)
    assert not torch.equal(loaded["adapter"]["a.lora_A.weight"], param.detach())
    assert torch.equal(loaded["optimizer"]["optimizer"]["state"][0]["exp_avg"], expected_moment)
    assert loaded["optimizer"]["optimizer"]["param_groups"][0]["lr"] == 0.1
    set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(4), expected_draw)


def test_upload_verification_catches_missing_or_short_files(tmp_path):
    from pyarrow import fs

    local, remote = tmp_path / "local", tmp_path / "remote"
    local.mkdir()
    remote.mkdir()
    for name in ("adapter_model.safetensors", "rng_rank0.pt"):
        (local / name).write_bytes(b"x" * 64)
        (remote / name).write_bytes(b"x" * 64)
    (remote / "rng_rank1.pt").write_bytes(b"another worker's file")
    _verify_upload(str(local), fs.LocalFileSystem(), str(remote))
    (remote / "rng_rank0.pt").write_bytes(b"x" * 10)
    with pytest.raises(OSError, match="rng_rank0.pt"):
        _verify_upload(str(local), fs.LocalFileSystem(), str(remote))
    (remote / "rng_rank0.pt").unlink()
    with pytest.raises(OSError, match="rng_rank0.pt"):
        _verify_upload(str(local), fs.LocalFileSystem(), str(remote))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_checkpoint_thread_yields_the_cpu_and_only_it():
    from lorafleet.train.worker import _yield_cpu_to_training

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    training = nice()
    seen = {}

    def upload_thread():
        seen["before"] = nice()
        _yield_cpu_to_training()
        seen["after"] = nice()

    thread = threading.Thread(target=upload_thread)
    thread.start()
    thread.join()
    assert seen["before"] == training and seen["after"] == min(19, training + 10)
    assert nice() == training  # the training thread keeps its priority


def test_shards_need_same_world_size(tmp_path):
    write_checkpoint(tmp_path)
    with pytest.raises(RuntimeError, match="same scaling.num_workers"):
        load_training_state(tmp_path, rank=2)


def test_delete_run_and_listing(tmp_path):
    location = RunLocation(str(tmp_path), "job-a")
    for name in ("checkpoint_2026-01-01_00-00-02.0", "checkpoint_2026-01-01_00-00-01.0", "other"):
        (tmp_path / "job-a" / name).mkdir(parents=True)
    (tmp_path / "job-a" / "metrics.jsonl").write_text("{}\n")
    assert [p.rsplit("/", 1)[-1] for p in location.checkpoint_dirs()] == [
        "checkpoint_2026-01-01_00-00-01.0",
        "checkpoint_2026-01-01_00-00-02.0",
    ]
    assert location.delete() is True
    assert not (tmp_path / "job-a").exists()
    assert location.delete() is False


def test_deepspeed_config_is_derived_and_merged():
    from lorafleet.train.strategies import deepspeed_config

    spec = load_spec(
        "tests/jobs/llama.yaml",
        [
            "scaling.strategy=deepspeed",
            "scaling.zero_stage=3",
            "training.grad_accum=2",
            "training.max_grad_norm=0.5",
            'scaling.deepspeed_config={"zero_optimization": {"reduce_bucket_size": 1000}, "steps_per_print": 5}',
        ],
    )
    config = deepspeed_config(spec, world_size=2)
    assert config["train_batch_size"] == spec.training.micro_batch_size * 2 * 2
    assert config["gradient_accumulation_steps"] == 2
    assert config["gradient_clipping"] == 0.5
    # Merged, not replaced: the derived stage survives next to the expert's bucket size.
    assert config["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1000}
    assert config["steps_per_print"] == 5
    assert config["bf16"] == {"enabled": False}
