"""Samples to rows and tensors: pack several samples into a row ([`pack_samples`]) and pad a micro-batch ([`collate`])."""

from __future__ import annotations

import bisect
import heapq
import logging
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from lorafleet.constants import IGNORE_INDEX

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)


def pack_samples(samples: Sequence[dict], max_length: int) -> list[dict]:
    """Pack samples into rows of at most `max_length` tokens (best-fit decreasing, deterministic).

    Args:
        samples (`Sequence[dict]`): Samples with `input_ids` and `labels`, each at most `max_length` long.
        max_length (`int`): Tokens per row.

    Returns:
        `list[dict]`: Rows with `input_ids`, `labels` and `position_ids` (restarting at 0 at each sample). Each
        sample's first label is -100, so the last token of one sample is never trained to predict the next.

    Example:

    ```python
    >>> from lorafleet.data.batching import pack_samples
    >>> rows = pack_samples([{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]},
    ...                      {"input_ids": [1, 7], "labels": [-100, 7]}], max_length=8)
    >>> rows[0]["position_ids"], rows[0]["labels"]
    ([0, 1, 2, 0, 1], [-100, 5, 6, -100, 7])
    ```
    """
    alora = any("alora_start" in s for s in samples)
    bins = pack_bins([len(s["input_ids"]) for s in samples], max_length)
    return [packed_row([samples[i] for i in members], alora) for members in bins]


def pack_bins(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Which samples [`pack_samples`] puts in each row: best-fit decreasing over `lengths` (longest sample first, ties
    by index; each goes to the fullest row that still has room, ties by the older row, else starts a new row).

    Rows are bucketed by free space (an integer in `[0, max_length]`), so a placement costs a bisect over the distinct
    free spaces and a heap operation, not a search over every open row: a million samples pack in seconds.

    Example:

    ```python
    >>> pack_bins([3, 2, 5], max_length=8)
    [[2, 0], [1]]
    ```
    """
    sizes = np.asarray(lengths, dtype=np.int64)
    if len(sizes) and sizes.max() > max_length:
        i = int(np.argmax(sizes > max_length))
        raise ValueError(f"sample {i} has {int(sizes[i])} tokens, more than max_length={max_length}")
    order = np.argsort(-sizes, kind="stable")  # stable: ties keep index order
    bins: list[list[int]] = []
    rows_with: dict[int, list[int]] = {}  # free space -> heap of the row indices that have exactly that much
    spaces: list[int] = []  # the free spaces some row has, sorted
    for i, n in zip(order.tolist(), sizes[order].tolist()):
        j = bisect.bisect_left(spaces, n)
        if j == len(spaces):
            row, left = len(bins), max_length - n
            bins.append([i])
        else:
            space = spaces[j]
            heap = rows_with[space]
            row = heapq.heappop(heap)
            if not heap:
                del rows_with[space], spaces[j]
            bins[row].append(i)
            left = space - n
        heap = rows_with.get(left)
        if heap is None:
            rows_with[left] = [row]
            bisect.insort(spaces, left)
        else:
            heapq.heappush(heap, row)
    return bins


def packed_row(members: Sequence[dict], alora: bool) -> dict:
    """One packed row of [`pack_samples`] from its samples, in order (`alora`: add `alora_spans`)."""
    row: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    if alora:
        # [activation start, sample end) per packed sample, in row coordinates: one offset per row cannot
        # express several invocations, so collate turns these into a per-token activation mask.
        row["alora_spans"] = []
    for sample in members:
        ids, labels = sample["input_ids"], sample["labels"]
        if alora:
            at = len(row["input_ids"])
            row["alora_spans"].append([at + sample["alora_start"], at + len(ids)])
        row["input_ids"] += ids
        row["labels"] += [IGNORE_INDEX] + list(labels[1:])
        row["position_ids"] += list(range(len(ids)))
    return row


def collate(samples: Sequence[dict], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad samples into a batch of tensors.

    Args:
        samples (`Sequence[dict]`): Samples from [`prepare_samples`] (all packed rows, or all plain samples).
        pad_id (`int`): Id written in padded `input_ids` positions (labels get -100).
        padding_side (`str`, *optional*, defaults to `"right"`): `"right"` or `"left"`.

    Returns:
        `dict[str, torch.Tensor]`: `input_ids`, `labels` and `position_ids` (int64, `[batch, longest]`), plus
        `attention_mask` for plain samples. aLoRA samples (with `alora_start`) add `alora_offsets` (int64 `[batch]`,
        PEFT's convention: tokens from the invocation start to the end of the padded row, so left and right padding
        give the same activated tokens); packed aLoRA rows add `alora_mask` (bool `[batch, longest]`, True from each
        packed sample's invocation to that sample's end). Packed rows get no `attention_mask`: transformers then reads the
        sample boundaries from `position_ids` and builds a block-diagonal causal mask (padding becomes one more
        sequence of its own, with -100 labels). That detection only runs without a KV cache, so call the model with
        `use_cache=False` (its config default is True). Plain samples' `position_ids` start at 0 at their first real
        token, so left padding does not shift positions.

    Example:

    ```python
    >>> from lorafleet.data.batching import collate
    >>> batch = collate([{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [-100, 7]}],
    ...                 pad_id=0, padding_side="left")
    >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist(), batch["position_ids"].tolist()
    ([[1, 5, 6], [0, 1, 7]], [[1, 1, 1], [0, 1, 1]], [[0, 1, 2], [0, 0, 1]])
    ```
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left' (got {padding_side!r})")
    if not samples:
        raise ValueError("cannot collate an empty batch")
    packed = ["position_ids" in s for s in samples]
    if any(packed) and not all(packed):
        raise ValueError("cannot collate packed rows with plain samples")
    packed = packed[0]
    width = max(len(s["input_ids"]) for s in samples)
    batch = {name: torch.empty(len(samples), width, dtype=torch.long) for name in ("input_ids", "labels", "position_ids")}
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    alora_offsets = torch.zeros(len(samples), dtype=torch.long) if "alora_start" in samples[0] else None
    alora_mask = torch.zeros(len(samples), width, dtype=torch.bool) if "alora_spans" in samples[0] else None
    for row, s in enumerate(samples):
        n, pad = len(s["input_ids"]), width - len(s["input_ids"])
        real = slice(pad, width) if padding_side == "left" else slice(0, n)
        fill = slice(0, pad) if padding_side == "left" else slice(n, width)
        batch["input_ids"][row, real] = torch.tensor(s["input_ids"])
        batch["input_ids"][row, fill] = pad_id
        batch["labels"][row, real] = torch.tensor(s["labels"])
        batch["labels"][row, fill] = IGNORE_INDEX
        if packed:
            batch["position_ids"][row, real] = torch.tensor(s["position_ids"])
            # Padding as its own 0..k-1 run: a separate "sequence" that nothing real attends to.
            batch["position_ids"][row, fill] = torch.arange(pad)
        else:
            batch["position_ids"][row, real] = torch.arange(n)
            batch["position_ids"][row, fill] = 0
            mask[row, real] = 1
        if alora_offsets is not None:
            alora_offsets[row] = width - (real.start + s["alora_start"])
        if alora_mask is not None:
            for start, end in s["alora_spans"]:
                alora_mask[row, real.start + start : real.start + end] = True
    if not packed:
        batch["attention_mask"] = mask
    if alora_offsets is not None:
        batch["alora_offsets"] = alora_offsets
    if alora_mask is not None:
        batch["alora_mask"] = alora_mask
    return batch

