"""Fused LoRA paths against PEFT's own layers, for every family, NF4 / FP4 / unquantized base, fp32 and bf16.

Each case loads a tiny saved model of the family, wraps it with PEFT LoRA on all 7 projections (lora_B drawn
non-zero, otherwise A's gradients are zero and the comparison is weak), computes the summed loss and every LoRA
gradient with PEFT's unfused layers, then patches the same model with `apply_kernels` and does it again.

fp32: fused and PEFT agree to ~1e-6 relative. bf16: both paths round differently (the fused MLP computes
act(g)*u in fp32 and rounds once; PEFT rounds after each op), so the bf16 results are compared with an fp32
"truth" computed by the same model upcast to fp32: the fused path's error must not be worse than PEFT's own
bf16 error (x1.5 + a small floor), and both paths must agree on the loss to 1e-3 relative.
"""

import contextlib

import pytest
import torch

from lorafleet.kernels import apply_kernels, lm_loss, remove_kernels
from lorafleet.spec import KernelsSpec

from helpers.models import FAMILIES, SMALL, TARGETS, VOCAB, load_peft

QUANTS = ["nf4", "fp4", "none"]


def batch(seed=2):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 9), generator=gen)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt that is not trained on
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # right padding
    labels[1, -2:] = -100
    return ids, mask, labels


def loss_and_grads(model, fused, seed=5, data=None):
    ids, mask, labels = data or batch()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # dropout masks: the fused path draws them in PEFT's order from the same generator
    loss, n = lm_loss(model, ids, attention_mask=mask, labels=labels, fused=fused)
    loss.backward()
    grads = {k: p.grad.detach().float().clone() for k, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), int(n), grads


def rel_err(got, want):
    return max(((got[k] - want[k]).norm() / want[k].norm()).item() for k in want)


def upcast_to_fp32(model):
    model.float()
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.compute_dtype = torch.float32
            # dequantize straight to fp32 (bnb's own 4-bit matmul does not round the weight to bf16 either)
            module.weight.quant_state.dtype = torch.float32


def assert_all_lora_grads(grads):
    lora = [k for k in grads if "lora_A" in k or "lora_B" in k]
    assert len(lora) == 2 * len(TARGETS) * SMALL["num_hidden_layers"] == len(grads)
    assert all(grads[k].abs().sum() > 0 for k in lora)


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_matches_peft_fp32(saved_models, family, quant):
    model = load_peft(saved_models[family], quant, torch.float32)
    loss_ref, n_ref, grads_ref = loss_and_grads(model, fused=False)
    summary = apply_kernels(model, KernelsSpec()).applied
    assert summary == {"mlp": 2, "qkv": 2, "o": 2, "loss": 1}, model.lorafleet_kernel_report
    assert model.lorafleet_kernel_report["skipped"] == []
    loss, n, grads = loss_and_grads(model, fused=True)
    assert n == n_ref == 12
    assert_all_lora_grads(grads)
    torch.testing.assert_close(loss, loss_ref, rtol=2e-6, atol=0)
    assert rel_err(grads, grads_ref) < 2e-5


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_matches_peft_bf16(saved_models, family, quant):
    model = load_peft(saved_models[family], quant, torch.bfloat16)
    loss_peft, _, grads_peft = loss_and_grads(model, fused=False)
    apply_kernels(model, KernelsSpec())
    loss_fused, _, grads_fused = loss_and_grads(model, fused=True)
    assert_all_lora_grads(grads_fused)
    remove_kernels(model)
    upcast_to_fp32(model)
    loss_true, _, grads_true = loss_and_grads(model, fused=False)

    assert abs(loss_fused - loss_peft) / loss_true < 1e-3
    assert abs(loss_fused - loss_true) <= 1.5 * abs(loss_peft - loss_true) + 2e-4 * loss_true
    err_peft, err_fused = rel_err(grads_peft, grads_true), rel_err(grads_fused, grads_true)
    assert err_fused <= 1.5 * err_peft + 5e-3, (err_fused, err_peft)
    assert rel_err(grads_fused, grads_peft) < 6e-2


