"""Checkpoint folders written by lorafleet's own `save_checkpoint`, without a model or Ray: a stand-in PEFT model
and a two-worker checkpoint of a 2x4 adapter at step 7."""

from __future__ import annotations

import json

import torch

from lorafleet.runstore.checkpoint import rng_state, save_checkpoint


class FakeConfig:
    base_model_name_or_path = "/models/base"

    def save_pretrained(self, directory: str) -> None:
        with open(f"{directory}/adapter_config.json", "w") as f:
            json.dump({"peft_type": "LORA", "r": 2}, f)


class FakePeft:
    """What `save_checkpoint` reads of a PEFT model: its adapter config."""

    peft_config = {"default": FakeConfig()}


def write_checkpoint(directory, world_size=2, shards=True) -> dict[str, torch.Tensor]:
    """Every worker's files of a step-7 checkpoint in `directory` (per-rank optimizer shards unless `shards` is
    False); returns the adapter tensors saved."""
    adapter = {"a.lora_A.weight": torch.randn(2, 4), "a.lora_B.weight": torch.randn(4, 2)}
    for rank in range(world_size):
        save_checkpoint(
            directory,
            rank=rank,
            step=7,
            adapter_state=adapter if rank == 0 else None,
            peft_model=FakePeft(),
            optimizer_state={"scheduler": {"last_epoch": 7}} if rank == 0 else None,
            optimizer_shard={"state": {0: {"exp_avg": torch.full((3,), float(rank))}}} if shards else None,
            world_size=world_size,
            info={"job": "unit", "loss": 1.5},
            rng_states={r: rng_state() for r in range(world_size)} if rank == 0 else None,
        )
    return adapter


def write_legacy_checkpoint(directory, world_size=2, shards=True, rng_files=False) -> dict[str, torch.Tensor]:
    """A step-7 checkpoint as lorafleet wrote them before they were safetensors + JSON: `training_state.pt` (step,
    optimizer and scheduler state of a real AdamW and cosine schedule after 3 steps, every worker's RNG states),
    `optimizer_rank{R}.pt` shards unless `shards` is False, and with `rng_files` the even older layout that kept
    each worker's RNG states in `rng_rank{R}.pt`. Returns what was saved: `adapter`, `state` (the training state as
    pickled) and `rng` (by rank)."""
    from pathlib import Path

    from transformers import get_scheduler

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    param = torch.nn.Parameter(torch.randn(3, 2))
    optimizer = torch.optim.AdamW([param], lr=0.1, betas=(0.8, 0.95))
    scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=1, num_training_steps=10)
    for _ in range(3):
        param.grad = torch.randn(3, 2)
        optimizer.step()
        scheduler.step()
    adapter = {"a.lora_A.weight": param.detach().clone()}
    rng = {}
    for rank in range(world_size):
        torch.manual_seed(50 + rank)
        rng[rank] = rng_state()
    optimizer_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    from safetensors.torch import save_file

    FakePeft.peft_config["default"].save_pretrained(str(directory))
    save_file(adapter, directory / "adapter_model.safetensors")
    state = {"step": 7, "optimizer": optimizer_state}
    if rng_files:
        for rank in range(world_size):
            torch.save(rng[rank], directory / f"rng_rank{rank}.pt")
    else:
        state["rng"] = rng
    torch.save(state, directory / "training_state.pt")
    for rank in range(world_size if shards else 0):
        torch.save({"state": {0: {"exp_avg": torch.full((3,), float(rank))}}}, directory / f"optimizer_rank{rank}.pt")
    info = {"step": 7, "base_model": "/models/base", "world_size": world_size, "optimizer_shards": shards, "job": "old"}
    (directory / "lorafleet.json").write_text(json.dumps(info, indent=2))
    return {"adapter": adapter, "state": state, "rng": rng}


class OpensFile:
    """Pickles to a call of `open(path, "w")`: unpickling it creates `path`. What a crafted checkpoint file would
    carry to run code (a shell command instead) in every worker that loads it with plain `torch.load`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant_pickle(path, marker) -> None:
    """Write a `torch.save` file at `path` whose unpickling would create the file `marker`."""
    torch.save({"step": 7, "optimizer": OpensFile(marker)}, path)
