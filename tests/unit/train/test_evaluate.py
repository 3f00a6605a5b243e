"""The held-out loss (lorafleet.train.evaluate): equal to a plain single-process PEFT computation on the same adapter,
the same split over any number of ranks, and leaving training's RNG and mode as they were."""

from __future__ import annotations

import pytest
import torch
from helpers.models import tiny_alora

from lorafleet.constants import IGNORE_INDEX
from lorafleet.train.evaluate import EvalResult, evaluate_loss
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
