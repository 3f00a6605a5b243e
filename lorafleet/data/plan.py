"""Which samples make up each global optimizer step, as a pure function of the step number ([`BatchPlan`]).

The plan depends only on the step, so a resumed run continues the same order, and a 1-worker and a 2-worker run with
the same global batch see the same samples at every step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional, Sequence

import torch

from lorafleet.constants import GROUP_WINDOW

logger = logging.getLogger(__name__)


@lru_cache(maxsize=8)
def _epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool) -> tuple[int, ...]:
    if not shuffle:
        return tuple(range(num_samples))
    gen = torch.Generator().manual_seed(seed + epoch)
    return tuple(torch.randperm(num_samples, generator=gen).tolist())


def _grouped(order: Sequence[int], lengths: Sequence[int], head: int, global_batch_size: int, seed: int,
             shuffle: bool) -> tuple[int, ...]:
    """`order` regrouped by length: after the first `head` positions (which complete the previous epoch's last global
    batch), each window of `GROUP_WINDOW` global batches is sorted longest first (stably, so ties keep `order`) and
    cut into global batches, and the window's full batches are put in a seeded order (kept without `shuffle`)."""
    gen = torch.Generator().manual_seed(seed)
    out = list(order[:head])
    span = GROUP_WINDOW * global_batch_size
    for start in range(head, len(order), span):
        window = sorted(order[start : start + span], key=lambda i: -lengths[i])
        batches = [window[k : k + global_batch_size] for k in range(0, len(window), global_batch_size)]
        full = [b for b in batches if len(b) == global_batch_size]
        if shuffle:
            full = [full[k] for k in torch.randperm(len(full), generator=gen).tolist()]
        for batch in full + batches[len(full):]:
            out.extend(batch)
    return tuple(out)


@dataclass(frozen=True)
class BatchPlan:
    """Which samples make up each global optimizer step, as a pure function of the step number.

    The samples are read epoch after epoch, each epoch in its own order (a permutation seeded by `seed + epoch`,
    or file order without `shuffle`); global step k takes positions `[k * global_batch_size, (k + 1) *
    global_batch_size)` of that endless stream, wrapping into the next epoch when needed. Since the global batch
    does not depend on how it is split over workers, a 1-worker and a 2-worker run with the same global batch see
    the same samples at every step, and a run resumed at step k needs nothing but k.

    With `lengths`, each epoch's order is then grouped by length (`data.group_by_length`): windows of
    [`~lorafleet.constants.GROUP_WINDOW`] global batches are sorted longest first and cut into global batches, which
    are read in a seeded order. A global batch, and so each worker's micro-batches, then holds samples of similar
    length and is padded less; every sample is still read once per epoch, and the plan is still a function of the
    step alone.

    Args:
        num_samples (`int`): Samples (or packed rows) available.
        global_batch_size (`int`): Samples per optimizer step over all workers
            (`micro_batch_size * grad_accum * world_size`).
        seed (`int`): Seeds the per-epoch order.
        shuffle (`bool`, *optional*, defaults to `True`): Reorder every epoch.
        lengths (`Sequence[int]`, *optional*): Each sample's length in tokens; given, the order is grouped by length.

    Example:

    ```python
    >>> from lorafleet.data.plan import BatchPlan
    >>> plan = BatchPlan(num_samples=10, global_batch_size=4, seed=0, shuffle=False)
    >>> plan.global_batch(2)  # positions 8..11: wraps into epoch 1
    [8, 9, 0, 1]
    >>> plan.micro_batches(2, rank=1, world_size=2, micro_batch_size=1, grad_accum=2)
    [[0], [1]]
    >>> grouped = BatchPlan(num_samples=6, global_batch_size=2, seed=0, shuffle=False, lengths=[5, 1, 6, 2, 4, 3])
    >>> [grouped.global_batch(step) for step in range(3)]  # longest first without shuffle
    [[2, 0], [4, 5], [3, 1]]
    ```
    """

    num_samples: int
    global_batch_size: int
    seed: int
    shuffle: bool = True
    lengths: Optional[Sequence[int]] = field(default=None, repr=False)
    _orders: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.num_samples <= 0:
            raise ValueError("BatchPlan needs at least one sample")
        if self.global_batch_size <= 0:
            raise ValueError("global_batch_size must be positive")
        if self.lengths is not None:
            if len(self.lengths) != self.num_samples:
                raise ValueError(f"{len(self.lengths)} lengths for {self.num_samples} samples")
            object.__setattr__(self, "lengths", tuple(self.lengths))  # frozen: compared and hashed as a value

    def epoch_order(self, epoch: int) -> tuple[int, ...]:
        """Sample indices in the order epoch `epoch` (0-based) reads them."""
        order = _epoch_order(self.num_samples, self.seed, epoch, self.shuffle)
        if self.lengths is None:
            return order
        if epoch not in self._orders:
            if len(self._orders) >= 4:  # a run reads epochs in turn; keep the few around the current step
                self._orders.pop(next(iter(self._orders)))
            head = min(-epoch * self.num_samples % self.global_batch_size, self.num_samples)
            self._orders[epoch] = _grouped(order, self.lengths, head, self.global_batch_size, self.seed + epoch,
                                           self.shuffle)
        return self._orders[epoch]

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
        pos, end = start, start + self.global_batch_size
        while pos < end:
            epoch, offset = divmod(pos, self.num_samples)
            taken = self.epoch_order(epoch)[offset : offset + end - pos]
            out.extend(taken)
            pos += len(taken)
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

