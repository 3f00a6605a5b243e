"""accelerate internals lorafleet relies on to save a model without importing DeepSpeed.

Checked on: accelerate 1.15.0 with transformers 5.24.0 and deepspeed 0.19.8 (installed;
`tests/unit/compat/test_compat_accelerate.py` saves a tiny model with and without the workaround, each in a fresh
interpreter).

`PreTrainedModel.save_pretrained` unwraps the model with accelerate's public `extract_model_from_parallel`, which
imports DeepSpeed whenever it is installed, only to test `isinstance(model, DeepSpeedEngine)`. The import costs
~0.3 s and prints an accelerator warning on stdout (DeepSpeed's logger writes there), so every DDP job's driver, and
`lorafleet merge`, paid for a library only `scaling.strategy: deepspeed` workers use.

Private things touched:

1. `accelerate.utils.other.is_deepspeed_available`, the module-global name `extract_model_from_parallel` looks up
   when it runs: [`unwrap_without_deepspeed`] replaces it, for the duration of a block, with a test of whether
   DeepSpeed is already imported. A model can only be a `DeepSpeedEngine` if it is, so unwrapping stays exact.
   Gone when accelerate tests `sys.modules` (or catches the engine type lazily) instead of importing DeepSpeed.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


def _deepspeed_imported() -> bool:
    return "deepspeed" in sys.modules


@contextlib.contextmanager
def unwrap_without_deepspeed() -> Iterator[None]:
    """Within the block, unwrapping a model (`save_pretrained` does) imports DeepSpeed only if it is already imported.

    Example:

    ```python
    >>> import torch
    >>> from accelerate.utils import extract_model_from_parallel
    >>> layer = torch.nn.Linear(2, 2)
    >>> with unwrap_without_deepspeed():
    ...     extract_model_from_parallel(layer) is layer
    True
    ```
    """
    # Deferred, as everywhere in compat: accelerate costs ~0.7 s on top of torch, and the CLI imports the callers.
    from accelerate.utils import other

    probe = other.is_deepspeed_available
    other.is_deepspeed_available = _deepspeed_imported
    try:
        yield
    finally:
        other.is_deepspeed_available = probe
