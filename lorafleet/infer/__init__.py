"""Using a trained adapter: load it and generate, reusing the base model's KV cache for aLoRA (`generate`); merge it into the base (`merge`)."""
