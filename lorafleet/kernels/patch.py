"""Patch a PEFT LoRA model's decoder layers to use lorafleet's fused LoRA paths.

[`apply_kernels`] checks each decoder layer's structure and, where it knows the layout, replaces (on the module
instance, not the class) the MLP's `forward`, the attention's `forward` (with a forward written for the family's
layout that computes Q/K/V through [`lora_qkv`]) and the O projection's `forward` (through [`lora_o`]). It never
edits library source. Every layer/path it does not fuse is listed with a reason in the returned [`KernelPlan`].
Which attention and MLP classes it knows, and each attention's layout, come from the family registry
([`lorafleet.families`]).

Each patched forward re-checks cheap runtime conditions (adapters disabled, merged, another adapter activated,
extra call arguments) and runs the original forward when they do not hold, so PEFT's context managers such as
`disable_adapter()` keep working.

aLoRA (activated LoRA) layers are fused too: the patched forwards read the activation PEFT hands its aLoRA layers
for the current call (per-row `alora_offsets`, or lorafleet's per-token mask for packed rows) and pass it to the
fused Functions, which add the LoRA update only on active tokens, as PEFT's own aLoRA layers do.
"""

from __future__ import annotations

import types
from typing import Any, Callable, Optional

import torch
from torch import nn

from lorafleet.compat.bitsandbytes import is_cpu_packed
from lorafleet.compat.peft import hooked_alora_offsets, is_alora_variant, lora_variant
from lorafleet.compat.transformers import (
    apply_rotary_pos_emb,
    attention_interface,
    missing_attention_functions,
    pop_cache_argument,
)
from lorafleet.families import FAMILIES, AttentionLayout
from lorafleet.kernels.alora import offsets_to_mask
from lorafleet.kernels.plan import KernelPlan, SkippedKernel

from .lora_ops import lora_mlp, lora_o, lora_qkv
from .loss import fused_loss_refusal

_ORIG = "_lorafleet_orig_forward"


# ----------------------------------------------------------------------------------------------------------------
# Layout knowledge per family
# ----------------------------------------------------------------------------------------------------------------


ATTENTION_LAYOUTS: dict[str, AttentionLayout] = {f.attention_class: f.attention for f in FAMILIES.values()}

# MLP classes whose forward is exactly `down_proj(act_fn(gate_proj(x)) * up_proj(x))`.
GATED_MLPS: tuple[str, ...] = tuple(f.mlp_class for f in FAMILIES.values())


def activation_name(act: nn.Module) -> Optional[str]:
    """The fused activation matching `act` (`silu`, `gelu`, `gelu_tanh`), or None if lorafleet does not know it.

    Example:

    ```python
    >>> from transformers.activations import ACT2FN
    >>> activation_name(ACT2FN["gelu_pytorch_tanh"]), activation_name(ACT2FN["silu"]), activation_name(ACT2FN["relu"])
    ('gelu_tanh', 'silu', None)

    ```
    """
    from transformers import activations as hf

    kind = type(act)
    if kind in (nn.SiLU, getattr(hf, "SiLUActivation", nn.SiLU)):
        return "silu"
    if kind is nn.GELU:
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    tanh_kinds = tuple(getattr(hf, n) for n in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "FastGELUActivation") if hasattr(hf, n))
    if kind in tanh_kinds:
        return "gelu_tanh"
    if kind is getattr(hf, "GELUActivation", None):
        return "gelu"
    return None


