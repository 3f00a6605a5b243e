"""The plain loss path computes logits only where a label exists, and that changes no loss and no LoRA gradient.

The reference is what `lm_loss(fused=False)` did before: the causal LM's forward with logits for every position,
then cross-entropy with `ignore_index`. Batches have a prompt/response split (prompt labels -100) and padding. A
forward hook on the LM head module counts the rows it is given, so reverting to full logits fails these tests.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lorafleet.constants import IGNORE_INDEX
from lorafleet.data.batching import collate, pack_samples
from lorafleet.kernels.loss import label_only_refusal, lm_loss
from lorafleet.model.alora import activation
from lorafleet.model.families import family_config
from lorafleet.train.loss import LossModule

from helpers.models import FAMILIES, TARGETS, VOCAB, load_peft, tiny_alora

INV = [8, 9]


def split_batch(seed=3):
    """Three rows of 12 tokens: prompts of different lengths (labels -100), right padding on two rows."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 6:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    for row, prompt in enumerate((5, 2, 4)):
        labels[row, :prompt] = IGNORE_INDEX
    return ids, mask, labels


def full_logits_loss(model, ids, labels, **inputs):
    logits = model(input_ids=ids, use_cache=False, **inputs).logits[:, :-1]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


@contextlib.contextmanager
def head_rows(causal_lm):
    """Rows of every input the LM head module is called on, in call order."""
    rows = []
    handle = causal_lm.get_output_embeddings().register_forward_hook(
        lambda module, args, out: rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0])
    )
    try:
        yield rows
    finally:
        handle.remove()


def loss_and_grads(model, compute):
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g.abs().sum() > 0 for k, g in grads.items() if "lora_B" in k)
    return loss.detach(), grads


def assert_same(got, want):
    (loss, grads), (ref_loss, ref_grads) = got, want
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for k in ref_grads:
        # The head's matmul over fewer rows sums in another order: measured up to 1.7e-7 apart (rel 7e-5, on a
        # near-zero element) on an AVX-512 BF16 CPU, where a CI run failed at atol 1e-7.
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("head", ["frozen", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_label_only_equals_full_logits(saved_models, family, head):
    targets = TARGETS + (["lm_head"] if head == "lora" else [])
    model = load_peft(saved_models[family], "none", torch.float32, targets=targets)
    causal_lm = model.get_base_model()
    if getattr(causal_lm.config, "final_logit_softcapping", None) is not None:
        causal_lm.config.final_logit_softcapping = 2.0  # so the soft-cap bends these tiny logits
    assert label_only_refusal(model) is None
    if head == "lora":
        assert any("lm_head.lora_A" in k for k, p in model.named_parameters() if p.requires_grad)
    ids, mask, labels = split_batch()
    n_targets = int((labels[:, 1:] != IGNORE_INDEX).sum())

    with head_rows(causal_lm) as rows:
        got = loss_and_grads(model, lambda: lm_loss(model, ids, attention_mask=mask, labels=labels, fused=False)[0])
    assert rows == [n_targets] and n_targets < ids.numel() // 2
    want = loss_and_grads(model, lambda: full_logits_loss(model, ids, labels, attention_mask=mask))
    assert_same(got, want)


def test_head_sees_only_target_rows_and_n_is_unchanged():
    cfg = family_config("llama", 64, {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                      "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    ids = torch.randint(0, 64, (2, 10))
    labels = ids.clone()
    labels[:, :7] = IGNORE_INDEX  # 70% prompt: 3 targets per row
    with head_rows(model) as rows:
        loss, n = lm_loss(model, ids, labels=labels, fused=False)
    assert int(n) == 6 and rows == [6]
    with head_rows(model) as rows:
        ref = full_logits_loss(model, ids, labels)
    assert rows == [20]
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)


def test_no_target_in_the_batch_gives_zero_loss_and_zero_grads():
    model = tiny_alora(None).train()
    ids = torch.randint(0, 2048, (2, 6))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 0] = ids[:, 0]  # no position predicts the first token: still no target after the shift
    with head_rows(model.get_base_model()) as rows:
        loss, n = lm_loss(model, ids, labels=labels, fused=False)
    assert int(n) == 0 and loss.item() == 0.0 and rows == [0]
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() == 0 for g in grads)


def alora_samples():
    # Prompt, invocation, response: the loss is on the response only, the adapter is active from the invocation on.
    a = [1, 20, 30, 40, *INV, 50, 60, 70]
    b = [1, 21, *INV, 51, 61]
    c = [1, 22, 23, 24, 25, 26, *INV, 52]
    return [
        {"input_ids": s, "labels": [IGNORE_INDEX] * (start + len(INV)) + s[start + len(INV):], "alora_start": start}
        for s, start in ((a, 4), (b, 2), (c, 6))
    ]


@pytest.mark.parametrize("layout", ["right", "left", "packed"])
def test_alora_label_only_equals_full_logits(layout):
    model = tiny_alora(INV).train()
    samples = alora_samples()
    if layout == "packed":
        batch = collate(pack_samples(samples, max_length=16) + pack_samples(samples[:1], max_length=16), 0)
        activation_arg = batch["alora_mask"]
    else:
        batch = collate(samples, 0, padding_side=layout)
        activation_arg = batch["alora_offsets"]
    n_targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert n_targets == 6 + (3 if layout == "packed" else 0)

    module = LossModule(model, fused_loss=False)
    with head_rows(model.get_base_model()) as rows:
        got = loss_and_grads(model, lambda: module(**batch)[0])
    assert rows == [n_targets]

    inputs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}

    def reference():
        with activation(model, activation_arg) as causal_lm:
            return full_logits_loss(causal_lm, batch["input_ids"], batch["labels"], **inputs)

    assert_same(got, loss_and_grads(model, reference))


def test_alora_on_the_head_keeps_full_logits():
    cfg = family_config("llama", 128, {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16})
    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False, task_type="CAUSAL_LM",
                        alora_invocation_tokens=INV)
    model = get_peft_model(AutoModelForCausalLM.from_config(cfg), config).train()
    assert "aLoRA" in label_only_refusal(model)
    batch = collate(alora_samples(), 0)
    with head_rows(model.get_base_model()) as rows:
        got = loss_and_grads(model, lambda: LossModule(model, fused_loss=False)(**batch)[0])
    assert rows == [batch["input_ids"].numel()]

    def reference():
        with activation(model, batch["alora_offsets"]) as causal_lm:
            return full_logits_loss(causal_lm, batch["input_ids"], batch["labels"],
                                    attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])

    assert_same(got, loss_and_grads(model, reference))
