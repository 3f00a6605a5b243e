"""Causal-LM loss: LM head + cross-entropy in token chunks, never materializing the `[tokens, vocab]` logits.

[`lm_loss`] is the one function the training loop calls, for both the fused and the plain path; it returns the
*sum* of token cross-entropies (fp32) and the number of target tokens, since the trainer normalizes by the global
token count itself.

The fused path runs the decoder to get hidden states, keeps only the positions that have a target (label not
-100 after the shift), and computes logits for a chunk of those rows at a time: fp32 log-sum-exp, the optional
tanh soft-cap of gemma2 (`final_logit_softcapping`), and, when a gradient is needed, the gradient w.r.t. the
chunk's hidden states right away (softmax minus one-hot, times the soft-cap derivative, times the head weight).
The LM head is frozen (also when tied to the embeddings, as in the gemma families), so no weight gradient is
formed; the backward only scales the stored hidden-state gradient by the incoming scalar.

The plain path runs the causal LM's own forward, so the head keeps the model's semantics (a LoRA or
`modules_to_save` head that trains, bias, tied weights, soft-cap), but asks it for logits at the target positions only
(`logits_to_keep` as a boolean mask, see [`lorafleet.compat.transformers.logits_at`]): prompt tokens and padding cost
no head matmul and no cross-entropy on either path. [`label_only_refusal`] names the cases that still need full logits.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lorafleet.compat.peft import is_alora_variant, lora_variants
from lorafleet.compat.transformers import logits_at, takes_logits_to_keep
from lorafleet.constants import IGNORE_INDEX
from lorafleet.kernels.lora_ops import matmul_dtype

# Rows per chunk = _CHUNK_ELEMS // vocab, so one chunk's fp32 logits are ~16 MiB (128 rows of a 32k vocabulary)
# plus one same-size temporary for the soft-capped case. The bound is chosen for memory (the full-logits path
# holds [tokens, vocab] in fp32 several times: 2048 x 32000 x 4 B = 250 MiB each); the chunk size was not tuned
# for speed (no GPU here, and on CPU each chunk is already a large GEMM).
_CHUNK_ELEMS = 1 << 22


def _causal_lm(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _decoder(causal_lm: nn.Module) -> nn.Module:
    decoder = getattr(causal_lm, "model", None)
    if decoder is None and hasattr(causal_lm, "get_decoder"):
        decoder = causal_lm.get_decoder()
    if decoder is None:
        raise ValueError(f"{type(causal_lm).__name__} has no `.model` decoder; use fused=False")
    return decoder


def fused_loss_refusal(model: nn.Module) -> Optional[str]:
    """Why the chunked loss cannot be used on `model` (None when it can).

    Args:
        model (`nn.Module`): A PEFT model or a Hugging Face causal LM.

    Returns:
        `str` or `None`: A one-line reason, or None.
    """
    causal_lm = _causal_lm(model)
    if getattr(causal_lm, "model", None) is None:
        return f"{type(causal_lm).__name__} has no `.model` decoder"
    head = causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
    if head is None:
        return "the model has no output embeddings (LM head)"
    if type(head) is not nn.Linear:
        return f"LM head is a {type(head).__name__}, not a plain frozen nn.Linear (LoRA or modules_to_save on lm_head)"
    if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        return "LM head is trainable; the chunked loss computes no head gradient"
    return None


def label_only_refusal(model: nn.Module) -> Optional[str]:
    """Why the plain loss path must compute logits for every position of `model` (None when it need not).

    Args:
        model (`nn.Module`): A PEFT model or a Hugging Face causal LM.

    Returns:
        `str` or `None`: A one-line reason, or None.

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM
    >>> from lorafleet.model.families import family_config
    >>> cfg = family_config("gemma2", 64, {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
    ...                                    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16})
    >>> label_only_refusal(AutoModelForCausalLM.from_config(cfg)) is None
    True
    ```
    """
    causal_lm = _causal_lm(model)
    if not takes_logits_to_keep(causal_lm):
        return f"{type(causal_lm).__name__}.forward has no `logits_to_keep` argument"
    head = causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
    # An aLoRA head reads per-row offsets (or lorafleet's per-token mask) against a [batch, seq] input; the kept
    # rows are flattened, so its activation would no longer line up.
    if head is not None and any(is_alora_variant(v) for v in lora_variants(head).values()):
        return "the LM head is an aLoRA layer (its activation needs the [batch, seq] layout)"
    return None


class ChunkedLMHeadLoss(torch.autograd.Function):
    """Sum over rows of `cross_entropy(softcap(h @ W^T + b), target)` in fp32, computed `chunk_rows` rows at a time.

    `forward(ctx, hidden, weight, bias, targets, softcap, chunk_rows) -> 0-dim fp32 tensor`. Only `hidden`
    receives a gradient; it is computed in the forward (chunk by chunk, while the chunk's logits exist) and
    scaled by the upstream gradient in the backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, chunk_rows):
        n = hidden.shape[0]
        need_grad = ctx.needs_input_grad[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        rows = torch.arange(min(chunk_rows, max(n, 1)), device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk_rows):
                end = min(start + chunk_rows, n)
                h = hidden[start:end]
                tgt = targets[start:end]
                # The matmul runs in `matmul_dtype` (bf16 where the CPU/GPU has native bf16 GEMMs, else fp32);
                # the log-softmax always runs in fp32, as in transformers' loss.
                logits = torch.nn.functional.linear(h, weight, bias).float()
                if softcap is not None:
                    logits.div_(softcap).tanh_()
                    capped_tanh = logits.clone() if need_grad else None
                    logits.mul_(softcap)
                lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, tgt[:, None]).squeeze(1)
                total += (lse - picked).sum()
                if need_grad:
                    probs = logits.sub_(lse[:, None]).exp_()
                    probs[rows[: end - start], tgt] -= 1.0
                    if softcap is not None:
                        probs.mul_(capped_tanh.mul_(capped_tanh).neg_().add_(1.0))
                    torch.mm(probs.to(weight.dtype), weight, out=grad_hidden[start:end])
        ctx.save_for_backward(grad_hidden if need_grad else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad_hidden,) = ctx.saved_tensors
        if grad_hidden is None:
            return None, None, None, None, None, None
        return grad_hidden * grad_out.to(grad_hidden.dtype), None, None, None, None, None


def chunked_lm_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    chunk_rows: Optional[int] = None,
) -> torch.Tensor:
    """Summed fp32 cross-entropy of `softcap(hidden @ weight^T + bias)` against `targets`, chunked over rows.

    Args:
        hidden (`torch.Tensor`): `[n, hidden]` hidden states of the positions that have a target.
        weight (`torch.Tensor`): `[vocab, hidden]` frozen LM head weight.
        targets (`torch.Tensor`): `[n]` target token ids (no ignore index: select rows first).
        bias (`torch.Tensor`, *optional*): `[vocab]` head bias.
        softcap (`float`, *optional*): `final_logit_softcapping` (logits become `cap * tanh(logits / cap)`).
        chunk_rows (`int`, *optional*): Rows per chunk; defaults to about 4M logits per chunk.

    Returns:
        `torch.Tensor`: 0-dim fp32 sum of the token losses (differentiable w.r.t. `hidden`).

    Example:

    ```python
    >>> import torch
    >>> h = torch.randn(5, 8, requires_grad=True); w = torch.randn(11, 8); t = torch.randint(0, 11, (5,))
    >>> ref = torch.nn.functional.cross_entropy(h @ w.t(), t, reduction="sum")
    >>> torch.allclose(chunked_lm_head_loss(h, w, t, chunk_rows=2), ref, atol=1e-5)
    True

    ```
    """
    if hidden.dim() != 2 or targets.dim() != 1 or hidden.shape[0] != targets.shape[0]:
        raise ValueError("hidden must be [n, d] and targets [n]")

    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else weight.dtype
    dtype = matmul_dtype(dtype, hidden.device)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    if chunk_rows is None:
        chunk_rows = max(1, _CHUNK_ELEMS // weight.shape[0])
    # `hidden.to` is differentiable: the gradient comes back in the caller's dtype.
    return ChunkedLMHeadLoss.apply(hidden, weight, bias, targets, softcap, int(chunk_rows))


def lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    fused: bool = True,
    chunk_rows: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy of a causal LM, fused (chunked head + loss) or plain.

    Labels are aligned with `input_ids` (Hugging Face convention, `-100` = ignore); the shift happens here.
    Both paths only make ordinary module calls (so a DDP-wrapped module may call this in its forward).

    Args:
        model (`nn.Module`): The PEFT model (or the raw causal LM).
        input_ids (`torch.LongTensor`): `[batch, seq]`.
        attention_mask (`torch.Tensor`, *optional*): `[batch, seq]`, 1 for real tokens.
        labels (`torch.LongTensor`, *optional*): `[batch, seq]`; defaults to `input_ids` with padding
            (`attention_mask == 0`) ignored.
        position_ids (`torch.LongTensor`, *optional*): `[batch, seq]` (packed rows restart positions).
        fused (`bool`, *optional*, defaults to `True`): Chunked LM head + loss (see [`fused_loss_refusal`]) or the
            causal LM's own forward, with logits at the target positions only (full logits where
            [`label_only_refusal`] says so).
        chunk_rows (`int`, *optional*): Token rows per chunk for the fused path.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: (sum of the token cross-entropies, fp32 0-dim with grad; number of
        target tokens, int64 0-dim).

    Example:

    ```python
    >>> import torch
    >>> from transformers import AutoModelForCausalLM
    >>> from lorafleet.model.families import family_config
    >>> cfg = family_config("llama", 64, {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
    ...                                   "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16})
    >>> model = AutoModelForCausalLM.from_config(cfg)
    >>> _ = model.lm_head.requires_grad_(False)  # the fused loss treats the head as frozen (as LoRA does)
    >>> ids = torch.randint(0, 64, (2, 6))
    >>> a, n = lm_loss(model, ids, fused=True); b, _ = lm_loss(model, ids, fused=False)
    >>> int(n), torch.allclose(a, b, rtol=1e-4)
    (10, True)

    ```
    """
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    shift_labels = labels[:, 1:]
    target_mask = shift_labels != IGNORE_INDEX
    n_tokens = target_mask.sum()
    if not fused:
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        if label_only_refusal(model) is None:
            # Position t predicts label t+1: keep t where that label is a target (never the last position).
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = target_mask
            logits, targets = logits_at(model, keep, **inputs), shift_labels[target_mask]
        else:
            logits, targets = model(**inputs).logits[:, :-1], shift_labels
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return loss, n_tokens
    reason = fused_loss_refusal(model)
    if reason is not None:
        raise ValueError(f"fused loss unavailable: {reason}; call lm_loss(..., fused=False)")
    causal_lm = _causal_lm(model)
    out = _decoder(causal_lm)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    rows = hidden[:, :-1][target_mask]
    head = causal_lm.get_output_embeddings()
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
    loss = chunked_lm_head_loss(rows, head.weight, shift_labels[target_mask], head.bias, softcap, chunk_rows)
    return loss, n_tokens
