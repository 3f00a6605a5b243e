"""The model families lorafleet knows: one registry that the spec, model building and the kernels all read.

Each [`Family`] names its transformers classes and the facts the fused attention forward needs about its layout.
This module is pure data (no torch, no transformers), so the spec can validate `model.architecture` against it
without importing either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class AttentionLayout:
    """How a family's attention forward differs from Llama's.

    Attributes:
        qk_norm (`bool`): Q and K pass through `q_norm` / `k_norm` before rotary (gemma3).
        sliding_window (`str`): `none` (not passed), `config` (`config.sliding_window`, mistral) or `attr`
            (`self.sliding_window`, qwen2/gemma2/gemma3).
        softcap (`bool`): Pass `softcap=self.attn_logit_softcapping` (gemma2).
    """

    qk_norm: bool = False
    sliding_window: Literal["none", "config", "attr"] = "none"
    softcap: bool = False


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        name (`str`): The `model.architecture` value (`llama`, ...).
        config_class (`str`): The transformers config class a small model of the family is built from.
        config (`dict`): The family's own config defaults (activation, tied embeddings, sliding window, soft-caps),
            applied over lorafleet's small common sizes.
        attention_class (`str`): The transformers attention module class of its decoder layers.
        attention (`AttentionLayout`): What the fused attention forward must do differently for it.
        mlp_class (`str`): The transformers MLP module class; its forward is `down(act(gate(x)) * up(x))`.
    """

    name: str
    config_class: str
    attention_class: str
    mlp_class: str
    attention: AttentionLayout = AttentionLayout()
    config: dict[str, Any] = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            name="llama",
            config_class="LlamaConfig",
            attention_class="LlamaAttention",
            mlp_class="LlamaMLP",
            config=dict(hidden_act="silu", tie_word_embeddings=False),
        ),
        Family(
            name="mistral",
            config_class="MistralConfig",
            attention_class="MistralAttention",
            mlp_class="MistralMLP",
            attention=AttentionLayout(sliding_window="config"),
            config=dict(hidden_act="silu", tie_word_embeddings=False, sliding_window=1024),
        ),
        Family(
            name="qwen2",
            config_class="Qwen2Config",
            attention_class="Qwen2Attention",
            mlp_class="Qwen2MLP",
            attention=AttentionLayout(sliding_window="attr"),
            config=dict(hidden_act="silu", tie_word_embeddings=False),
        ),
        Family(
            name="gemma",
            config_class="GemmaConfig",
            attention_class="GemmaAttention",
            mlp_class="GemmaMLP",
            config=dict(hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True),
        ),
        Family(
            name="gemma2",
            config_class="Gemma2Config",
            attention_class="Gemma2Attention",
            mlp_class="Gemma2MLP",
            attention=AttentionLayout(sliding_window="attr", softcap=True),
            config=dict(
                hidden_activation="gelu_pytorch_tanh",
                tie_word_embeddings=True,
                query_pre_attn_scalar=64,
                sliding_window=64,
                final_logit_softcapping=30.0,
                attn_logit_softcapping=50.0,
            ),
        ),
        Family(
            name="gemma3",
            config_class="Gemma3TextConfig",
            attention_class="Gemma3Attention",
            mlp_class="Gemma3MLP",
            attention=AttentionLayout(qk_norm=True, sliding_window="attr"),
            config=dict(
                hidden_activation="gelu_pytorch_tanh",
                tie_word_embeddings=True,
                query_pre_attn_scalar=64,
                sliding_window=64,
                sliding_window_pattern=2,
            ),
        ),
    )
}

FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)


def get_family(name: str) -> Family:
    """The registered family called `name`.

    Args:
        name (`str`): A `model.architecture` value.

    Returns:
        [`Family`]: Its entry.

    Raises:
        `ValueError`: For a name that is not registered, listing the known ones.

    Example:

    ```python
    >>> get_family("gemma2").attention
    AttentionLayout(qk_norm=False, sliding_window='attr', softcap=True)

    ```
    """
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; known: {', '.join(FAMILY_NAMES)}")
    return FAMILIES[name]
