"""Data-parallel strategies: how a worker wraps the loss module, steps the optimizer and exposes adapter state.

The worker loop only talks to a [`Strategy`]; DDP and DeepSpeed differ in who owns the optimizer, how gradient
accumulation skips synchronization and where the (possibly partitioned) LoRA parameters live.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
import torch.distributed as dist

from lorafleet.compat.deepspeed import load_zero_state
from lorafleet.kernels.plan import KernelPlan
from lorafleet.spec import JobSpec
from lorafleet.train.loss import LossModule


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
        """A CPU copy of the full adapter tensors on the rank that writes checkpoints (rank 0), `None` elsewhere.

        A copy, not the live parameters: checkpoint files are written while training goes on.
        """
        raise NotImplementedError

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def optimizer_state(self) -> Optional[dict]:
        raise NotImplementedError

    def load_optimizer_state(self, state: dict) -> None:
        raise NotImplementedError

    def optimizer_shard(self) -> Optional[dict]:
        """This worker's part of a partitioned optimizer state (saved by every worker), `None` when replicated."""
        return None

    def load_optimizer_shard(self, shard: dict) -> None:
        raise RuntimeError("this strategy's optimizer is not partitioned; the checkpoint's shards cannot be loaded")

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by state-dict name: what an adapter checkpoint holds, for
    `get_peft_model_state_dict(model, state_dict=...)`.

    PEFT's default is the whole `model.state_dict()`, which for a 4-bit base serializes every layer's quantization
    state only to filter it out again.
    """
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


class AdapterSnapshot:
    """Copies of the adapter's tensors under their checkpoint names, as `get_peft_model_state_dict` names them.

    PEFT's function re-derives the names on every call (a walk of every module and a re-read of the base model's
    config): 4.4 ms of the training thread's time at each checkpoint step of the default job, against 0.3 ms for
    the copies themselves. The names do not change during training, so they are resolved once and the same
    parameters copied after that. Where PEFT returns tensors that are not the parameters themselves, its result is
    taken afresh each time.

    Args:
        peft_model ([`~peft.PeftModel`]):
            The model whose trainable parameters form the adapter.

    Example:

    ```python
    >>> from peft import LoraConfig, get_peft_model
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                      num_attention_heads=2, num_key_value_heads=2)
    >>> model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    >>> snapshot = AdapterSnapshot(model)()
    >>> sorted(snapshot)[0]
    'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'
    ```
    """

    def __init__(self, peft_model):
        self.peft_model = peft_model
        self._named: Optional[list[tuple[str, torch.Tensor]]] = None

    def __call__(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the adapter state dict, taken now."""
        named = self._named
        if named is None:
            from peft import get_peft_model_state_dict

            params = trainable_state(self.peft_model)
            named = list(get_peft_model_state_dict(self.peft_model, state_dict=params).items())
            live = {id(param) for param in params.values()}
            if all(id(tensor) in live for _, tensor in named):
                self._named = named
        return {name: tensor.detach().to("cpu", copy=True) for name, tensor in named}


