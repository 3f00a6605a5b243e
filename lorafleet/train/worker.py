"""The per-worker training loop Ray Train runs: build, resume, loop, report.

Each helper below does one step of the story so [`train_loop_per_worker`] reads top to bottom. The loop's only
inputs are the validated spec (as JSON) and the resolved base model; it never reads config by loose string keys.
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
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from lorafleet.data.alora import Invocation, spec_invocation
from lorafleet.data.batching import collate
from lorafleet.data.encode import prepare_samples
from lorafleet.data.plan import BatchPlan
from lorafleet.model.build import build_model, load_tokenizer_for
from lorafleet.model.device import torch_dtype
from lorafleet.runstore.checkpoint import (
    cpu_copy,
    is_complete,
    load_training_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from lorafleet.runstore.monitoring import export_step
from lorafleet.runstore.storage import list_checkpoint_dirs, upload_checkpoint
from lorafleet.spec import JobSpec, spec_from_json
from lorafleet.train.strategies import is_distributed, make_strategy


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


@dataclass
class WorkerContext:
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


def load_data(spec: JobSpec, tokenizer):
    """Tokenized samples, the batch plan and the per-sample count of target tokens (after the causal shift)."""

    samples = prepare_samples(spec.data, tokenizer, invocation=Invocation.from_spec(spec, tokenizer))
    targets = [sum(1 for label in s["labels"][1:] if label != -100) for s in samples]
    plan = BatchPlan(len(samples), spec.global_batch_size, seed=spec.training.seed, shuffle=spec.data.shuffle)
    return samples, targets, plan


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


def _checkpoint_candidates():
    """Ray Train's latest checkpoint, then the older checkpoint folders of the same run, newest first."""
    import ray.train


    latest = ray.train.get_checkpoint()
    if latest is None:
        return []
    run_path = latest.path.rstrip("/").rsplit("/", 1)[0]
    older = [p for p in list_checkpoint_dirs(latest.filesystem, run_path) if p.rstrip("/") < latest.path.rstrip("/")]
    return [latest] + [ray.train.Checkpoint(path=p, filesystem=latest.filesystem) for p in reversed(older)]


def resume(strategy, ctx: WorkerContext) -> int:
    """Restore adapter, optimizer, scheduler and RNG from the run's latest complete checkpoint; return the step to start at.

    Ray Train hands over the latest *registered* checkpoint (one that every worker finished uploading). It is
    still verified file by file ([`~lorafleet.checkpoint.is_complete`]): should it have been damaged in storage,
    the previous complete checkpoint is used instead. Rank 0 chooses and tells the others, so all ranks resume
    from the same one.
    """

    candidates = _checkpoint_candidates()
    choice = [None]
    if ctx.rank == 0:
        for index, candidate in enumerate(candidates):
            with candidate.as_directory() as directory:
                if is_complete(directory):
                    choice[0] = index
                    break
            print(f"lorafleet: checkpoint {candidate.path.rsplit('/', 1)[-1]} is incomplete; trying an older one", flush=True)
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return 0
    with candidates[choice[0]].as_directory() as directory:
        state = load_training_state(directory, ctx.rank)
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


