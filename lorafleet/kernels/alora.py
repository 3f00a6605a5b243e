"""aLoRA activation as a mask: PEFT's per-row `alora_offsets` turned into the per-token mask the fused kernels apply.

PEFT's convention: `alora_offsets[i]` is the number of tokens from the start of row i's invocation to the end of the
row, so the adapter is active on the last `alora_offsets[i]` positions.
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