@pytest.mark.parametrize("family,quant", [("llama", "nf4"), ("qwen2", "none"), ("gemma2", "fp4")])
def test_dropout_masks_match_peft_exactly(saved_models, family, quant):
    """With dropout > 0 the fused path draws PEFT's masks (same modules, same order, same generator)."""
    model = load_peft(saved_models[family], quant, torch.float32, dropout=0.3)
    loss_ref, _, grads_ref = loss_and_grads(model, fused=False, seed=11)
    apply_kernels(model, KernelsSpec())
    loss, _, grads = loss_and_grads(model, fused=True, seed=11)
    torch.testing.assert_close(loss, loss_ref, rtol=2e-6, atol=0)
    assert rel_err(grads, grads_ref) < 2e-5
    # A different seed gives different masks, hence a different loss: dropout really is active.
    loss_other, _, _ = loss_and_grads(model, fused=True, seed=12)
    assert abs(loss_other - loss) > 1e-3
    # In eval mode dropout is off in both paths.
    model.eval()
    fused_eval, _, _ = loss_and_grads(model, fused=True, seed=11)
    remove_kernels(model)
    peft_eval, _, _ = loss_and_grads(model, fused=False, seed=13)
    torch.testing.assert_close(fused_eval, peft_eval, rtol=2e-6, atol=0)


def test_dropout_bf16_runs_finite_and_agrees(saved_models):
    model = load_peft(saved_models["gemma"], "nf4", torch.bfloat16, dropout=0.2)
    loss_ref, _, grads_ref = loss_and_grads(model, fused=False, seed=3)
    apply_kernels(model, KernelsSpec())
    loss, _, grads = loss_and_grads(model, fused=True, seed=3)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    assert abs(loss - loss_ref) / loss_ref < 1e-3
    assert rel_err(grads, grads_ref) < 6e-2


def test_repeated_forward_is_deterministic(saved_models):
    model = load_peft(saved_models["llama"], "nf4", torch.bfloat16)
    apply_kernels(model, KernelsSpec())
    first, _, g1 = loss_and_grads(model, fused=True)
    second, _, g2 = loss_and_grads(model, fused=True)
    assert first == second
    assert all(torch.equal(g1[k], g2[k]) for k in g1)


def test_disabled_spec_and_partial_spec(saved_models):
    model = load_peft(saved_models["qwen2"], "none", torch.float32)
    assert apply_kernels(model, KernelsSpec(enabled=False)).applied == {}
    assert model.lorafleet_kernel_report == {"applied": {}, "skipped": []}
    assert not any(hasattr(m, "_lorafleet_orig_forward") for m in model.modules())
    summary = apply_kernels(model, KernelsSpec(qkv=False, loss=False)).applied
    assert summary == {"mlp": 2, "o": 2}
    patched = [n for n, m in model.named_modules() if hasattr(m, "_lorafleet_orig_forward")]
    assert sorted(patched) == sorted(
        [f"base_model.model.model.layers.{i}.mlp" for i in range(2)]
        + [f"base_model.model.model.layers.{i}.self_attn.o_proj" for i in range(2)]
    )
    assert remove_kernels(model) == 4


