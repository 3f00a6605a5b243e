"""PEFT internals lorafleet's aLoRA support relies on, each behind one function.

Checked on: peft 0.21.2 with torch 2.13.0 (installed; `tests/unit/compat/test_compat_peft.py` exercises each item on
a tiny aLoRA model); the same code was read in PEFT's source at v0.18.0, v0.19.0, v0.20.0 and main (5d602fd). aLoRA
itself appeared in PEFT 0.18.0, so nothing here exists before it.

Public API used where one exists: a call through the whole PEFT model passes `alora_offsets=` to
`PeftModel.forward` / `generate` (documented; [`lorafleet.infer.generate`] does so). The items below cover what that
argument cannot reach: lorafleet's fused loss runs the decoder and the LM head itself, never `PeftModel.forward`.

Private things touched:

1. `LoraModel._enable_peft_forward_hooks(alora_offsets=...)` (`peft.tuners.lora.model`; a PEFT model's `base_model`):
   the context manager `PeftModel.forward` enters to hand the offsets to every LoRA layer, used as is by
   [`alora_forward_hooks`]. Gone when PEFT offers a public context manager (or makes this one public) that activates
   aLoRA offsets for calls that do not go through `PeftModel.forward`.
2. `_alora_offsets_pre_forward_hook`, a module-private function of `peft.tuners.lora.model` that the context manager
   registers on each LoRA layer as `functools.partial(..., alora_offsets=...)`, found by [`hooked_alora_offsets`]
   by its `__name__` in torch's private `nn.Module._forward_pre_hooks` dict (torch 2.13.0). Needed because the fused
   paths compute a layer's projection without calling the layer, so the hook never runs. Gone when PEFT keeps the
   offsets of the current call where a reader can get them (an attribute of the LoRA layer, a context variable or an
   accessor) instead of only inside a hook's closure.
3. `peft.tuners.lora.variants.ALoraLinearVariant` (not exported from `peft`), the `LoraLayer.lora_variant` dict
   (adapter name -> variant instance; undocumented) and the variant's static
   `forward(module, active_adapter, x, result, **kwargs)` receiving `alora_offsets` in `kwargs`: read by
   [`lora_variant`] / [`is_alora_variant`] and subclassed by [`lorafleet.model.alora`] to accept a per-token
   activation mask (packed rows). Gone when PEFT exports the class and its aLoRA layers accept a per-token mask as
   `alora_offsets` (then the subclass goes too).

Not listed: the LoRA layer attributes PEFT's own guides use (`lora_A`, `lora_B`, `lora_dropout`, `scaling`,
`active_adapters`, `merged`, `disable_adapters`, `get_base_layer()`), treated as public.
"""

from __future__ import annotations

from typing import Any, ContextManager

from torch import nn

# The hook PEFT registers on each LoRA layer while aLoRA offsets are active (item 2 above).
ALORA_HOOK_NAME = "_alora_offsets_pre_forward_hook"


def alora_variant_class() -> type:
    """PEFT's aLoRA layer variant class, `peft.tuners.lora.variants.ALoraLinearVariant` (item 3).

    Example:

    ```python
    >>> alora_variant_class().__name__
    'ALoraLinearVariant'
    ```
    """
    # Deferred: importing peft takes seconds and every lorafleet command imports this module's callers.
    from peft.tuners.lora.variants import ALoraLinearVariant

    return ALoraLinearVariant


def lora_variants(layer: nn.Module) -> dict[str, Any]:
    """The adapter name -> variant dict of a PEFT LoRA layer (item 3); empty for other modules.

    The dict is the layer's own: assigning to it replaces the variant the layer runs.

    Example:

    ```python
    >>> import torch
    >>> lora_variants(torch.nn.Linear(2, 2))
    {}
    ```
    """
    variants = getattr(layer, "lora_variant", None)
    return variants if isinstance(variants, dict) else {}


def lora_variant(layer: nn.Module, adapter: str) -> Any:
    """The LoRA variant (DoRA, aLoRA, ...) `adapter` of `layer` runs, or None for plain LoRA (item 3).

    Example:

    ```python
    >>> import torch
    >>> lora_variant(torch.nn.Linear(2, 2), "default") is None
    True
    ```
    """
    return lora_variants(layer).get(adapter)


def is_alora_variant(variant: Any) -> bool:
    """Whether `variant` (a value of [`lora_variants`]) is PEFT's aLoRA variant or a subclass of it (item 3).

    Example:

    ```python
    >>> is_alora_variant(None), is_alora_variant(alora_variant_class()())
    (False, True)
    ```
    """
    return isinstance(variant, alora_variant_class())


def alora_forward_hooks(peft_model: nn.Module, alora_offsets: Any) -> ContextManager[None]:
    """Hand `alora_offsets` to every LoRA layer of `peft_model` on each call made inside the context (item 1).

    What `PeftModel.forward(..., alora_offsets=...)` does around its own call, for calls that bypass it (the decoder
    or a single layer called directly). PEFT also re-applies the offsets in gradient checkpointing's recomputation.

    Args:
        peft_model (`peft.PeftModel`): A LoRA PEFT model.
        alora_offsets (`list[Optional[int]]` or `torch.Tensor`): Passed to the layers as is: PEFT's per-row offsets,
            or lorafleet's per-token bool mask (which only lorafleet's masked variant understands).

    Returns:
        `ContextManager`: The context (PEFT's own; `None` offsets leave the layers untouched).

    Example:

    ```python
    >>> import torch
    >>> from transformers import AutoModelForCausalLM
    >>> from peft import LoraConfig, get_peft_model
    >>> from lorafleet.model.families import family_config
    >>> cfg = family_config("llama", 32, {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
    ...                                   "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16})
    >>> config = LoraConfig(r=4, target_modules=["q_proj"], alora_invocation_tokens=[9], task_type="CAUSAL_LM")
    >>> model = get_peft_model(AutoModelForCausalLM.from_config(cfg), config)
    >>> q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    >>> with alora_forward_hooks(model, [3]):
    ...     hooked_alora_offsets(q_proj)
    [3]
    >>> hooked_alora_offsets(q_proj) is None
    True
    ```
    """
    tuner = getattr(peft_model, "base_model", None)
    enable_hooks = getattr(tuner, "_enable_peft_forward_hooks", None)
    if enable_hooks is None:
        raise TypeError(
            f"{type(tuner).__name__} has no `_enable_peft_forward_hooks` (a PEFT LoRA model's base_model has it in "
            "peft 0.18-0.21; see lorafleet.compat.peft)"
        )
    return enable_hooks(alora_offsets=alora_offsets)


def hooked_alora_offsets(layer: nn.Module) -> Any:
    """The `alora_offsets` PEFT's pre-forward hooks would pass to `layer` now, or None when none is set (item 2).

    PEFT activates aLoRA layers by registering, for the duration of a forward, a pre-hook on every LoRA layer that
    adds `alora_offsets=...` to the layer's call. The fused paths compute the projections without calling the layers,
    so they read the value from the hook (the last one registered wins, as it would in the call).

    Example: see [`alora_forward_hooks`].
    """
    found = None
    for hook in layer._forward_pre_hooks.values():
        if getattr(getattr(hook, "func", None), "__name__", "") == ALORA_HOOK_NAME:
            found = hook.keywords["alora_offsets"]
    return found
