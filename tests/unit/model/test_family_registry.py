"""The family registry is what the spec, model building and the kernels read: every family in it validates in a spec,
builds a config and a model of the classes it names, and gets every kernel path fused."""

import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lorafleet.compat.transformers import attention_interface
from lorafleet.families import FAMILY_NAMES, get_family
from lorafleet.kernels import apply_kernels, lm_loss
from lorafleet.model.build import build_model, resolve_base_model
from lorafleet.model.families import family_config
from lorafleet.spec import KernelsSpec, ModelSpec, SpecError, load_spec

from helpers.cli import TEST_JOB
from helpers.models import SMALL, TARGETS, VOCAB


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_family_builds_and_gets_every_kernel_path_fused(name):
    family = get_family(name)
    assert ModelSpec(architecture=name).architecture == name
    config = family_config(name, VOCAB, {k: v for k, v in SMALL.items() if k != "sliding_window"})
    assert type(config).__name__ == family.config_class
    assert {key: getattr(config, key) for key in family.config} == family.config
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    layers = model.model.layers
    assert {type(layer.self_attn).__name__ for layer in layers} == {family.attention_class}
    assert {type(layer.mlp).__name__ for layer in layers} == {family.mlp_class}

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS))
    plan = apply_kernels(peft_model, KernelsSpec())
    assert plan.applied == {"mlp": 2, "qkv": 2, "o": 2, "loss": 1} and plan.skipped == ()
    # The fused attention forward runs with the layout the registry gives the family.
    assert {layer.self_attn._lorafleet_layout for layer in layers} == {family.attention}
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    loss, n = lm_loss(peft_model, ids, fused=plan.fused_loss)
    loss.backward()
    assert int(n) == 10 and torch.isfinite(loss)
    assert all(p.grad is not None for p in peft_model.parameters() if p.requires_grad)


def test_spec_accepts_exactly_the_registry_families():
    with pytest.raises(SpecError, match="model.architecture"):
        load_spec(TEST_JOB, ["model.architecture=gpt2"])
    with pytest.raises(ValueError, match="unknown family 'gpt2'; known: " + ", ".join(FAMILY_NAMES)):
        family_config("gpt2", VOCAB)


def test_registry_and_spec_import_without_torch():
    code = "import sys, lorafleet.families, lorafleet.spec; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_family_loads_and_trains_the_way_a_job_does(name):
    """A job's path: the materialized model through `from_pretrained` (4-bit), LoRA and every fused path, one training
    forward and backward, with the attention transformers gives the family by default (SDPA where its model class
    has it; gemma2 refuses SDPA since transformers 5.24)."""
    spec = load_spec(TEST_JOB, [f"model.architecture={name}", "model.config.num_hidden_layers=1"])
    base = resolve_base_model(spec)
    model, plan = build_model(spec, base)
    assert plan.applied == {"mlp": 1, "qkv": 1, "o": 1, "loss": 1} and plan.skipped == ()
    default = AutoModelForCausalLM.from_pretrained(base)
    assert attention_interface(model.get_base_model().model.layers[0].self_attn) is attention_interface(
        default.model.layers[0].self_attn
    )
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    loss, n = lm_loss(model, ids, fused=plan.fused_loss)
    loss.backward()
    assert int(n) == 10 and torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
