"""DeepSpeed internals lorafleet relies on to restore a worker's ZeRO optimizer state from its own shard.

Checked on: deepspeed 0.19.8 (installed; `tests/unit/compat/test_compat_deepspeed.py` runs DeepSpeed's own loading
code on stand-in optimizers, with a data-parallel rank of 1, without a process group).

Every worker of a ZeRO run saves what its ZeRO optimizer's `state_dict()` returns (its partition of the float32 master
weights and of the optimizer moments, as `DeepSpeedEngine.save_checkpoint` writes to `zero_pp_rank_*` files) and, on
resume, loads only its own file. DeepSpeed's only public way back is `DeepSpeedEngine.load_checkpoint`, which wants
its own checkpoint folder on a shared file system (lorafleet's checkpoints are Ray Train's, in any storage).

Private things touched:

1. The `state_dict_list` argument of the ZeRO optimizers' `load_state_dict` (`DeepSpeedZeroOptimizer` for stages 1
   and 2, `DeepSpeedZeroOptimizer_Stage3`) is documented as "all saved ZeRO checkpoints, one for each saved
   partition", but outside elastic and universal checkpoints it is only read at
   `state_dict_list[dist.get_rank(group=optimizer.dp_process_group)]`; `dp_process_group` is the optimizer's
   undocumented data-parallel group attribute. [`load_zero_state`] passes this worker's state at that index and
   `None` at the others, so that a DeepSpeed reading another rank's entry fails loudly instead of loading it. Passing
   a one-element list made every worker but data-parallel rank 0 fail with `IndexError` on resume. Gone when
   `load_state_dict` takes the worker's own state, or `load_checkpoint` takes states in memory.
2. `checkpoint_event_prologue()` / `checkpoint_event_epilogue()` of the ZeRO-3 optimizer (undocumented; stages 1
   and 2 have neither), which `DeepSpeedEngine.load_checkpoint` calls around `load_state_dict`: its
   `load_state_dict` re-partitions the small "persistent" parameters ZeRO-3 otherwise keeps whole on every worker,
   and only the epilogue gathers them again. [`load_zero_state`] makes the same calls. Gone with item 1's fix.
"""

from __future__ import annotations

from typing import Any, Optional


def zero_state_dict_list(zero_optimizer: Any, state: dict) -> list[Optional[dict]]:
    """The `state_dict_list` a ZeRO optimizer's `load_state_dict` reads `state` from on this worker (item 1).

    Args:
        zero_optimizer (`DeepSpeedZeroOptimizer` or `DeepSpeedZeroOptimizer_Stage3`):
            The engine's `optimizer`, in a run whose process group is initialized.
        state (`dict`):
            What this worker's `zero_optimizer.state_dict()` returned when the checkpoint was taken.

    Returns:
        `list`: One entry per rank of ZeRO's data-parallel group: `state` at this worker's, `None` elsewhere.

    Example:

    ```python
    >>> states = zero_state_dict_list(engine.optimizer, shard)  # doctest: +SKIP
    >>> states[torch.distributed.get_rank()] is shard  # doctest: +SKIP
    True
    ```
    """
    # Deferred, as everywhere in compat: DeepSpeed costs seconds to import and only its workers use it.
    from deepspeed import comm

    group = zero_optimizer.dp_process_group
    states: list[Optional[dict]] = [None] * comm.get_world_size(group=group)
    states[comm.get_rank(group=group)] = state
    return states


def load_zero_state(zero_optimizer: Any, state: dict) -> None:
    """Restore this worker's ZeRO optimizer state (master weights and moments) as `load_checkpoint` does (items 1, 2).

    Args:
        zero_optimizer (`DeepSpeedZeroOptimizer` or `DeepSpeedZeroOptimizer_Stage3`):
            The engine's `optimizer`, built for the same number of workers as the one that saved `state`.
        state (`dict`):
            What this worker's `zero_optimizer.state_dict()` returned when the checkpoint was taken.

    Example:

    ```python
    >>> shard = engine.optimizer.state_dict()  # doctest: +SKIP
    >>> load_zero_state(engine.optimizer, shard)  # doctest: +SKIP
    ```
    """
    states = zero_state_dict_list(zero_optimizer, state)
    prologue = getattr(zero_optimizer, "checkpoint_event_prologue", None)
    if prologue is not None:
        prologue()
    # The master weights come from the shard, not from the (bit16) model: exact even where the model is not float32.
    zero_optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)
    epilogue = getattr(zero_optimizer, "checkpoint_event_epilogue", None)
    if epilogue is not None:
        epilogue()
