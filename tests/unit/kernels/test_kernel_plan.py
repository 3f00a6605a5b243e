"""The kernel plan decides the loss path once: a model whose LM head or layout refuses the fused loss trains one step
on the plain loss through the strategy's loss module, with the reason in the plan and in the model's report."""

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.modeling_outputs import CausalLMOutput

from lorafleet.data.batching import collate
from lorafleet.data.encode import prepare_samples
from lorafleet.kernels import KernelPlan, SkippedKernel, apply_kernels
from lorafleet.model.build import build_model, load_tokenizer_for, resolve_base_model
from lorafleet.model.families import family_config
from lorafleet.spec import KernelsSpec, load_spec
from lorafleet.train.driver import RunSummary
from lorafleet.train.strategies import make_strategy

from helpers.cli import TEST_JOB
from helpers.models import SMALL, TARGETS, VOCAB

CPU = torch.device("cpu")
SPEC = ["model.config={num_hidden_layers: 2}", "training.dtype=float32", "model.dtype=float32", "training.warmup=0"]


def small_spec(*extra):
    return load_spec(TEST_JOB, SPEC + list(extra))


def spec_batch(spec, base, n=4):
    tokenizer = load_tokenizer_for(base)
    samples = prepare_samples(spec.data, tokenizer)[:n]
    return {k: v for k, v in collate(samples, tokenizer.pad_token_id).items() if v is not None}


def train_one_step(strategy, batch):
    """One optimizer step through the strategy's (possibly DDP-wrapped) loss module; the loss and what changed."""
    before = {n: p.detach().clone() for n, p in strategy.peft_model.named_parameters() if p.requires_grad}
    loss, count = strategy.module(**batch)
    strategy.backward(loss / count)
    strategy.step()
    changed = {n for n, p in strategy.peft_model.named_parameters() if n in before and not torch.equal(p, before[n])}
    return float(loss.detach() / count), changed


def test_plan_with_every_path_fused_drives_the_fused_loss():
    spec = small_spec()
    base = resolve_base_model(spec)
    model, plan = build_model(spec, base)
    assert plan == KernelPlan({"mlp": 2, "qkv": 2, "o": 2, "loss": 1}, ())
    strategy = make_strategy(model, spec, CPU, plan)
    assert strategy.module.fused_loss is True
    loss, changed = train_one_step(strategy, spec_batch(spec, base))
    assert 0 < loss < 20 and any("lora_B" in name for name in changed)


def test_lora_on_lm_head_trains_on_the_plain_loss():
    """`lm_head` in `lora.target_modules`: the decoder paths stay fused, the loss falls back (the old code built the
    loss module from the spec's `kernels.loss` flag and raised on the first step)."""
    spec = small_spec(f"lora.target_modules=[{','.join(TARGETS)},lm_head]")
    base = resolve_base_model(spec)
    model, plan = build_model(spec, base)
    assert plan.applied == {"mlp": 2, "qkv": 2, "o": 2, "loss": 0} and plan.fused_loss is False
    assert [(s.layer, s.path) for s in plan.skipped] == [("lm_head", "loss")]
    assert "LM head is a Linear, not a plain frozen nn.Linear" in plan.skipped[0].reason
    assert plan.reasons() == [f"lm_head (loss): {plan.skipped[0].reason}"]
    assert model.lorafleet_kernel_report == plan.report()
    strategy = make_strategy(model, spec, CPU, plan)
    loss, changed = train_one_step(strategy, spec_batch(spec, base))
    assert 0 < loss < 20
    # The head's own adapter trains: the plain loss gives it a gradient (the chunked loss would not).
    assert {n for n in changed if "lm_head.lora_B" in n} == {"base_model.model.lm_head.lora_B.default.weight"}
    # The reason reaches the run's `--json` summary; a run with everything fused keeps the summary's old shape.
    summary = RunSummary(job="j", status="succeeded", kernels=dict(plan.applied), kernels_skipped=plan.reasons())
    assert summary.to_dict()["kernels_skipped"] == plan.reasons()
    assert "kernels_skipped" not in RunSummary(job="j", status="succeeded", kernels={"loss": 1}).to_dict()


class RenamedDecoderLM(nn.Module):
    """A causal LM whose decoder sits at `.backbone`, not at `.model` (as in some remote-code models)."""

    def __init__(self, causal_lm):
        super().__init__()
        self.config = causal_lm.config
        self.backbone = causal_lm.model
        self.lm_head = causal_lm.lm_head

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, **kwargs):
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return CausalLMOutput(logits=self.lm_head(out.last_hidden_state))


def test_model_without_model_decoder_trains_unfused_with_reasons():
    overrides = {k: v for k, v in SMALL.items() if k != "sliding_window"}
    torch.manual_seed(0)
    causal_lm = AutoModelForCausalLM.from_config(family_config("llama", VOCAB, overrides))
    model = get_peft_model(RenamedDecoderLM(causal_lm), LoraConfig(r=4, target_modules=TARGETS))
    plan = apply_kernels(model, KernelsSpec())
    assert plan.applied == {"mlp": 0, "qkv": 0, "o": 0, "loss": 0} and plan.fused_loss is False
    no_layers = "no decoder layers found at `.model.layers`"
    assert plan.skipped == (
        SkippedKernel("model", "mlp", no_layers),
        SkippedKernel("model", "qkv", no_layers),
        SkippedKernel("model", "o", no_layers),
        SkippedKernel("lm_head", "loss", "RenamedDecoderLM has no `.model` decoder"),
    )
    assert model.lorafleet_kernel_report["skipped"][3] == {
        "layer": "lm_head", "path": "loss", "reason": "RenamedDecoderLM has no `.model` decoder"
    }

    strategy = make_strategy(model, small_spec(), CPU, plan)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 8), generator=gen)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        logits = causal_lm.lm_head(causal_lm.model(input_ids=ids).last_hidden_state)[:, :-1]
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    loss, changed = train_one_step(strategy, batch)
    # lora_B starts at zero, so the first loss is the base model's; the step moves every lora_B.
    assert abs(loss - float(want)) < 1e-5
    assert len([n for n in changed if "lora_B" in n]) == len(TARGETS) * overrides["num_hidden_layers"]