def test_disable_adapter_context_falls_back(saved_models):
    model = load_peft(saved_models["llama"], "none", torch.float32)
    ids, mask, labels = batch()
    with torch.no_grad(), model.disable_adapter():
        base_loss, _ = lm_loss(model, ids, mask, labels, fused=False)
    apply_kernels(model, KernelsSpec())
    with torch.no_grad(), model.disable_adapter():
        fused_base, _ = lm_loss(model, ids, mask, labels, fused=True)
    with torch.no_grad():
        adapted, _ = lm_loss(model, ids, mask, labels, fused=True)
    torch.testing.assert_close(fused_base, base_loss, rtol=2e-6, atol=0)
    assert abs(adapted - base_loss) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_attention_decodes_on_a_kv_cache(saved_models, family):
    # Generation hands the patched attention a KV cache (an argument transformers 5.24 renamed): a prefill and then
    # one token at a time on that cache must give what PEFT's layers give for the whole sequence without a cache,
    # with the adapter on (fused path) and off (the original forward).
    from transformers import DynamicCache

    from lorafleet.compat.transformers import cache_argument

    model = load_peft(saved_models[family], "none", torch.float32).eval()
    ids = batch()[0][:1]
    with torch.no_grad():
        expected = {"on": model(input_ids=ids, use_cache=False).logits[0]}
        with model.disable_adapter():
            expected["off"] = model(input_ids=ids, use_cache=False).logits[0]
        assert apply_kernels(model, KernelsSpec()).applied == {"mlp": 2, "qkv": 2, "o": 2, "loss": 1}
        for mode, want in expected.items():
            cache, prefill = DynamicCache(), 5
            with model.disable_adapter() if mode == "off" else contextlib.nullcontext():
                steps = [model(input_ids=ids[:, :prefill], use_cache=True, **{cache_argument(model): cache}).logits[0]]
                for t in range(prefill, ids.shape[1]):
                    step = model(input_ids=ids[:, t : t + 1], use_cache=True, **{cache_argument(model): cache})
                    steps.append(step.logits[0])
            assert cache.get_seq_length() == ids.shape[1]
            torch.testing.assert_close(torch.cat(steps), want, rtol=1e-4, atol=1e-5)
    assert abs(expected["on"] - expected["off"]).max() > 1e-3  # the adapter changes the logits


def _skipped(model, path):
    return [s for s in model.lorafleet_kernel_report["skipped"] if s["path"] == path]


def test_refuses_layers_that_are_not_lora(saved_models):
    model = load_peft(saved_models["mistral"], "nf4", torch.float32, targets=["q_proj", "v_proj"])
    summary = apply_kernels(model, KernelsSpec()).applied
    assert summary == {"mlp": 0, "qkv": 0, "o": 0, "loss": 1}
    reasons = model.lorafleet_kernel_report["skipped"]
    assert len(reasons) == 6
    assert all("not a PEFT LoRA layer" in r["reason"] for r in reasons)
    assert {r["layer"] for r in _skipped(model, "qkv")} == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    assert "k_proj" in _skipped(model, "qkv")[0]["reason"]
    # Unfused layers still train through PEFT and the fused loss.
    loss, _, grads = loss_and_grads(model, fused=True)
    assert torch.isfinite(loss) and len(grads) == 8


def test_refuses_dora(saved_models):
    model = load_peft(saved_models["llama"], "none", torch.float32, use_dora=True)
    summary = apply_kernels(model, KernelsSpec()).applied
    assert summary == {"mlp": 0, "qkv": 0, "o": 0, "loss": 1}
    assert all("DoRA" in s["reason"] for s in model.lorafleet_kernel_report["skipped"])


# ----------------------------------------------------------------------------------------------------------------
# aLoRA: the fused paths add the LoRA update only on active tokens, like PEFT's aLoRA layers

INVOKE = [5, 6]


