"""Adapter-only checkpoints: what a checkpoint directory holds and how a worker writes and restores it.

A checkpoint directory is a loadable PEFT adapter plus what an exact resume needs, and nothing of the frozen base:

- `adapter_config.json`, `adapter_model.safetensors`: the adapter (plain `PeftModel.from_pretrained` loads it);
- `training_state.pt`: optimizer and scheduler state and the step reached (the data position: batches are a
  function of the step, see [`~lorafleet.data.BatchPlan`]);
- `rng_rank{R}.pt`: each worker's Python, NumPy and torch RNG states (LoRA dropout draws differ per worker);
- `lorafleet.json`: job name, step, base model and loss, for people and tools that list checkpoints.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
STATE_FILE = "training_state.pt"
INFO_FILE = "lorafleet.json"


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def rng_state() -> dict[str, Any]:
    """The current Python, NumPy and torch RNG states."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states captured by [`rng_state`]."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(
    directory: str | Path,
    *,
    rank: int,
    step: int,
    adapter_state: Optional[dict[str, torch.Tensor]],
    peft_model=None,
    optimizer_state: Optional[dict] = None,
    info: Optional[dict[str, Any]] = None,
) -> Path:
    """Write this worker's share of a checkpoint into `directory`.

    Every worker writes its RNG state; the writer (rank 0, or whoever holds the gathered adapter) also writes the
    adapter, the optimizer and scheduler state and `lorafleet.json`. Ray Train merges the workers' directories.

    Args:
        directory (`str` or `Path`):
            An empty local directory.
        rank (`int`):
            The worker's world rank.
        step (`int`):
            Optimizer steps completed.
        adapter_state (`dict[str, torch.Tensor]`, *optional*):
            The full (gathered) trainable adapter tensors, as `get_peft_model_state_dict` returns them. `None` on
            workers that do not write the adapter.
        peft_model ([`~peft.PeftModel`], *optional*):
            Needed with `adapter_state`: its config and base model name go into `adapter_config.json`.
        optimizer_state (`dict`, *optional*):
            What the strategy's `optimizer_state()` returned (optimizer and scheduler state).
        info (`dict`, *optional*):
            Extra fields for `lorafleet.json` (job name, loss).

    Returns:
        `Path`: `directory`.

    Example:

    ```python
    >>> import tempfile
    >>> path = save_checkpoint(tempfile.mkdtemp(), rank=1, step=3, adapter_state=None)
    >>> sorted(p.name for p in path.iterdir())
    ['rng_rank1.pt']
    ```
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), directory / _rng_file(rank))
    if adapter_state is None:
        return directory
    from safetensors.torch import save_file

    config = peft_model.peft_config["default"]
    config.save_pretrained(str(directory))
    # Plain tensors, contiguous and on CPU: what safetensors and every PEFT/vLLM loader expect.
    save_file({k: v.detach().to("cpu").contiguous() for k, v in adapter_state.items()}, directory / ADAPTER_FILES[1])
    torch.save({"step": step, "optimizer": optimizer_state}, directory / STATE_FILE)
    (directory / INFO_FILE).write_text(
        json.dumps({"step": step, "base_model": config.base_model_name_or_path, **(info or {})}, indent=2)
    )
    return directory


def load_training_state(directory: str | Path, rank: int) -> dict[str, Any]:
    """Read what [`save_checkpoint`] wrote: adapter tensors, optimizer/scheduler state, step and this rank's RNG.

    Returns:
        `dict`: `step`, `adapter` (tensor dict), `optimizer` (for the strategy), `rng` (`None` when the checkpoint was
        written by fewer workers than are resuming it).
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
    rng_path = directory / _rng_file(rank)
    state["rng"] = torch.load(rng_path, weights_only=False) if rng_path.exists() else None
    state["adapter"] = load_file(directory / ADAPTER_FILES[1])
    return state


def is_complete(directory: str | Path) -> bool:
    """Whether `directory` holds a whole checkpoint (adapter, training state and info)."""
    directory = Path(directory)
    return all((directory / name).is_file() for name in (*ADAPTER_FILES, STATE_FILE, INFO_FILE))
