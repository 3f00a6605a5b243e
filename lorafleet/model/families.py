"""Small models of each supported family, built from a config (no download).

Each family keeps its real layout: llama/mistral use SiLU-gated MLPs, qwen2 has biased Q/K/V projections, the gemma
families use the tanh-approximated GELU gate, gemma2/gemma3 add soft-capping, sliding-window layers and Q/K norms.
What each family is (config class, its own defaults) comes from the registry in [`lorafleet.families`]; this module
adds the small common sizes.
"""

from __future__ import annotations

from typing import Any

import transformers
from transformers import PretrainedConfig

from lorafleet.families import get_family

# Small enough that a 2-worker CPU job finishes in a minute or two, large enough that every
# structural feature of the family (GQA, sliding layers, norms) is present.
_COMMON = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
)


def family_config(
    family: str, vocab_size: int, overrides: dict[str, Any] | None = None, **special_ids: int
) -> PretrainedConfig:
    """Build a small causal-LM config of one family.

    Args:
        family (`str`):
            A family of the registry, [`~lorafleet.families.FAMILIES`] (`llama`, `gemma2`, ...).
        vocab_size (`int`):
            The tokenizer's vocabulary size.
        overrides (`dict`, *optional*):
            Config fields that replace lorafleet's small defaults (e.g. `{"num_hidden_layers": 8}`).
        special_ids (`int`):
            `bos_token_id`, `eos_token_id`, `pad_token_id` of the tokenizer.

    Returns:
        [`~transformers.PretrainedConfig`]: A config whose `AutoModelForCausalLM.from_config` is the family's model.

    Example:

    ```python
    >>> cfg = family_config("qwen2", vocab_size=1000, overrides={"num_hidden_layers": 2})
    >>> cfg.model_type, cfg.num_hidden_layers, cfg.hidden_act
    ('qwen2', 2, 'silu')
    ```
    """
    entry = get_family(family)
    values = {**_COMMON, **entry.config, **special_ids, **(overrides or {})}
    values["vocab_size"] = vocab_size
    return getattr(transformers, entry.config_class)(**values)
