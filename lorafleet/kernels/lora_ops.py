"""Fused LoRA blocks as custom autograd Functions: the gated MLP, the Q/K/V projections and the O projection.

Each projection is `base(x) + scaling * B(A(dropout(x)))` where `base` is a frozen `torch.nn.Linear` or a
bitsandbytes `Linear4bit` (NF4/FP4). A 4-bit weight is dequantized on the fly with
`bitsandbytes.functional.dequantize_4bit` in the forward and again in the backward; the dequantized copy is a
temporary, never stored on the module or saved for backward.

What is saved for backward is only what the gradients need: the block input `x` (in its own dtype; the fp32 copy
for the LoRA path is re-made in backward, the bf16 -> fp32 cast being exact), the rank-`r` LoRA activations
`x @ A^T` and, for the MLP, the gate and up projections (the activation itself is recomputed). One backward per
block returns the gradient of `x` and of every LoRA A/B; base weights and biases are frozen (no gradient).

Dtypes follow PEFT so that the fused path computes the same numbers as PEFT's layers:

- without autocast, the base matmul runs in the base layer's compute dtype (bnb `compute_dtype`, or the weight's
  dtype), the LoRA path in the LoRA weights' dtype (PEFT keeps adapters in fp32 on a bf16 model), and the LoRA
  output is cast to the base output's dtype before the sum;
- under `torch.autocast`, both run in the autocast dtype.

Dropout: PEFT applies an independent dropout module per projection to that projection's LoRA input. The fused
path calls the *same* modules, in the same order as PEFT's forward (q, k, v; gate, up, down), on a tensor of ones
of the shape and dtype PEFT would drop, which draws the same random numbers and yields the scaled keep-mask
(`dropout(x) == x * dropout(ones)`); the masks are applied inside the Functions.

aLoRA: with an `active` mask (`[..., tokens]` bool, True from a sample's invocation on), the LoRA update is added
only on active tokens (inactive ones get the base output exactly) and only active tokens send gradient to A and B,
which is PEFT's aLoRA arithmetic; the mask zeroes rank-r tensors only, never a full-width one.

The backward of these Functions overwrites some saved tensors in place (gate/up buffers receive their
gradients), so they support one backward per forward (no `retain_graph=True` double backward).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .activations import gated_backward, gated_forward

_CPU_HALF_NATIVE: Optional[bool] = None


def cpu_half_matmul_is_native() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX or AVX512-BF16), per `/proc/cpuinfo`.

    Override with `LORAFLEET_CPU_BF16_MATMUL=1` (native) or `=0` (upcast). On the AVX2-only AMD EPYC these tests
    ran on, a 512^3 bf16 matmul ran at 1.1 GFLOP/s against 15 GFLOP/s in fp32 (oneDNN has no bf16 kernel there),
    so there the fused paths upcast bf16 operands to fp32 for matmuls: exact inputs, fp32 accumulation as in a
    bf16 GEMM, only the intermediate rounding to bf16 is skipped.
    """
    global _CPU_HALF_NATIVE
    env = os.environ.get("LORAFLEET_CPU_BF16_MATMUL")
    if env is not None:
        return env not in ("0", "false", "False", "")
    if _CPU_HALF_NATIVE is None:
        try:
            with open("/proc/cpuinfo") as fh:
                flags = next((line for line in fh if line.startswith("flags")), "").split()
            _CPU_HALF_NATIVE = "amx_bf16" in flags or "avx512_bf16" in flags
        except OSError:
            _CPU_HALF_NATIVE = False
    return _CPU_HALF_NATIVE


