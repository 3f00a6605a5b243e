"""The driver: check everything a run needs, start (or join) Ray, run the `TorchTrainer`, summarize.

[`run_job`] is what `lorafleet submit` and notebooks call. It refuses a bad spec or bad data with a
[`~lorafleet.spec.SpecError`] *before* Ray starts, so nothing is scheduled and nothing in storage is touched.
"""

from __future__ import annotations

import logging
import os
import queue as _queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from lorafleet.compat.ray import train_env
from lorafleet.model.build import load_tokenizer_for, resolve_base_model
from lorafleet.runstore.location import RunLocation
from lorafleet.runstore.monitoring import write_run_artifacts
from lorafleet.runstore.storage import UPLOAD_RETRY_S
from lorafleet.spec import JobSpec, SpecError
from lorafleet.train.worker import (
    StepHook,
    TrainingData,
    WorkerInputs,
    train_loop_per_worker,
)

logger = logging.getLogger(__name__)


ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class RunSummary:
    """What a finished run reports (the `--json` line of `lorafleet submit`)."""

    job: str
    status: str
    first_loss: Optional[float] = None
    final_loss: Optional[float] = None
    steps: int = 0
    start_step: int = 0
    tokens_per_s: Optional[float] = None
    adapter_uri: Optional[str] = None
    kernels: dict[str, int] = field(default_factory=dict)
    error: Optional[str] = None
    # A re-submitted run whose latest checkpoint already reached `training.steps`: nothing was trained.
    already_complete: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if out["error"] is None:
            out.pop("error")
        if not out["already_complete"]:
            out.pop("already_complete")
        return out


@dataclass
class Prepared:
    """The outcome of the pre-flight checks: where the base model is and the tokenized data the workers train on."""

    spec: JobSpec
    base: str
    data: TrainingData


def prepare(spec: JobSpec) -> Prepared:
    """Materialize the base model and tokenize the data once, on the driver: data errors surface before Ray starts,
    and the workers train on these samples rather than tokenizing again.

    Args:
        spec ([`~lorafleet.spec.JobSpec`]):
            The validated spec.

    Returns:
        [`Prepared`]: the base model location and the [`~lorafleet.train.worker.TrainingData`].

    Raises:
        [`~lorafleet.spec.SpecError`]: For data that cannot be trained on (bad records, nothing to train).
    """

    base = resolve_base_model(spec)
    try:
        tokenizer = load_tokenizer_for(base, spec.model.trust_remote_code)
    except OSError as exc:
        raise SpecError(f"model.name_or_path: cannot load a tokenizer from '{base}' ({str(exc).splitlines()[0]})") from None

    # aLoRA: the invocation must tokenize to something, and every sample must contain it (or be dropped on request);
    # checked here so a bad invocation or bad data fails at submit time, never as a sample silently trained as base.
    return Prepared(spec=spec, base=base, data=TrainingData.from_spec(spec, tokenizer, warn=True))


def start_ray(address: Optional[str] = None, verbose: bool = False) -> None:
    """Join the Ray cluster at `address` (or `RAY_ADDRESS`), or start an embedded local instance."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = dict(
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.WARNING,
        # Workers import lorafleet from the installed package; keep Ray's usage stats and dashboard off locally.
        include_dashboard=False if address is None and "RAY_ADDRESS" not in os.environ else None,
    )
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # An embedded instance's processes (the Train controller among them) inherit this environment; jobs sent to a
    # cluster carry the same settings in their runtime environment (lorafleet.remote).
    os.environ.update(train_env())
    ray.init(address=address, **{k: v for k, v in kwargs.items() if v is not None})


def make_trainer(prepared: Prepared, channel: Any = None, step_hooks: Sequence[StepHook] = ()) -> Any:
    """Assemble the `TorchTrainer` for a prepared spec (`step_hooks`: see [`run_job`])."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer


    spec = prepared.spec
    scaling = spec.scaling
    use_gpu = scaling.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    resources = dict(scaling.resources_per_worker) or None
    storage_path, filesystem = RunLocation.of(spec).ray_storage()
    return TorchTrainer(
        train_loop_per_worker,
        # Ray Train puts the loop and its config in the object store once; every worker reads the data from there.
        train_loop_config=WorkerInputs(
            spec.model_dump_json(), prepared.base, prepared.data, channel=channel, step_hooks=tuple(step_hooks)
        ).config(),
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=spec.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
            failure_config=FailureConfig(max_failures=scaling.max_failures),
        ),
    )


