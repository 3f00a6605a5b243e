"""Fused LoRA paths against PEFT's own layers, for every family, NF4 / FP4 / unquantized base, fp32 and bf16.

Each case loads a tiny saved model of the family, wraps it with PEFT LoRA on all 7 projections (lora_B drawn
non-zero, otherwise A's gradients are zero and the comparison is weak), computes the summed loss and every LoRA
gradient with PEFT's unfused layers, then patches the same model with `apply_kernels` and does it again.

fp32: fused and PEFT agree to ~1e-6 relative. bf16: both paths round differently (the fused MLP computes
act(g)*u in fp32 and rounds once; PEFT rounds after each op), so the bf16 results are compared with an fp32
"truth" computed by the same model upcast to fp32: the fused path's error must not be worse than PEFT's own
bf16 error (x1.5 + a small floor), and both paths must agree on the loss to 1e-3 relative.
"""


import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from lorafleet.families import family_config
from lorafleet.kernels import apply_kernels, lm_loss, remove_kernels
from lorafleet.spec import KernelsSpec

FAMILIES = ["llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3"]
QUANTS = ["nf4", "fp4", "none"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 256
# Dimensions are multiples of 64 (bitsandbytes' quantization block); 2 layers so gemma2/3 have a sliding and a
# global layer.
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=32, sliding_window=4)


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernel_models")
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


def load_peft(path, quant, dtype, dropout=0.0, seed=1, targets=TARGETS, **lora_kwargs):
    from peft import LoraConfig, get_peft_model

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


def fix_bnb(model):
    # STACK-NOTES: avoid the in-place AVX512-BF16 repack of Linear4bit weights in eval mode.
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.support_avx512bf16_for_cpu = False
    model.train()


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
    summary = apply_kernels(model, KernelsSpec())
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
    assert apply_kernels(model, KernelsSpec(enabled=False)) == {}
    assert model.lorafleet_kernel_report == {"applied": {}, "skipped": []}
    assert not any(hasattr(m, "_lorafleet_orig_forward") for m in model.modules())
    summary = apply_kernels(model, KernelsSpec(qkv=False, loss=False))
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


def _skipped(model, path):
    return [s for s in model.lorafleet_kernel_report["skipped"] if s["path"] == path]


def test_refuses_layers_that_are_not_lora(saved_models):
    model = load_peft(saved_models["mistral"], "nf4", torch.float32, targets=["q_proj", "v_proj"])
    summary = apply_kernels(model, KernelsSpec())
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
    summary = apply_kernels(model, KernelsSpec())
    assert summary == {"mlp": 0, "qkv": 0, "o": 0, "loss": 1}
    assert all("DoRA" in s["reason"] for s in model.lorafleet_kernel_report["skipped"])


def test_refuses_alora(saved_models):
    model = load_peft(saved_models["llama"], "none", torch.float32, alora_invocation_tokens=[5, 6],
                      targets=["q_proj", "k_proj", "v_proj"])
    summary = apply_kernels(model, KernelsSpec(mlp=False, o=False, loss=False))
    assert summary == {"qkv": 0}
    reasons = _skipped(model, "qkv")
    assert len(reasons) == 2 and all("aLoRA" in r["reason"] for r in reasons)


def test_refuses_several_active_adapters(saved_models):
    from peft import LoraConfig

    model = load_peft(saved_models["llama"], "none", torch.float32)
    model.add_adapter("second", LoraConfig(r=2, target_modules=TARGETS))
    model.base_model.set_adapter(["default", "second"])
    summary = apply_kernels(model, KernelsSpec(loss=False))
    assert summary == {"mlp": 0, "qkv": 0, "o": 0}
    assert all("2 active adapters" in s["reason"] for s in model.lorafleet_kernel_report["skipped"])


def test_refuses_unknown_activation(saved_models):
    model = load_peft(saved_models["llama"], "none", torch.float32)
    model.base_model.model.model.layers[1].mlp.act_fn = torch.nn.ReLU()
    summary = apply_kernels(model, KernelsSpec(qkv=False, o=False, loss=False))
    assert summary == {"mlp": 1}
    assert _skipped(model, "mlp") == [{"layer": "model.layers.1.mlp", "path": "mlp", "reason": "unknown activation ReLU"}]


def test_refuses_fused_loss_with_trainable_head(saved_models):
    model = load_peft(saved_models["llama"], "none", torch.float32, modules_to_save=["lm_head"])
    summary = apply_kernels(model, KernelsSpec(mlp=False, qkv=False, o=False))
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
