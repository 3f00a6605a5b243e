"""The trainable model: device and dtype policy (`device`), small family configs (`families`), 4-bit base + PEFT LoRA (`build`), aLoRA activation (`alora`)."""
