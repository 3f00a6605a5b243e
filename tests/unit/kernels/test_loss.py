"""The chunked LM head + cross-entropy against full-logits cross-entropy, and `lm_loss` on both paths."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from lorafleet.model.families import family_config
from lorafleet.kernels.loss import chunked_lm_head_loss, lm_loss


def reference(h, w, t, bias=None, softcap=None):
    logits = F.linear(h, w, bias).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, t, reduction="sum")


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("chunk_rows", [1, 7, 64])
def test_chunked_matches_full_logits_fp32(softcap, chunk_rows):
    gen = torch.Generator().manual_seed(0)
    h = (torch.randn(23, 16, generator=gen) * 2).requires_grad_()
    w = torch.randn(101, 16, generator=gen)  # odd vocabulary on purpose
    b = torch.randn(101, generator=gen)
    t = torch.randint(0, 101, (23,), generator=gen)
    want = reference(h, w, t, b, softcap)
    (g_want,) = torch.autograd.grad(want * 0.5, h)
    got = chunked_lm_head_loss(h, w, t, bias=b, softcap=softcap, chunk_rows=chunk_rows)
    (g_got,) = torch.autograd.grad(got * 0.5, h)  # a non-unit upstream gradient is applied in backward
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)


def test_chunked_bf16_close_to_fp32_truth():
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(40, 32, generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(300, 32, generator=gen) * 0.3).bfloat16()
    t = torch.randint(0, 300, (40,), generator=gen)
    got = chunked_lm_head_loss(h, w, t, softcap=30.0, chunk_rows=16)
    (g_got,) = torch.autograd.grad(got, h)
    h32 = h.detach().float().requires_grad_()
    want = reference(h32, w.float(), t, softcap=30.0)
    (g_want,) = torch.autograd.grad(want, h32)
    # bf16 logits (8-bit mantissa) then fp32 log-softmax: ~1e-3 relative on the loss; bf16 gradient rows.
    assert abs(got - want) / want < 2e-3
    assert ((g_got.float() - g_want).norm() / g_want.norm()) < 1e-2


def test_no_grad_and_empty_targets():
    h = torch.randn(0, 8, requires_grad=True)
    loss = chunked_lm_head_loss(h, torch.randn(10, 8), torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    with torch.no_grad():
        value = chunked_lm_head_loss(torch.randn(3, 8), torch.randn(10, 8), torch.tensor([1, 2, 3]))
    assert value.requires_grad is False and value.item() > 0


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_lm_loss_fused_equals_plain(family):
    cfg = family_config(family, 97, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.get_output_embeddings().requires_grad_(False)
    if family == "gemma2":
        assert model.config.final_logit_softcapping == 30.0 and model.config.tie_word_embeddings
    ids = torch.randint(0, 97, (3, 10))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    plain, n_plain = lm_loss(model, ids, attention_mask=mask, fused=False)
    g_plain = torch.autograd.grad(plain, [p for p in model.parameters() if p.requires_grad])
    fused, n_fused = lm_loss(model, ids, attention_mask=mask, fused=True, chunk_rows=5)
    g_fused = torch.autograd.grad(fused, [p for p in model.parameters() if p.requires_grad])
    # labels default to input_ids with padding ignored: 3 rows x 9 shifted targets, minus 3 padded ones
    assert int(n_plain) == int(n_fused) == 24
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=0)
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
