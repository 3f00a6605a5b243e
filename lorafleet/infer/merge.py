"""Inference with trained adapters: load one, generate, and run an aLoRA adapter on the base model's KV cache.

An aLoRA adapter leaves every token before its invocation exactly as the base model computes it, so a conversation
the base model has already prefilled does not need to be recomputed when the adapter is invoked: only the
invocation and the tokens after it go through the model ([`continue_with_adapter`]). A plain LoRA adapter changes
every token, so the same call recomputes the whole sequence. The output is the same as one adapter forward over
the whole sequence either way; only the work differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lorafleet.infer.generate import adapter_config, load_adapter


class MergeRefused(ValueError):
    """The adapter cannot be merged into the base weights (aLoRA adapters act on part of the sequence only)."""


def merge_adapter(uri: str, out_dir: str, endpoint: Optional[str] = None) -> Path:
    """Merge a plain LoRA adapter into its base model and save the merged model (refused for aLoRA adapters).

    Args:
        uri (`str`): Adapter directory or storage URI.
        out_dir (`str`): Where the merged model and tokenizer are saved.

    Returns:
        `Path`: `out_dir`.

    Raises:
        [`MergeRefused`]: For an aLoRA adapter: its update applies only from the invocation onward, which no change
        of the base weights can express.
    """
    config = adapter_config(uri, endpoint)
    if config.get("alora_invocation_tokens"):
        raise MergeRefused(
            f"{uri} is an aLoRA adapter: it acts only on tokens from its invocation onward, so it cannot be merged into "
            "the base weights; load it with PeftModel.from_pretrained or use `lorafleet generate`"
        )
    model, tokenizer = load_adapter(uri, dtype="float32", endpoint=endpoint)
    merged = model.merge_and_unload()
    out = Path(out_dir)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out