def matmul_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype to run a matmul of `dtype` operands in on `device` (fp32 for bf16/fp16 on CPUs without native
    bf16 GEMMs, else `dtype` itself).

    Example:

    ```python
    >>> import torch
    >>> matmul_dtype(torch.float32, torch.device("cpu"))
    torch.float32

    ```
    """
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not cpu_half_matmul_is_native():
        return torch.float32
    return dtype


def _is_4bit(base: nn.Module) -> bool:
    return getattr(base.weight, "quant_state", None) is not None


def _base_compute_dtype(base: nn.Module, x_dtype: torch.dtype) -> torch.dtype:
    if _is_4bit(base):
        return getattr(base, "compute_dtype", None) or x_dtype
    return base.weight.dtype


def dequantized_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight as a dense `[out, in]` tensor of `dtype` (a temporary for 4-bit layers).

    Args:
        base (`nn.Module`): A `torch.nn.Linear` or a bitsandbytes `Linear4bit`.
        dtype (`torch.dtype`): The dtype wanted.

    Returns:
        `torch.Tensor`: The weight itself when it is already dense in `dtype`, else a new tensor.

    Example:

    ```python
    >>> import torch
    >>> lin = torch.nn.Linear(4, 3)
    >>> dequantized_weight(lin, torch.float32) is lin.weight
    True

    ```
    """
    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if state is not None:
        import bitsandbytes.functional as bnbf

        weight = bnbf.dequantize_4bit(weight.data, state)
    return weight if weight.dtype == dtype else weight.to(dtype)


