"""Data-parallel strategies: how a worker wraps the loss module, steps the optimizer and exposes adapter state.

The worker loop only talks to a [`Strategy`]; DDP and DeepSpeed differ in who owns the optimizer, how gradient
accumulation skips synchronization and where the (possibly partitioned) LoRA parameters live.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
import torch.distributed as dist

from .model import LossModule
from .spec import JobSpec


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def make_scheduler(spec: JobSpec, optimizer: torch.optim.Optimizer):
    """Warm-up then `training.lr_scheduler` decay over `training.steps`, stepped once per optimizer step."""
    from transformers import get_scheduler

    return get_scheduler(
        spec.training.lr_scheduler if spec.training.lr_scheduler != "constant" else "constant_with_warmup",
        optimizer=optimizer,
        num_warmup_steps=spec.training.warmup,
        num_training_steps=spec.training.steps,
    )


class Strategy:
    """Common interface; see [`DDPStrategy`]."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any

    def accumulate(self, last_micro_batch: bool):
        """Context for one micro-batch's forward+backward; gradients are synchronized on the last one only."""
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> Optional[float]:
        """Clip, step optimizer and scheduler, zero gradients. Returns the gradient norm before clipping."""
        raise NotImplementedError

    def adapter_state(self) -> Optional[dict[str, torch.Tensor]]:
        """The full adapter tensors on the rank that writes checkpoints (rank 0), `None` elsewhere."""
        raise NotImplementedError

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def optimizer_state(self) -> Optional[dict]:
        raise NotImplementedError

    def load_optimizer_state(self, state: dict) -> None:
        raise NotImplementedError

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


class DDPStrategy(Strategy):
    """Plain AdamW over the LoRA parameters, DDP across workers (gloo on CPU, NCCL on GPU).

    Args:
        peft_model ([`~peft.PeftModel`]):
            The model with LoRA adapters (kernels already applied).
        spec ([`~lorafleet.spec.JobSpec`]):
            For the optimizer, scheduler, clipping and loss settings.
        device (`torch.device`):
            The worker's device.
    """

    def __init__(self, peft_model, spec: JobSpec, device: torch.device):
        self.peft_model = peft_model
        self.spec = spec
        loss_module = LossModule(peft_model, fused_loss=spec.kernels.enabled and spec.kernels.loss)
        self.params = [p for p in peft_model.parameters() if p.requires_grad]
        if is_distributed():
            from torch.nn.parallel import DistributedDataParallel

            self.module = DistributedDataParallel(
                loss_module, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=False
            )
        else:
            self.module = loss_module
        self.optimizer = torch.optim.AdamW(
            self.params, lr=spec.training.learning_rate, weight_decay=spec.training.weight_decay
        )
        self.scheduler = make_scheduler(spec, self.optimizer)

    def accumulate(self, last_micro_batch: bool):
        if last_micro_batch or not hasattr(self.module, "no_sync"):
            return contextlib.nullcontext()
        return self.module.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> Optional[float]:
        norm = None
        if self.spec.training.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.spec.training.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def adapter_state(self) -> Optional[dict[str, torch.Tensor]]:
        from peft import get_peft_model_state_dict

        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        return get_peft_model_state_dict(self.peft_model)

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.peft_model, state)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise RuntimeError(f"checkpoint adapter has tensors this model lacks: {unexpected[:3]}")

    def optimizer_state(self) -> Optional[dict]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def make_strategy(peft_model, spec: JobSpec, device: torch.device) -> Strategy:
    """The strategy `scaling.strategy` names."""
    if spec.scaling.strategy == "deepspeed":
        raise NotImplementedError("scaling.strategy: deepspeed is not available in this build yet")
    return DDPStrategy(peft_model, spec, device)
