"""The per-worker training loop Ray Train runs: build, resume, loop, report.

Each helper below does one step of the story so [`train_loop_per_worker`] reads top to bottom. The loop's only
input is the driver's [`WorkerInputs`]: the validated spec (as JSON), the resolved base model and the data the driver
already tokenized ([`TrainingData`]). One optimizer step is [`train_step`], which a loop outside Ray (a notebook, a
test) calls the same way; [`StepHook`]s let a caller act on the workers before each step.
"""

from __future__ import annotations

import math
import os
import random
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Protocol

from lorafleet.train.timings import PhaseClock

# Started before the heavy imports below: in a Ray Train worker this module is first imported when the training loop
# arrives, so the clock's first phase is the worker's imports. Taken by the first run in this process (`_startup_clock`).
_IMPORT_CLOCK: Optional[PhaseClock] = PhaseClock()

import numpy as np
import torch
import torch.distributed as dist

from lorafleet.data.batching import collate
from lorafleet.data.dataset import TrainingData
from lorafleet.data.plan import BatchPlan
from lorafleet.model.build import build_model, load_tokenizer_for, local_base
from lorafleet.model.device import torch_dtype
from lorafleet.runstore.checkpoint import (
    checkpoint_problem,
    cpu_copy,
    load_training_state,
    read_info,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from lorafleet.runstore.location import RunLocation, folder_name
from lorafleet.runstore.monitoring import export_step
from lorafleet.runstore.storage import upload_checkpoint
from lorafleet.spec import JobSpec, spec_from_json
from lorafleet.train.evaluate import eval_metrics, evaluate_loss, generation_metrics
from lorafleet.train.strategies import Strategy, is_distributed, make_strategy


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


@dataclass
class WorkerContext:
    """Where a worker stands in the data-parallel group.

    Args:
        rank (`int`): This worker's rank, 0 to `world_size - 1`.
        world_size (`int`): Number of data-parallel workers.
        device (`torch.device`): The device this worker trains on.
    """

    rank: int
    world_size: int
    device: torch.device


def _context() -> WorkerContext:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    return WorkerContext(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())


def seed_everything(seed: int, rank: int) -> None:
    """Per-rank seeds: identical data order comes from the step-indexed batch plan, not from these."""
    worker_seed = seed * 1009 + rank
    random.seed(worker_seed)
    np.random.seed(worker_seed % 2**32)
    torch.manual_seed(worker_seed)


def autocast(spec: JobSpec, device: torch.device):
    """bf16/fp16 autocast for matmuls where the device is fast at them; float32 runs without autocast."""

    dtype = torch_dtype(spec.training.dtype, device)
    if dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _checkpoint_candidates(spec: JobSpec) -> list:
    """The run's checkpoint folders in its storage, newest first, plus Ray Train's latest should the listing miss it.

    Not only Ray Train's latest registered checkpoint: a run stopped (SIGTERM, a killed worker) after a checkpoint's
    upload finished but before Ray Train registered it would otherwise resume from the one before, although
    `lorafleet submit` already told the user the newer step.
    """
    import ray.train


    location = RunLocation.of(spec)
    folders = reversed(location.checkpoint_dirs())
    candidates = [ray.train.Checkpoint(path=path, filesystem=location.filesystem) for path in folders]
    latest = ray.train.get_checkpoint()
    if latest is not None and folder_name(latest.path) not in {folder_name(c.path) for c in candidates}:
        candidates.insert(0, latest)
    return candidates


def resume(strategy, spec: JobSpec, ctx: WorkerContext, channel=None, info: Optional[dict] = None) -> int:
    """Restore adapter, optimizer, scheduler and RNG from the run's latest complete checkpoint; return the step to start at.

    The run's checkpoint folders are tried newest first ([`_checkpoint_candidates`]), each verified file by file
    ([`~lorafleet.runstore.checkpoint.checkpoint_problem`]: sizes and checksums): one that is incomplete (the run
    stopped while writing it) or damaged in storage is skipped for the one before, and rank 0 tells the driver
    (through `channel`) which one it skipped and why. Rank 0 chooses and tells the others, so all ranks resume from the
    same one. When `info` is given, it is filled with the chosen checkpoint's `lorafleet.json` (e.g. its
    [`EvalProgress`]).
    """

    candidates = _checkpoint_candidates(spec)
    choice = [None]
    if ctx.rank == 0:
        for index, candidate in enumerate(candidates):
            with candidate.as_directory() as directory:
                problem = checkpoint_problem(directory)
            if problem is None:
                choice[0] = index
                break
            name = folder_name(candidate.path)
            message = f"checkpoint {name} is damaged or incomplete: {problem}; "
            message += "trying an older one" if index + 1 < len(candidates) else "no older one, starting from step 0"
            print(f"lorafleet: {message}", flush=True)
            if channel is not None:
                import ray

                ray.get(channel.actor.put.remote({"event": "warning", "message": message}))
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return 0
    with candidates[choice[0]].as_directory() as directory:
        state = load_training_state(directory, ctx.rank)
        if info is not None:
            info.update(read_info(directory))
    strategy.load_adapter_state(state["adapter"])
    strategy.load_optimizer_state(state["optimizer"])
    if state["optimizer_shard"] is not None:
        strategy.load_optimizer_shard(state["optimizer_shard"])
    if state["rng"] is not None:
        set_rng_state(state["rng"])
    return int(state["step"])


def publish(channel, metrics: dict[str, Any], ctx: WorkerContext) -> None:
    """Send rank 0's step metrics to the driver without waiting.

    `ray.train.report` synchronizes all ranks through an actor barrier; doing that every step cost more than the
    step itself on the default job, so per-step progress takes this one-way path and Ray Train only sees
    checkpoint steps.
    """
    if channel is not None and ctx.rank == 0:
        channel.actor.put_nowait.remote(metrics)


def _yield_cpu_to_training() -> None:
    """Lower the calling thread's CPU priority (Linux, where `nice` is per thread; elsewhere nothing).

    Called from the thread that writes and uploads checkpoints: where training keeps every core busy (CPU workers),
    the upload takes the cycles training leaves rather than slowing its steps, and only finishes later.
    """
    if not sys.platform.startswith("linux"):
        return
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + 10))
    except OSError:
        pass


