"""Which samples make up each global optimizer step, as a pure function of the step number ([`BatchPlan`]).

The plan depends only on the step, so a resumed run continues the same order, and a 1-worker and a 2-worker run with
the same global batch see the same samples at every step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)


@lru_cache(maxsize=8)
def _epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool) -> tuple[int, ...]:
    if not shuffle:
        return tuple(range(num_samples))
    gen = torch.Generator().manual_seed(seed + epoch)
    return tuple(torch.randperm(num_samples, generator=gen).tolist())


@dataclass(frozen=True)
class BatchPlan:
    """Which samples make up each global optimizer step, as a pure function of the step number.

    The samples are read epoch after epoch, each epoch in its own order (a permutation seeded by `seed + epoch`,
    or file order without `shuffle`); global step k takes positions `[k * global_batch_size, (k + 1) *
    global_batch_size)` of that endless stream, wrapping into the next epoch when needed. Since the global batch
    does not depend on how it is split over workers, a 1-worker and a 2-worker run with the same global batch see
    the same samples at every step, and a run resumed at step k needs nothing but k.

    Args:
        num_samples (`int`): Samples (or packed rows) available.
        global_batch_size (`int`): Samples per optimizer step over all workers
            (`micro_batch_size * grad_accum * world_size`).
        seed (`int`): Seeds the per-epoch order.
        shuffle (`bool`, *optional*, defaults to `True`): Reorder every epoch.

    Example:

    ```python
    >>> from lorafleet.data.plan import BatchPlan
    >>> plan = BatchPlan(num_samples=10, global_batch_size=4, seed=0, shuffle=False)
    >>> plan.global_batch(2)  # positions 8..11: wraps into epoch 1
    [8, 9, 0, 1]
    >>> plan.micro_batches(2, rank=1, world_size=2, micro_batch_size=1, grad_accum=2)
    [[0], [1]]
    ```
    """

    num_samples: int
    global_batch_size: int
    seed: int
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.num_samples <= 0:
            raise ValueError("BatchPlan needs at least one sample")
        if self.global_batch_size <= 0:
            raise ValueError("global_batch_size must be positive")

    def epoch_order(self, epoch: int) -> tuple[int, ...]:
        """Sample indices in the order epoch `epoch` (0-based) reads them."""
        return _epoch_order(self.num_samples, self.seed, epoch, self.shuffle)

    def epoch(self, step: int) -> float:
        """Epochs completed at the start of global step `step` (fractional)."""
        return step * self.global_batch_size / self.num_samples

    def global_batch(self, step: int) -> list[int]:
        """Sample indices of global optimizer step `step` (0-based), in the order they are split over workers.

        Args:
            step (`int`): The global step.

        Returns:
            `list[int]`: `global_batch_size` sample indices (repeats only when a batch spans epochs or is larger
            than the dataset).
        """
        if step < 0:
            raise ValueError(f"step must be >= 0 (got {step})")
        start = step * self.global_batch_size
        out = []
        for pos in range(start, start + self.global_batch_size):
            epoch, offset = divmod(pos, self.num_samples)
            out.append(self.epoch_order(epoch)[offset])
        return out

    def micro_batches(
        self, step: int, rank: int, world_size: int, micro_batch_size: int, grad_accum: int
    ) -> list[list[int]]:
        """The `grad_accum` micro-batches worker `rank` runs for global step `step`.

        Worker r takes the r-th contiguous slice of [`global_batch`] and cuts it into micro-batches in order, so the
        union over ranks and micro-batches is exactly the global batch.

        Args:
            step (`int`): The global step (0-based).
            rank (`int`): This worker's rank, in `[0, world_size)`.
            world_size (`int`): Number of workers.
            micro_batch_size (`int`): Samples per forward/backward.
            grad_accum (`int`): Micro-batches per optimizer step.

        Returns:
            `list[list[int]]`: `grad_accum` lists of `micro_batch_size` sample indices.

        Raises:
            `ValueError`: If `micro_batch_size * grad_accum * world_size != global_batch_size` or `rank` is out of range.
        """
        if micro_batch_size * grad_accum * world_size != self.global_batch_size:
            raise ValueError(
                f"micro_batch_size * grad_accum * world_size = {micro_batch_size} * {grad_accum} * {world_size} "
                f"!= global_batch_size {self.global_batch_size}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        batch = self.global_batch(step)
        per_rank = micro_batch_size * grad_accum
        mine = batch[rank * per_rank : (rank + 1) * per_rank]
        return [mine[i * micro_batch_size : (i + 1) * micro_batch_size] for i in range(grad_accum)]

