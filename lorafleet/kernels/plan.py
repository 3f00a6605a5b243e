"""The kernel plan: what [`apply_kernels`] fused on a model and why it left the rest, decided once.

Everything downstream of the patching (the loss the training step computes, the `kernels` metric and the `--json`
summary, the reasons shown to a user) reads this one object instead of re-deriving it from the spec's flags, which
say what was asked for, not what a given model allowed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class SkippedKernel:
    """One fused path left unfused on one layer.

    Attributes:
        layer (`str`): Where, e.g. `model.layers.0.mlp` or `lm_head`.
        path (`str`): The fused path: `mlp`, `qkv`, `o` or `loss`.
        reason (`str`): Why, in one line.
    """

    layer: str
    path: str
    reason: str


@dataclass(frozen=True)
class KernelPlan:
    """The fused paths a model runs and the ones it does not, with reasons.

    Attributes:
        applied (`dict[str, int]`): Fused path -> number of decoder layers it covers, for every path the spec asked
            for (`loss` counts the model's head: 0 or 1). Empty when kernels are off.
        skipped (`tuple[SkippedKernel, ...]`): Every layer/path that was asked for and left on PEFT's path.

    Example:

    ```python
    >>> plan = KernelPlan({"mlp": 2, "loss": 0}, (SkippedKernel("lm_head", "loss", "LM head is trainable"),))
    >>> plan.fused_loss, plan.reasons()
    (False, ['lm_head (loss): LM head is trainable'])

    ```
    """

    applied: dict[str, int] = field(default_factory=dict)
    skipped: tuple[SkippedKernel, ...] = ()

    @property
    def fused_loss(self) -> bool:
        """Whether the training step may call [`lm_loss`] with `fused=True` (the LM head was found fusable)."""
        return self.applied.get("loss", 0) == 1

    def reasons(self) -> list[str]:
        """One `"layer (path): reason"` line per skipped entry, in layer order."""
        return [f"{s.layer} ({s.path}): {s.reason}" for s in self.skipped]

    def report(self) -> dict[str, Any]:
        """The plan as plain data: `{"applied": {...}, "skipped": [{"layer", "path", "reason"}, ...]}`."""
        return {"applied": dict(self.applied), "skipped": [asdict(s) for s in self.skipped]}
