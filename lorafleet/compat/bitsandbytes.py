"""bitsandbytes internals lorafleet relies on: 4-bit base weights kept fixed on CPU, and an import without Inductor.

Checked on: bitsandbytes 0.50.2 with torch 2.13.0 (installed; `tests/unit/compat/test_compat_bitsandbytes.py`
exercises items 1-2 on a `Linear4bit` layer, forcing the repack path on CPUs without AVX512-BF16, and item 3
in a fresh interpreter).

On CPUs with AVX512-BF16, `Linear4bit.forward` repacks its weight *in place* into a CPU-only layout the first time it
runs in eval mode on an input that does not require grad. The repack mutates the parameter DeepSpeed and DDP think
they own: under ZeRO-3 it silently corrupted the frozen base (STACK-NOTES), and lorafleet's fused LoRA paths
dequantize the weight with the public `bitsandbytes.functional.dequantize_4bit`, which reads only the standard
layout ([`lorafleet.kernels.lora_ops.dequantized_weight`] uses that public API, and `weight.quant_state` and
`Linear4bit.compute_dtype`, constructor-level attributes, nothing listed here).

Private things touched:

1. `Linear4bit.support_avx512bf16_for_cpu`, an undocumented instance attribute (set in `__init__` from
   `bitsandbytes.functional.has_avx512bf16()`) that gates the repack: [`disable_cpu_repack`] sets it to False.
2. `QuantState.packing_format_for_cpu`, set to True by bitsandbytes' private `_convert_weight_packed_for_cpu` when it
   has repacked a weight (absent before): [`is_cpu_packed`].

Both go when bitsandbytes keeps the packed layout in a separate buffer instead of overwriting the parameter in
`forward`, or offers a documented switch for the repack.

3. bitsandbytes' import-time `torch.compile` wrappers (`backends/default/ops.py`, `_try_torch_compile`) and
   torch's `TORCHDYNAMO_DISABLE` variable, read by each `torch.compile` call, which then returns its function
   unchanged: [`import_uncompiled`] sets it for the import alone. Goes when bitsandbytes compiles lazily.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from torch import nn

_DYNAMO_OFF = "TORCHDYNAMO_DISABLE"


def disable_cpu_repack(model: nn.Module) -> int:
    """Turn the in-place CPU repack off on every bitsandbytes `Linear4bit` in `model` (item 1).

    Returns:
        `int`: How many 4-bit layers were switched (0 when bitsandbytes is not installed).

    Example:

    ```python
    >>> import torch
    >>> disable_cpu_repack(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    0
    ```
    """
    try:
        # Deferred: importing bitsandbytes takes seconds, and a model without 4-bit layers never needs it.
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def is_cpu_packed(weight: Any) -> bool:
    """Whether a 4-bit weight was repacked into bitsandbytes' CPU-only layout (item 2).

    Args:
        weight (`bitsandbytes.nn.Params4bit` or `torch.Tensor`): A `Linear4bit`'s weight (False for anything else).

    Example:

    ```python
    >>> import torch
    >>> is_cpu_packed(torch.nn.Linear(4, 4).weight)
    False
    ```
    """
    return bool(getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False))


def import_uncompiled() -> None:
    """Import bitsandbytes with `torch.compile` turned off for the import only (item 3), if it is installed.

    bitsandbytes 0.50 wraps its pure-torch fallback ops in `torch.compile` at import time, which imports TorchInductor:
    1-2 s per process (every worker, every job). On CPU and CUDA those fallbacks only run for shapes the native kernels
    refuse (an odd last dimension, blocks of 2048 or more); left uncompiled, they compute the same values eagerly.
    Call it before anything imports `peft` or loads a 4-bit model; once bitsandbytes is imported it does nothing.

    Example:

    ```python
    >>> import os
    >>> import_uncompiled()
    >>> "TORCHDYNAMO_DISABLE" in os.environ  # restored after the import
    False
    ```
    """
    if "bitsandbytes" in sys.modules:
        return
    saved = os.environ.get(_DYNAMO_OFF)
    os.environ[_DYNAMO_OFF] = "1"  # read by torch.compile at each call: the wrappers become no-ops
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    finally:
        if saved is None:
            os.environ.pop(_DYNAMO_OFF, None)
        else:
            os.environ[_DYNAMO_OFF] = saved
