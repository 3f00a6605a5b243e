"""Fused LoRA kernels: gated activations (Triton + torch), LoRA block autograd Functions, the chunked LM loss and
the per-family patch layer.

The training loop needs two calls:

- [`apply_kernels`]`(peft_model, spec.kernels) -> KernelPlan` (`plan.applied`: `{"mlp": n, "qkv": n, "o": n,
  "loss": 0|1}`; `plan.skipped`: what was left unfused, and why);
- [`lm_loss`]`(model, input_ids, attention_mask, labels, position_ids, fused=plan.fused_loss) -> (loss_sum, n_tokens)`.

Importing this package never requires a GPU or Triton.
"""

from .activations import HAS_TRITON, gated_backward, gated_forward, geglu_ref, swiglu_ref
from .lora_ops import LoRAMLPFunction, LoRAProjectionsFunction, lora_mlp, lora_o, lora_qkv
from .loss import chunked_lm_head_loss, fused_loss_refusal, lm_loss
from .patch import apply_kernels, remove_kernels
from .plan import KernelPlan, SkippedKernel

__all__ = [
    "HAS_TRITON",
    "KernelPlan",
    "LoRAMLPFunction",
    "LoRAProjectionsFunction",
    "SkippedKernel",
    "apply_kernels",
    "chunked_lm_head_loss",
    "fused_loss_refusal",
    "gated_backward",
    "gated_forward",
    "geglu_ref",
    "lm_loss",
    "lora_mlp",
    "lora_o",
    "lora_qkv",
    "remove_kernels",
    "swiglu_ref",
]
