"""A short AdamW run with the kernels on and off, from the same seed: the loss curves must agree."""

import torch

from lorafleet.kernels import apply_kernels, lm_loss
from lorafleet.spec import KernelsSpec

from helpers.models import load_peft


def _curve(path, fused, steps=10):
    model = load_peft(path, "nf4", torch.float32, dropout=0.1)
    if fused:
        assert apply_kernels(model, KernelsSpec()).applied == {"mlp": 2, "qkv": 2, "o": 2, "loss": 1}
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(123)
    ids = torch.randint(0, 256, (2, 12), generator=gen)  # one batch, memorized: the loss falls steadily
    losses = []
    for _ in range(steps):
        loss, n = lm_loss(model, ids, fused=fused)
        (loss / n).backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(float(loss / n))
    return losses


def test_ten_adamw_steps_same_curve(saved_models):
    plain = _curve(saved_models["llama"], fused=False)
    fused = _curve(saved_models["llama"], fused=True)
    assert plain[-1] < plain[0] - 0.05, plain  # it trains (the comparison is not between two flat lines)
    for a, b in zip(plain, fused):
        assert abs(a - b) < 1e-4 * abs(a), (plain, fused)