def gather_rng_states(ctx: WorkerContext) -> Optional[dict[int, dict[str, Any]]]:
    """Every worker's RNG states by rank, on rank 0 (`None` on the others).

    Rank 0 writes them all, so that under DDP, where the RNG states are all the other workers would write, they upload
    nothing: one uploader per checkpoint instead of one per worker. A collective: every rank calls it.
    """

    state = rng_state()
    if not is_distributed():
        return {ctx.rank: state}
    gathered = [None] * ctx.world_size if ctx.rank == 0 else None
    dist.gather_object(state, gathered, dst=0)
    return dict(enumerate(gathered)) if ctx.rank == 0 else None


def save_and_report(
    metrics: dict[str, Any],
    strategy,
    spec: JobSpec,
    ctx: WorkerContext,
    data_source: Optional[dict] = None,
    extra_info: Optional[dict] = None,
) -> None:
    """Take this worker's share of a checkpoint and report it (with the step's metrics) to Ray Train.

    The training thread only copies the state into CPU memory (the strategy's adapter copy, the optimizer state through
    [`~lorafleet.runstore.checkpoint.cpu_copy`], every worker's RNG states gathered to rank 0) and passes `ray.train.report`'s
    barrier. Writing the files and uploading them run in Ray Train's background thread
    (`checkpoint_upload_mode=ASYNC`) while training continues, with [`~lorafleet.runstore.storage.upload_checkpoint`] retrying
    failed copies; Ray registers the checkpoint only after every worker's upload returned. A worker with nothing to
    write (DDP ranks other than 0) reports the metrics alone. Ray deletes the local folder once uploaded, so it lives in
    a fresh temporary directory rather than a context manager's. `extra_info` goes into the checkpoint's
    `lorafleet.json` (the evaluation progress a resume continues from).
    """
    import ray.train
    from ray.train import CheckpointUploadMode


    adapter = strategy.adapter_state()  # already a copy (under ZeRO-3 it can only be taken while gathered)
    state = {
        "adapter_state": adapter,
        **cpu_copy(
            {
                "optimizer_state": strategy.optimizer_state() if adapter is not None else None,
                "optimizer_shard": strategy.optimizer_shard(),
            }
        ),
    }
    rng_states = gather_rng_states(ctx)
    if adapter is None and state["optimizer_shard"] is None:
        ray.train.report(metrics)
        return
    directory = tempfile.mkdtemp(prefix=f"lorafleet-ckpt-{metrics['step']}-")

    def write_and_upload(checkpoint, checkpoint_dir_name: str):
        _yield_cpu_to_training()
        try:
            save_checkpoint(
                directory,
                rank=ctx.rank,
                step=metrics["step"],
                peft_model=strategy.peft_model,
                world_size=ctx.world_size,
                # `data`: what a re-submit compares its data with before resuming (lorafleet.train.driver.preflight)
                info={"job": spec.name, "loss": metrics["loss"], "data": data_source or {},
                      "template": spec.data.model_dump(include={"format", "max_length", "train_on_inputs"}),
                      # How the base was loaded, so that `lorafleet eval` scores the adapter on the same weights.
                      "base": {"dtype": spec.model.dtype, "quantization": spec.quantization.model_dump(mode="json")},
                      **(extra_info or {})},
                rng_states=rng_states,
                **state,
            )
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return upload_checkpoint(checkpoint, checkpoint_dir_name)

    try:
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
            checkpoint_upload_fn=write_and_upload,
        )
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def stop_without_retry(channel, error: Exception, ctx: WorkerContext) -> bool:
    """Tell the driver the run failed for good (e.g. a non-finite loss) so it ends without Ray Train's restarts.

    Ray Train retries every worker error up to `scaling.max_failures` times, and a deterministic failure such as a
    NaN loss would only recur from the same checkpoint. So rank 0 hands the error to the driver and every rank
    returns normally (all ranks see the same all-reduced loss). Returns `False` when there is no driver channel to
    tell, in which case the caller raises.
    """
    if channel is None:
        return False
    if ctx.rank == 0:
        import ray

        # Waited for: the driver must have the error before fit() returns.
        ray.get(channel.actor.put.remote({"event": "fatal", "error": f"{type(error).__name__}: {error}"}))
    return True


