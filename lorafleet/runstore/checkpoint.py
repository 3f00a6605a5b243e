"""Adapter-only checkpoints: what a checkpoint directory holds and how a worker writes and restores it.

A checkpoint directory is a loadable PEFT adapter plus what an exact resume needs, and nothing of the frozen base:

- `adapter_config.json`, `adapter_model.safetensors`: the adapter (plain `PeftModel.from_pretrained` loads it);
- `training_state.pt`: optimizer and scheduler state, the step reached (the data position: batches are a
  function of the step, see [`~lorafleet.data.BatchPlan`]) and every worker's Python, NumPy and torch RNG states
  (LoRA dropout draws differ per worker);
- `optimizer_rank{R}.pt`: each worker's optimizer shard, only when the optimizer is partitioned (DeepSpeed ZeRO);
- `lorafleet.json`: job name, step, base model, loss, world size and whether optimizer shards exist, for people
  and tools that list checkpoints and for [`is_complete`].

Rank 0 writes the adapter, `lorafleet.json` and the training state, with the RNG states of every worker gathered to
it; under DeepSpeed ZeRO every worker also writes its optimizer shard. Each worker writes into its own local directory
and Ray Train merges them in storage, so a checkpoint is only whole once every writing worker's upload has finished;
[`is_complete`] checks exactly that. Under DDP only rank 0 writes, so each checkpoint is one worker's four files.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


STATE_FILE = "training_state.pt"


INFO_FILE = "lorafleet.json"


def _legacy_rng_file(rank: int) -> str:
    # Where checkpoints written before the RNG states moved into `training_state.pt` keep them; still read on resume.
    return f"rng_rank{rank}.pt"


def _optimizer_file(rank: int) -> str:
    return f"optimizer_rank{rank}.pt"


def rng_state() -> dict[str, Any]:
    """The current Python, NumPy and torch RNG states."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states captured by [`rng_state`]."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def cpu_copy(value: Any) -> Any:
    """A copy of `value` that training can no longer change: tensors cloned to CPU, containers rebuilt.

    Optimizer and adapter state dicts hold references to the live tensors, which the next step updates in place; a
    checkpoint written after training moved on needs this copy of them taken at the checkpoint step.

    Args:
        value (`Any`):
            A tensor, or dicts, lists and tuples of tensors and other values (what `state_dict()` returns).

    Returns:
        `Any`: The same structure; other leaves are deep-copied (immutable ones, such as numbers, are shared).

    Example:

    ```python
    >>> live = {"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 0.1}]}
    >>> snapshot = cpu_copy(live)
    >>> _ = live["state"][0]["exp_avg"].add_(1.0)
    >>> snapshot["state"][0]["exp_avg"]
    tensor([0., 0.])
    ```
    """
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: cpu_copy(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(cpu_copy(item) for item in value)
    return copy.deepcopy(value)


def save_checkpoint(
    directory: str | Path,
    *,
    rank: int,
    step: int,
    adapter_state: Optional[dict[str, torch.Tensor]],
    peft_model=None,
    optimizer_state: Optional[dict] = None,
    optimizer_shard: Optional[dict] = None,
    world_size: int = 1,
    info: Optional[dict[str, Any]] = None,
    rng_states: Optional[dict[int, dict[str, Any]]] = None,
) -> Path:
    """Write this worker's share of a checkpoint into `directory`.

    The writer of the adapter (rank 0) writes it with `lorafleet.json` and the training state: optimizer and scheduler
    state, step and the RNG states it is given (every worker's). A worker with a partitioned optimizer writes its
    shard. Ray Train merges the workers' directories.

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
        optimizer_shard (`dict`, *optional*):
            This worker's part of a partitioned optimizer (DeepSpeed ZeRO), written by every worker as
            `optimizer_rank{R}.pt`. `None` when the optimizer is replicated (DDP).
        world_size (`int`, *optional*, defaults to 1):
            Workers writing this checkpoint; recorded so [`is_complete`] knows which per-rank files to expect.
        info (`dict`, *optional*):
            Extra fields for `lorafleet.json` (job name, loss).
        rng_states (`dict[int, dict]`, *optional*):
            RNG states by world rank, each from [`rng_state`] taken at the checkpoint step (the files are written
            later, by a background thread, while training goes on); only the adapter's writer writes them. Defaults
            to this worker's current states.

    Returns:
        `Path`: `directory`.

    Example:

    ```python
    >>> import tempfile
    >>> path = save_checkpoint(tempfile.mkdtemp(), rank=1, step=3, adapter_state=None, optimizer_shard={"state": {}})
    >>> sorted(p.name for p in path.iterdir())
    ['optimizer_rank1.pt']
    ```
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if optimizer_shard is not None:
        torch.save(optimizer_shard, directory / _optimizer_file(rank))
    if adapter_state is None:
        return directory
    from safetensors.torch import save_file

    config = peft_model.peft_config["default"]
    config.save_pretrained(str(directory))
    # Plain tensors, contiguous and on CPU: what safetensors and every PEFT/vLLM loader expect.
    save_file({k: v.detach().to("cpu").contiguous() for k, v in adapter_state.items()}, directory / ADAPTER_FILES[1])
    rng = rng_states if rng_states is not None else {rank: rng_state()}
    torch.save({"step": step, "optimizer": optimizer_state, "rng": rng}, directory / STATE_FILE)
    (directory / INFO_FILE).write_text(
        json.dumps(
            {
                "step": step,
                "base_model": config.base_model_name_or_path,
                "world_size": world_size,
                "optimizer_shards": optimizer_shard is not None,
                **(info or {}),
            },
            indent=2,
        )
    )
    return directory


def load_training_state(directory: str | Path, rank: int) -> dict[str, Any]:
    """Read what [`save_checkpoint`] wrote: adapter tensors, optimizer/scheduler state, step and this rank's RNG.

    Args:
        directory (`str` or `Path`):
            A local copy of a checkpoint.
        rank (`int`):
            The resuming worker's world rank.

    Returns:
        `dict`: `step`, `adapter` (tensor dict), `optimizer` (for the strategy), `optimizer_shard` (this rank's
        partitioned optimizer state, or `None`), `rng` (`None` when the checkpoint was written by fewer workers
        than are resuming it).

    Raises:
        `RuntimeError`: The checkpoint holds optimizer shards for a different number of workers (partitioned state
        cannot be re-split).

    Example:

    ```python
    >>> state = load_training_state("/path/to/checkpoint", rank=0)  # doctest: +SKIP
    >>> state["step"]  # doctest: +SKIP
    40
    ```
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
    legacy_rng = directory / _legacy_rng_file(rank)
    if "rng" in state:
        state["rng"] = state["rng"].get(rank)
    else:
        state["rng"] = torch.load(legacy_rng, weights_only=False) if legacy_rng.exists() else None
    state["adapter"] = load_file(directory / ADAPTER_FILES[1])
    state["optimizer_shard"] = None
    info = read_info(directory)
    if info.get("optimizer_shards"):
        shard = directory / _optimizer_file(rank)
        if not shard.is_file():
            raise RuntimeError(
                f"checkpoint at step {state['step']} was written by {info.get('world_size')} workers with a "
                "partitioned optimizer; resume it with the same scaling.num_workers"
            )
        state["optimizer_shard"] = torch.load(shard, map_location="cpu", weights_only=False)
    return state


def read_info(directory: str | Path) -> dict[str, Any]:
    """`lorafleet.json` of a checkpoint directory (`{}` when missing or unreadable)."""
    try:
        return json.loads((Path(directory) / INFO_FILE).read_text())
    except (OSError, ValueError):
        return {}


def expected_files(info: dict[str, Any]) -> list[str]:
    """Every file a checkpoint described by `info` (its `lorafleet.json`) must hold."""
    world_size = int(info.get("world_size", 1))
    names = [*ADAPTER_FILES, STATE_FILE, INFO_FILE]
    if info.get("optimizer_shards"):
        names += [_optimizer_file(r) for r in range(world_size)]
    return names


def is_complete(directory: str | Path) -> bool:
    """Whether `directory` holds a whole checkpoint: the adapter, the training state and every worker's files.

    Args:
        directory (`str` or `Path`):
            A local checkpoint directory (or a local copy of one).

    Returns:
        `bool`: `False` when any file is missing or empty, e.g. an upload that was cut off.

    Example:

    ```python
    >>> import tempfile
    >>> shard_only = save_checkpoint(tempfile.mkdtemp(), rank=1, step=3, adapter_state=None, optimizer_shard={})
    >>> is_complete(shard_only)
    False
    ```
    """
    directory = Path(directory)
    info = read_info(directory)
    if not info:
        return False
    return all((directory / name).is_file() and (directory / name).stat().st_size > 0 for name in expected_files(info))

