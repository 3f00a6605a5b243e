"""Small models of each supported family, built from a config (no download).

Each family keeps its real layout: llama/mistral use SiLU-gated MLPs, qwen2 has biased Q/K/V projections, the gemma
families use the tanh-approximated GELU gate, gemma2/gemma3 add soft-capping, sliding-window layers and Q/K norms.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

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


_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(hidden_act="silu", tie_word_embeddings=False),
    "mistral": dict(hidden_act="silu", tie_word_embeddings=False, sliding_window=1024),
    "qwen2": dict(hidden_act="silu", tie_word_embeddings=False),
    "gemma": dict(hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True),
    "gemma2": dict(
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        query_pre_attn_scalar=64,
        sliding_window=64,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
    ),
    "gemma3": dict(
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        query_pre_attn_scalar=64,
        sliding_window=64,
        sliding_window_pattern=2,
    ),
}


def _config_class(family: str) -> type[PretrainedConfig]:
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GemmaConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

    return {
        "llama": LlamaConfig,
        "mistral": MistralConfig,
        "qwen2": Qwen2Config,
        "gemma": GemmaConfig,
        "gemma2": Gemma2Config,
        "gemma3": Gemma3TextConfig,
    }[family]


def family_config(family: str, vocab_size: int, overrides: dict[str, Any] | None = None, **special_ids: int) -> PretrainedConfig:
    """Build a small causal-LM config of one family.

    Args:
        family (`str`):
            One of `llama`, `mistral`, `qwen2`, `gemma`, `gemma2`, `gemma3`.
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
    if family not in _FAMILY_DEFAULTS:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(_FAMILY_DEFAULTS)}")
    values = {**_COMMON, **_FAMILY_DEFAULTS[family], **special_ids, **(overrides or {})}
    values["vocab_size"] = vocab_size
    return _config_class(family)(**values)