@dataclass
class StepEvent:
    """What a [`StepHook`] is told: the step a worker is about to run.

    Args:
        step (`int`): 1-based number of the step about to run (the `step` its metrics will carry).
        rank (`int`): The worker's rank.
        world_size (`int`): Number of workers.
        strategy ([`~lorafleet.train.strategies.Strategy`]): The worker's model and optimizer, e.g. to read or adjust
            parameters before the step.
    """

    step: int
    rank: int
    world_size: int
    strategy: Strategy


class StepHook(Protocol):
    """A callable every worker runs before each training step: `hook(event) -> bool | None`.

    Returning `True` asks the run to end cleanly after its next checkpoint (the step's own, when it is a checkpoint
    step), as a preempted job would: a re-submit resumes there. One rank asking is enough; the ranks agree at the
    checkpoint. Hooks reach the workers inside Ray Train's `train_loop_config`, so they must be picklable (by
    reference from a module the workers can import, or registered with `ray.cloudpickle.register_pickle_by_value`);
    they run on the training thread, so a slow hook slows every step. Pass them to
    [`~lorafleet.train.driver.run_job`] as `step_hooks`.

    Example:

    ```python
    >>> class StopAfter:
    ...     def __init__(self, step):
    ...         self.step = step
    ...     def __call__(self, event: StepEvent):
    ...         return event.step >= self.step
    >>> StopAfter(4)(StepEvent(step=4, rank=0, world_size=2, strategy=None))
    True
    ```
    """

    def __call__(self, event: StepEvent) -> bool | None: ...


def run_step_hooks(hooks: Sequence[StepHook], event: StepEvent) -> bool:
    """Call every hook with `event` (all of them, even after one asked to stop); whether any asked to stop."""
    asked = False
    for hook in hooks:
        asked = bool(hook(event)) or asked
    return asked


def _any_rank(flag: bool, ctx: WorkerContext) -> bool:
    """Whether `flag` is set on any rank (a collective: every rank calls it)."""
    return _all_reduce_sum([float(flag)], ctx.device)[0] > 0


