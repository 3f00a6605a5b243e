"""Adapter generation: aLoRA runs on the base model's KV cache and gives what a full adapter forward gives."""

import pytest
import torch

from lorafleet.infer.generate import base_prefill, continue_with_adapter, prompt_ids

from helpers.models import tiny_alora

INV = [8, 300, 9]


def _sequence(n_context=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    context = [1] + torch.randint(16, 2048, (n_context,), generator=g).tolist()
    return context, context + INV


def _full_forward_greedy(model, ids, steps):
    """Reference: the whole sequence through the adapter each step, no cache at all."""
    ids = list(ids)
    tokens, logits = [], []
    with torch.no_grad():
        for _ in range(steps):
            out = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
            logits.append(out)
            tokens.append(int(out.argmax()))
            ids.append(tokens[-1])
    return tokens, torch.stack(logits)


def test_alora_reuses_the_base_cache_and_equals_a_full_forward():
    model = tiny_alora(INV)
    context, full = _sequence()
    cache = base_prefill(model, torch.tensor([context]))
    out = continue_with_adapter(model, full, base_cache=cache, max_new_tokens=5)
    assert out.reused_tokens == len(context) and out.computed_tokens == len(INV)
    ref_tokens, ref_logits = _full_forward_greedy(model, full, 5)
    assert out.tokens == ref_tokens
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == len(context)  # the caller's cache is left as it was
    # Same tokens as PEFT's own generate (offsets computed by PEFT from the prompt).
    gen = model.generate(input_ids=torch.tensor([full]), max_new_tokens=5, do_sample=False)
    assert gen[0, len(full):].tolist() == ref_tokens


def test_cache_past_the_invocation_is_cropped_not_trusted():
    model = tiny_alora(INV)
    context, full = _sequence()
    cache = base_prefill(model, torch.tensor([full]))  # the base model also ran over the invocation: invalid there
    out = continue_with_adapter(model, full, base_cache=cache, max_new_tokens=3)
    assert out.reused_tokens == len(context)
    assert out.tokens == _full_forward_greedy(model, full, 3)[0]


def test_plain_lora_recomputes_everything():
    model = tiny_alora(None)
    context, full = _sequence()
    cache = base_prefill(model, torch.tensor([context]))
    out = continue_with_adapter(model, full, base_cache=cache, max_new_tokens=3)
    assert out.reused_tokens == 0 and out.computed_tokens == len(full)
    assert out.tokens == _full_forward_greedy(model, full, 3)[0]


def test_alora_without_invocation_is_refused():
    model = tiny_alora(INV)
    with pytest.raises(ValueError, match="invocation"):
        continue_with_adapter(model, [1, 20, 30], max_new_tokens=1)


def test_prompt_ids_append_the_invocation_only_when_missing():
    from lorafleet.data.tokenizer import load_tokenizer

    tok = load_tokenizer()
    ids, appended = prompt_ids(tok, "<|user|>cat 7<|end|>", [8, 9])
    assert appended and ids[0] == tok.bos_token_id and ids[-2:] == [8, 9]
    ids, appended = prompt_ids(tok, "<|user|>cat<|end|><|reserved_0|><|reserved_1|>", [8, 9])
    assert not appended and ids[-2:] == [8, 9]