def alora_batch():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(10, VOCAB, (3, 12), generator=gen)  # ids >= 10: no accidental invocation
    ids[0, 3:5] = torch.tensor(INVOKE)  # adapter on from position 3
    ids[1, 6:8] = torch.tensor(INVOKE)  # from position 6; positions 10-11 are right padding
    mask = torch.ones_like(ids)  # row 2 has no invocation: the base model only
    mask[1, 10:] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def alora_loss_and_grads(model, fused_loss, active=None, seed=5):
    """Loss and grads with PEFT's own offsets (from input_ids through PeftModel.forward) or an explicit activation."""
    from lorafleet.model.alora import activation

    ids, mask, labels = alora_batch()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    if active is None:
        loss, _ = lm_loss(model, ids, attention_mask=mask, labels=labels, fused=fused_loss)
    else:
        with activation(model, active) as causal_lm:
            loss, _ = lm_loss(causal_lm, ids, attention_mask=mask, labels=labels, fused=fused_loss)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_alora_matches_peft_alora_layers(saved_models, family):
    model = load_peft(saved_models[family], "nf4", torch.float32, alora_invocation_tokens=INVOKE, task_type="CAUSAL_LM")
    loss_ref, grads_ref = alora_loss_and_grads(model, fused_loss=False)
    assert apply_kernels(model, KernelsSpec()).applied == {"mlp": 2, "qkv": 2, "o": 2, "loss": 1}
    assert model.lorafleet_kernel_report["skipped"] == []
    # Full-logits loss through PeftModel.forward: the offsets reach the fused paths through PEFT's hooks.
    loss, grads = alora_loss_and_grads(model, fused_loss=False)
    assert_all_lora_grads(grads)
    torch.testing.assert_close(loss, loss_ref, rtol=2e-6, atol=0)
    assert rel_err(grads, grads_ref) < 2e-5
    # lorafleet's training path: chunked loss, offsets applied with `activation` (row 0: 9, row 1: 6, row 2: none).
    loss, grads = alora_loss_and_grads(model, fused_loss=True, active=[9, 6, None])
    torch.testing.assert_close(loss, loss_ref, rtol=2e-6, atol=0)
    assert rel_err(grads, grads_ref) < 2e-5


def test_fused_alora_layers_differ_from_plain_lora(saved_models):
    # The test above would also pass if both paths ignored the activation; aLoRA must differ from LoRA here.
    alora = load_peft(saved_models["llama"], "none", torch.float32, alora_invocation_tokens=INVOKE,
                      task_type="CAUSAL_LM")
    plain = load_peft(saved_models["llama"], "none", torch.float32)
    apply_kernels(alora, KernelsSpec())
    apply_kernels(plain, KernelsSpec())
    loss_alora, _ = alora_loss_and_grads(alora, fused_loss=True, active=[9, 6, None])
    loss_plain, _ = alora_loss_and_grads(plain, fused_loss=True)
    assert abs(loss_alora - loss_plain) > 1e-3


def packed_mask(kind):
    active = torch.zeros(3, 12, dtype=torch.bool)
    if kind == "all":
        active[:] = True
    elif kind == "packed":  # row 0 holds two packed samples, each active from its own invocation
        active[0, 2:5] = True
        active[0, 8:] = True
        active[1, 6:] = True
    return active


@pytest.mark.parametrize("kind", ["packed", "all", "none"])
@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_fused_alora_mask_matches_reference_with_dropout(saved_models, kind, quant):
    """Per-token masks (packed rows) against lorafleet's reference variant, dropout drawn in PEFT's order."""
    model = load_peft(saved_models["gemma"], quant, torch.float32, dropout=0.25, alora_invocation_tokens=INVOKE,
                      task_type="CAUSAL_LM")
    active = packed_mask(kind)
    loss_ref, grads_ref = alora_loss_and_grads(model, fused_loss=True, active=active)
    with torch.no_grad(), model.disable_adapter():
        ids, mask, labels = alora_batch()
        base_loss, _ = lm_loss(model, ids, attention_mask=mask, labels=labels, fused=True)
    apply_kernels(model, KernelsSpec())
    loss, grads = alora_loss_and_grads(model, fused_loss=True, active=active)
    torch.testing.assert_close(loss, loss_ref, rtol=2e-6, atol=0)
    assert set(grads) == set(grads_ref) and len(grads) == 2 * len(TARGETS) * SMALL["num_hidden_layers"]
    if kind == "none":
        # Inactive everywhere: the base model's loss, and every adapter weight in the graph with a zero gradient.
        torch.testing.assert_close(loss, base_loss, rtol=1e-6, atol=0)
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads.values())
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads_ref.values())
    else:
        assert_all_lora_grads(grads)
        assert abs(loss - base_loss) > 1e-3
        assert rel_err(grads, grads_ref) < 2e-5


