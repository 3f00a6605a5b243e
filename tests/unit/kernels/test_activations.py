"""Gated activation kernels: Triton against the plain-torch reference, and the reference against torch autograd of
the Hugging Face activations.

The Triton tests run under TRITON_INTERPRET=1 on CPU tensors by default; with TRITON_INTERPRET=0 on a CUDA machine
(what bench/gpu_check.sh does) the same tests run the compiled kernels on the GPU.
"""

import os

# Must be set before the @triton.jit functions are defined (the interpreter is chosen at definition time).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lorafleet.kernels.activations as act  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Where the Triton tests put their tensors: the interpreter runs on CPU tensors, compiled kernels need a GPU.
TRITON_DEVICE = "cpu" if INTERPRETED else "cuda"
needs_triton = pytest.mark.skipif(
    not act.HAS_TRITON or not (INTERPRETED or torch.cuda.is_available()),
    reason="needs triton with TRITON_INTERPRET=1, or a CUDA device",
)

HF_ACT = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
}
# Odd shapes on purpose: a row narrower than a block, a 3-D input, a single row with a prime width.
SHAPES = [(3, 37), (2, 5, 130), (1, 257)]


def _inputs(shape, dtype, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    g = (torch.randn(shape, generator=gen) * 3).to(device, dtype)  # x3 reaches the tails of the activations
    u = torch.randn(shape, generator=gen).to(device, dtype)
    dh = torch.randn(shape, generator=gen).to(device, dtype)
    return g, u, dh


def _autograd(g, u, dh, name):
    g32 = g.to(torch.float32, copy=True).requires_grad_()  # a copy: the callers pass the inputs on afterwards
    u32 = u.to(torch.float32, copy=True).requires_grad_()
    h = HF_ACT[name](g32) * u32
    h.backward(dh.float())
    return h.detach(), g32.grad, u32.grad


@pytest.mark.parametrize("name", act.ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_torch_autograd(name, shape):
    g, u, dh = _inputs(shape, torch.float32)
    h_ref, dg_ref, du_ref = _autograd(g, u, dh, name)
    torch.testing.assert_close(act.gated_forward_ref(g, u, name), h_ref, rtol=1e-6, atol=1e-6)
    h, dg, du = act.gated_backward_ref(dh.clone(), g.clone(), u.clone(), name)
    torch.testing.assert_close(h, h_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dg, dg_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(du, du_ref, rtol=1e-6, atol=1e-6)


def test_named_wrappers():
    g, u, _ = _inputs((4, 9), torch.float32)
    torch.testing.assert_close(act.swiglu_ref(g, u), F.silu(g) * u)
    torch.testing.assert_close(act.geglu_ref(g, u), F.gelu(g) * u)
    torch.testing.assert_close(act.geglu_ref(g, u, approximate="tanh"), F.gelu(g, approximate="tanh") * u)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_writes_in_place(dtype):
    g, u, dh = _inputs((3, 11), dtype)
    want = _autograd(g, u, dh, "silu")
    ptrs = (u.data_ptr(), g.data_ptr(), dh.data_ptr())
    h, dg, du = act.gated_backward_ref(dh, g, u, "silu")
    assert (h.data_ptr(), dg.data_ptr(), du.data_ptr()) == ptrs
    for got, ref in zip((h, dg, du), want):
        torch.testing.assert_close(got.float(), ref, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-5)


@pytest.mark.parametrize("name", act.ACTIVATIONS)
def test_fp32_forward_is_bit_identical_to_the_hugging_face_mlp(name):
    from transformers.activations import ACT2FN

    hf = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[name]
    g, u, _ = _inputs((5, 33), torch.float32)
    assert torch.equal(act.gated_forward_ref(g, u, name), ACT2FN[hf](g) * u)


def test_cpu_dispatch_uses_torch_even_under_the_interpreter():
    assert not act.triton_usable(torch.zeros(2))
    g, u, _ = _inputs((2, 3), torch.float32)
    torch.testing.assert_close(act.gated_forward(g, u, "silu"), act.swiglu_ref(g, u))


@needs_triton
@pytest.mark.parametrize("name", act.ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_fp32_matches_reference(name, shape):
    g, u, dh = _inputs(shape, torch.float32, device=TRITON_DEVICE)
    torch.testing.assert_close(act.gated_forward_triton(g, u, name), act.gated_forward_ref(g, u, name), rtol=1e-5, atol=1e-6)
    tri = act.gated_backward_triton(dh.clone(), g.clone(), u.clone(), name)
    ref = act.gated_backward_ref(dh.clone(), g.clone(), u.clone(), name)
    for got, want in zip(tri, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("name", act.ACTIVATIONS)
def test_triton_bf16_within_one_ulp(name):
    # Both compute in fp32 and cast once; the interpreter's fp32->bf16 store truncates where torch rounds to
    # nearest, so results may differ by one bf16 ulp (2^-7 relative at worst), not more.
    g, u, dh = _inputs((5, 67), torch.bfloat16, seed=3, device=TRITON_DEVICE)
    one_ulp = 2.0**-7
    got = act.gated_forward_triton(g, u, name)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), act.gated_forward_ref(g, u, name).float(), rtol=one_ulp, atol=1e-6)
    tri = act.gated_backward_triton(dh.clone(), g.clone(), u.clone(), name)
    ref = act.gated_backward_ref(dh.clone(), g.clone(), u.clone(), name)
    for got, want in zip(tri, ref):
        torch.testing.assert_close(got.float(), want.float(), rtol=one_ulp, atol=1e-6)
    # And against fp32 autograd truth: one rounding of a bf16 result, i.e. within 2 ulps.
    h_true, dg_true, du_true = _autograd(g, u, dh, name)
    torch.testing.assert_close(tri[0].float(), h_true, rtol=2 * one_ulp, atol=1e-5)
    torch.testing.assert_close(tri[2].float(), du_true, rtol=2 * one_ulp, atol=1e-5)


@needs_triton
def test_triton_rows_wider_than_a_block(monkeypatch):
    # Production rows up to 4096 columns are one block; force several blocks per row to test the column tiling.
    monkeypatch.setattr(act, "_MAX_BLOCK", 64)
    g, u, dh = _inputs((3, 150), torch.float32, seed=7, device=TRITON_DEVICE)
    torch.testing.assert_close(act.gated_forward_triton(g, u, "gelu"), act.gated_forward_ref(g, u, "gelu"))
    tri = act.gated_backward_triton(dh.clone(), g.clone(), u.clone(), "gelu")
    ref = act.gated_backward_ref(dh.clone(), g.clone(), u.clone(), "gelu")
    for got, want in zip(tri, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_backward_in_place_and_rejects_mismatch():
    g, u, dh = _inputs((2, 33), torch.float32, device=TRITON_DEVICE)
    ptrs = (dh.data_ptr(), g.data_ptr(), u.data_ptr())
    out = act.gated_backward_triton(dh, g, u, "silu")
    assert tuple(t.data_ptr() for t in out) == ptrs
    with pytest.raises(ValueError):
        act.gated_forward_triton(g, u[:, :5].contiguous(), "silu")
    with pytest.raises(ValueError):
        act.gated_forward_triton(g, u, "relu")


@needs_triton
def test_lora_mlp_through_triton_kernels(monkeypatch):
    """The fused MLP Function, with its activation on the Triton kernels, matches PEFT's layers."""
    from peft import LoraConfig, get_peft_model

    from lorafleet.kernels.lora_ops import lora_mlp

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = torch.nn.Linear(24, 40), torch.nn.Linear(24, 40)
            self.down_proj = torch.nn.Linear(40, 24, bias=False)

        def forward(self, x):
            return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))

    torch.manual_seed(0)
    model = get_peft_model(MLP(), LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    model.to(TRITON_DEVICE)
    inner = model.base_model.model
    x = torch.randn(2, 3, 24).to(TRITON_DEVICE).requires_grad_()
    upstream = torch.randn(2, 3, 24).to(TRITON_DEVICE)

    def grads(fn):
        model.zero_grad(set_to_none=True)
        x.grad = None
        (fn(x) * upstream).sum().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]

    want = grads(model)
    # Production dispatch sends CPU tensors to torch; send every tensor to the Triton launchers (interpreted on CPU).
    launched = []
    monkeypatch.setattr(act, "triton_usable", lambda t: launched.append(t.shape) or True)
    got = grads(lambda t: lora_mlp(t, inner.gate_proj, inner.up_proj, inner.down_proj, "gelu_tanh"))
    assert len(got) == 7
    assert len(launched) == 2, "the fused MLP did not dispatch its forward and backward through the Triton launchers"
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-4, atol=1e-5)
