"""The held-out loss (lorafleet.train.evaluate): equal to a plain single-process PEFT computation on the same adapter,
the same split over any number of ranks, and leaving training's RNG and mode as they were; generation scores
(`eval.generate`) of greedy answers with the job's template."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.cli import TEST_JOB
from helpers.models import TARGETS, tiny_alora
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lorafleet.constants import IGNORE_INDEX
from lorafleet.data.batching import collate
from lorafleet.data.dataset import TrainingData
from lorafleet.data.tokenizer import load_tokenizer
from lorafleet.model.families import family_config
from lorafleet.spec import load_spec
from lorafleet.train.evaluate import EvalResult, evaluate_loss, generation_metrics
from lorafleet.train.loss import LossModule

CPU = torch.device("cpu")
INVOCATION = [7, 8, 9]


def samples_for(seed: int, count: int = 7, vocab: int = 2048, invocation=None) -> list[dict]:
    """Samples of varied length whose first half is prompt (-100 labels); with `invocation`, it ends the prompt."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        n = int(torch.randint(6, 20, (1,), generator=gen))
        ids = torch.randint(10, vocab, (n,), generator=gen).tolist()
        prompt = n // 2
        if invocation is not None:
            ids[prompt - len(invocation) : prompt] = invocation
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        sample = {"input_ids": ids, "labels": labels}
        if invocation is not None:
            sample["alora_start"] = prompt - len(invocation)
        out.append(sample)
    return out


def plain_peft_loss(model, samples) -> float:
    """Sum of per-token cross-entropies over every target / number of targets, one unpadded sample at a time,
    straight from the PEFT model's logits (PEFT finds the aLoRA invocation itself)."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for s in samples:
            logits = model(input_ids=torch.tensor([s["input_ids"]])).logits[0, :-1].double()
            targets = torch.tensor(s["labels"][1:])
            keep = targets != IGNORE_INDEX
            total += float(torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("invocation", [None, INVOCATION], ids=["lora", "alora"])
def test_eval_loss_is_plain_peft_token_mean(fused, invocation):
    model = tiny_alora(invocation, seed=3)
    samples = samples_for(0, invocation=invocation)
    expected = plain_peft_loss(model, samples)
    model.train()
    result = evaluate_loss(LossModule(model, fused_loss=fused), samples, 0, device=CPU, micro_batch_size=3)
    assert result.samples == len(samples)
    assert result.tokens == sum(sum(1 for label in s["labels"][1:] if label != IGNORE_INDEX) for s in samples)
    assert result.loss == pytest.approx(expected, rel=1e-5)


class CountingModule(torch.nn.Module):
    """A loss module that counts its forward calls (what ZeRO-3 needs equal on every rank)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, **batch):
        self.calls += 1
        return self.inner(**batch)


def test_ranks_share_the_set_and_make_equal_forward_calls():
    model = tiny_alora(None, seed=3)
    samples = samples_for(1, count=7)
    single = evaluate_loss(LossModule(model, fused_loss=False), samples, 0, device=CPU, micro_batch_size=2)
    world, parts, calls = 3, [], []
    for rank in range(world):
        module = CountingModule(LossModule(model, fused_loss=False))
        # No process group here: each rank's share alone; summing them is what the all-reduce does.
        parts.append(evaluate_loss(module, samples, 0, device=CPU, micro_batch_size=2, rank=rank, world_size=world,
                                   all_reduce=lambda values: values))
        calls.append(module.calls)
    assert calls == [2, 2, 2]  # 3, 2 and 2 samples: rank 1 and 2 pad their second call with a dummy batch
    assert [p.samples for p in parts] == [3, 2, 2]
    total = EvalResult(sum(p.loss_sum for p in parts), sum(p.tokens for p in parts), sum(p.samples for p in parts))
    assert total.tokens == single.tokens and total.samples == single.samples
    assert total.loss == pytest.approx(single.loss, rel=1e-6)


def test_max_samples_takes_the_first_ones():
    model = tiny_alora(None, seed=3)
    samples = samples_for(2, count=6)
    capped = evaluate_loss(LossModule(model, fused_loss=False), samples, 0, device=CPU, micro_batch_size=4,
                           max_samples=4)
    first = evaluate_loss(LossModule(model, fused_loss=False), samples[:4], 0, device=CPU, micro_batch_size=4)
    assert (capped.samples, capped.tokens, capped.loss_sum) == (4, first.tokens, first.loss_sum)


def test_training_mode_rng_and_gradients_are_left_alone():
    model = tiny_alora(None, seed=3, lora_dropout=0.5)
    module = LossModule(model, fused_loss=False)
    module.train()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = evaluate_loss(module, samples_for(3), 0, device=CPU, micro_batch_size=2)
    assert torch.equal(torch.get_rng_state(), before)
    assert module.training and model.training
    assert all(p.grad is None for p in model.parameters())
    # Dropout is off while evaluating, so the loss is the same every time.
    assert evaluate_loss(module, samples_for(3), 0, device=CPU, micro_batch_size=2).loss_sum == first.loss_sum
    module.eval()
    evaluate_loss(module, samples_for(3), 0, device=CPU, micro_batch_size=2)
    assert not module.training


def test_several_ranks_need_a_reduction():
    with pytest.raises(ValueError, match="all_reduce"):
        evaluate_loss(torch.nn.Identity(), [], 0, device=CPU, micro_batch_size=1, rank=0, world_size=2)


def test_generation_metrics_score_greedy_answers_with_the_jobs_template(tmp_path):
    # Two records memorized by a tiny LoRA model: from none right (the base) to both right, scored as the run does.
    records = [{"instruction": "Say sun 2 times.", "output": "sun sun"},
               {"instruction": "Spell the word king with dashes.", "output": "k-i-n-g"}]
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = load_spec(TEST_JOB, [f"data.path={path}", f"data.eval_path={path}", "data.packing=false",
                                           "eval.generate.max_new_tokens=8", "eval.generate.num_samples=2"])
    tokenizer = load_tokenizer()
    data = TrainingData.from_spec(spec, tokenizer)
    assert data.eval_records == records
    torch.manual_seed(0)
    config = family_config("llama", len(tokenizer), {"hidden_size": 64, "intermediate_size": 128,
                           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2})
    model = get_peft_model(AutoModelForCausalLM.from_config(config),
                           LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    assert generation_metrics(model, tokenizer, records, spec, prefix="base_") == {
        "base_exact_match": 0.0, "base_contains": 0.0}
    module = LossModule(model, fused_loss=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = collate(data.samples, tokenizer.pad_token_id)
    for _ in range(60):
        loss, count = module(**batch)
        (loss / count).backward()
        optimizer.step()
        optimizer.zero_grad()
    rng = torch.get_rng_state()
    assert generation_metrics(model, tokenizer, records, spec) == {"eval_exact_match": 1.0, "eval_contains": 1.0}
    assert model.training and torch.equal(torch.get_rng_state(), rng)  # training goes on as if nothing happened
    only = load_spec(TEST_JOB, [f"data.eval_path={path}", "eval.generate.metrics=[contains]"])
    assert generation_metrics(model, tokenizer, records[:1], only) == {"eval_contains": 1.0}
    assert generation_metrics(model, tokenizer, records, load_spec(TEST_JOB, [f"data.eval_path={path}"])) == {}