def lora_refusal(layer: Any, name: str) -> Optional[str]:
    """Why a projection cannot go through the fused path (None when it can).

    Args:
        layer (`nn.Module`): The projection module (`q_proj`, `gate_proj`, ...).
        name (`str`): Its name, for the message.

    Returns:
        `str` or `None`: A one-line reason.
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover
        return "peft is not installed"
    if not isinstance(layer, LoraLayer):
        return f"{name} is a {type(layer).__name__}, not a PEFT LoRA layer"
    if type(layer).__name__ not in ("Linear", "Linear4bit"):
        return f"{name} is a PEFT {type(layer).__name__} layer (only lora.Linear / bnb Linear4bit are fused)"
    active = list(layer.active_adapters)
    if len(active) != 1:
        return f"{name} has {len(active)} active adapters (fused path needs exactly one)"
    adapter = active[0]
    if adapter not in layer.lora_A:
        return f"{name} has no LoRA weights for active adapter {adapter!r}"
    variant = lora_variant(layer, adapter)
    if variant is not None and not is_alora(layer, adapter):
        vname = type(variant).__name__
        if "dora" in vname.lower():
            return f"{name} uses DoRA; fused DoRA is not supported"
        return f"{name} uses the LoRA variant {vname}; not supported by the fused path"
    if getattr(layer, "use_dora", {}).get(adapter, False):
        return f"{name} uses DoRA; fused DoRA is not supported"
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        return f"{name} has a LoRA bias (lora_bias=True); not supported by the fused path"
    if layer.merged:
        return f"{name} has adapters merged into the base weights"
    base = layer.get_base_layer()
    kind = type(base).__name__
    if kind == "Linear4bit":
        state = getattr(base.weight, "quant_state", None)
        if state is None:
            return f"{name}: Linear4bit weight is not quantized yet (no quant_state)"
        if is_cpu_packed(base.weight):
            return (
                f"{name}: 4-bit weight was repacked for AVX512-BF16 inference; set support_avx512bf16_for_cpu=False "
                "on every Linear4bit before the first forward"
            )
    elif type(base) is not nn.Linear:
        return f"{name}'s base layer is a {kind} (fused path supports nn.Linear and bitsandbytes Linear4bit)"
    if base.weight.requires_grad:
        return f"{name}'s base weight is trainable (fused path treats it as frozen)"
    if base.bias is not None and base.bias.requires_grad:
        return f"{name}'s base bias is trainable (LoRA bias='all'/'lora_only' is not fused)"
    return None


def is_alora(layer: nn.Module, adapter: str) -> bool:
    """Whether `adapter` of the PEFT LoRA layer `layer` is an activated LoRA (PEFT's aLoRA variant)."""
    return is_alora_variant(lora_variant(layer, adapter))


def alora_active(offsets: Any, x: torch.Tensor) -> torch.Tensor:
    """The bool activation mask (`x.shape[:-1]`) PEFT's aLoRA layer computes from `alora_offsets` for input `x`.

    Args:
        offsets (`list`, `torch.BoolTensor` or `None`): What PEFT passes as `alora_offsets`: per-row offsets
            (`None` entries: no invocation in that row), a per-token bool mask (lorafleet's packed rows, see
            [`~lorafleet.model.alora.activation`]), or `None` (no activation anywhere: the base model's output).
        x (`torch.Tensor`): The layer input, `[batch, tokens, in]` or `[batch, in]`.

    Returns:
        `torch.BoolTensor`: True where the adapter acts.

    Example:

    ```python
    >>> import torch
    >>> alora_active([2, None], torch.zeros(2, 3, 4)).int().tolist()
    [[0, 1, 1], [0, 0, 0]]

    ```
    """

    if offsets is None:
        return torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
    if isinstance(offsets, torch.Tensor) and offsets.dtype == torch.bool:
        if offsets.shape != x.shape[:-1]:
            raise ValueError(f"aLoRA activation mask {tuple(offsets.shape)} does not match the input {tuple(x.shape[:-1])}")
        return offsets.to(x.device)
    tokens = x.shape[1] if x.dim() == 3 else 1
    return offsets_to_mask(list(offsets), tokens, device=x.device).reshape(x.shape[:-1])


def _still_fusable(layers: tuple[nn.Module, ...], adapter: str) -> bool:
    for layer in layers:
        if layer.disable_adapters or layer.merged or list(layer.active_adapters) != [adapter]:
            return False
    return True


# ----------------------------------------------------------------------------------------------------------------
# Patched forwards
# ----------------------------------------------------------------------------------------------------------------


def _activation_for(layer: nn.Module, adapter: str, x: torch.Tensor) -> Optional[torch.Tensor]:
    # Read per call: the hook, hence the activation, changes with every batch.
    if not is_alora(layer, adapter):
        return None
    # The fused paths never call the layer, so PEFT's pre-hook that would hand it the activation never runs.
    return alora_active(hooked_alora_offsets(layer), x)


def _mlp_forward(self, x, *args, **kwargs):
    projs = (self.gate_proj, self.up_proj, self.down_proj)
    if args or kwargs or not _still_fusable(projs, self._lorafleet_adapter):
        return getattr(self, _ORIG)(x, *args, **kwargs)
    return lora_mlp(x, *projs, self._lorafleet_activation, _activation_for(self.gate_proj, self._lorafleet_adapter, x))


def _o_forward(self, x, *args, **kwargs):
    adapter = self._lorafleet_adapter
    alora = is_alora(self, adapter)
    # PEFT's pre-hook hands aLoRA layers their activation as a call argument.
    offsets = kwargs.pop("alora_offsets", None) if alora else None
    if args or kwargs or not _still_fusable((self,), adapter):
        if alora:
            kwargs["alora_offsets"] = offsets
        return getattr(self, _ORIG)(x, *args, **kwargs)
    return lora_o(x, self, alora_active(offsets, x) if alora else None)


def _attention_forward(
    self,
    hidden_states: torch.Tensor,
    position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    attention_mask: Optional[torch.Tensor] = None,
    *args: Any,
    **kwargs: Any,
):
    projs = (self.q_proj, self.k_proj, self.v_proj)
    if not _still_fusable(projs, self._lorafleet_adapter):
        return getattr(self, _ORIG)(hidden_states, position_embeddings, attention_mask, *args, **kwargs)
    # Taken out of `kwargs` under either of its names: the rest of `kwargs` goes on to the attention function.
    cache = pop_cache_argument(args, kwargs)
    layout: AttentionLayout = self._lorafleet_layout
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)

    query, key, value = lora_qkv(
        hidden_states, *projs, active=_activation_for(self.q_proj, self._lorafleet_adapter, hidden_states)
    )
    query = query.view(hidden_shape).transpose(1, 2)
    key = key.view(hidden_shape).transpose(1, 2)
    value = value.view(hidden_shape).transpose(1, 2)
    if layout.qk_norm:
        query = self.q_norm(query)
        key = self.k_norm(key)

    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(self, query, key, cos, sin)
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx)

    interface: Callable = attention_interface(self)
    extra: dict[str, Any] = {}
    if layout.sliding_window == "config":
        extra["sliding_window"] = getattr(self.config, "sliding_window", None)
    elif layout.sliding_window == "attr":
        extra["sliding_window"] = self.sliding_window
    if layout.softcap:
        extra["softcap"] = self.attn_logit_softcapping
    attn_output, attn_weights = interface(
        self,
        query,
        key,
        value,
        attention_mask,
        dropout=self.attention_dropout if self.training else 0.0,
        scaling=self.scaling,
        **extra,
        **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    attn_output = self.o_proj(attn_output)
    return attn_output, attn_weights


def _install(module: nn.Module, fn: Callable, **attrs: Any) -> None:
    if not hasattr(module, _ORIG):
        # The bound method the module had (class forward); restored by remove_kernels.
        setattr(module, _ORIG, module.forward)
    for key, value in attrs.items():
        setattr(module, key, value)
    module.forward = types.MethodType(fn, module)


def _uninstall(module: nn.Module) -> bool:
    if not hasattr(module, _ORIG):
        return False
    del module.forward
    delattr(module, _ORIG)
    for key in ("_lorafleet_adapter", "_lorafleet_activation", "_lorafleet_layout"):
        if key in module.__dict__:
            delattr(module, key)
    return True


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def _decoder_layers(model: nn.Module) -> tuple[str, list[nn.Module]]:
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(causal_lm, "model", None)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        return "", []
    prefix = "model.layers"
    return prefix, list(layers)


def _check_group(owner: nn.Module, names: tuple[str, ...]) -> tuple[Optional[str], Optional[str]]:
    """(reason, adapter) for a group of projections on `owner` that must share one active adapter."""
    adapters = set()
    for name in names:
        layer = getattr(owner, name, None)
        if layer is None:
            return f"{type(owner).__name__} has no {name}", None
        reason = lora_refusal(layer, name)
        if reason:
            return reason, None
        adapters.add(layer.active_adapters[0])
    if len(adapters) != 1:
        return f"{', '.join(names)} have different active adapters {sorted(adapters)}", None
    adapter = adapters.pop()
    kinds = {is_alora(getattr(owner, name), adapter) for name in names}
    if len(kinds) != 1:
        return f"{', '.join(names)} mix aLoRA and plain LoRA layers", None
    return None, adapter


def apply_kernels(model: nn.Module, spec: Any) -> KernelPlan:
    """Route a PEFT LoRA model's decoder layers through the fused kernels that `spec` enables.

    Args:
        model (`peft.PeftModel`): A LoRA model (base possibly bitsandbytes 4-bit) of a supported family
            (llama, mistral, qwen2, gemma, gemma2, gemma3); patched in place.
        spec (`lorafleet.spec.KernelsSpec`): Which paths to fuse (`enabled`, `mlp`, `qkv`, `o`, `loss`).

    Returns:
        [`KernelPlan`]: `applied` maps each fused path to the number of decoder layers it covers (`loss` counts the
        model's head: 0 or 1), e.g. `{"mlp": 4, "qkv": 4, "o": 4, "loss": 1}`, empty when `spec.enabled` is false;
        `skipped` gives a reason for every layer/path left unfused. The training loop calls [`lm_loss`] with
        `fused=plan.fused_loss`. The plan is also stored as plain data in `model.lorafleet_kernel_report`
        (`{"applied": {...}, "skipped": [{"layer": ..., "path": ..., "reason": ...}]}`).

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM
    >>> from peft import LoraConfig, get_peft_model
    >>> from lorafleet.model.families import family_config
    >>> from lorafleet.spec import KernelsSpec
    >>> cfg = family_config("llama", 64, {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    ...                                   "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16})
    >>> peft_model = get_peft_model(AutoModelForCausalLM.from_config(cfg), LoraConfig(r=4, target_modules="all-linear"))
    >>> plan = apply_kernels(peft_model, KernelsSpec())
    >>> plan.applied, plan.fused_loss, plan.skipped
    ({'mlp': 2, 'qkv': 2, 'o': 2, 'loss': 1}, True, ())

    ```
    """
    applied: dict[str, int] = {}
    skipped: list[SkippedKernel] = []
    if not spec.enabled:
        return _set_report(model, KernelPlan())
    for path in ("mlp", "qkv", "o"):
        if getattr(spec, path):
            applied[path] = 0
    prefix, layers = _decoder_layers(model)
    if not layers:
        for path in applied:
            skipped.append(SkippedKernel("model", path, "no decoder layers found at `.model.layers`"))
    for idx, layer in enumerate(layers):
        where = f"{prefix}.{idx}"
        mlp = getattr(layer, "mlp", None)
        attn = getattr(layer, "self_attn", None)
        if spec.mlp:
            reason = None
            if mlp is None:
                reason = "decoder layer has no `mlp`"
            elif type(mlp).__name__ not in GATED_MLPS:
                reason = f"unknown MLP class {type(mlp).__name__} (known: {', '.join(GATED_MLPS)})"
            else:
                act = activation_name(getattr(mlp, "act_fn", None))
                if act is None:
                    reason = f"unknown activation {type(getattr(mlp, 'act_fn', None)).__name__}"
                else:
                    reason, adapter = _check_group(mlp, ("gate_proj", "up_proj", "down_proj"))
            if reason:
                skipped.append(SkippedKernel(f"{where}.mlp", "mlp", reason))
            else:
                _install(mlp, _mlp_forward, _lorafleet_adapter=adapter, _lorafleet_activation=act)
                applied["mlp"] += 1
        if spec.qkv:
            reason = None
            if attn is None:
                reason = "decoder layer has no `self_attn`"
            elif type(attn).__name__ not in ATTENTION_LAYOUTS:
                reason = f"unknown attention class {type(attn).__name__} (known: {', '.join(ATTENTION_LAYOUTS)})"
            elif missing_attention_functions(attn):
                reason = f"{type(attn).__module__} lacks the functions the fused attention forward calls"
            else:
                reason, adapter = _check_group(attn, ("q_proj", "k_proj", "v_proj"))
            if reason:
                skipped.append(SkippedKernel(f"{where}.self_attn", "qkv", reason))
            else:
                _install(attn, _attention_forward, _lorafleet_adapter=adapter,
                         _lorafleet_layout=ATTENTION_LAYOUTS[type(attn).__name__])
                applied["qkv"] += 1
        if spec.o:
            reason = "decoder layer has no `self_attn`" if attn is None else None
            if reason is None:
                reason, adapter = _check_group(attn, ("o_proj",))
            if reason:
                skipped.append(SkippedKernel(f"{where}.self_attn.o_proj", "o", reason))
            else:
                _install(attn.o_proj, _o_forward, _lorafleet_adapter=adapter)
                applied["o"] += 1
    if spec.loss:
        reason = fused_loss_refusal(model)
        applied["loss"] = 0 if reason else 1
        if reason:
            skipped.append(SkippedKernel("lm_head", "loss", reason))
    return _set_report(model, KernelPlan(applied, tuple(skipped)))


def _set_report(model: nn.Module, plan: KernelPlan) -> KernelPlan:
    # Set on the object itself (PeftModel forwards unknown attribute reads to the base model, not writes).
    object.__setattr__(model, "lorafleet_kernel_report", plan.report())
    return plan


def remove_kernels(model: nn.Module) -> int:
    """Undo [`apply_kernels`]: restore every patched module's own forward.

    Returns:
        `int`: The number of modules restored.

    Example:

    ```python
    >>> remove_kernels(torch.nn.Linear(2, 2))
    0

    ```
    """
    restored = sum(_uninstall(m) for m in model.modules())
    if "lorafleet_kernel_report" in model.__dict__:
        del model.__dict__["lorafleet_kernel_report"]
    return restored
