"""Tiny models for the kernel, aLoRA and generation tests: random-init members of every supported family, PEFT
LoRA on top of them, and a tiny aLoRA adapter. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from lorafleet.compat.bitsandbytes import disable_cpu_repack
from lorafleet.families import FAMILY_NAMES
from lorafleet.model.families import family_config

FAMILIES = list(FAMILY_NAMES)  # the registry's families: every test parametrized over families covers each one
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 256
# Dimensions are multiples of 64 (bitsandbytes' quantization block); 2 layers so gemma2/3 have a sliding and a
# global layer.
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=32, sliding_window=4)


def save_family_models(root: Path) -> dict[str, Path]:
    """One random-init [`SMALL`] model per family in [`FAMILIES`], saved under `root/<family>`; family -> path."""
    paths = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        overrides = dict(SMALL)
        if family == "llama":
            overrides.pop("sliding_window")
        model = AutoModelForCausalLM.from_config(family_config(family, VOCAB, overrides))
        model.save_pretrained(root / family)
        paths[family] = root / family
    return paths


def fix_bnb(model):
    # STACK-NOTES: avoid the in-place AVX512-BF16 repack of Linear4bit weights in eval mode.
    disable_cpu_repack(model)
    model.train()


def load_peft(path, quant, dtype, dropout=0.0, seed=1, targets=TARGETS, **lora_kwargs):
    """A saved model under PEFT LoRA (r=4) on `targets`, base quantized with `quant` ("nf4", "fp4" or "none");
    lora_B is drawn non-zero (seeded), otherwise A's gradients are zero and comparisons are weak."""
    kwargs = {}
    if quant != "none":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_compute_dtype=dtype
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu", **kwargs)
    fix_bnb(model)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets, **lora_kwargs)
    model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.train()
    return model


def tiny_alora(invocation, seed=0, vocab=2048, **lora):
    """A random-init 2-layer llama under a PEFT aLoRA adapter (non-zero init) invoked by `invocation` (token ids;
    None for plain LoRA), in eval mode."""
    cfg = family_config(
        "llama", vocab, {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                         "num_key_value_heads": 1, "head_dim": 16},
    )
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(cfg)
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM",
                        alora_invocation_tokens=invocation, **lora)
    return get_peft_model(base, config).eval()