def _failure_message(exc: BaseException) -> str:
    """The one line a user needs from a failed fit(): the worker's own error, not Ray's wrapping."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        err = failures[min(failures)]
        cause = getattr(err, "cause", None) or err
        text = str(cause).strip().splitlines()
        name = type(cause).__name__
        return f"{name}: {text[-1] if text else ''}".strip()
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def _storage_outage(exc: BaseException) -> bool:
    """Whether a failed fit() died of unreachable storage (the Train controller writes its own run snapshot
    there, outside the per-checkpoint upload retries)."""
    cause = getattr(exc, "controller_failure", None)
    return isinstance(cause, OSError)


def _storage_reachable(spec: JobSpec) -> bool:
    """Whether the run's storage answers again (`checkpoint.storage`, or its default when the spec has none)."""
    return RunLocation.of(spec).reachable()


def fit_with_storage_retries(prepared: Prepared, channel: Any, step_hooks: Sequence[StepHook] = ()) -> Any:
    """`TorchTrainer.fit()`, started again while storage is unreachable, for up to `LORAFLEET_UPLOAD_RETRY_S`.

    Ray Train only counts a checkpoint once every worker's upload finished, and a re-run with the same name and
    storage resumes from that checkpoint, so a retried fit continues where the last complete checkpoint left off.
    The retry waits until the storage answers again: a new Train controller creates the run's folder in its
    constructor, and dies there (an error that no longer names its cause) if the storage is still away.
    """
    import sys


    started, delay = time.monotonic(), 2.0
    while True:
        try:
            return make_trainer(prepared, channel, step_hooks).fit()
        except Exception as exc:
            if not _storage_outage(exc):
                raise
            print(
                f"lorafleet: {prepared.spec.name}: storage unreachable ({type(exc.controller_failure).__name__}); "
                "resuming from the last complete checkpoint once it answers",
                file=sys.stderr,
                flush=True,
            )
            while True:
                if time.monotonic() - started + delay > UPLOAD_RETRY_S:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 15.0)
                if _storage_reachable(prepared.spec):
                    break


def remove_orphan_checkpoints(result: Any, location: RunLocation) -> int:
    """Delete checkpoint folders in the run's storage that Ray Train does not hold as kept checkpoints.

    A `fit()` that died mid-upload (e.g. storage went away) can leave folders its retry never registered, so Ray's
    `keep` pruning would never see them. Called after a successful run, when the kept set is final.

    Args:
        result (`ray.train.Result`):
            The run's result: its latest checkpoint and the ones Ray Train keeps.
        location ([`~lorafleet.runstore.location.RunLocation`]):
            The run's location, whose folder holds those checkpoints.

    Returns:
        `int`: How many folders were removed.
    """
    kept = [checkpoint for checkpoint, _ in (result.best_checkpoints or [])]
    if result.checkpoint is None or not kept:
        return 0
    # By folder name: Ray Train's paths and the location's name the same folders, but need not be spelled alike.
    keep_names = {c.path.rstrip("/").rsplit("/", 1)[-1] for c in [*kept, result.checkpoint]}
    removed = 0
    for path in location.checkpoint_dirs():
        if path.rstrip("/").rsplit("/", 1)[-1] not in keep_names:
            try:
                location.filesystem.delete_dir(path)
                removed += 1
            except OSError:
                pass  # best effort: a leftover folder costs space, never correctness (resume verifies)
    return removed


