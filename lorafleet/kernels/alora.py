"""Activated LoRA (aLoRA): the invocation, where it activates the adapter, and how training passes that to PEFT.

An aLoRA adapter changes the model only on the tokens from the *last* occurrence of its invocation sequence onward;
every token before it sees the frozen base model, so the base model's KV cache for a conversation stays valid when
the adapter is invoked on it (see [`~lorafleet.generate.continue_with_adapter`]). PEFT implements the layers
(`LoraConfig(alora_invocation_tokens=...)`); this module adds what a training tool needs around them:

- [`resolve_invocation`]: the spec's `alora.invocation_string` / `invocation_tokens` as token ids, checked at submit
  time (non-empty, in the vocabulary, framed by special tokens or a warning).
- [`find_invocation`] and [`Invocation`]: where a sample's invocation starts, and its labels masked so that the loss
  only counts the tokens after the invocation (the tokens before it cannot be changed by the adapter).
- [`activation`]: runs a forward with an explicit activation, either PEFT's per-row `alora_offsets` or, for packed
  rows holding several samples (each with its own invocation), a per-token activation mask.

PEFT's convention, used throughout: `alora_offsets[i]` is the number of tokens from the start of row i's invocation
to the end of the row, so the adapter is active on the last `alora_offsets[i]` positions. Counted from the end, it
does not depend on left padding; with right padding the padded tail is counted too (padding is never attended to
nor trained, so activating it changes nothing).
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch

logger = logging.getLogger(__name__)


def offsets_to_mask(offsets: Sequence[Optional[int]], width: int, device: Any = None) -> torch.Tensor:
    """The `[batch, width]` activation mask PEFT derives from `alora_offsets` (True = adapter on).

    A `None` or 0 offset means the row has no invocation (adapter off everywhere); offsets are clipped to `width`.

    Example:

    ```python
    >>> offsets_to_mask([2, None], 4).int().tolist()
    [[0, 0, 1, 1], [0, 0, 0, 0]]
    ```
    """
    clipped = torch.tensor([0 if o is None else min(int(o), width) for o in offsets], dtype=torch.long, device=device)
    return torch.arange(width, device=device)[None, :] >= (width - clipped)[:, None]

