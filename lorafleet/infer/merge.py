"""Merging a plain LoRA adapter into its base model (refused for aLoRA adapters)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lorafleet.compat.transformers import save_model
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
    save_model(merged, out)
    tokenizer.save_pretrained(out)
    return out

