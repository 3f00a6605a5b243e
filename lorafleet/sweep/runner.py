"""Run a sweep on Ray Tune: each trial an ordinary lorafleet run, ASHA stopping the ones that fall behind.

Each Ray Tune trial runs [`~lorafleet.train.driver.run_job`] on the trial's spec (the sweep's job with the sampled
values, named `trial-NNN`, stored in `<storage>/<sweep>/trial-NNN`), so its Ray Train `TorchTrainer`, checkpoints,
`metrics.jsonl` and `loss.png` are those of any run, and its adapter is a plain PEFT adapter. The trial forwards each
evaluation to Tune (`step` and the metric), where ASHA compares it at its rungs, and ends with a result carrying the
run's summary. Tune's own files (experiment state, each trial's `result.json`) sit in the same folders, which is what
lets a re-run of the sweep continue: finished trials stay finished, unfinished ones resume from their checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import signal
import sys
import threading
from dataclasses import asdict, dataclass, field
from collections.abc import Sequence
from typing import Any, Callable, Optional

from ray import tune
from ray.tune import Callback

from lorafleet.compat.ray import TUNE_ERROR_LOGGERS, restored_run_config, tune_env
from lorafleet.runstore.location import RunLocation
from lorafleet.runstore.monitoring import write_run_artifacts
from lorafleet.spec import SpecError
from lorafleet.sweep.space import Sweep, copy_params
from lorafleet.train.cluster import start_ray
from lorafleet.train.driver import data_fingerprint, newest_complete_checkpoint, run_job
from lorafleet.train.worker import StepHook

logger = logging.getLogger(__name__)

SWEEP_FILE = "lorafleet-sweep.json"
# Written to the trial's last Tune result by the trial itself: its run's status ("succeeded"); a trial whose results
# lack it ended without finishing its run (ASHA stopped it, or the sweep was interrupted).
STATUS_KEY = "lorafleet_status"

LineFn = Callable[[str], None]


@dataclass
class TrialOutcome:
    """One trial of a finished (or interrupted) sweep, as the `--json` summary lists it."""

    trial: str
    params: dict[str, Any]
    status: str  # succeeded | stopped | failed | unfinished
    metric: Optional[float] = None
    steps: int = 0
    adapter_uri: Optional[str] = None
    error: Optional[str] = None


@dataclass
class SweepSummary:
    """What `lorafleet sweep --json` prints: the best trial and every trial, best first."""

    sweep: str
    metric: str
    mode: str
    status: str = "succeeded"  # succeeded | interrupted | failed (no trial succeeded)
    best: Optional[dict[str, Any]] = None
    trials: list[TrialOutcome] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["trials"] = [{k: v for k, v in asdict(t).items() if v is not None or k == "metric"} for t in self.trials]
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SweepSummary:
        """The summary [`to_dict`] gave (e.g. read back from a remote sweep's log); other keys are ignored."""
        trials = [TrialOutcome(**t) for t in raw.get("trials") or []]
        return cls(sweep=raw["sweep"], metric=raw["metric"], mode=raw["mode"], status=raw.get("status", "failed"),
                   best=raw.get("best"), trials=trials)


class _TrialNames:
    """Names a trial `trial-NNN` (its folder and its name in Tune) by the number its search algorithm gave it, the
    first part of its `experiment_tag`: counted from 0 by Tune's variant generator, from 1 by a search algorithm
    (Optuna). The count is saved with the experiment, so a restored sweep names its new trials after the earlier ones.

    Args:
        first (`int`): The number the search algorithm gives its first trial.
    """

    def __init__(self, first: int) -> None:
        self.first = first

    def __call__(self, trial: Any) -> str:
        return f"trial-{int(str(trial.experiment_tag).split('_', 1)[0]) - self.first:03d}"


def _run_trial(config: dict[str, Any], sweep_json: str, step_hooks: tuple = ()) -> None:
    """The Ray Tune trainable: one trial, i.e. one lorafleet run, its evaluations reported to Tune as they come."""

    sweep = Sweep.from_json(sweep_json)
    trial = os.path.basename(tune.get_context().get_trial_dir().rstrip("/"))
    spec = sweep.trial_spec(copy_params(config), trial)
    metric = sweep.section.metric
    items: queue.Queue = queue.Queue()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["summary"] = run_job(spec, on_progress=items.put, step_hooks=step_hooks)
        except BaseException as exc:  # noqa: BLE001 - raised again on the trial's thread
            outcome["error"] = exc
        finally:
            items.put(None)

    threading.Thread(target=run, name="lorafleet-trial", daemon=True).start()
    history: list[dict[str, Any]] = []
    while (item := items.get()) is not None:
        history.append(item)
        # The last step's evaluation is reported once, with the run's summary: ASHA has a rung at the last step too,
        # and a stop there would end the trial before its summary.
        if metric in item and item["step"] < spec.training.steps:
            # ASHA may stop the trial at this report, which ends its process before the run writes its metrics and
            # plot: written here first (the run rewrites them when it ends).
            write_run_artifacts(RunLocation.of(spec), history)
            tune.report({"step": item["step"], metric: item[metric], "loss": item["loss"]})
    if "error" in outcome:
        raise outcome["error"]
    summary = outcome["summary"]
    if summary.status != "succeeded":
        raise RuntimeError(summary.error or summary.status)
    final = {"step": summary.steps, STATUS_KEY: summary.status, "adapter_uri": summary.adapter_uri}
    # The run summary's field for each metric: a held-out loss by its best evaluation, the training loss by its last.
    value = getattr(summary, {"eval_loss": "best_eval_loss", "loss": "final_loss"}.get(metric, metric), None)
    if value is not None:
        final[metric] = value
    if summary.best_adapter_uri and metric == "eval_loss":
        final["adapter_uri"] = summary.best_adapter_uri
    tune.report(final)


class TermAsInterrupt:
    """While a sweep runs: SIGTERM is handled as Ctrl-C, which Ray Tune turns into a clean stop of the trials (their
    checkpoints kept, the experiment state saved for a re-run to continue). The signal is kept for the exit code."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: Any = None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        signal.raise_signal(signal.SIGINT)

    def __enter__(self) -> TermAsInterrupt:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def default_concurrency(sweep: Sweep) -> int:
    """How many trials fit on the cluster at once: its CPUs (and GPUs, for GPU jobs) over one trial's workers'."""
    import ray

    scaling = sweep.job.scaling
    resources = ray.cluster_resources()
    per_worker = dict(scaling.resources_per_worker) or {"CPU": 1}
    if scaling.use_gpu or (scaling.use_gpu is None and resources.get("GPU", 0) > 0):
        per_worker.setdefault("GPU", 1)
    fits = [resources.get(key, 0) // (amount * scaling.num_workers) for key, amount in per_worker.items() if amount]
    return max(1, int(min(fits))) if fits else 1


class _Progress(Callback):
    """The Ray Tune callback that prints one line per trial event and remembers each trial's results.

    Args:
        sweep ([`~lorafleet.sweep.space.Sweep`]): The sweep.
        say (`Callable[[str], None]`): Receives each line.
    """

    def __init__(self, sweep: Sweep, say: LineFn):
        self.sweep, self.say = sweep, say
        self.results: dict[str, list[dict[str, Any]]] = {}
        self.params: dict[str, dict[str, Any]] = {}
        self.ended: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        # Each trial's Tune state when the sweep ended, trials finished in an earlier run of the sweep included.
        self.states: dict[str, str] = {}

    def _name(self, trial: Any) -> str:
        name = str(trial)  # its custom name, from _TrialNames
        self.params.setdefault(name, copy_params(trial.config))
        return name

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        name = self._name(trial)
        self.say(f"[{name}] started: {self.sweep.describe(self.params[name])}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        name = self._name(trial)
        self.results.setdefault(name, []).append(dict(result))
        metric = self.sweep.section.metric
        if STATUS_KEY not in result and metric in result:
            self.say(
                f"[{name}] step {result['step']}/{self.sweep.job.training.steps}  {metric} {result[metric]:.4f}  "
                f"({self.sweep.describe(self.params[name])})"
            )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        name = self._name(trial)
        results = self.results.get(name) or []
        self.ended[name] = _status(results)
        step = results[-1]["step"] if results else 0
        said = {"succeeded": "succeeded", "stopped": f"stopped by ASHA at step {step}"}
        self.say(f"[{name}] {said.get(self.ended[name], f'interrupted at step {step}')}")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for trial in trials:
            name = self._name(trial)
            self.states[name] = str(trial.status)
            if self.states[name] == "ERROR" and name not in self.errors:
                self.errors[name] = _error_line(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        name = self._name(trial)
        self.ended[name] = "failed"
        self.errors[name] = _error_line(trial)
        self.say(f"[{name}] failed: {self.errors[name]}")


def _error_line(trial: Any) -> str:
    """The last line of a failed trial's error (the run's own message, not Ray's wrapping)."""
    text = ""
    path = getattr(trial, "error_file", None) or ""
    try:
        if path:
            text = open(path).read()
    except OSError:
        pass
    text = text or str(getattr(trial, "error_msg", "") or "")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = lines[-1] if lines else "failed"
    return line.split("RuntimeError: ", 1)[-1]


def _identity(sweep: Sweep) -> dict[str, Any]:
    """What a re-run must match to continue the sweep (recorded in its folder): its section and job, with the job's data
    files by content, not path (a remote sweep's data lies in a folder of Ray's whose path changes between
    submissions)."""
    raw = json.loads(json.dumps(sweep.to_json()))
    data = raw["job"]["data"]
    for key in ("path", "eval_path"):
        if data.get(key) is not None:
            data[key] = data_fingerprint(data[key])
    return raw


def _check_recorded(sweep: Sweep, location: RunLocation, resume: bool) -> bool:
    """Whether the sweep's folder holds an earlier run of this same sweep (to continue); one that holds another
    sweep's is refused. `resume` (`--resume`) requires an earlier run."""
    recorded = location.read(SWEEP_FILE)
    if recorded is None:
        if resume:
            raise SpecError(f"--resume: no sweep '{sweep.name}' in {location.uri} to resume")
        return False
    try:
        before = json.loads(recorded)
    except ValueError:
        before = None
    if before != _identity(sweep):
        raise SpecError(
            f"name: sweep '{sweep.name}' in {location.uri} was started with another sweep file or other values; "
            "use another name, or --fresh to start it over"
        )
    return True


def run_sweep(
    sweep: Sweep,
    *,
    address: Optional[str] = None,
    resume: bool = False,
    fresh: bool = False,
    verbose: bool = False,
    say: Optional[LineFn] = None,
    step_hooks: Sequence[StepHook] = (),
) -> SweepSummary:
    """Run (or continue) a sweep to the end and summarize it.

    Args:
        sweep ([`~lorafleet.sweep.space.Sweep`]):
            The checked sweep ([`~lorafleet.sweep.space.load_sweep`]).
        address (`str`, *optional*):
            A Ray cluster to join; default `RAY_ADDRESS`, else a Ray instance started for the sweep.
        resume (`bool`, *optional*, defaults to `False`):
            Require an earlier run of this sweep to continue (a re-run continues one anyway when there is one).
        fresh (`bool`, *optional*, defaults to `False`):
            Delete the sweep's folder first and start over.
        verbose (`bool`, *optional*, defaults to `False`):
            Forward Ray's and the workers' logs.
        say (`Callable[[str], None]`, *optional*):
            Receives one progress line per trial event; default: printed on stderr.
        step_hooks (`Sequence[StepHook]`, *optional*, defaults to `()`):
            Passed to every trial's [`~lorafleet.train.driver.run_job`] (they travel to Ray Tune's processes
            pickled).

    Returns:
        [`SweepSummary`]: the trials sorted best first (failed and stopped ones after those with a metric).

    Raises:
        [`~lorafleet.spec.SpecError`]: Storage that cannot be written, or a folder that holds another sweep.
    """
    say = say or (lambda line: print(f"lorafleet: {sweep.name}: {line}", file=sys.stderr, flush=True))
    location = RunLocation(sweep.job.storage_uri, sweep.name, sweep.job.checkpoint.endpoint)
    cause = location.write_problem()
    if cause is not None:
        raise SpecError(f"checkpoint.storage: cannot write to {location.uri} ({cause})")
    if fresh:
        location.delete()
    continuing = _check_recorded(sweep, location, resume)
    os.environ.update(tune_env())
    # ASHA kills a stopped trial's process, and with it its Train controller; Ray Train frees that run's workers'
    # CPUs once its cleaner sees the controller dead through the State API, which needs the dashboard.
    start_ray(address, verbose, dashboard=True)
    for name in TUNE_ERROR_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR if verbose else logging.CRITICAL)
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, sweep_json=json.dumps(sweep.to_json()), step_hooks=tuple(step_hooks)),
        # The trial itself only waits on its Ray Train run, whose workers hold the resources (Tune refuses an empty
        # request: one byte of memory).
        {"cpu": 0, "memory": 1},
    )
    progress = _Progress(sweep, say)
    storage_path, filesystem = location.ray_storage()
    if continuing and tune.Tuner.can_restore(location.path, storage_filesystem=filesystem):
        say(f"continuing the sweep in {location.uri} (finished trials are not run again)")
        tuner = tune.Tuner.restore(
            location.path,
            trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
            storage_filesystem=filesystem,
        )
        _set_callbacks(tuner, [progress])
    else:
        location.write(SWEEP_FILE, json.dumps(_identity(sweep), indent=1).encode())
        names = _TrialNames(first=1 if sweep.section.search == "optuna" else 0)
        tuner = tune.Tuner(
            trainable,
            param_space={path: space.to_tune() for path, space in sweep.spaces.items()},
            tune_config=tune.TuneConfig(
                num_samples=sweep.section.num_samples,
                scheduler=_scheduler(sweep),
                search_alg=_search(sweep, sweep.section.max_concurrent_trials or default_concurrency(sweep)),
                trial_dirname_creator=names,
                trial_name_creator=names,
                reuse_actors=False,
            ),
            run_config=tune.RunConfig(
                name=sweep.name,
                storage_path=storage_path,
                storage_filesystem=filesystem,
                callbacks=[progress],
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
    tuner.fit()
    return _summarize(sweep, location, progress)


def _set_callbacks(tuner: Any, callbacks: list) -> None:
    """A restored `Tuner` keeps the run config it was saved with, without callbacks (they are not serialized)."""
    restored_run_config(tuner).callbacks = callbacks


def _scheduler(sweep: Sweep) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if sweep.section.scheduler == "none":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="step",
        metric=sweep.section.metric,
        mode=sweep.mode,
        max_t=sweep.job.training.steps,
        grace_period=sweep.grace_period,
        reduction_factor=sweep.section.reduction_factor,
        # A trial at its last step ends by itself, with its summary; stopped there, it would count as stopped.
        stop_last_trials=False,
    )


def _search(sweep: Sweep, concurrency: int) -> Any:
    """The search algorithm, limited to `concurrency` trials at once (Tune's `max_concurrent_trials` does not apply
    to a search algorithm given as an instance)."""
    seed = sweep.section.seed if sweep.section.seed is not None else sweep.job.training.seed
    if sweep.section.search == "optuna":
        import optuna
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # its "new study created" line, on every sweep

        searcher = OptunaSearch(
            metric=sweep.section.metric, mode=sweep.mode, sampler=optuna.samplers.TPESampler(seed=seed)
        )
        return ConcurrencyLimiter(searcher, max_concurrent=concurrency)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed, max_concurrent=concurrency)