def run_job(
    spec: JobSpec,
    *,
    address: Optional[str] = None,
    on_progress: Optional[ProgressFn] = None,
    verbose: bool = False,
    fresh: bool = False,
    step_hooks: Sequence[StepHook] = (),
) -> RunSummary:
    """Run a job to the end and summarize it.

    Args:
        spec ([`~lorafleet.spec.JobSpec`]):
            The validated spec.
        address (`str`, *optional*):
            A Ray cluster address (`auto`, `ray://...`, `HOST:PORT`); default: an embedded local instance.
        on_progress (`Callable[[dict], None]`, *optional*):
            Called on the driver with each step's metrics (`step`, `loss`, `lr`, `tokens_per_s`, ...).
        verbose (`bool`, *optional*, defaults to `False`):
            Forward Ray's and the workers' logs.
        fresh (`bool`, *optional*, defaults to `False`):
            Delete the run's stored checkpoints first and start over. By default a job re-submitted with the same
            `name` and `checkpoint.storage` resumes from its latest complete checkpoint (adapter, optimizer,
            scheduler, RNG and data position); `start_step` in the summary says where it started.
        step_hooks (`Sequence[StepHook]`, *optional*, defaults to `()`):
            Callables every worker runs before each step ([`~lorafleet.train.worker.StepHook`]); one returning `True`
            ends the run cleanly after its next checkpoint.

    Returns:
        [`RunSummary`]: `status` is `succeeded` or `failed` (with `error`).

    Example:

    ```python
    >>> from lorafleet.spec import load_spec
    >>> summary = run_job(load_spec("jobs/llama.yaml", ["training.steps=4", "training.warmup=1", "name=doc-example"]))
    >>> summary.status, summary.steps
    ('succeeded', 4)
    ```
    """
    import ray
    from ray.util.queue import Queue

    prepared = prepare(spec)
    location = RunLocation.of(spec)
    if fresh:
        location.delete()
    start_ray(address, verbose)
    channel = Queue(actor_options={"num_cpus": 0})
    history: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []  # {"event": "complete" | "fatal", ...} from the workers, not step metrics
    stop = threading.Event()

    def pump() -> None:
        while not stop.is_set() or not channel.empty():
            try:
                item = channel.get(timeout=0.2)
            except (_queue.Empty, Exception):
                continue
            if "event" in item:
                events.append(item)
                continue
            history.append(item)
            if on_progress is not None:
                on_progress(item)

    reader = threading.Thread(target=pump, name="lorafleet-progress", daemon=True)
    reader.start()
    summary = RunSummary(job=spec.name, status="succeeded")
    try:
        result = fit_with_storage_retries(prepared, channel, step_hooks)
    except Exception as exc:  # Ray wraps worker errors; the summary carries the worker's own message.
        result = None
        summary.status = "failed"
        summary.error = _failure_message(exc)
    finally:
        stop.set()
        reader.join(timeout=10)
        try:
            ray.kill(channel.actor)
        except Exception:
            pass
    if history:
        summary.first_loss = history[0]["loss"]
        summary.final_loss = history[-1]["loss"]
        summary.steps = history[-1]["step"]
        summary.start_step = history[0].get("start_step", 0)
        rates = [h["tokens_per_s"] for h in history[1:]] or [history[0]["tokens_per_s"]]
        summary.tokens_per_s = sum(rates) / len(rates)
        for item in history:
            if "kernels" in item:
                summary.kernels = dict(item["kernels"])
    for event in events:
        if event["event"] == "fatal" and summary.status == "succeeded":
            # The workers stopped without Ray Train's restarts (a deterministic failure such as a NaN loss).
            summary.status, summary.error = "failed", event["error"]
        elif event["event"] == "complete" and not history:
            summary.already_complete = True
            summary.steps = summary.start_step = int(event["step"])
    if history:

        write_run_artifacts(location, history)  # metrics.jsonl + loss.png next to the checkpoints; never raises
    if result is not None and result.checkpoint is not None:

        if summary.status == "succeeded":
            remove_orphan_checkpoints(result, location)
        summary.adapter_uri = location.display_uri(result.checkpoint.path)
    elif summary.status == "succeeded" and not summary.already_complete:
        summary.status, summary.error = "failed", "the run finished without a checkpoint"
    return summary

