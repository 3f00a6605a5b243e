"""The driver: check everything a run needs, start (or join) Ray, run the `TorchTrainer`, summarize.

[`run_job`] is what `lorafleet submit` and notebooks call. It refuses a bad spec or bad data with a
[`~lorafleet.spec.SpecError`] *before* Ray starts, so nothing is scheduled and nothing in storage is touched; so are
storage it cannot write and a re-submit whose data differs from what its checkpoints were trained on ([`preflight`]).

Where it runs is decided, never guessed: without an address, on a Ray instance started for the job alone (never on
one that happens to run on this machine, whose workers would lack this shell's environment); with `--address` or
`RAY_ADDRESS`, on that cluster, announced in one line, the storage settings going to its workers in the job's runtime
environment ([`start_ray`]).
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue as _queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from pyarrow import fs

from lorafleet.compat.ray import checkpoint_config, embedded_trainer
from lorafleet.data.alora import Invocation
from lorafleet.data.cache import build_cache, is_sharded, uses_cache
from lorafleet.data.dataset import TrainingData
from lorafleet.data.hub import load_hub
from lorafleet.data.sources import data_fingerprint, same_file
from lorafleet.model.build import load_tokenizer_for, resolve_base_model, weights_digest
from lorafleet.runstore.checkpoint import INFO_FILE, expected_files
from lorafleet.runstore.lease import RunLease
from lorafleet.runstore.location import RunLocation, folder_name
from lorafleet.runstore.monitoring import eval_summary, read_metrics, run_records, write_run_artifacts
from lorafleet.runstore.storage import UPLOAD_RETRY_S
from lorafleet.spec import JobSpec, SpecError
from lorafleet.train.cluster import start_ray, started_here
from lorafleet.train.timings import PhaseClock
from lorafleet.train.worker import (
    StepHook,
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
    # Every layer/path the spec asked to fuse that the model's layout left unfused, as "layer (path): reason" lines.
    kernels_skipped: list[str] = field(default_factory=list)
    error: Optional[str] = None
    # A re-submitted run whose latest checkpoint already reached `training.steps`: nothing was trained.
    already_complete: bool = False
    # An interrupted run (`status` "interrupted"): the step of its last complete checkpoint, where a re-submit resumes.
    resume_step: Optional[int] = None
    # With evaluation on (`data.eval_path` / `data.eval_fraction`): the last held-out loss, and the lowest one with
    # its step, over the whole run (a resumed run's earlier steps included).
    eval_loss: Optional[float] = None
    best_eval_loss: Optional[float] = None
    best_step: Optional[int] = None
    # With evaluation on: the kept checkpoint with the lowest held-out loss (`adapter_uri` stays the latest one).
    best_adapter_uri: Optional[str] = None
    # The run ended before `training.steps` because `eval.early_stopping_patience` evaluations did not improve.
    stopped_early: bool = False
    # With `eval.generate`: the last scores of generated answers to held-out records, and the base model's (before the
    # first step); `eval_contains` / `base_contains` likewise.
    eval_exact_match: Optional[float] = None
    eval_contains: Optional[float] = None
    base_exact_match: Optional[float] = None
    base_contains: Optional[float] = None
    # Seconds per phase of the run's fixed cost (lorafleet.train.timings.PHASES), e.g. {"ray_start": 4.2, ...}.
    phases: dict[str, float] = field(default_factory=dict)
    # With `data.on_bad_record: skip`: how many bad records were left out, and where the first few were.
    skipped_records: Optional[int] = None
    skipped_at: list[str] = field(default_factory=list)
    # The tokenized cache the workers read (lorafleet.data.cache), when the job used one.
    data_cache: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not out["stopped_early"]:
            out.pop("stopped_early")
        for name in ("error", "skipped_records", "data_cache", "eval_loss", "best_eval_loss", "best_step",
                     "best_adapter_uri", "eval_exact_match", "eval_contains", "base_exact_match", "base_contains"):
            if out[name] is None:
                out.pop(name)
        for name in ("kernels_skipped", "skipped_at"):
            if not out[name]:
                out.pop(name)
        if out["status"] != "interrupted":
            out.pop("resume_step")
        if not out["already_complete"]:
            out.pop("already_complete")
        return out


@dataclass
class Prepared:
    """The outcome of the pre-flight checks: where the base model is and the tokenized data the workers train on."""

    spec: JobSpec
    base: str
    data: TrainingData
    base_digest: Optional[str] = None


def prepare(spec: JobSpec, address: Optional[str] = None, verbose: bool = False) -> Prepared:
    """Materialize the base model and tokenize the data once, on the driver: data errors surface before Ray starts,
    and the workers train on these samples rather than tokenizing again.

    With the tokenized cache ([`~lorafleet.data.cache.uses_cache`]) the data is tokenized into (or found in) the
    storage's cache instead, by Ray Data tasks unless it is small and local (Ray is then started first, with
    `address` and `verbose` as [`start_ray`] takes them); the workers read the samples from the cache by index.

    Args:
        spec ([`~lorafleet.spec.JobSpec`]):
            The validated spec.
        address (`str`, *optional*):
            The Ray cluster to build the cache on ([`start_ray`]).
        verbose (`bool`, *optional*, defaults to `False`):
            Forward Ray's logs.

    Returns:
        [`Prepared`]: the base model location and the [`~lorafleet.data.dataset.TrainingData`].

    Raises:
        [`~lorafleet.spec.SpecError`]: For data that cannot be trained on (bad records, nothing to train).
    """

    base = resolve_base_model(spec)
    try:
        tokenizer = load_tokenizer_for(base, spec.model.trust_remote_code)
    except OSError as exc:
        raise SpecError(f"model.name_or_path: cannot load a tokenizer from '{base}' ({str(exc).splitlines()[0]})") from None

    # Fingerprinted before reading: were the file to change in between, the checkpoints would claim the older
    # content, and the next submit would see a change rather than miss one. Hub data is loaded here, once: its
    # fingerprint and the files the cache reads come from the same load.
    files = eval_files = None
    if spec.data.hub is not None:
        loaded = load_hub(spec.data.hub)
        source, files = dict(loaded.fingerprint), loaded.files
    else:
        source = data_fingerprint(spec.data.path, spec.checkpoint.endpoint)
    # The held-out set is part of what a checkpoint was made from: `eval_fraction` decides which records train,
    # and a best evaluation is only comparable on one held-out set (see preflight).
    if spec.data.eval_path is not None:
        source["eval_path"] = data_fingerprint(spec.data.eval_path, spec.checkpoint.endpoint)
    if spec.data.eval_hub is not None:
        loaded = load_hub(spec.data.eval_hub, "data.eval_hub")
        source["eval_hub"], eval_files = loaded.fingerprint, loaded.files
    if spec.data.eval_fraction is not None:
        source["eval_fraction"] = spec.data.eval_fraction
    # aLoRA: the invocation must tokenize to something, and every sample must contain it (or be dropped on request);
    # checked here so a bad invocation or bad data fails at submit time, never as a sample silently trained as base.
    if uses_cache(spec):
        invocation = Invocation.from_spec(spec, tokenizer, warn=True)
        cache, report = build_cache(spec, tokenizer, source, invocation,
                                    start_ray=lambda: start_ray(address, verbose), files=files)
        eval_cache = None
        if spec.data.eval_hub is not None or (spec.data.eval_path is not None and is_sharded(spec.data.eval_path)):
            # The held-out data as a job's training data, so that build_cache reads it; its problems are renamed back.
            if spec.data.eval_hub is not None:
                field, update = "data.eval_hub", {"path": None, "hub": spec.data.eval_hub, "eval_hub": None}
            else:
                field, update = "data.eval_path", {"path": spec.data.eval_path, "hub": None}
            held_out = spec.model_copy(update={"data": spec.data.model_copy(update=update)})
            try:
                eval_cache, _ = build_cache(held_out, tokenizer, source[field.split(".")[1]], invocation,
                                            start_ray=lambda: start_ray(address, verbose), files=eval_files)
            except SpecError as exc:
                raise SpecError(*(p.replace("data.path:", f"{field}:", 1).replace("data.hub:", f"{field}:", 1)
                                  for p in exc.problems)) from None
        data = TrainingData.from_cache(spec, tokenizer, cache, report, invocation, eval_cache)
    else:
        data = TrainingData.from_spec(spec, tokenizer, warn=True)
    data.source = source
    return Prepared(spec=spec, base=base, data=data, base_digest=weights_digest(spec, base))


def data_change(recorded: dict[str, Any], current: dict[str, Any]) -> Optional[str]:
    """How the data changed between two [`data_fingerprint`]s, in a few words, or `None` if it did not.

    Example:

    ```python
    >>> data_change({"size": 10, "sha256": "ab"}, {"size": 12, "sha256": "cd"})
    'size 10 -> 12 bytes'
    >>> data_change({"files": {"a": {"size": 1, "sha256": "x"}}}, {"files": {"a": {"size": 1, "sha256": "y"}}})
    'a changed'
    >>> data_change({"size": 10, "sha256": "ab"}, {"size": 10, "sha256": "ab"}) is None
    True
    >>> data_change({"files": {"a": {"size": 1, "mtime": 5.0}}}, {"files": {"a": {"size": 1, "etag": "x"}}}) is None
    True
    ```
    """
    if recorded == current:
        return None
    if "hub" in recorded or "hub" in current:
        if recorded.get("hub") != current.get("hub"):
            return f"was {_data_kind(recorded)}, now {_data_kind(current)}"
        if recorded.get("fingerprint") != current.get("fingerprint"):
            return f"the dataset's fingerprint changed ({recorded.get('fingerprint')} -> {current.get('fingerprint')})"
    if "sha256" in recorded and "sha256" in current:
        if recorded.get("size") != current.get("size"):
            return f"size {recorded.get('size')} -> {current.get('size')} bytes"
        return f"same size, different content (sha256 {str(recorded['sha256'])[:12]}... -> {current['sha256'][:12]}...)"
    if "files" in recorded and "files" in current:
        old, new = recorded["files"], current["files"]
        # same_file: a checkpoint recorded before object-store files had content tags still resumes.
        changes = [f"{name} changed" for name in sorted(old.keys() & new.keys())
                   if not same_file(old[name], new[name])]
        changes += [f"{name} added" for name in sorted(new.keys() - old.keys())]
        changes += [f"{name} removed" for name in sorted(old.keys() - new.keys())]
        if not changes:
            return None
        shown = ", ".join(changes[:3])
        return shown + (f" and {len(changes) - 3} more" if len(changes) > 3 else "")
    return "was a folder, now a file" if "files" in recorded else "was a file, now a folder"


def _data_kind(fingerprint: dict[str, Any]) -> str:
    hub = fingerprint.get("hub")
    if isinstance(hub, dict):
        return f"hub dataset {hub.get('name')} (split {hub.get('split')}, config {hub.get('config')}, " \
               f"revision {hub.get('revision')})"
    return "a folder" if "files" in fingerprint else "a file"


def preflight(prepared: Prepared, location: RunLocation, fresh: bool = False) -> None:
    """The checks on the run's storage before anything starts: the run folder can be written (a marker file written
    and deleted again), and, unless `fresh`, a run that already has checkpoints was trained on the same data.

    A job re-submitted with the same name and storage resumes from its latest checkpoint; over different data, the
    same step would select other samples, and the adapter would silently mix two data sets. The held-out set counts
    too: another `data.eval_fraction` trains other records, and evaluations on another `data.eval_path` file would
    not compare with the earlier ones. Checkpoints written before
    lorafleet recorded fingerprints have none, and resume unchecked.

    Args:
        prepared ([`Prepared`]):
            The prepared job (its data's fingerprint, `data.source`).
        location ([`~lorafleet.runstore.location.RunLocation`]):
            The run's location.
        fresh (`bool`, *optional*, defaults to `False`):
            The run starts over (`--fresh`): its checkpoints do not matter.

    Raises:
        [`~lorafleet.spec.SpecError`]: One line naming the storage and the cause, or the data file and what changed.

    Example:

    ```python
    >>> from types import SimpleNamespace
    >>> job = SimpleNamespace(spec=None, data=SimpleNamespace(source={}))
    >>> preflight(job, RunLocation("/tmp/lorafleet-doc-runs", "preflight-demo"))  # writable, no checkpoint yet
    >>> open("/tmp/lorafleet-doc-file", "w").close()
    >>> try:
    ...     preflight(job, RunLocation("/tmp/lorafleet-doc-file/runs", "demo"))
    ... except SpecError as exc:
    ...     print(exc)
    checkpoint.storage: cannot write to /tmp/lorafleet-doc-file/runs/demo (Not a directory)
    ```
    """
    cause = location.write_problem()
    if cause is not None:
        raise SpecError(f"checkpoint.storage: cannot write to {location.uri} ({cause})")
    if fresh:
        return
    latest = location.latest_checkpoint_json(INFO_FILE)
    recorded = latest[1].get("data") if latest is not None else None
    if not isinstance(recorded, dict) or not recorded:
        return
    spec, step = prepared.spec, latest[1].get("step")
    held_out = ("eval_fraction", "eval_path", "eval_hub")  # the fraction first: it changes which records train
    current = prepared.data.source
    change = data_change(*({k: v for k, v in f.items() if k not in held_out} for f in (recorded, current)))
    if change is not None:
        raise SpecError(
            f"{spec.data.source_field}: {spec.data.source_name} is not the data run '{spec.name}' was trained on up "
            f"to step "
            f"{step} ({change}); start over with --fresh, or use another name"
        )
    for key in held_out:
        before, now = recorded.get(key), current.get(key)
        if before == now:
            continue
        if key == "eval_fraction":
            what = f"{before if before is not None else 'none'} -> {now if now is not None else 'none'}"
            raise SpecError(
                f"data.eval_fraction: run '{spec.name}' was trained up to step {step} with another held-out split "
                f"({what}), so other records would train; start over with --fresh, or use another name"
            )
        what = "added" if before is None else "removed" if now is None else data_change(before, now)
        raise SpecError(
            f"data.{key}: the held-out data of run '{spec.name}' differs from what it was evaluated on up to step "
            f"{step} ({what}); start over with --fresh, or use another name"
        )


def make_trainer(
    prepared: Prepared, channel: Any = None, step_hooks: Sequence[StepHook] = ()
) -> Any:
    """Assemble the `TorchTrainer` for a prepared spec (`step_hooks`: see [`run_job`])."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer


    spec = prepared.spec
    scaling = spec.scaling
    use_gpu = scaling.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    resources = dict(scaling.resources_per_worker) or None
    storage_path, filesystem = RunLocation.of(spec).ray_storage()
    # On the run's own instance the controller starts in a prestarted worker (lorafleet.compat.ray item 10).
    trainer_cls = embedded_trainer(TorchTrainer) if started_here() else TorchTrainer
    return trainer_cls(
        train_loop_per_worker,
        # Ray Train puts the loop and its config in the object store once; every worker reads the data from there.
        train_loop_config=WorkerInputs(
            spec.model_dump_json(), prepared.base, prepared.data, channel=channel, step_hooks=tuple(step_hooks),
            base_digest=prepared.base_digest,
        ).config(),
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=spec.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            # `keep_best_by`: the best `keep` by it plus the latest (lorafleet.compat.ray item 5).
            checkpoint_config=checkpoint_config(spec.checkpoint.keep, spec.checkpoint.keep_best_by),
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


def fit_with_storage_retries(
    prepared: Prepared, channel: Any, step_hooks: Sequence[StepHook] = ()
) -> Any:
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


def fit_interruptibly(
    prepared: Prepared, channel: Any, step_hooks: Sequence[StepHook] = ()
) -> Any:
    """[`fit_with_storage_retries`] on a helper thread while the main thread waits, so that a signal reaches the caller.

    `TorchTrainer.fit()` called on the main thread replaces the SIGINT handler with Ray Train's own, which aborts the
    run and ends the process (status 1, no summary). Called on another thread it leaves signals alone: Ctrl-C (or
    `lorafleet submit`'s SIGTERM handler) raises `KeyboardInterrupt` here, in the main thread's wait, and the caller
    stops the run cleanly. Off the main thread (no signals to receive) it calls fit directly.
    """
    if threading.current_thread() is not threading.main_thread():
        return fit_with_storage_retries(prepared, channel, step_hooks)
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = fit_with_storage_retries(prepared, channel, step_hooks)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
            outcome["error"] = exc

    # A daemon: after an interrupt the caller shuts Ray down, and this thread's wait on it must not hold up the exit.
    thread = threading.Thread(target=fit, name="lorafleet-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.2)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def last_complete_step(location: RunLocation) -> Optional[int]:
    """The step of the newest checkpoint in the run's storage that holds every file it should, at the size recorded
    for it (what a re-submit resumes from, unless Ray Train had not registered that checkpoint yet when the run
    stopped).

    Args:
        location ([`~lorafleet.runstore.location.RunLocation`]):
            The run's location.

    Returns:
        `int` or `None`: The step, or `None` when no checkpoint is complete.

    Example:

    ```python
    >>> last_complete_step(RunLocation("/tmp/lorafleet-doc-runs", "never-ran")) is None
    True
    ```
    """
    newest = newest_complete_checkpoint(location)
    return None if newest is None else newest[1]


def newest_complete_checkpoint(location: RunLocation) -> Optional[tuple[str, int]]:
    """The path and step of the newest complete checkpoint folder in the run's storage ([`last_complete_step`]), or
    `None`. After a successful run it holds the final adapter, even when Ray Train never registered it: a `fit()`
    retried after its controller lost the storage resumes from it and, with no step left to run, reports nothing."""
    for path in reversed(location.checkpoint_dirs()):
        step = _complete_step(location.filesystem, path)
        if step is not None:
            return path, step
    return None


def _complete_step(filesystem: fs.FileSystem, path: str) -> Optional[int]:
    """The step of the checkpoint folder at `path` if it holds every file it should at its recorded size, else `None`."""
    try:
        sizes = {info.base_name: info.size for info in filesystem.get_file_info(fs.FileSelector(path))}
        with filesystem.open_input_stream(f"{path}/{INFO_FILE}") as stream:
            info = json.loads(stream.read())
    except (OSError, ValueError):
        return None
    # Sizes only, from one listing: the checksums would mean downloading the checkpoint (resume verifies them).
    records = info.get("files") if isinstance(info.get("files"), dict) else {}
    if all(sizes.get(name) and sizes[name] == records.get(name, {}).get("size", sizes[name])
           for name in expected_files(info)):
        return int(info["step"])
    return None


def remove_orphan_checkpoints(result: Any, location: RunLocation, keep: Optional[int] = None,
                              final: Optional[str] = None) -> int:
    """Delete the checkpoint folders in the run's storage that the run no longer keeps.

    A `fit()` that died mid-upload (e.g. storage went away) can leave folders its retry never registered, so Ray's
    pruning would never see them, and a retry or re-submit may have resumed from such a folder. Called after a
    successful run, when the kept set is final.

    Args:
        result (`ray.train.Result`):
            The run's result: its latest checkpoint and the ones Ray Train keeps.
        location ([`~lorafleet.runstore.location.RunLocation`]):
            The run's location, whose folder holds those checkpoints.
        keep (`int`, *optional*):
            `checkpoint.keep` when the newest are kept: the newest `keep` complete folders stay (registered by Ray
            Train or not), with the latest checkpoint. `None` (checkpoints ranked by `keep_best_by`): what Ray Train
            keeps stays.
        final (`str`, *optional*):
            The path of the run's final checkpoint when it is not Ray Train's latest ([`newest_complete_checkpoint`]);
            it stays in place of that one.

    Returns:
        `int`: How many folders were removed.
    """
    kept = [checkpoint for checkpoint, _ in (result.best_checkpoints or [])]
    if result.checkpoint is None or not kept:
        return 0
    latest = final or result.checkpoint.path
    # By folder name: Ray Train's paths and the location's name the same folders, but need not be spelled alike.
    if keep is None:
        keep_names = {folder_name(p) for p in [*(c.path for c in kept), latest]}
    else:
        complete = [p for p in location.checkpoint_dirs() if _complete_step(location.filesystem, p) is not None]
        keep_names = {folder_name(p) for p in [*complete[-keep:], latest]}
    removed = 0
    for path in location.checkpoint_dirs():
        if folder_name(path) not in keep_names:
            try:
                location.filesystem.delete_dir(path)
                removed += 1
            except OSError:
                pass  # best effort: a leftover folder costs space, never correctness (resume verifies)
    return removed


def best_checkpoint(result: Any) -> Any:
    """The kept checkpoint of a finished fit with the lowest finite `eval_loss` (the earliest step on ties), or
    `None` when none was evaluated. Ray Train's kept checkpoints (`best_checkpoints`) and the latest one are the
    candidates: under `checkpoint.keep_best_by` they hold the best (lorafleet.compat.ray item 5); without it, the
    best of the newest `checkpoint.keep`.

    Example:

    ```python
    >>> from types import SimpleNamespace
    >>> a, b = SimpleNamespace(path="/runs/x/checkpoint_a"), SimpleNamespace(path="/runs/x/checkpoint_b")
    >>> result = SimpleNamespace(best_checkpoints=[(a, {"step": 2, "eval_loss": 2.1})], checkpoint=b,
    ...                          metrics={"step": 6, "eval_loss": 2.4})
    >>> best_checkpoint(result).path
    '/runs/x/checkpoint_a'
    ```
    """
    candidates = list(result.best_checkpoints or [])
    if result.checkpoint is not None:
        candidates.append((result.checkpoint, result.metrics or {}))
    scored = [
        (metrics["eval_loss"], metrics.get("step", 0), checkpoint)
        for checkpoint, metrics in candidates
        if isinstance(metrics.get("eval_loss"), (int, float)) and math.isfinite(metrics["eval_loss"])
    ]
    return min(scored, key=lambda item: item[:2])[2] if scored else None


def run_job(
    spec: JobSpec,
    *,
    address: Optional[str] = None,
    on_progress: Optional[ProgressFn] = None,
    verbose: bool = False,
    fresh: bool = False,
    step_hooks: Sequence[StepHook] = (),
    clock: Optional[PhaseClock] = None,
) -> RunSummary:
    """Run a job to the end and summarize it.

    Args:
        spec ([`~lorafleet.spec.JobSpec`]):
            The validated spec.
        address (`str`, *optional*):
            A Ray cluster to join (`auto`, `ray://...`, `HOST:PORT`); default `RAY_ADDRESS`, else a Ray instance
            started for this job alone ([`start_ray`]).
        on_progress (`Callable[[dict], None]`, *optional*):
            Called on the driver with each step's metrics (`step`, `loss`, `lr`, `tokens_per_s`, ...).
        verbose (`bool`, *optional*, defaults to `False`):
            Forward Ray's and the workers' logs.
        fresh (`bool`, *optional*, defaults to `False`):
            Delete the run's stored checkpoints first and start over. By default a job re-submitted with the same
            `name` and `checkpoint.storage` resumes from its latest complete checkpoint (adapter, optimizer,
            scheduler, RNG and data position), if it was trained on the same data; `start_step` in the summary says
            where it started.
        step_hooks (`Sequence[StepHook]`, *optional*, defaults to `()`):
            Callables every worker runs before each step ([`~lorafleet.train.worker.StepHook`]); one returning `True`
            ends the run cleanly after its next checkpoint.
        clock ([`~lorafleet.train.timings.PhaseClock`], *optional*):
            Times the run's phases (`phases` in the summary; one line each in the log at INFO); default a clock
            started now. `lorafleet submit` passes one started with the command, so its start counts too.

    Returns:
        [`RunSummary`]: `status` is `succeeded`, `failed` (with `error`) or `interrupted` (a `KeyboardInterrupt`
        during training, e.g. Ctrl-C: the workers were stopped and Ray shut down; `resume_step` is the step of the
        last complete checkpoint, where a re-submit resumes).

    Raises:
        [`~lorafleet.spec.SpecError`]: For a spec or data that cannot be trained, storage that cannot be written, a
        re-submit whose data differs from its checkpoints' ([`preflight`]), an address where no cluster answers, or
        a run that another submit is training ([`~lorafleet.runstore.lease.RunInUse`]); nothing was started.

    Example:

    ```python
    >>> from lorafleet.spec import load_spec
    >>> summary = run_job(load_spec("jobs/llama.yaml", ["training.steps=4", "training.warmup=1", "name=doc-example"]))
    >>> summary.status, summary.steps
    ('succeeded', 4)
    ```
    """
    clock = clock or PhaseClock()
    prepared = prepare(spec, address, verbose)
    location = RunLocation.of(spec)
    preflight(prepared, location, fresh)  # storage that cannot be written, a re-submit over other data: refused
    # Taken before Ray starts: a second submit of the same run is refused here, having started nothing. Released
    # however the run ends.
    with RunLease(location) as lease:
        if fresh:
            location.delete()
            lease.renew()  # the run folder is gone, lease included: write it again
        clock.lap("preflight")
        summary = _train(prepared, location, address, on_progress, verbose, step_hooks, clock)
    clock.lap("after_last_step")
    summary.phases = clock.as_dict()
    for line in clock.lines():
        logger.info(line)
    return summary


def _train(
    prepared: Prepared,
    location: RunLocation,
    address: Optional[str],
    on_progress: Optional[ProgressFn],
    verbose: bool,
    step_hooks: Sequence[StepHook],
    clock: PhaseClock,
) -> RunSummary:
    """[`run_job`] once the run's lease is held: start Ray, fit, summarize."""
    import ray
    from ray.util.queue import Queue

    spec = prepared.spec
    start_ray(address, verbose)
    clock.lap("ray_start")
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
                if item["event"] == "phases":  # rank 0's set-up (lorafleet.train.timings)
                    clock.merge_worker(item)
                    continue
                if item["event"] == "warning":  # e.g. a damaged checkpoint skipped on resume: shown as it happens
                    logger.warning(item["message"])
                events.append(item)
                continue
            if not history:
                clock.lap("first_step")
            clock.skip_to(time.time())  # the steps are not fixed cost: the last phase starts at the last step
            history.append(item)
            if on_progress is not None:
                on_progress(item)

    reader = threading.Thread(target=pump, name="lorafleet-progress", daemon=True)
    reader.start()
    summary = RunSummary(job=spec.name, status="succeeded")
    report = prepared.data.report
    summary.skipped_records = report.get("skipped") or None
    summary.skipped_at = list(report.get("skipped_at", []))
    summary.data_cache = report.get("uri")
    interrupted = False
    try:
        result = fit_interruptibly(prepared, channel, step_hooks)
    except Exception as exc:  # Ray wraps worker errors; the summary carries the worker's own message.
        result = None
        summary.status = "failed"
        summary.error = _failure_message(exc)
    except KeyboardInterrupt:
        # Ctrl-C, or a SIGTERM `lorafleet submit` turned into one: stop here. Ray Train registers a checkpoint only
        # once it is whole, so a re-submit resumes from the last complete one.
        result, interrupted = None, True
        summary.status, summary.error = "interrupted", "interrupted"
    finally:
        stop.set()
        reader.join(timeout=10)
        try:
            ray.kill(channel.actor)
        except Exception:
            pass
    if interrupted:
        # Stops the workers: an embedded instance ends with every Ray process it started; a cluster ends this
        # driver's job, and with it the Train controller and its workers.
        ray.shutdown(wait_for_processes=True)
        summary.resume_step = last_complete_step(location)
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
                summary.kernels_skipped = list(item.get("kernels_skipped", []))
    for event in events:
        if event["event"] == "fatal" and summary.status == "succeeded":
            # The workers stopped without Ray Train's restarts (a deterministic failure such as a NaN loss).
            summary.status, summary.error = "failed", event["error"]
        elif event["event"] == "complete" and not history:
            summary.already_complete = True
            summary.steps = summary.start_step = int(event["step"])
            summary.stopped_early = bool(event.get("stopped_early"))
            # The evaluations of the finished run, from its metrics.jsonl (a sweep ranks a re-run trial by them).
            try:
                records = read_metrics(location)
            except (OSError, ValueError):
                records = []
            for name, value in eval_summary(records).items():
                setattr(summary, name, value)
    if history:
        summary.stopped_early = bool(history[-1].get("stopped_early"))
        write_run_artifacts(location, history)  # metrics.jsonl + loss.png next to the checkpoints; never raises
        if any("eval_loss" in h for h in history):
            try:
                records = run_records(location, history)
            except (OSError, ValueError):  # the earlier records unreadable: the best of this attempt's steps
                records = history
            for name, value in eval_summary(records).items():
                setattr(summary, name, value)
    if result is not None and result.checkpoint is not None:

        final = result.checkpoint.path
        if summary.status == "succeeded":
            newest = newest_complete_checkpoint(location)
            if newest is not None and folder_name(newest[0]) != folder_name(final) and newest[1] >= summary.steps:
                final = newest[0]
            keep = None if spec.checkpoint.keep_best_by else spec.checkpoint.keep
            remove_orphan_checkpoints(result, location, keep, final=final)
        summary.adapter_uri = location.display_uri(final)
        best = best_checkpoint(result) if spec.data.evaluates else None
        if best is not None:
            summary.best_adapter_uri = location.display_uri(best.path)
    elif summary.status == "succeeded" and not summary.already_complete:
        summary.status, summary.error = "failed", "the run finished without a checkpoint"
    return summary