def _summarize(sweep: Sweep, location: RunLocation, progress: Any) -> SweepSummary:
    """The summary from what the callback saw and, for trials it did not see end (a continued sweep's earlier
    trials), from each trial's folder."""
    metric, mode = sweep.section.metric, sweep.mode
    summary = SweepSummary(sweep=sweep.name, metric=metric, mode=mode)
    names = sorted(set(progress.params) | set(_recorded_trials(location)))
    for name in names:
        results = progress.results.get(name) or _recorded_results(location, name)
        params = progress.params.get(name) or _recorded_params(location, name)
        status = progress.ended.get(name) or _recorded_status(results, progress.states.get(name), location, name)
        values = [r[metric] for r in results if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
        final = next((r for r in reversed(results) if STATUS_KEY in r), None)
        if final is not None and isinstance(final.get(metric), (int, float)):
            value: Optional[float] = float(final[metric])
        elif values:
            value = float(min(values) if mode == "min" else max(values)) if metric == "eval_loss" else float(values[-1])
        else:
            value = None
        adapter = final.get("adapter_uri") if final is not None else None
        if adapter is None and status != "failed":
            adapter = _newest_adapter(location, name)
        summary.trials.append(
            TrialOutcome(
                trial=name,
                params=params,
                status=status,
                metric=value,
                steps=int(results[-1]["step"]) if results else 0,
                adapter_uri=adapter,
                error=progress.errors.get(name) if status == "failed" else None,
            )
        )
    sign = 1 if mode == "min" else -1
    summary.trials.sort(key=lambda t: (t.metric is None, sign * t.metric if t.metric is not None else 0, t.trial))
    ranked = [t for t in summary.trials if t.metric is not None and t.status in ("succeeded", "stopped")]
    if ranked:
        best = ranked[0]
        summary.best = {"trial": best.trial, "params": best.params, "metric": best.metric,
                        "adapter_uri": best.adapter_uri}
    if any(t.status == "unfinished" for t in summary.trials):
        summary.status = "interrupted"
    elif not any(t.status == "succeeded" for t in summary.trials):
        summary.status = "failed"
    return summary


def _recorded_trials(location: RunLocation) -> list[str]:
    """The trial folders in the sweep's folder (`trial-NNN`)."""
    from pyarrow import fs

    try:
        infos = location.filesystem.get_file_info(fs.FileSelector(location.path))
    except (OSError, FileNotFoundError):
        return []
    return [i.base_name for i in infos if i.type == fs.FileType.Directory and i.base_name.startswith("trial-")]


def _recorded_results(location: RunLocation, trial: str) -> list[dict[str, Any]]:
    """A trial's Tune results from its `result.json` (one JSON object per line)."""
    text = RunLocation(location.uri, trial).read("result.json")
    if text is None:
        return []
    out = []
    for line in text.decode().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _recorded_params(location: RunLocation, trial: str) -> dict[str, Any]:
    text = RunLocation(location.uri, trial).read("params.json")
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {}


def _status(results: list[dict[str, Any]]) -> str:
    """How a trial that did not fail ended, from its Tune results: `succeeded` (its run's summary came), `stopped`
    (Tune marks the result its scheduler stopped it at `done`) or `unfinished` (the sweep was interrupted)."""
    if any(STATUS_KEY in r for r in results):
        return "succeeded"
    return "stopped" if any(r.get("done") for r in results) else "unfinished"


def _recorded_status(results: list[dict[str, Any]], state: Optional[str], location: RunLocation, trial: str) -> str:
    """The status of a trial that ended in an earlier run of the sweep, from its results and its Tune state."""
    if state == "ERROR" or RunLocation(location.uri, trial).read("error.txt") is not None:
        return "failed"
    return _status(results)


def _newest_adapter(location: RunLocation, trial: str) -> Optional[str]:
    run = RunLocation(location.uri, trial)
    newest = newest_complete_checkpoint(run)
    return run.display_uri(newest[0]) if newest is not None else None