@dataclass
class WorkerInputs:
    """What the driver hands every worker, as Ray Train's `train_loop_config` ([`config`]).

    Args:
        spec (`str`): The validated spec as JSON.
        base (`str`): Directory or hub id of the base model (the driver materialized it).
        data ([`TrainingData`]): The samples the driver tokenized and checked.
        channel (`ray.util.queue.Queue`, *optional*): Where rank 0 sends step metrics and events for the driver.
        step_hooks (`Sequence[StepHook]`, *optional*, defaults to `()`): Run on every worker before each step.
        base_digest (`str`, *optional*): [`~lorafleet.model.build.weights_digest`] of `base`, which a node that
            materializes the base itself must reproduce.
    """

    spec: str
    base: str
    data: TrainingData
    channel: Any = None
    step_hooks: Sequence[StepHook] = ()
    base_digest: Optional[str] = None

    _KEY = "lorafleet"

    def config(self) -> dict[str, Any]:
        """These inputs as a `train_loop_config` (Ray Train wants a dict) for [`train_loop_per_worker`]."""
        return {self._KEY: self}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> WorkerInputs:
        return config[cls._KEY]


def train_step(
    strategy: Strategy, data: TrainingData, plan: BatchPlan, step: int, ctx: WorkerContext, spec: JobSpec
) -> dict[str, Any]:
    """One optimizer step on this worker's share of global batch `step`; every worker calls it with the same `step`.

    The worker's micro-batches come from `plan`. Each one's summed token loss is scaled by
    `world_size / (target tokens of the whole global batch)` before its backward, so that after the data-parallel
    gradient average the gradient is the token-mean over the global batch, whatever its split into workers and
    micro-batches (1 worker x 2 accumulations == 2 workers x 1). Under `torch.distributed` this is a collective: it
    all-reduces the target and token counts and the loss.

    Args:
        strategy ([`~lorafleet.train.strategies.Strategy`]): The worker's model and optimizer.
        data ([`TrainingData`]): The tokenized samples.
        plan ([`~lorafleet.data.plan.BatchPlan`]): Which samples make up each global batch ([`TrainingData.plan`]).
        step (`int`): 0-based index of the optimizer step.
        ctx ([`WorkerContext`]): This worker's rank, world size and device.
        spec ([`~lorafleet.spec.JobSpec`]): For `training.micro_batch_size`, `grad_accum` and `dtype`.

    Returns:
        `dict[str, Any]`: The step's metrics: `step` (1-based), `loss` (token-mean over the global batch), `lr` (the
        step's learning rate), `grad_norm` (before clipping; `None` without clipping), `tokens_per_s` (global batch
        tokens over the step's time) and `step_time_s`.

    Raises:
        [`NonFiniteLossError`]: The loss is NaN or infinite; raised before the optimizer step, so the parameters keep
        their last finite values.

    Example:

    ```python
    >>> from lorafleet.model.build import build_model, load_tokenizer_for, resolve_base_model
    >>> from lorafleet.spec import load_spec
    >>> overrides = ["kernels.enabled=false", "scaling.num_workers=1", "training.micro_batch_size=2"]
    >>> spec = load_spec("jobs/llama.yaml", overrides)
    >>> base = resolve_base_model(spec)
    >>> data = TrainingData.from_spec(spec, load_tokenizer_for(base))
    >>> model, kernels = build_model(spec, base)
    >>> strategy = make_strategy(model, spec, torch.device("cpu"), kernels)
    >>> metrics = train_step(strategy, data, data.plan(spec), 0, WorkerContext(0, 1, torch.device("cpu")), spec)
    >>> metrics["step"], metrics["loss"] > 0
    (1, True)
    ```
    """
    t = spec.training
    started = time.perf_counter()
    micro_batches = plan.micro_batches(step, ctx.rank, ctx.world_size, t.micro_batch_size, t.grad_accum)
    local_targets = sum(data.targets[i] for mb in micro_batches for i in mb)
    local_tokens = sum(len(data.samples[i]["input_ids"]) for mb in micro_batches for i in mb)
    global_targets, global_tokens = _all_reduce_sum([local_targets, local_tokens], ctx.device)
    # Normalizing by the global target count (not per micro-batch or per worker) makes the gradient the
    # token-mean over the whole global batch, so 1 worker x 2 accumulations == 2 workers x 1.
    scale = ctx.world_size / max(global_targets, 1.0)
    loss_sum = 0.0
    for i, indices in enumerate(micro_batches):
        batch = collate([data.samples[j] for j in indices], data.pad_token_id)
        batch = {k: v.to(ctx.device) for k, v in batch.items() if v is not None}
        with strategy.accumulate(last_micro_batch=i == len(micro_batches) - 1), autocast(spec, ctx.device):
            token_loss, _ = strategy.module(**batch)
            strategy.backward(token_loss * scale)
        loss_sum += float(token_loss.detach())
    (global_loss_sum,) = _all_reduce_sum([loss_sum], ctx.device)
    loss = global_loss_sum / max(global_targets, 1.0)
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"training loss became {loss} at step {step + 1}; stopped (the last good checkpoint is kept). "
            "Lower training.learning_rate or check the data."
        )
    lr = strategy.lr
    grad_norm = strategy.step()
    elapsed = time.perf_counter() - started
    return {
        "step": step + 1,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": global_tokens / elapsed,
        "step_time_s": elapsed,
    }