def save_and_report(metrics: dict[str, Any], strategy, spec: JobSpec, ctx: WorkerContext) -> None:
    """Take this worker's share of a checkpoint and report it (with the step's metrics) to Ray Train.

    The training thread only copies the state into CPU memory (the strategy's adapter copy, the optimizer state through
    [`~lorafleet.checkpoint.cpu_copy`], every worker's RNG states gathered to rank 0) and passes `ray.train.report`'s
    barrier. Writing the files and uploading them run in Ray Train's background thread
    (`checkpoint_upload_mode=ASYNC`) while training continues, with [`~lorafleet.storage.upload_checkpoint`] retrying
    failed copies; Ray registers the checkpoint only after every worker's upload returned. A worker with nothing to
    write (DDP ranks other than 0) reports the metrics alone. Ray deletes the local folder once uploaded, so it lives in
    a fresh temporary directory rather than a context manager's.
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
                info={"job": spec.name, "loss": metrics["loss"]},
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


def _test_fault(step: int, ctx: WorkerContext) -> Optional[str]:
    """Fault injection for lorafleet's own tests, inert unless a `LORAFLEET_TEST_*` variable is set.

    `LORAFLEET_TEST_KILL_AT_STEP=k`: worker `LORAFLEET_TEST_KILL_RANK` (default 1) SIGKILLs itself before step k, once
    (guarded by the file `LORAFLEET_TEST_KILL_ONCE_FILE`). `LORAFLEET_TEST_NAN_AT_STEP=k`: step k's loss reads as NaN
    (returns "nan"). `LORAFLEET_TEST_STOP_AFTER_STEP=k`: stop cleanly after step k's checkpoint, like a preempted job
    (returns "stop").
    """
    done = step + 1
    kill_at = os.environ.get("LORAFLEET_TEST_KILL_AT_STEP")
    if kill_at and done == int(kill_at) and ctx.rank == int(os.environ.get("LORAFLEET_TEST_KILL_RANK", "1")):
        marker = os.environ.get("LORAFLEET_TEST_KILL_ONCE_FILE")
        if marker is None or not os.path.exists(marker):
            if marker is not None:
                open(marker, "w").close()
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("LORAFLEET_TEST_NAN_AT_STEP") == str(done):
        return "nan"
    if os.environ.get("LORAFLEET_TEST_STOP_AFTER_STEP") == str(done):
        return "stop"
    return None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point.

    `config` carries `spec` (the validated spec as JSON), `base` (directory or hub id of the base model) and
    optionally `channel` (a `ray.util.queue.Queue` the driver reads step metrics from).
    """

    spec = spec_from_json(config["spec"])
    ctx = _context()
    seed_everything(spec.training.seed, ctx.rank)
    tokenizer = load_tokenizer_for(config["base"], spec.model.trust_remote_code)
    samples, targets, plan = load_data(spec, tokenizer)
    model, kernels = build_model(spec, config["base"], ctx.device, invocation_tokens=spec_invocation(spec, tokenizer))
    strategy = make_strategy(model, spec, ctx.device)
    start_step = resume(strategy, ctx)
    channel = config.get("channel")

    t = spec.training
    every = spec.checkpoint.every_n_steps
    if start_step >= t.steps and channel is not None and ctx.rank == 0:
        import ray

        ray.get(channel.actor.put.remote({"event": "complete", "step": start_step, "start_step": start_step}))
    for step in range(start_step, t.steps):
        fault = _test_fault(step, ctx)
        started = time.perf_counter()
        micro_batches = plan.micro_batches(step, ctx.rank, ctx.world_size, t.micro_batch_size, t.grad_accum)
        local_targets = sum(targets[i] for mb in micro_batches for i in mb)
        local_tokens = sum(len(samples[i]["input_ids"]) for mb in micro_batches for i in mb)
        global_targets, global_tokens = _all_reduce_sum([local_targets, local_tokens], ctx.device)
        # Normalizing by the global target count (not per micro-batch or per worker) makes the gradient the
        # token-mean over the whole global batch, so 1 worker x 2 accumulations == 2 workers x 1.
        scale = ctx.world_size / max(global_targets, 1.0)
        loss_sum = 0.0
        for i, indices in enumerate(micro_batches):
            batch = collate([samples[j] for j in indices], tokenizer.pad_token_id)
            batch = {k: v.to(ctx.device) for k, v in batch.items() if v is not None}
            with strategy.accumulate(last_micro_batch=i == len(micro_batches) - 1), autocast(spec, ctx.device):
                token_loss, _ = strategy.module(**batch)
                strategy.backward(token_loss * scale)
            loss_sum += float(token_loss.detach())
        (global_loss_sum,) = _all_reduce_sum([loss_sum], ctx.device)
        loss = global_loss_sum / max(global_targets, 1.0) if fault != "nan" else float("nan")
        if not math.isfinite(loss):
            error = NonFiniteLossError(
                f"training loss became {loss} at step {step + 1}; stopped (the last good checkpoint is kept). "
                "Lower training.learning_rate or check the data."
            )
            if stop_without_retry(channel, error, ctx):
                return
            raise error
        lr = strategy.lr
        grad_norm = strategy.step()
        elapsed = time.perf_counter() - started
        done = step + 1
        metrics = {
            "step": done,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": global_tokens / elapsed,
            "step_time_s": elapsed,
            "start_step": start_step,
            "total_steps": t.steps,
            "peak_rss_mb": peak_rss_mb(),
        }
        if step == start_step:
            metrics["kernels"] = kernels
        publish(channel, metrics, ctx)
        export_step(metrics, spec.name, ctx.rank)  # Ray metric gauges (rank 0 only), see lorafleet/monitoring.py
        if done % every == 0 or done == t.steps:
            save_and_report(metrics, strategy, spec, ctx)
            if fault == "stop":
                return

