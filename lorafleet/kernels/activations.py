"""Gated MLP activations (SwiGLU and GeGLU), forward and backward, in plain torch and in Triton.

Three layers, as in Liger-Kernel:

- private `@triton.jit` kernels (`_gated_fwd_kernel`, `_gated_bwd_kernel`), defined only when Triton imports;
- launchers (`gated_forward_triton`, `gated_backward_triton`) that view the inputs as 2-D `[rows, cols]` and pick
  the block size;
- plain-torch references of the same math (`swiglu_ref`, `geglu_ref`, `gated_backward_ref`), built on torch's own
  activation and activation-backward ops (independent of the kernels' hand-written derivatives), which are also
  what runs on CPU tensors.

`gated_forward` / `gated_backward` pick the implementation by capability (Triton on CUDA tensors when Triton is
importable, torch otherwise); nothing is chosen by trying and catching a crash.

All variants load in the storage dtype, compute in fp32 and cast once on store. The backward recomputes the
activation instead of keeping it from the forward and writes its three results `h = act(g) * u`, `dg`, `du` into
the three input buffers (the Triton kernel in `dh`, `g`, `u`; the torch version in `u`, `g`, `dh`, which saves a
pass): the caller needs `h` once more (for the down projection's LoRA A gradient) and never needs `g`, `u`, `dh`
again, so it uses the returned tensors.
"""

from __future__ import annotations

from typing import Literal

import torch

try:  # Triton is optional: the package must import and run on machines without it (and without a GPU).
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is absent or broken
    triton = None
    tl = None
    HAS_TRITON = False

Activation = Literal["silu", "gelu", "gelu_tanh"]
ACTIVATIONS: tuple[str, ...] = ("silu", "gelu", "gelu_tanh")

# Activation codes passed to the kernels as a constexpr (one compiled variant per activation).
_ACT_CODE = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


# ----------------------------------------------------------------------------------------------------------------
# Plain-torch reference (also the CPU implementation)
# ----------------------------------------------------------------------------------------------------------------