def held_out_metrics(strategy: Strategy, data: TrainingData, ctx: WorkerContext, spec: JobSpec) -> dict[str, Any]:
    """The held-out evaluation of the current adapter as metrics fields (`eval_loss`); every worker calls it at the
    same step (a collective). Each evaluates its shard of `data.eval_samples` through the training loss module
    ([`~lorafleet.train.evaluate.evaluate_loss`]) with training's micro-batch size and autocast."""
    result = evaluate_loss(
        strategy.module,
        data.eval_samples,
        data.pad_token_id,
        device=ctx.device,
        micro_batch_size=spec.training.micro_batch_size,
        rank=ctx.rank,
        world_size=ctx.world_size,
        max_samples=spec.eval.max_samples,
        autocast=lambda: autocast(spec, ctx.device),
        all_reduce=lambda values: _all_reduce_sum(values, ctx.device),
    )
    return eval_metrics(result)


@dataclass
class EvalProgress:
    """Early stopping's count: the best held-out loss so far and how many evaluations since it (Keras' rule: a loss
    is an improvement only when lower than the best by more than `eval.min_delta`, and only then becomes the best).

    Every rank holds the same one (the evaluated loss is all-reduced), so all decide to stop at the same step. It is
    recorded in each checkpoint's `lorafleet.json` (`eval_progress`), so a stopped and re-submitted run continues
    counting where its checkpoint left off.

    Args:
        best (`float`, *optional*): The best loss so far (`None`: no finite evaluation yet).
        best_step (`int`, *optional*): Its step.
        since_best (`int`, *optional*, defaults to `0`): Evaluations since it without an improvement.

    Example:

    ```python
    >>> progress = EvalProgress()
    >>> for step, loss in [(1, 3.0), (2, 2.95), (3, 2.5), (4, 2.6)]:
    ...     progress.update(loss, step, min_delta=0.1)
    >>> progress.best, progress.best_step, progress.since_best, progress.exhausted(1), progress.exhausted(2)
    (2.5, 3, 1, True, False)
    >>> EvalProgress.from_info({"eval_progress": progress.to_info()}) == progress
    True
    ```
    """

    best: Optional[float] = None
    best_step: Optional[int] = None
    since_best: int = 0

    def update(self, loss: float, step: int, min_delta: float = 0.0) -> None:
        """Count the evaluation of `step` (a NaN or infinite loss is never an improvement)."""
        if math.isfinite(loss) and (self.best is None or loss < self.best - min_delta):
            self.best, self.best_step, self.since_best = loss, step, 0
        else:
            self.since_best += 1

    def exhausted(self, patience: Optional[int]) -> bool:
        """Whether `patience` evaluations in a row have not improved (never without a patience)."""
        return patience is not None and self.since_best >= patience

    def to_info(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "since_best": self.since_best}

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> EvalProgress:
        """From a checkpoint's `lorafleet.json`; a fresh count when it has none (no checkpoint, or an older one)."""
        recorded = info.get("eval_progress")
        if not isinstance(recorded, dict):
            return cls()
        return cls(recorded.get("best"), recorded.get("best_step"), int(recorded.get("since_best", 0)))


