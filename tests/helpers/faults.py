"""Faults injected into a run's workers as [`~lorafleet.train.worker.StepHook`]s, for the failure-handling tests.

Each fault is a small picklable object that every worker calls before each step. [`from_options`] builds them from
the options of `tests/helpers/faulty_cli.py`, which runs `lorafleet ARGS` with them installed; `helpers.cli.run_cli`
and `submit_small` take those options as `faults=[...]`:

```python
>>> [type(f).__name__ for f in from_options(["--nan-at", "3", "--stop-after", "4"])]
['NanLossAt', 'StopAfter']
```
"""

from __future__ import annotations

import argparse
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafleet.train.worker import StepEvent, StepHook


@dataclass
class KillRankOnce:
    """Worker `rank` SIGKILLs itself before step `step` (after the previous step's checkpoint was taken), once: it
    creates the file `marker` first, so the worker Ray Train restarts from the checkpoint runs that step."""

    step: int
    marker: str
    rank: int = 1

    def __call__(self, event: StepEvent) -> None:
        if event.step == self.step and event.rank == self.rank and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class NanLossAt:
    """Step `step`'s loss is NaN: before it, every worker sets its trainable (LoRA) parameters to NaN, as a diverged
    run would have. Needs whole parameters on every worker (DDP, ZeRO-1/2; ZeRO-3 partitions them). With
    `learning_rate`, only in a run of that peak learning rate (one trial of a sweep)."""

    step: int
    learning_rate: float | None = None

    def __call__(self, event: StepEvent) -> None:
        peak = event.strategy.optimizer.param_groups[0].get("initial_lr")
        if event.step == self.step and (self.learning_rate is None or peak == self.learning_rate):
            with torch.no_grad():
                for param in event.strategy.params:
                    param.fill_(float("nan"))


@dataclass
class GarbleAt:
    """Before step `step`, every worker overwrites its trainable (LoRA) parameters with the same seeded Gaussian
    noise of standard deviation `scale`: the adapter turns to garbage (its held-out loss rises well above that of the
    steps before, and a few more steps do not bring it back) while the loss stays finite. Whole parameters needed
    (DDP, ZeRO-1/2)."""

    step: int
    scale: float = 1.0
    seed: int = 0

    def __call__(self, event: StepEvent) -> None:
        if event.step == self.step:
            generator = torch.Generator().manual_seed(self.seed)
            with torch.no_grad():
                for param in event.strategy.params:
                    noise = torch.randn(param.shape, generator=generator) * self.scale
                    param.copy_(noise.to(device=param.device, dtype=param.dtype))


@dataclass
class StopAfter:
    """Ask the run to end cleanly after step `step` (after its checkpoint, or the next one), like a preempted job."""

    step: int

    def __call__(self, event: StepEvent) -> bool:
        return event.step >= self.step


def from_options(argv: list[str]) -> list[StepHook]:
    """The faults the options in `argv` ask for (`--kill-at K --kill-once-file PATH [--kill-rank R]`, `--nan-at K`,
    `--stop-after K`, `--garble-at K`; steps are 1-based, as in the run's metrics)."""
    parser = argparse.ArgumentParser(prog="faulty_cli.py", description="lorafleet ARGS with faults in its workers")
    parser.add_argument("--kill-at", type=int, help="a worker SIGKILLs itself before this step, once")
    parser.add_argument("--kill-rank", type=int, default=1, help="the worker --kill-at kills (default 1)")
    parser.add_argument("--kill-once-file", help="created at the kill; the fault does not recur while it exists")
    parser.add_argument("--nan-at", type=int, help="this step's loss is NaN")
    parser.add_argument("--nan-lr", type=float, help="--nan-at only in runs of this peak learning rate")
    parser.add_argument("--stop-after", type=int, help="end the run cleanly after this step's checkpoint")
    parser.add_argument("--garble-at", type=int, help="the LoRA weights turn to noise before this step")
    options = parser.parse_args(argv)
    hooks: list[StepHook] = []
    if options.kill_at is not None:
        if options.kill_once_file is None:
            parser.error("--kill-at needs --kill-once-file (a restarted worker would be killed again)")
        hooks.append(KillRankOnce(options.kill_at, options.kill_once_file, options.kill_rank))
    if options.nan_at is not None:
        hooks.append(NanLossAt(options.nan_at, options.nan_lr))
    if options.stop_after is not None:
        hooks.append(StopAfter(options.stop_after))
    if options.garble_at is not None:
        hooks.append(GarbleAt(options.garble_at))
    return hooks