def _act(g: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return torch.nn.functional.silu(g)
    if activation in ("gelu", "gelu_tanh"):
        return torch.nn.functional.gelu(g, approximate="tanh" if activation == "gelu_tanh" else "none")
    raise ValueError(f"unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")


def _act_backward_into(grad: torch.Tensor, g: torch.Tensor, activation: str, out: torch.Tensor) -> torch.Tensor:
    """`grad * act'(g)` written into `out` (may be `g` itself: an elementwise op may overwrite its input)."""
    if activation == "silu":
        return torch.ops.aten.silu_backward.grad_input(grad, g, grad_input=out)
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    return torch.ops.aten.gelu_backward.grad_input(grad, g, approximate=approximate, grad_input=out)


def gated_forward_ref(g: torch.Tensor, u: torch.Tensor, activation: Activation) -> torch.Tensor:
    """`act(g) * u` computed in fp32 and returned in `g`'s dtype (the plain-torch reference).

    Args:
        g (`torch.Tensor`): Gate projection output, any shape.
        u (`torch.Tensor`): Up projection output, same shape and dtype as `g`.
        activation (`str`): `silu` (SwiGLU), `gelu` (exact erf GELU) or `gelu_tanh` (tanh approximation).

    Returns:
        `torch.Tensor`: `act(g) * u`, dtype of `g`.

    Example:

    ```python
    >>> import torch
    >>> g = torch.tensor([0.0, 1.0]); u = torch.tensor([2.0, 3.0])
    >>> gated_forward_ref(g, u, "silu")
    tensor([0.0000, 2.1932])

    ```
    """
    if g.dtype == torch.float32:
        return _act(g, activation).mul_(u)  # the same ops as the Hugging Face MLPs: bit-identical in fp32
    return _act(g.float(), activation).mul_(u.float()).to(g.dtype)


def swiglu_ref(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """`silu(g) * u`, fp32 math, result in `g`'s dtype. See [`gated_forward_ref`]."""
    return gated_forward_ref(g, u, "silu")


def geglu_ref(g: torch.Tensor, u: torch.Tensor, approximate: Literal["none", "tanh"] = "none") -> torch.Tensor:
    """`gelu(g) * u` (exact erf GELU, or the tanh approximation with `approximate="tanh"`), fp32 math.

    Example:

    ```python
    >>> import torch
    >>> geglu_ref(torch.tensor([1.0]), torch.tensor([1.0]), approximate="tanh")
    tensor([0.8412])

    ```
    """
    return gated_forward_ref(g, u, "gelu_tanh" if approximate == "tanh" else "gelu")


def gated_backward_ref(
    dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, activation: Activation
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of `h = act(g) * u`, recomputing `act(g)`, with its three results in the three input buffers.

    Uses torch's own vectorized activation and activation-backward ops (the ones autograd runs for the Hugging Face
    MLPs): five elementwise passes in fp32, none of them allocating a result that outlives the call.

    Args:
        dh (`torch.Tensor`): Gradient of `h`; overwritten.
        g (`torch.Tensor`): Gate values; overwritten with `dL/dg`.
        u (`torch.Tensor`): Up values; overwritten.
        activation (`str`): `silu`, `gelu` or `gelu_tanh`.

    Returns:
        `tuple[torch.Tensor, torch.Tensor, torch.Tensor]`: `(h, dg, du)`, held in the buffers `u`, `g`, `dh`
        (the Triton kernel uses `dh`, `g`, `u`: callers use the returned tensors, not the buffer names).

    Example:

    ```python
    >>> import torch
    >>> h, dg, du = gated_backward_ref(torch.ones(2), torch.tensor([0.0, 1.0]), torch.ones(2), "silu")
    >>> dg
    tensor([0.5000, 0.9277])

    ```
    """
    if g.dtype == torch.float32 and u.dtype == torch.float32 and dh.dtype == torch.float32:
        a = _act(g, activation)
        _act_backward_into(dh * u, g, activation, out=g)
        return u.mul_(a), g, dh.mul_(a)
    g32, u32, dh32 = g.float(), u.float(), dh.float()
    a = _act(g32, activation)
    g.copy_(_act_backward_into(dh32 * u32, g32, activation, out=g32))
    u.copy_(a * u32)
    dh.copy_(a.mul_(dh32))
    return u, g, dh


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels (private) and launchers
# ----------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _tanh(x):
        # libdevice tanh does not run under TRITON_INTERPRET; 2*sigmoid(2x)-1 is exact enough in fp32 and portable.
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def _act_fwd(g, ACT: tl.constexpr):
        if ACT == 0:
            a = g * tl.sigmoid(g)
        elif ACT == 1:
            a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
        else:
            t = _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
            a = 0.5 * g * (1.0 + t)
        return a

    @triton.jit
    def _act_fwd_and_grad(g, ACT: tl.constexpr):
        if ACT == 0:
            s = tl.sigmoid(g)
            a = g * s
            d = s * (1.0 + g * (1.0 - s))
        elif ACT == 1:
            cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
            a = g * cdf
            d = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
        else:
            t = _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
            a = 0.5 * g * (1.0 + t)
            d = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
        return a, d

    @triton.jit
    def _gated_fwd_kernel(g_ptr, u_ptr, h_ptr, n_cols, stride, ACT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        col0 = tl.program_id(1) * BLOCK
        cols = col0 + tl.arange(0, BLOCK)
        mask = cols < n_cols
        offs = row * stride + cols
        # Storage dtype may be bf16/fp16: upcast on load, compute in fp32, cast once on store.
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h = _act_fwd(g, ACT) * u
        tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gated_bwd_kernel(dh_ptr, g_ptr, u_ptr, n_cols, stride, ACT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        col0 = tl.program_id(1) * BLOCK
        cols = col0 + tl.arange(0, BLOCK)
        mask = cols < n_cols
        offs = row * stride + cols
        dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a, d = _act_fwd_and_grad(g, ACT)
        # Each program reads its three tiles fully before writing, so overwriting the inputs in place is safe.
        tl.store(dh_ptr + offs, (a * u).to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(g_ptr + offs, (dh * u * d).to(g_ptr.dtype.element_ty), mask=mask)
        tl.store(u_ptr + offs, (dh * a).to(u_ptr.dtype.element_ty), mask=mask)


# A 2-D grid of (rows, column blocks). Not tuned on a GPU (none was available): 4096 elements per program keeps an
# MLP row of up to 4096 columns in one program, which under TRITON_INTERPRET (cost ~ number of programs, STACK-NOTES)
# keeps tests fast, while capping per-program registers for wide intermediate sizes (14336 -> 4 blocks per row).
_MAX_BLOCK = 4096


def _block_size(n_cols: int) -> int:
    return min(_MAX_BLOCK, triton.next_power_of_2(n_cols))


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError("gated activation kernels need contiguous tensors")
    return t.view(-1, t.shape[-1])


def _check(g: torch.Tensor, u: torch.Tensor, activation: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use the torch reference (gated_forward_ref)")
    if activation not in _ACT_CODE:
        raise ValueError(f"unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
    if g.shape != u.shape or g.dtype != u.dtype:
        raise ValueError(f"gate and up must match: {tuple(g.shape)} {g.dtype} vs {tuple(u.shape)} {u.dtype}")


def gated_forward_triton(g: torch.Tensor, u: torch.Tensor, activation: Activation) -> torch.Tensor:
    """Triton launcher for `act(g) * u` (fp32 math inside the kernel, result in `g`'s dtype).

    Args:
        g (`torch.Tensor`): Gate values, contiguous, any leading shape.
        u (`torch.Tensor`): Up values, same shape and dtype.
        activation (`str`): `silu`, `gelu` or `gelu_tanh`.

    Returns:
        `torch.Tensor`: A new tensor holding `act(g) * u`.

    Example (on a CUDA tensor, or on CPU with `TRITON_INTERPRET=1` set before import):

    ```python
    >>> h = gated_forward_triton(torch.randn(4, 8, device="cuda"), torch.randn(4, 8, device="cuda"), "silu")  # doctest: +SKIP

    ```
    """
    _check(g, u, activation)
    g2, u2 = _as_rows(g), _as_rows(u)
    h = torch.empty_like(g2)
    n_rows, n_cols = g2.shape
    block = _block_size(n_cols)
    grid = (n_rows, triton.cdiv(n_cols, block))
    _gated_fwd_kernel[grid](g2, u2, h, n_cols, g2.stride(0), ACT=_ACT_CODE[activation], BLOCK=block)
    return h.view(g.shape)


def gated_backward_triton(
    dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, activation: Activation
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton launcher for the backward of `act(g) * u`; in place like [`gated_backward_ref`].

    Returns:
        `tuple[torch.Tensor, torch.Tensor, torch.Tensor]`: `(h, dg, du)` living in the buffers `dh`, `g`, `u`.
    """
    _check(g, u, activation)
    if dh.shape != g.shape or dh.dtype != g.dtype:
        raise ValueError("dh must match gate and up in shape and dtype")
    dh2, g2, u2 = _as_rows(dh), _as_rows(g), _as_rows(u)
    n_rows, n_cols = g2.shape
    block = _block_size(n_cols)
    grid = (n_rows, triton.cdiv(n_cols, block))
    _gated_bwd_kernel[grid](dh2, g2, u2, n_cols, g2.stride(0), ACT=_ACT_CODE[activation], BLOCK=block)
    return dh, g, u


def triton_usable(t: torch.Tensor) -> bool:
    """Whether the Triton kernels run on `t`: Triton imports and `t` is on a CUDA (or ROCm) device.

    CPU tensors always take the torch path, even under `TRITON_INTERPRET=1`: the interpreter is ~250x slower than
    eager torch. (The launchers themselves accept CPU tensors under the interpreter.)
    """
    return HAS_TRITON and t.is_cuda


def gated_forward(g: torch.Tensor, u: torch.Tensor, activation: Activation) -> torch.Tensor:
    """`act(g) * u` with the best implementation for `g`'s device (Triton on GPU, torch on CPU).

    Example:

    ```python
    >>> import torch
    >>> gated_forward(torch.zeros(2, 3), torch.ones(2, 3), "gelu_tanh").shape
    torch.Size([2, 3])

    ```
    """
    if triton_usable(g):
        return gated_forward_triton(g.contiguous(), u.contiguous(), activation)
    return gated_forward_ref(g, u, activation)


def gated_backward(
    dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, activation: Activation
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In-place gated-activation backward with the best implementation for the device. See [`gated_backward_ref`]."""
    if triton_usable(g) and dh.is_contiguous() and g.is_contiguous() and u.is_contiguous():
        return gated_backward_triton(dh, g, u, activation)
    return gated_backward_ref(dh, g, u, activation)
