"""The loss module data-parallel wrappers wrap: a batch in, (summed token loss, target token count) out."""

from __future__ import annotations

import logging

import torch

from lorafleet.kernels.loss import lm_loss
from lorafleet.model.alora import activation

logger = logging.getLogger(__name__)


class LossModule(torch.nn.Module):
    """The unit DDP and DeepSpeed wrap: a batch in, (summed token loss, target token count) out.

    Wrapping the loss inside a module's `forward` lets the fused LM-head loss run through the data-parallel
    wrapper's forward, which is where DDP prepares its gradient reducer.

    Args:
        model (`peft.PeftModel`):
            The LoRA model (kernels already applied).
        fused_loss (`bool`):
            Use the chunked LM-head loss. Pass the model's [`~lorafleet.kernels.KernelPlan`]`.fused_loss`, never
            the spec's `kernels.loss` flag: the plan says whether this model's head allowed it.
    """

    def __init__(self, model, fused_loss: bool):
        super().__init__()
        self.model = model
        self.fused_loss = fused_loss

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None, alora_offsets=None, alora_mask=None):

        kwargs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            position_ids=position_ids,
            fused=self.fused_loss,
        )
        if alora_offsets is None and alora_mask is None:
            return lm_loss(self.model, **kwargs)

        # aLoRA batches (see lorafleet.data.batching): the activation is applied on the adapter layers themselves,
        # because the fused loss calls the decoder directly and never reaches PeftModel.forward's offset logic.
        with activation(self.model, alora_mask if alora_mask is not None else alora_offsets) as causal_lm:
            return lm_loss(causal_lm, **kwargs)

