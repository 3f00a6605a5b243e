"""transformers internals lorafleet's fused attention forward and its KV-cache reuse rely on.

Checked on: transformers 5.24.0 (installed; `tests/unit/compat/test_compat_transformers.py` exercises each item on
tiny models of the six families in [`lorafleet.families`]); STACK-NOTES also records 5.23 working.

Private things touched:

1. The module-level functions of each family's modeling file (`transformers.models.<family>.modeling_<family>`,
   found as `sys.modules[type(attention_module).__module__]`): `apply_rotary_pos_emb`, `eager_attention_forward`
   and `ALL_ATTENTION_FUNCTIONS` (the `AttentionInterface` the file dispatches through: the global one of
   `transformers.modeling_utils` in all six families, but the attention-interface guide lets a modeling file declare
   its own, so it is read from the same module), plus `config._attn_implementation`, which selects the function.
   Used by [`missing_attention_functions`], [`apply_rotary_pos_emb`] and [`attention_interface`]: lorafleet's fused
   attention forward replaces only the Q/K/V projections and must otherwise compute what the family's own forward
   does. Gone when transformers lets a caller replace the attention module's Q/K/V projection step (a public hook
   between the hidden states and the attention function), so lorafleet need not re-implement the attention forward.
2. The KV cache's argument (and output field) name: `cache` since 5.24, `past_key_values` before; 5.24 still takes
   `past_key_values` with a deprecation warning until 5.40. Read from the forward's signature by [`cache_argument`]
   (`inspect.signature`, public Python, on an argument name transformers only documents per release), and accepted
   under both names, or positionally, by [`pop_cache_argument`]. Gone when lorafleet requires transformers >= 5.24:
   then the name is always `cache`.
3. The refusal `from_pretrained(..., attn_implementation="sdpa")` raises for a model class without SDPA support (its
   private `_supports_sdpa` flag is False: `Gemma2ForCausalLM` since 5.24, because SDPA cannot soft-cap attention
   logits): a `ValueError` whose message names `scaled_dot_product_attention`, raised while the model is constructed,
   before any weight is read. Recognized by [`refuses_sdpa`], so that model building can ask for SDPA and fall back to
   eager attention on exactly this refusal: a hub model's class is only known once transformers resolves it, which
   is why the flag is not read beforehand. Gone when transformers offers a public way to ask a config (or model
   class) which attention implementations it supports, or falls back by itself when asked for `sdpa`.
4. The causal LM forward's `logits_to_keep` argument given a 2-D *boolean* `[batch, seq]` tensor: the forward
   applies the LM head (and the family's own logit post-processing, gemma2's soft-cap) only to the `True` positions
   and returns logits flattened to `[num_true, vocab]` in row-major order (`hidden_states[mask]`, in
   `transformers.modeling_utils.slice_logits_to_keep`, which each family's forward calls; read in the source of 5.23.0
   and 5.24.0, where all six families call it; only documented in that helper's docstring). Used by
   [`logits_at`] so the unfused loss computes logits only for positions that have a label, through the model's own
   head. [`takes_logits_to_keep`] reads the argument from the forward's signature; a model without it gets full
   logits. Gone when the boolean form is documented on the causal LM forward itself.
5. `PreTrainedModel.save_pretrained` writes weight files only where the model's `should_save_on_this_rank(
   is_main_process)` is true, which since 5.24 (`transformers/distributed/mixin.py`) also requires global rank 0
   whenever `torch.distributed` is initialized, whatever `is_main_process` says; other ranks get a folder without
   weights and no error. [`save_model`] shadows that method on the one instance for the call, so a worker at any rank
   can write a whole model (a node without the driver's folder materializes the base itself). Gone when
   `save_pretrained` lets the caller decide which process writes.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Union

import torch
from torch import nn

from lorafleet.compat.accelerate import unwrap_without_deepspeed

# What the fused attention forward calls from the family's modeling module (item 1).
FAMILY_FUNCTIONS = ("apply_rotary_pos_emb", "ALL_ATTENTION_FUNCTIONS", "eager_attention_forward")


def _modeling_module(attention: nn.Module):
    return sys.modules[type(attention).__module__]


def missing_attention_functions(attention: nn.Module) -> list[str]:
    """The [`FAMILY_FUNCTIONS`] the attention module's modeling module lacks (empty when the fused forward can run).

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM
    >>> from lorafleet.model.families import family_config
    >>> cfg = family_config("llama", 32, {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
    ...                                   "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16})
    >>> missing_attention_functions(AutoModelForCausalLM.from_config(cfg).model.layers[0].self_attn)
    []
    ```
    """
    module = _modeling_module(attention)
    return [name for name in FAMILY_FUNCTIONS if not hasattr(module, name)]


def apply_rotary_pos_emb(attention: nn.Module, query, key, cos, sin) -> tuple[Any, Any]:
    """Rotate `query` and `key` as `attention`'s own forward does (its family's `apply_rotary_pos_emb`).

    Returns:
        `tuple`: The rotated query and key.
    """
    return _modeling_module(attention).apply_rotary_pos_emb(query, key, cos, sin)


def attention_interface(attention: nn.Module) -> Callable:
    """The attention function `attention`'s own forward would call now (per `config._attn_implementation`).

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM
    >>> from lorafleet.model.families import family_config
    >>> cfg = family_config("llama", 32, {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
    ...                                   "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16})
    >>> model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    >>> attention_interface(model.model.layers[0].self_attn).__name__
    'eager_attention_forward'
    ```
    """
    module = _modeling_module(attention)
    return module.ALL_ATTENTION_FUNCTIONS.get_interface(
        attention.config._attn_implementation, module.eager_attention_forward
    )


def cache_argument(model: nn.Module) -> str:
    """The forward argument (and output field) that carries the KV cache: `cache` since transformers 5.24,
    `past_key_values` before (item 2).

    Args:
        model (`nn.Module`): A transformers causal LM, or a PEFT model around one.

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM
    >>> from lorafleet.model.families import family_config
    >>> cfg = family_config("llama", 32, {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
    ...                                   "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16})
    >>> import torch
    >>> model = AutoModelForCausalLM.from_config(cfg)
    >>> out = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    >>> type(getattr(out, cache_argument(model))).__name__
    'DynamicCache'
    ```
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def pop_cache_argument(args: tuple, kwargs: dict[str, Any]) -> Any:
    """The KV cache an attention module's forward was called with (item 2), removed from `kwargs`.

    The cache is the attention forward's 4th argument (after `hidden_states`, `position_embeddings`,
    `attention_mask`): `args[0]` when the extra arguments are positional, else the `cache` or `past_key_values`
    keyword. Both keywords are removed so that neither reaches the attention function with the rest of `kwargs`.

    Example:

    ```python
    >>> kwargs = {"past_key_values": "kv", "position_ids": None}
    >>> pop_cache_argument((), kwargs), kwargs
    ('kv', {'position_ids': None})
    ```
    """
    return args[0] if args else kwargs.pop("cache", kwargs.pop("past_key_values", None))


def refuses_sdpa(error: BaseException) -> bool:
    """Whether `error` is transformers refusing `attn_implementation="sdpa"` for a model class that has no SDPA
    attention (item 3), rather than any other failure of `from_pretrained`.

    Args:
        error (`BaseException`): What `from_pretrained` / `from_config` raised.

    Returns:
        `bool`: True for the SDPA refusal only.

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM
    >>> from lorafleet.model.families import family_config
    >>> cfg = family_config("gemma2", 64, {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
    ...                                    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16})
    >>> try:
    ...     AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    ... except ValueError as error:
    ...     print(refuses_sdpa(error))
    True
    >>> refuses_sdpa(ValueError("bnb_4bit_quant_type must be nf4 or fp4"))
    False
    ```
    """
    return isinstance(error, ValueError) and "scaled_dot_product_attention" in str(error)


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether the causal LM's forward has a `logits_to_keep` argument (item 4).

    Args:
        model (`nn.Module`): A transformers causal LM, or a PEFT model around one.

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM
    >>> from lorafleet.model.families import family_config
    >>> cfg = family_config("llama", 32, {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
    ...                                   "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16})
    >>> takes_logits_to_keep(AutoModelForCausalLM.from_config(cfg)), takes_logits_to_keep(torch.nn.Linear(2, 2))
    (True, False)
    ```
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(type(base).forward).parameters


def logits_at(model: nn.Module, keep: torch.Tensor, **inputs: Any) -> torch.Tensor:
    """The model's own logits at the `True` positions of `keep` only, `[keep.sum(), vocab]` (item 4).

    Calls `model(**inputs, logits_to_keep=keep)`, so the head runs as the model's forward runs it (LoRA or
    `modules_to_save` on the head, bias, tied weights, soft-capping), on the kept rows alone.

    Args:
        model (`nn.Module`): A causal LM whose forward [`takes_logits_to_keep`], or a PEFT model around one.
        keep (`torch.BoolTensor`): `[batch, seq]`, True where a logit is needed.
        inputs: The forward's other arguments (`input_ids`, `attention_mask`, ...).

    Returns:
        `torch.Tensor`: Logits of the kept positions, row-major (`logits[keep]` of the full `[batch, seq, vocab]`).

    Raises:
        `RuntimeError`: When the forward did not return one row per kept position (transformers changed item 4).

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM
    >>> from lorafleet.model.families import family_config
    >>> cfg = family_config("llama", 32, {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
    ...                                   "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16})
    >>> model = AutoModelForCausalLM.from_config(cfg)
    >>> ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    >>> keep = torch.tensor([[False, True, True, False], [False, False, True, False]])
    >>> logits = logits_at(model, keep, input_ids=ids)
    >>> logits.shape, torch.allclose(logits, model(input_ids=ids).logits[keep], atol=1e-6)
    (torch.Size([3, 32]), True)
    ```
    """
    if keep.dtype != torch.bool or keep.dim() != 2:
        raise ValueError(f"keep must be a 2-D bool tensor, got {keep.dtype} of shape {tuple(keep.shape)}")
    logits = model(**inputs, logits_to_keep=keep).logits
    if logits.dim() != 2 or logits.shape[0] != int(keep.sum()):
        raise RuntimeError(
            f"{type(model).__name__} returned logits of shape {tuple(logits.shape)} for a boolean logits_to_keep "
            f"keeping {int(keep.sum())} positions (lorafleet.compat.transformers item 4, checked 5.23.0-5.24.0)"
        )
    return logits


def save_model(model: nn.Module, folder: Union[str, Path]) -> None:
    """`model.save_pretrained(folder)`, weights included, from whichever process calls it (item 5: transformers
    otherwise writes them only at global rank 0 of an initialized process group).

    Args:
        model (`transformers.PreTrainedModel`): The model to save.
        folder (`str` or `Path`): The directory to write.

    Example:

    ```python
    >>> import tempfile
    >>> from pathlib import Path
    >>> from transformers import AutoModelForCausalLM
    >>> from lorafleet.model.families import family_config
    >>> cfg = family_config("llama", 32, {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
    ...                                   "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16})
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     save_model(AutoModelForCausalLM.from_config(cfg), folder)
    ...     sorted(p.name for p in Path(folder).glob("*.safetensors"))
    ['model.safetensors']
    ```
    """
    # An instance attribute shadows the method for this call only; the model's class is left as it is.
    model.__dict__["should_save_on_this_rank"] = lambda is_main_process: is_main_process
    try:
        with unwrap_without_deepspeed():
            model.save_pretrained(folder)
    finally:
        del model.__dict__["should_save_on_this_rank"]
