"""bitsandbytes internals lorafleet relies on to keep 4-bit base weights fixed on CPU.

Checked on: bitsandbytes 0.50.2 with torch 2.13.0 (installed; `tests/unit/compat/test_compat_bitsandbytes.py`
exercises both items on a `Linear4bit` layer, forcing the repack path on CPUs without AVX512-BF16).

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
"""

from __future__ import annotations

from typing import Any

from torch import nn


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