@dataclass
class LoRAProjection:
    """What the fused Functions need from one PEFT `lora.Linear` (read at call time, so never stale).

    Attributes:
        base (`nn.Module`): The frozen base layer (`nn.Linear` or bnb `Linear4bit`).
        lora_A (`torch.Tensor`): `[r, in]` weight of the active adapter's A.
        lora_B (`torch.Tensor`): `[out, r]` weight of the active adapter's B.
        scaling (`float`): PEFT's `lora_alpha / r` (or rsLoRA's) for the adapter.
        dropout (`nn.Module`): The adapter's dropout module (`nn.Identity` when `lora_dropout == 0`).
    """

    base: nn.Module
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    dropout: nn.Module

    @classmethod
    def from_peft(cls, layer: nn.Module) -> "LoRAProjection":
        """Read the single active adapter of a PEFT LoRA layer."""
        adapter = layer.active_adapters[0]
        return cls(
            base=layer.get_base_layer(),
            lora_A=layer.lora_A[adapter].weight,
            lora_B=layer.lora_B[adapter].weight,
            scaling=float(layer.scaling[adapter]),
            dropout=layer.lora_dropout[adapter],
        )

    def noise(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
        """The scaled keep-mask PEFT's dropout would apply to a LoRA input of `shape`/`dtype`, or None."""
        drop = self.dropout
        if isinstance(drop, nn.Identity) or not drop.training or getattr(drop, "p", 0.0) == 0.0:
            return None
        return drop(torch.ones(shape, dtype=dtype, device=device))


def _dtypes(x: torch.Tensor, proj: LoRAProjection) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    """(base compute dtype, LoRA dtype, output dtype) for input `x`, following PEFT (see module doc)."""
    if torch.is_autocast_enabled(x.device.type):
        ac = torch.get_autocast_dtype(x.device.type)
        return matmul_dtype(ac, x.device), matmul_dtype(ac, x.device), ac
    cd = matmul_dtype(_base_compute_dtype(proj.base, x.dtype), x.device)
    return cd, matmul_dtype(proj.lora_A.dtype, x.device), x.dtype


def _base_linear(x_c: torch.Tensor, base: nn.Module, cd: torch.dtype) -> torch.Tensor:
    bias = base.bias
    return torch.nn.functional.linear(x_c, dequantized_weight(base, cd), None if bias is None else bias.to(cd))


def _masked(x: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
    return x if noise is None else x * noise


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _lora_forward(
    x_c: torch.Tensor,
    x_l: torch.Tensor,
    proj: LoRAProjection,
    a_w: torch.Tensor,
    b_w: torch.Tensor,
    noise: Optional[torch.Tensor],
    active: Optional[torch.Tensor],
    dtypes: tuple[torch.dtype, torch.dtype, torch.dtype],
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(base(x) + s * B A (x * noise) on active rows, A (x * noise) with inactive rows zeroed)` for 2-D inputs.

    `x_c` / `x_l` are the input in the base and LoRA dtypes. Zeroing the rank-r activation's inactive rows (aLoRA)
    zeroes their LoRA update exactly, so those rows get the base output bit for bit, and it is what the backward
    needs for B's gradient. When base and LoRA compute in one dtype, the update is accumulated into the base output
    by the GEMM itself (`addmm_`), with no separate scaling and sum passes over the `[tokens, out]` output.
    """
    cd, ld, od = dtypes
    y = _base_linear(x_c, proj.base, cd)
    a = _masked(x_l, noise) @ _cast(a_w, ld).t()
    if active is not None:
        a.mul_(active)
    if cd == ld:
        return _cast(y.addmm_(a, _cast(b_w, ld).t(), alpha=proj.scaling), od), a
    return _cast(y, od) + _cast((a @ _cast(b_w, ld).t()).mul_(proj.scaling), od), a


class _InputGrad:
    """Sums the input gradient of several projections: base parts (base dtype) and LoRA parts (LoRA dtype).

    A LoRA part without dropout goes into the base sum by `addmm_` when the dtypes agree (no `[tokens, in]`
    temporary); otherwise it is summed apart (it needs the dropout mask, or a different dtype) and added at the end.
    """

    def __init__(self, cd: torch.dtype, ld: torch.dtype):
        self.cd, self.ld = cd, ld
        self.base: Optional[torch.Tensor] = None
        self.lora: Optional[torch.Tensor] = None

    def add_base(self, grad_c: torch.Tensor, weight: torch.Tensor) -> None:
        self.base = grad_c @ weight if self.base is None else self.base.addmm_(grad_c, weight)

    def add_lora(self, t: torch.Tensor, a_l: torch.Tensor, noise: Optional[torch.Tensor]) -> None:
        if noise is None and self.cd == self.ld and self.base is not None:
            self.base.addmm_(t, a_l)
            return
        part = _masked(t @ a_l, noise)
        self.lora = part if self.lora is None else self.lora.add_(part)

    def total(self, dtype: torch.dtype) -> torch.Tensor:
        if self.lora is None:
            return _cast(self.base, dtype)
        if self.base.dtype == self.lora.dtype:
            return _cast(self.base.add_(self.lora), dtype)
        return _cast(self.base, dtype) + _cast(self.lora, dtype)


def _lora_backward(
    grad: torch.Tensor,
    x_l: torch.Tensor,
    a: torch.Tensor,
    proj: LoRAProjection,
    a_w: torch.Tensor,
    b_w: torch.Tensor,
    noise: Optional[torch.Tensor],
    active: Optional[torch.Tensor],
    dx: _InputGrad,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of one projection (see [`_lora_forward`]) for the 2-D output gradient `grad`.

    Adds the input gradient (base and LoRA parts) to `dx`; returns the gradients of A and B in their own dtypes.
    """
    ld, s = dx.ld, proj.scaling
    dx.add_base(_cast(grad, dx.cd), dequantized_weight(proj.base, dx.cd))
    g_l = _cast(grad, ld)
    a_l, b_l = _cast(a_w, ld), _cast(b_w, ld)
    d_b = (g_l.t() @ a).mul_(s)  # `a` has zero rows where the adapter is off
    t = (g_l @ b_l).mul_(s)
    if active is not None:
        t.mul_(active)
    d_a = t.t() @ _masked(x_l, noise)
    dx.add_lora(t, a_l, noise)
    return _cast(d_a, a_w.dtype), _cast(d_b, b_w.dtype)


class LoRAProjectionsFunction(torch.autograd.Function):
    """`y_i = base_i(x) + s_i * B_i A_i (x * noise_i)` for projections sharing the input `x` (Q/K/V, or O alone).

    `forward(ctx, x, projs, dtypes, active, *tensors)` with `tensors = (A_1, B_1, noise_1, ..., A_n, B_n, noise_n)`
    and `active` an optional `[tokens, 1]` 0/1 column (aLoRA: the LoRA update only on rows where it is 1); returns the
    n outputs. Use [`lora_qkv`] / [`lora_o`] rather than calling this directly.
    """

    @staticmethod
    def forward(ctx, x, projs, dtypes, active, *tensors):
        cd, ld, od = dtypes
        x2 = x.reshape(-1, x.shape[-1])
        x_c, x_l = _cast(x2, cd), _cast(x2, ld)
        outs, acts = [], []
        with torch.autocast(x.device.type, enabled=False):
            for i, proj in enumerate(projs):
                y, a = _lora_forward(x_c, x_l, proj, *tensors[3 * i : 3 * i + 3], active, dtypes)
                outs.append(y.view(*x.shape[:-1], -1))
                acts.append(a)
        ctx.projs, ctx.dtypes, ctx.x_shape = projs, dtypes, x.shape
        ctx.save_for_backward(x2, active, *acts, *tensors)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        # Backward may run inside the caller's autocast region (CPU autograd runs on the calling thread):
        # dtypes are explicit here, so autocast is switched off.
        with torch.autocast(next(g for g in grads if g is not None).device.type, enabled=False):
            return LoRAProjectionsFunction._backward(ctx, *grads)

    @staticmethod
    def _backward(ctx, *grads):
        cd, ld, od = ctx.dtypes
        n = len(ctx.projs)
        saved = ctx.saved_tensors
        x2, active, acts, tensors = saved[0], saved[1], saved[2 : 2 + n], saved[2 + n :]
        x_l = _cast(x2, ld)
        dx = _InputGrad(cd, ld)
        out_grads: list = []
        for i, proj in enumerate(ctx.projs):
            a_w, b_w, noise = tensors[3 * i : 3 * i + 3]
            if grads[i] is None:
                out_grads += [None, None, None]
                continue
            g = grads[i].reshape(-1, grads[i].shape[-1])
            d_a, d_b = _lora_backward(g, x_l, acts[i], proj, a_w, b_w, noise, active, dx)
            out_grads += [d_a, d_b, None]
        grad_x = None
        if ctx.needs_input_grad[0] and dx.base is not None:
            grad_x = dx.total(x2.dtype).view(ctx.x_shape)
        return (grad_x, None, None, None, *out_grads)


class LoRAMLPFunction(torch.autograd.Function):
    """The gated LoRA MLP `down(act(gate(x)) * up(x))`, each projection `base + s * B A (dropout(.))`.

    `forward(ctx, x, projs, dtypes, activation, active, A_g, B_g, n_g, A_u, B_u, n_u, A_d, B_d, n_d)`, `active` as in
    [`LoRAProjectionsFunction`] (one column for all three projections: the MLP works token by token). Saves `x`,
    the gate and up outputs and the three rank-r LoRA activations; the backward recomputes `act(gate) * up` and writes
    gradients into the gate/up buffers (see [`~lorafleet.kernels.activations.gated_backward`]). Use [`lora_mlp`]
    rather than calling this directly.
    """

    @staticmethod
    def forward(ctx, x, projs, dtypes, activation, active, a_g, b_g, n_g, a_u, b_u, n_u, a_d, b_d, n_d):
        cd, ld, od = dtypes
        gate, up, down = projs
        x2 = x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            x_c, x_l = _cast(x2, cd), _cast(x2, ld)  # one cast shared by gate and up (PEFT/bnb cast once per projection)
            g, act_g = _lora_forward(x_c, x_l, gate, a_g, b_g, n_g, active, dtypes)
            u, act_u = _lora_forward(x_c, x_l, up, a_u, b_u, n_u, active, dtypes)
            h = gated_forward(g, u, activation)
            out, act_d = _lora_forward(_cast(h, cd), _cast(h, ld), down, a_d, b_d, n_d, active, dtypes)
        ctx.projs, ctx.dtypes, ctx.activation, ctx.x_shape = projs, dtypes, activation, x.shape
        ctx.save_for_backward(x2, g, u, act_g, act_u, act_d, active, a_g, b_g, n_g, a_u, b_u, n_u, a_d, b_d, n_d)
        return out.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        with torch.autocast(grad.device.type, enabled=False):  # explicit dtypes, see LoRAProjectionsFunction
            return LoRAMLPFunction._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        cd, ld, od = ctx.dtypes
        gate, up, down = ctx.projs
        x2, g, u, act_g, act_u, act_d, active, a_g, b_g, n_g, a_u, b_u, n_u, a_d, b_d, n_d = ctx.saved_tensors
        dy = grad.reshape(-1, grad.shape[-1])

        # Down projection: gradient of h = act(g) * u. A's gradient needs h, which only exists after the gated
        # backward below, so it is formed there from the rank-r `t_d`.
        dh = _InputGrad(cd, ld)
        dy_l = _cast(dy, ld)
        dh.add_base(_cast(dy, cd), dequantized_weight(down.base, cd))
        d_bd = (dy_l.t() @ act_d).mul_(down.scaling)
        t_d = (dy_l @ _cast(b_d, ld)).mul_(down.scaling)
        if active is not None:
            t_d.mul_(active)
        dh.add_lora(t_d, _cast(a_d, ld), n_d)
        dh = dh.total(od)
        if not dh.is_contiguous():
            dh = dh.contiguous()

        # In place: the gate/up buffers and dh receive h (recomputed), dL/dg and dL/du.
        h, dg, du = gated_backward(dh, g, u, ctx.activation)
        d_ad = t_d.t() @ _masked(_cast(h, ld), n_d)

        x_l = _cast(x2, ld)
        dx = _InputGrad(cd, ld)
        grads = []
        for proj, dproj, a, a_w, b_w, noise in ((gate, dg, act_g, a_g, b_g, n_g), (up, du, act_u, a_u, b_u, n_u)):
            grads += [*_lora_backward(dproj, x_l, a, proj, a_w, b_w, noise, active, dx), None]
        return (dx.total(x2.dtype).view(ctx.x_shape), None, None, None, None, *grads,
                _cast(d_ad, a_d.dtype), _cast(d_bd, b_d.dtype), None)


def _noises(projs, x: torch.Tensor, drop_dtype: torch.dtype, widths, active: Optional[torch.Tensor]) -> list:
    """Per projection, the `[tokens, width]` dropout keep-mask PEFT would draw (None without dropout).

    PEFT's aLoRA layers drop only the active rows (`dropout(x[mask])`), so with `active` the draw has that shape
    (same random numbers as PEFT) and is scattered into a mask of ones (inactive rows get no LoRA update anyway).
    """
    tokens = x.shape[:-1].numel()
    rows = None if active is None else active.reshape(-1)
    out = []
    for proj, width in zip(projs, widths):
        if rows is None:
            noise = proj.noise((*x.shape[:-1], width), drop_dtype, x.device)
        else:
            drawn = proj.noise((int(rows.sum()), width), drop_dtype, x.device)
            noise = None
            if drawn is not None:
                noise = torch.ones((tokens, width), dtype=drop_dtype, device=x.device)
                noise[rows] = drawn
        out.append(None if noise is None else noise.reshape(tokens, width))
    return out


def _active_column(x: torch.Tensor, active: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    if active is None:
        return None
    if active.dtype != torch.bool or active.shape != x.shape[:-1]:
        raise ValueError(
            f"active must be a bool tensor of shape {tuple(x.shape[:-1])}, got {active.dtype} {tuple(active.shape)}"
        )
    return active.reshape(-1, 1).to(device=x.device, dtype=dtype)


def _drop_dtype(x: torch.Tensor, proj: LoRAProjection) -> torch.dtype:
    # PEFT drops the LoRA input after casting it to the adapter dtype (no autocast) or as-is (autocast).
    if torch.is_autocast_enabled(x.device.type):
        return x.dtype
    return proj.lora_A.dtype


def lora_qkv(
    x: torch.Tensor, q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module, active: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K and V of `x` through three PEFT LoRA layers with one fused Function (one backward for the block).

    Args:
        x (`torch.Tensor`): `[..., hidden]` attention input.
        q_proj, k_proj, v_proj (`peft.tuners.lora.LoraLayer`): LoRA layers with one active adapter each, over a
            frozen `nn.Linear` or bnb `Linear4bit` (biases allowed, frozen).
        active (`torch.BoolTensor`, *optional*):
            aLoRA activation, `x.shape[:-1]`: the LoRA update is added only where True (PEFT's aLoRA arithmetic);
            elsewhere the output is the base layer's, and no gradient reaches A/B from those tokens. `None` means
            active everywhere (plain LoRA).

    Returns:
        `tuple[torch.Tensor, torch.Tensor, torch.Tensor]`: The three projections, `[..., out_i]`.

    Example:

    ```python
    >>> import torch
    >>> from peft import LoraConfig, get_peft_model
    >>> class Attn(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(8, 8) for _ in range(3))
    >>> m = get_peft_model(Attn(), LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj"]))
    >>> inner = m.base_model.model
    >>> q, k, v = lora_qkv(torch.randn(2, 3, 8), inner.q_proj, inner.k_proj, inner.v_proj)
    >>> q.shape
    torch.Size([2, 3, 8])

    ```
    """
    projs = tuple(LoRAProjection.from_peft(m) for m in (q_proj, k_proj, v_proj))
    return _projections(x, projs, active)


def lora_o(x: torch.Tensor, o_proj: nn.Module, active: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The attention output projection through a PEFT LoRA layer as one fused Function. See [`lora_qkv`]."""
    return _projections(x, (LoRAProjection.from_peft(o_proj),), active)[0]


def _projections(
    x: torch.Tensor, projs: tuple[LoRAProjection, ...], active: Optional[torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    dtypes = _dtypes(x, projs[0])
    column = _active_column(x, active, dtypes[1])
    noises = _noises(projs, x, _drop_dtype(x, projs[0]), [x.shape[-1]] * len(projs), active)
    flat: list = []
    for p, n in zip(projs, noises):
        flat += [p.lora_A, p.lora_B, None if n is None else _cast(n, dtypes[1])]
    return LoRAProjectionsFunction.apply(x, projs, dtypes, column, *flat)


def lora_mlp(
    x: torch.Tensor,
    gate_proj: nn.Module,
    up_proj: nn.Module,
    down_proj: nn.Module,
    activation: str,
    active: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`down(act(gate(x)) * up(x))` over three PEFT LoRA layers, as one fused autograd Function.

    Args:
        x (`torch.Tensor`): `[..., hidden]` MLP input.
        gate_proj, up_proj, down_proj (`peft.tuners.lora.LoraLayer`): LoRA layers, one active adapter each.
        activation (`str`): `silu` (SwiGLU), `gelu` (exact GeGLU) or `gelu_tanh` (tanh-approximated GeGLU).
        active (`torch.BoolTensor`, *optional*): aLoRA activation of each token, as in [`lora_qkv`] (the same mask
            for all three projections).

    Returns:
        `torch.Tensor`: `[..., hidden]`.

    Example:

    ```python
    >>> import torch
    >>> from peft import LoraConfig, get_peft_model
    >>> class MLP(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.gate_proj, self.up_proj = torch.nn.Linear(8, 16), torch.nn.Linear(8, 16)
    ...         self.down_proj = torch.nn.Linear(16, 8)
    >>> m = get_peft_model(MLP(), LoraConfig(r=2, target_modules=["gate_proj", "up_proj", "down_proj"]))
    >>> inner = m.base_model.model
    >>> lora_mlp(torch.randn(2, 3, 8), inner.gate_proj, inner.up_proj, inner.down_proj, "silu").shape
    torch.Size([2, 3, 8])

    ```
    """
    projs = tuple(LoRAProjection.from_peft(m) for m in (gate_proj, up_proj, down_proj))
    dtypes = _dtypes(x, projs[0])
    inter = projs[0].lora_B.shape[0]
    column = _active_column(x, active, dtypes[1])
    # Same order as PEFT's MLP forward: gate's dropout, then up's, then down's.
    noises = _noises(projs, x, _drop_dtype(x, projs[0]), [x.shape[-1], x.shape[-1], inter], active)
    flat = []
    for p, n in zip(projs, noises):
        flat += [p.lora_A, p.lora_B, None if n is None else _cast(n, dtypes[1])]
    return LoRAMLPFunction.apply(x, projs, dtypes, activation, column, *flat)