def test_fused_alora_ops_match_reference_variant():
    """lora_qkv / lora_o / lora_mlp with `active` against PEFT's aLoRA arithmetic on a single layer stack."""
    from peft import LoraConfig, get_peft_model

    from lorafleet.model.alora import activation
    from lorafleet.kernels.lora_ops import lora_mlp, lora_o, lora_qkv

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(16, 16, bias=i == 0) for i in range(3))
            self.o_proj = torch.nn.Linear(16, 16)
            self.gate_proj, self.up_proj = torch.nn.Linear(16, 32), torch.nn.Linear(16, 32)
            self.down_proj = torch.nn.Linear(32, 16)

        def forward(self, x, fused=False, active=None):
            if fused:
                q, k, v = lora_qkv(x, self.q_proj, self.k_proj, self.v_proj, active=active)
                h = lora_o(q * k + v, self.o_proj, active=active)
                return lora_mlp(h, self.gate_proj, self.up_proj, self.down_proj, "silu", active=active)
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            h = self.o_proj(q * k + v)
            return self.down_proj(torch.nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))

    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False, lora_dropout=0.1, alora_invocation_tokens=INVOKE)
    model = get_peft_model(Block(), config).train()
    inner = model.base_model.model
    x = torch.randn(2, 7, 16)
    active = torch.tensor([[0, 0, 1, 1, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    results = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(7)
        with activation(model, active):
            out = inner(xi, fused=fused, active=active)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        results.append((out.detach(), xi.grad, grads))
    (out_ref, dx_ref, g_ref), (out, dx, g) = results
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)
    assert len(g) == 14 and all(g[k].abs().sum() > 0 for k in g)
    assert rel_err(g, g_ref) < 1e-5
    # Row 1 is inactive throughout: exactly the base block.
    with torch.no_grad(), model.disable_adapter():
        base = inner(x)
    torch.testing.assert_close(out[1], base[1], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="active must be a bool tensor"):
        lora_o(x, inner.o_proj, active=active.int())


def test_refuses_several_active_adapters(saved_models):
    from peft import LoraConfig

    model = load_peft(saved_models["llama"], "none", torch.float32)
    model.add_adapter("second", LoraConfig(r=2, target_modules=TARGETS))
    model.base_model.set_adapter(["default", "second"])
    summary = apply_kernels(model, KernelsSpec(loss=False)).applied
    assert summary == {"mlp": 0, "qkv": 0, "o": 0}
    assert all("2 active adapters" in s["reason"] for s in model.lorafleet_kernel_report["skipped"])


def test_refuses_unknown_activation(saved_models):
    model = load_peft(saved_models["llama"], "none", torch.float32)
    model.base_model.model.model.layers[1].mlp.act_fn = torch.nn.ReLU()
    summary = apply_kernels(model, KernelsSpec(qkv=False, o=False, loss=False)).applied
    assert summary == {"mlp": 1}
    assert _skipped(model, "mlp") == [{"layer": "model.layers.1.mlp", "path": "mlp", "reason": "unknown activation ReLU"}]


def test_refuses_fused_loss_with_trainable_head(saved_models):
    model = load_peft(saved_models["llama"], "none", torch.float32, modules_to_save=["lm_head"])
    summary = apply_kernels(model, KernelsSpec(mlp=False, qkv=False, o=False)).applied
    assert summary == {"loss": 0}
    assert "LM head" in _skipped(model, "loss")[0]["reason"]
    ids, mask, labels = batch()
    with pytest.raises(ValueError, match="fused=False"):
        lm_loss(model, ids, mask, labels, fused=True)


def test_autocast_bf16_close_to_peft(saved_models):
    model = load_peft(saved_models["gemma3"], "nf4", torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ref, _, grads_ref = loss_and_grads(model, fused=False)
        apply_kernels(model, KernelsSpec())
        loss, _, grads = loss_and_grads(model, fused=True)
    assert abs(loss - loss_ref) / loss_ref < 2e-3
    assert rel_err(grads, grads_ref) < 6e-2