def _startup_clock() -> PhaseClock:
    """The clock of this process's first run, started when this module began importing (a later run in the same
    process imports nothing: its clock starts now)."""
    global _IMPORT_CLOCK
    clock, _IMPORT_CLOCK = _IMPORT_CLOCK or PhaseClock(), None
    return clock


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; `config` is [`WorkerInputs.config`]'s dict."""

    clock = _startup_clock()
    clock.lap("worker_imports")
    inputs = WorkerInputs.from_config(config)
    spec = spec_from_json(inputs.spec)
    ctx = _context()
    seed_everything(spec.training.seed, ctx.rank)
    data = inputs.data
    plan = data.plan(spec)
    base = local_base(spec, inputs.base, inputs.base_digest)
    model, kernels = build_model(spec, base, ctx.device, invocation_tokens=data.invocation_tokens)
    clock.lap("worker_model")
    strategy = make_strategy(model, spec, ctx.device, kernels)
    channel = inputs.channel
    resumed: dict[str, Any] = {}
    start_step = resume(strategy, spec, ctx, channel, info=resumed)
    clock.lap("worker_resume")
    if channel is not None and ctx.rank == 0:
        channel.actor.put_nowait.remote(clock.event())  # the driver's phase timings (lorafleet.train.timings)
    progress = EvalProgress.from_info(resumed)
    patience = spec.eval.early_stopping_patience

    t = spec.training
    # A run that stopped early is finished: a re-submit trains no further, as one that reached `training.steps`.
    finished = start_step >= t.steps or bool(resumed.get("stopped_early"))
    if finished and channel is not None and ctx.rank == 0:
        import ray

        ray.get(channel.actor.put.remote({"event": "complete", "step": start_step, "start_step": start_step,
                                          "stopped_early": bool(resumed.get("stopped_early"))}))
    # `eval.generate` scores on rank 0 alone; before the first step too, as the base model's score (LoRA's B starts
    # at zero, so the adapter adds nothing yet).
    generating = spec.eval.generate is not None and ctx.rank == 0
    tokenizer = load_tokenizer_for(base, spec.model.trust_remote_code) if generating else None
    base_scores: dict[str, float] = {}
    if tokenizer is not None and start_step == 0 and not finished:
        base_scores = generation_metrics(strategy.peft_model, tokenizer, data.eval_records, spec, prefix="base_")
    stop_requested = False
    for step in range(start_step, start_step if finished else t.steps):
        event = StepEvent(step + 1, ctx.rank, ctx.world_size, strategy)
        stop_requested = run_step_hooks(inputs.step_hooks, event) or stop_requested
        try:
            metrics = train_step(strategy, data, plan, step, ctx, spec)
        except NonFiniteLossError as error:
            if stop_without_retry(channel, error, ctx):
                return
            raise
        metrics.update(start_step=start_step, total_steps=t.steps, peak_rss_mb=peak_rss_mb())
        done = step + 1
        stop_early = False
        if spec.evaluates_at(done):
            metrics.update(held_out_metrics(strategy, data, ctx, spec))
            if tokenizer is not None:
                metrics.update(generation_metrics(strategy.peft_model, tokenizer, data.eval_records, spec))
            progress.update(metrics["eval_loss"], done, spec.eval.min_delta)
            # Every rank saw the same all-reduced loss, so every rank decides alike; the last step is no early stop.
            stop_early = progress.exhausted(patience) and done < t.steps
            if stop_early:
                metrics["stopped_early"] = True
        if step == start_step:
            metrics.update(base_scores)
            metrics["kernels"] = dict(kernels.applied)
            if data.report.get("skipped"):  # data.on_bad_record: skip; recorded once, in metrics.jsonl
                metrics["skipped_records"] = data.report["skipped"]
                metrics["skipped_at"] = list(data.report.get("skipped_at", []))
            if kernels.skipped:
                metrics["kernels_skipped"] = kernels.reasons()
        publish(channel, metrics, ctx)
        export_step(metrics, spec.name, ctx.rank)  # Ray metric gauges (rank 0 only), see lorafleet/monitoring.py
        if spec.checkpoints_at(done) or stop_early:
            info: dict[str, Any] = {"eval_progress": progress.to_info()} if spec.data.evaluates else {}
            if "eval_loss" in metrics:  # this adapter's own score: `lorafleet report` finds the best one by it
                info["eval_loss"] = metrics["eval_loss"]
            if stop_early:
                info["stopped_early"] = True
            save_and_report(metrics, strategy, spec, ctx, data.source, info)
            if stop_early:
                return
            # Only with hooks: without any, no rank can ask, and the loop spares the collective.
            if inputs.step_hooks and _any_rank(stop_requested, ctx):
                return