class DDPStrategy(Strategy):
    """Plain AdamW over the LoRA parameters, DDP across workers (gloo on CPU, NCCL on GPU).

    Args:
        peft_model ([`~peft.PeftModel`]):
            The model with LoRA adapters (kernels already applied).
        spec ([`~lorafleet.spec.JobSpec`]):
            For the optimizer, scheduler and clipping settings.
        device (`torch.device`):
            The worker's device.
        kernels ([`~lorafleet.kernels.KernelPlan`], *optional*):
            What [`~lorafleet.kernels.apply_kernels`] fused on `peft_model`; its `fused_loss` picks the loss path.
            Defaults to nothing fused (the plain loss).
    """

    def __init__(self, peft_model, spec: JobSpec, device: torch.device, kernels: Optional[KernelPlan] = None):
        self.peft_model = peft_model
        self.spec = spec
        loss_module = LossModule(peft_model, fused_loss=(kernels or KernelPlan()).fused_loss)
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
        self._snapshot = AdapterSnapshot(peft_model)

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
        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        return self._snapshot()

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


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(spec: JobSpec, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config lorafleet derives from the spec, with `scaling.deepspeed_config` merged over it.

    The loop owns the math: it scales each micro-batch's summed token loss by `world_size / global_targets` and
    DeepSpeed, like DDP, averages gradients over the workers, so the update is the token mean over the global
    batch. [`DeepSpeedStrategy.backward`] turns off DeepSpeed's own division by `gradient_accumulation_steps`;
    the batch sizes below only satisfy DeepSpeed's bookkeeping. Clipping is DeepSpeed's (same formula as
    `torch.nn.utils.clip_grad_norm_`); the optimizer is plain `torch.optim.AdamW`, run by ZeRO on its partition.

    Args:
        spec ([`~lorafleet.spec.JobSpec`]):
            The validated spec (`training` and `scaling` sections).
        world_size (`int`):
            Workers in the run.

    Returns:
        `dict`: A config for `deepspeed.initialize`.

    Example:

    ```python
    >>> from lorafleet.spec import load_spec
    >>> spec = load_spec("jobs/llama.yaml", ["scaling.strategy=deepspeed", "scaling.zero_stage=3",
    ...                                         "eval.generate=null"])  # rank 0 holds a shard: no generation
    >>> deepspeed_config(spec, world_size=2)["zero_optimization"]["stage"]
    3
    ```
    """
    t = spec.training
    derived: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": float(t.max_grad_norm or 0.0),
        "zero_optimization": {"stage": spec.scaling.zero_stage},
        # torch AdamW is what DDP runs too: the same update on ZeRO's flat partitions as on DDP's tensors.
        "zero_allow_untested_optimizer": True,
        # Parameters stay as loaded (LoRA in float32); mixed precision is the loop's autocast, as with DDP.
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _merge(derived, spec.scaling.deepspeed_config or {})


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO-2 or ZeRO-3 over the LoRA parameters (CPU over gloo inside Ray Train, or GPUs).

    The engine is created lazily, on first use: a resumed run loads its adapter into the plain model first, so ZeRO
    builds its float32 master partitions from the restored weights (loading into the model after `initialize`
    would be overwritten by the master copy on the next step). The optimizer state is partitioned, so every worker
    saves and restores its own shard ([`optimizer_shard`]); the scheduler is replicated and saved once.

    Args:
        peft_model ([`~peft.PeftModel`]):
            The model with LoRA adapters. For ZeRO-3 with 4-bit weights, load it with `bnb_4bit_quant_storage` equal
            to the compute dtype ([`~lorafleet.model.build.bnb_config`] does this).
        spec ([`~lorafleet.spec.JobSpec`]):
            For the DeepSpeed config ([`deepspeed_config`]), optimizer and scheduler settings.
        device (`torch.device`):
            The worker's device.
        kernels ([`~lorafleet.kernels.KernelPlan`], *optional*):
            What [`~lorafleet.kernels.apply_kernels`] fused on `peft_model`; its `fused_loss` picks the loss path.
            Defaults to nothing fused (the plain loss).

    Example:

    ```python
    >>> strategy = DeepSpeedStrategy(peft_model, spec, torch.device("cpu"))  # doctest: +SKIP
    >>> loss, _ = strategy.module(**batch); strategy.backward(loss); strategy.step()  # doctest: +SKIP
    ```
    """

    def __init__(self, peft_model, spec: JobSpec, device: torch.device, kernels: Optional[KernelPlan] = None):
        self.peft_model = peft_model
        self.spec = spec
        self.device = device
        self.zero3 = spec.scaling.zero_stage == 3
        self._loss_module = LossModule(peft_model, fused_loss=(kernels or KernelPlan()).fused_loss)
        self.params = [p for p in peft_model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=spec.training.learning_rate, weight_decay=spec.training.weight_decay)
        # Built on the torch optimizer: ZeRO keeps its param_group dicts, so the scheduler's lr reaches ZeRO's step.
        self.scheduler = make_scheduler(spec, self.optimizer)
        self._snapshot = AdapterSnapshot(peft_model)
        self._engine = None

    @property
    def engine(self):
        if self._engine is None:
            import deepspeed

            world_size = dist.get_world_size() if dist.is_initialized() else 1
            self._engine, _, _, _ = deepspeed.initialize(
                model=self._loss_module,
                optimizer=self.optimizer,
                model_parameters=self.params,
                config=deepspeed_config(self.spec, world_size),
                # Ray Train already created the process group (gloo on CPU).
                dist_init_required=False,
            )
        return self._engine

    @property
    def module(self):
        return self.engine

    def accumulate(self, last_micro_batch: bool):
        # Our loop calls step() once per optimizer step, so tell DeepSpeed where the boundary is instead of
        # letting it count micro-steps: it reduces gradients (and may step) only on the boundary.
        self.engine.set_gradient_accumulation_boundary(last_micro_batch)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is already scaled for the global token mean; DeepSpeed must not divide it by its accumulation steps.
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> Optional[float]:
        engine = self.engine
        engine.set_gradient_accumulation_boundary(True)
        engine.step()
        self.scheduler.step()
        norm = engine.get_global_grad_norm() if self.spec.training.max_grad_norm is not None else None
        return float(norm) if norm is not None else None

    def _gathered(self, modifier_rank: Optional[int] = None):
        if self.zero3 and self._engine is not None:
            import deepspeed

            return deepspeed.zero.GatheredParameters(self.params, modifier_rank=modifier_rank)
        return contextlib.nullcontext()

    def adapter_state(self) -> Optional[dict[str, torch.Tensor]]:
        rank = dist.get_rank() if dist.is_initialized() else 0
        # Under ZeRO-3 each worker holds a slice of every LoRA tensor; gathering is collective (all ranks enter),
        # and the copy must be taken inside the context, which frees the full tensors again on exit.
        with self._gathered():
            if rank != 0:
                return None
            return self._snapshot()

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        if self._engine is not None:
            raise RuntimeError("load the adapter before the first DeepSpeed step (ZeRO's master weights are built then)")
        result = set_peft_model_state_dict(self.peft_model, state)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise RuntimeError(f"checkpoint adapter has tensors this model lacks: {unexpected[:3]}")

    def optimizer_state(self) -> Optional[dict]:
        return {"scheduler": self.scheduler.state_dict()}

    def load_optimizer_state(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])

    def optimizer_shard(self) -> Optional[dict]:
        # ZeRO's own state of this worker's partition (float32 master weights and the optimizer's moments over them),
        # as DeepSpeed's save_checkpoint writes it. Not the torch optimizer's state_dict: ZeRO-3 swaps sub-group
        # tensors in and out of its param_groups during step(), so that state cannot be mapped back to parameters.
        return {"zero": self.engine.optimizer.state_dict()}

    def load_optimizer_shard(self, shard: dict) -> None:
        # "zero3": the same state, under the name ZeRO-3 shards had before ZeRO-2 saved it too.
        state = shard.get("zero", shard.get("zero3"))
        if state is None:
            raise RuntimeError(
                f"this checkpoint's optimizer shard ({', '.join(sorted(shard))}) was written by an older lorafleet; "
                "re-submit the run with --fresh, or resume it with the version that wrote it"
            )
        load_zero_state(self.engine.optimizer, state)


def make_strategy(peft_model, spec: JobSpec, device: torch.device, kernels: Optional[KernelPlan] = None) -> Strategy:
    """The strategy `scaling.strategy` names: [`DDPStrategy`] or [`DeepSpeedStrategy`] (same arguments)."""
    if spec.scaling.strategy == "deepspeed":
        return DeepSpeedStrategy(peft_model, spec, device, kernels)
    return DDPStrategy(peft_model, spec, device, kernels)

