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
