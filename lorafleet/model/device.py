"""Device and dtype policy: which dtype `auto` means on this device, decided here once."""

from __future__ import annotations

import logging

import torch

from lorafleet.kernels.lora_ops import cpu_half_matmul_is_native

logger = logging.getLogger(__name__)


def fast_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether `device` computes bf16 matmuls natively.

    On CPUs this means AVX512-BF16 or AMX: there bf16 is ~5x faster than fp32. On an AVX2-only CPU torch emulates
    bf16 and a LoRA step was measured ~19x *slower* than in fp32, so guessing wrong here is expensive.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()

    return cpu_half_matmul_is_native()


def torch_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """Map a spec dtype name (`auto`, `bfloat16`, `float32`, `float16`) to a `torch.dtype` for `device`.

    Example:

    ```python
    >>> torch_dtype("float32")
    torch.float32
    ```
    """
    if name == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[name]

