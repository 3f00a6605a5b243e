"""Forwards of a PEFT aLoRA model with an explicit activation: per-row offsets, or a per-token mask for packed rows.

[`activation`] is how the training loss passes each batch's activation to the adapter layers: lorafleet's fused loss
calls the decoder directly, which bypasses the offsets `PeftModel.forward` would compute, and packed rows hold several
samples, each activated from its own invocation, which one offset per row cannot express.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Optional, Sequence, Union

import torch

from lorafleet.compat.peft import alora_forward_hooks, alora_variant_class, is_alora_variant, lora_variants

logger = logging.getLogger(__name__)


def _masked_variant_class():
    ALoraLinearVariant = alora_variant_class()

    class MaskedALoraLinearVariant(ALoraLinearVariant):
        """PEFT's aLoRA variant, also accepting a per-token activation mask instead of per-row offsets.

        `alora_offsets` may be what PEFT passes (a list of ints or `None` per row) or a bool tensor of the layer
        input's `[batch, tokens]` shape, True where the adapter is on. The mask is how packed rows activate each
        packed sample from its own invocation, which one offset per row cannot express. Same arithmetic as PEFT
        otherwise (base output plus the LoRA update on the selected tokens only), so checkpoints are unchanged.
        """

        @staticmethod
        def forward(module, active_adapter, x, result, **kwargs):
            mask = kwargs.get("alora_offsets")
            if not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool):
                return ALoraLinearVariant.forward(module, active_adapter, x, result, **kwargs)
            if mask.shape != result.shape[:-1]:
                raise ValueError(f"aLoRA activation mask {tuple(mask.shape)} does not match the input {tuple(result.shape[:-1])}")
            lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
            dropout, scaling = module.lora_dropout[active_adapter], module.scaling[active_adapter]
            x = x.to(lora_A.weight.dtype)
            flat_mask = mask.reshape(-1).to(result.device)
            x_flat = x.reshape(-1, x.shape[-1])
            res_flat = result.view(-1, result.shape[-1])
            # An all-False mask still runs lora_A/lora_B on zero rows: every adapter weight stays in the autograd
            # graph with a zero gradient, which DDP needs (no "unused parameter" error on a batch without invocations).
            res_flat[flat_mask] += lora_B(lora_A(dropout(x_flat[flat_mask]))) * scaling
            return result

    return MaskedALoraLinearVariant


_VARIANT_CLASS = None


def install_mask_variant(model: torch.nn.Module) -> int:
    """Let every aLoRA layer of `model` accept a per-token activation mask (see [`activation`]).

    Replaces the layers' PEFT `ALoraLinearVariant` by a subclass that behaves identically for per-row offsets.
    Idempotent; nothing about the saved adapter changes.

    Returns:
        `int`: Number of layer/adapter variants replaced now.
    """
    global _VARIANT_CLASS
    if _VARIANT_CLASS is None:
        _VARIANT_CLASS = _masked_variant_class()
    count = 0
    for module in model.modules():
        variants = lora_variants(module)
        for name, variant in list(variants.items()):
            if is_alora_variant(variant) and not isinstance(variant, _VARIANT_CLASS):
                variants[name] = _VARIANT_CLASS()
                count += 1
    return count


def _peft_wrapper(model: torch.nn.Module):
    # DDP/DeepSpeed wrap the LossModule, not the PeftModel; accept a PeftModel or anything holding one as `.module`.
    while not hasattr(model, "peft_config") and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "peft_config") or not hasattr(model, "get_base_model"):
        raise ValueError(f"{type(model).__name__} is not a PEFT model")
    return model


@contextlib.contextmanager
def activation(
    model: torch.nn.Module, alora: Union[torch.Tensor, Sequence[Optional[int]]]
) -> Iterator[torch.nn.Module]:
    """Run forwards of a PEFT aLoRA model with an explicit activation.

    Inside the context the adapter layers see `alora` on every call, however the decoder is reached: through the
    causal LM, or directly (lorafleet's fused loss runs the decoder itself, which bypasses the offsets
    `PeftModel.forward` would compute). Call the yielded module, the underlying transformers model, so that PEFT does
    not recompute offsets from `input_ids` (which would activate only the last sample of a packed row).
    Gradient checkpointing is handled by PEFT's hook mechanism (the mask is re-applied in the recomputation).

    Args:
        model (`peft.PeftModel`):
            An aLoRA PEFT model.
        alora (`torch.Tensor` or `Sequence[Optional[int]]`):
            Per-row `alora_offsets` (PEFT's convention: tokens from the invocation start to the row end; a 1-D
            integer tensor or a list, `None` for "no invocation"), or a bool `[batch, tokens]` activation mask.

    Yields:
        `torch.nn.Module`: The transformers model to call (same weights).

    Example:

    ```python
    >>> import torch
    >>> from transformers import AutoModelForCausalLM
    >>> from peft import LoraConfig, get_peft_model
    >>> from lorafleet.model.families import family_config
    >>> cfg = family_config("llama", 32, {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
    ...                                   "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16})
    >>> model = get_peft_model(AutoModelForCausalLM.from_config(cfg),
    ...                        LoraConfig(r=4, target_modules=["q_proj"], alora_invocation_tokens=[9], init_lora_weights=False))
    >>> ids = torch.tensor([[1, 5, 9, 6, 1, 7, 9, 6]])
    >>> mask = torch.tensor([[0, 0, 1, 1, 0, 0, 1, 1]], dtype=torch.bool)  # two packed samples
    >>> with activation(model, mask) as lm:
    ...     out = lm(input_ids=ids).logits
    >>> out.shape
    torch.Size([1, 8, 32])
    ```
    """
    peft_model = _peft_wrapper(model)
    if isinstance(alora, torch.Tensor):
        if alora.dtype == torch.bool:
            install_mask_variant(peft_model)
        else:
            alora = [int(o) if o > 0 else None for o in alora.tolist()]
    with alora_forward_hooks(peft_model, alora):
        yield peft_model.get_base_model()

