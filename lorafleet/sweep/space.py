"""A sweep's definition: a job spec plus a `sweep:` section, read and checked before anything starts.

`load_sweep` reads `SWEEP.yaml`, validates the job part as any job ([`~lorafleet.spec.load_spec`]) and the `sweep:`
section here, then checks what the search can produce: every value a `choice`/`grid` lists and both ends of every
range, in every combination (up to `MAX_CHECKED_COMBINATIONS`), must make a valid job, and the metric must be one the
job produces. Each problem is one line naming its field, so a bad sweep is refused having started nothing.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorafleet.spec import (
    JobSpec,
    SpecError,
    apply_override,
    load_spec,
    parse_override,
    read_yaml_file,
    spec_from_json,
)

SPACE_KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
# What a trial can be ranked by, and which way is better by default.
METRICS = {"eval_loss": "min", "loss": "min", "eval_exact_match": "max", "eval_contains": "max"}
# Fields the sweep decides for each trial.
RESERVED = ("name", "checkpoint.storage")
# Corner combinations checked before a sweep starts; beyond this, a seeded sample of them.
MAX_CHECKED_COMBINATIONS = 256


@dataclass(frozen=True)
class Space:
    """One parameter's search space: `kind` (one of `SPACE_KINDS`) over `values` (the listed values for `choice` and
    `grid`, `(low, high)` for the ranges; `randint` includes both ends).

    Example:

    ```python
    >>> Space.parse("lora.r", {"choice": [4, 8]}).corners()
    [4, 8]
    >>> Space.parse("training.learning_rate", {"loguniform": [1e-4, 1e-2]}).corners()
    [0.0001, 0.01]
    >>> Space.parse("lora.r", {"uniform": [8, 4]})
    Traceback (most recent call last):
    ...
    lorafleet.spec.schema.SpecError: sweep.params.lora.r: uniform needs [low, high] with low < high, got [8, 4]
    ```
    """

    kind: str
    values: tuple

    @classmethod
    def parse(cls, path: str, raw: Any) -> Space:
        """The space `raw` (`{kind: values}`) given for the field `path`, or a [`~lorafleet.spec.SpecError`]."""
        where = f"sweep.params.{path}"
        if not isinstance(raw, dict) or len(raw) != 1:
            raise SpecError(f"{where}: expected one of {{{', '.join(f'{k}: [...]' for k in SPACE_KINDS)}}}")
        ((kind, values),) = raw.items()
        if kind not in SPACE_KINDS:
            raise SpecError(f"{where}: unknown space '{kind}' (one of {', '.join(SPACE_KINDS)})")
        if not isinstance(values, list) or not values:
            raise SpecError(f"{where}: {kind} needs a non-empty list, got {values!r}")
        if kind in ("choice", "grid"):
            return cls(kind, tuple(values))
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if len(values) != 2 or not numeric or not values[0] < values[1]:
            raise SpecError(f"{where}: {kind} needs [low, high] with low < high, got {values!r}")
        if kind == "loguniform" and values[0] <= 0:
            raise SpecError(f"{where}: loguniform needs 0 < low, got {values!r}")
        if kind == "randint" and not all(isinstance(v, int) for v in values):
            raise SpecError(f"{where}: randint needs two integers, got {values!r}")
        return cls(kind, (values[0], values[1]))

    def corners(self) -> list[Any]:
        """The values checked before the sweep starts: every listed value, or both ends of a range."""
        return list(self.values)

    def to_tune(self) -> Any:
        """The Ray Tune search space (`tune.choice`, `tune.grid_search`, ...)."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        return tune.randint(self.values[0], self.values[1] + 1)  # Tune's upper end is excluded, ours included


class SweepSection(BaseModel):
    """The `sweep:` section of a sweep file (every field is also documented in jobs/README.md)."""

    model_config = ConfigDict(extra="forbid")

    params: dict[str, Any] = Field(
        ..., description="Spec field path -> search space: {choice: [..]}, {grid: [..]}, {uniform: [lo, hi]}, "
        "{loguniform: [lo, hi]} or {randint: [lo, hi]} (both ends included)."
    )
    num_samples: int = Field(
        4, gt=0, description="Trials to sample; with `grid` spaces, each grid combination is run this many times."
    )
    metric: Literal["eval_loss", "loss", "eval_exact_match", "eval_contains"] = Field(
        "eval_loss", description="What ranks the trials (and what ASHA compares)."
    )
    mode: Optional[Literal["min", "max"]] = Field(
        None, description="Whether lower or higher `metric` is better; default min for losses, max for the others."
    )
    max_concurrent_trials: Optional[int] = Field(
        None, gt=0, description="Trials training at once; default as many as the cluster's CPUs (GPUs) fit."
    )
    scheduler: Literal["asha", "none"] = Field(
        "asha", description="`asha` stops trials that fall behind at their evaluation points; `none` runs all."
    )
    grace_period: Optional[int] = Field(
        None, gt=0, description="ASHA: steps every trial trains before it can be stopped; default the first "
        "evaluation step."
    )
    reduction_factor: float = Field(
        3, gt=1, description="ASHA: each rung keeps the best 1/reduction_factor of the trials that reached it."
    )
    search: Literal["random", "optuna"] = Field(
        "random",
        description="How values are chosen: random sampling, or Optuna's TPE (needs `optuna`: "
        "`pip install lorafleet[sweep]`).",
    )
    seed: Optional[int] = Field(None, description="Seed of the random search; default `training.seed`.")


@dataclass
class Sweep:
    """A checked sweep: its section, the job every trial starts from, and the parsed spaces.

    Attributes:
        section ([`SweepSection`]): The `sweep:` section.
        job ([`~lorafleet.spec.JobSpec`]): The job without the swept values (the sweep's name is its `name`).
        spaces (`dict[str, Space]`): Field path -> space, in file order.
    """

    section: SweepSection
    job: JobSpec
    spaces: dict[str, Space]

    @property
    def name(self) -> str:
        return self.job.name

    @property
    def mode(self) -> str:
        return self.section.mode or METRICS[self.section.metric]

    @property
    def storage_uri(self) -> str:
        """The sweep's folder, `<checkpoint.storage>/<name>`: one subfolder per trial."""
        return f"{self.job.storage_uri.rstrip('/')}/{self.name}"

    @property
    def grace_period(self) -> int:
        first_eval = next((s for s in range(1, self.job.training.steps + 1) if self.job.evaluates_at(s)), None)
        return self.section.grace_period or first_eval or max(1, self.job.training.steps // 4)

    def trial_spec(self, params: dict[str, Any], trial: str) -> JobSpec:
        """The job of one trial: the sweep's job with `params` (field path -> value) set, named `trial`, stored in
        the sweep's folder.

        Raises:
            [`~lorafleet.spec.SpecError`]: The values make an invalid job (one line naming the values and the cause).
        """
        raw = self.job.model_dump(mode="json")
        for path, value in params.items():
            apply_override(raw, path.split("."), value)  # creates an optional section left out (`eval.generate`)
        raw["name"] = trial
        raw.setdefault("checkpoint", {})["storage"] = self.storage_uri
        try:
            return load_spec(raw=raw)
        except SpecError as exc:
            shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
            raise SpecError(*(f"sweep.params: {shown} makes an invalid job: {p}" for p in exc.problems)) from None

    def to_json(self) -> dict[str, Any]:
        """What identifies the sweep (recorded in its folder; a re-run must match it to resume)."""
        return {"sweep": self.section.model_dump(mode="json"), "job": self.job.model_dump(mode="json")}

    @classmethod
    def from_json(cls, text: str) -> Sweep:
        """The sweep [`to_json`] described (what each trial receives)."""
        raw = json.loads(text)
        section = SweepSection.model_validate(raw["sweep"])
        spaces = {path: Space.parse(path, space) for path, space in section.params.items()}
        return cls(section=section, job=spec_from_json(json.dumps(raw["job"])), spaces=spaces)

    def describe(self, params: dict[str, Any]) -> str:
        """`params` as a short `r=8 learning_rate=0.0003` text (the last part of each path)."""
        return " ".join(f"{p.rsplit('.', 1)[-1]}={_short(v)}" for p, v in params.items())


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _field_exists(path: str) -> bool:
    """Whether `path` names a field of the job spec (through optional sections such as `alora` or `eval.generate`)."""
    model: Any = JobSpec
    for part in path.split("."):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return False
        annotation = fields[part].annotation
        candidates = [annotation, *typing.get_args(annotation)]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return True


def load_sweep(path: Union[str, Path], overrides: tuple[str, ...] | list[str] = ()) -> Sweep:
    """Read and check a sweep file: the job (as [`~lorafleet.spec.load_spec`] would), its `sweep:` section, every
    corner combination of the search space as a job, and the metric.

    Args:
        path (`str` or `Path`):
            The YAML file: a job spec with a `sweep:` section.
        overrides (`list[str]`, *optional*, defaults to `()`):
            `key.path=value` items; `sweep.*` ones apply to the section, the others to the job.

    Returns:
        [`Sweep`]

    Raises:
        [`~lorafleet.spec.SpecError`]: Every problem found, one line each naming its field.

    Example:

    ```python
    >>> sweep = load_sweep("jobs/sweep.yaml", ["sweep.num_samples=2"])
    >>> sweep.section.num_samples, sweep.section.metric, sweep.mode, list(sweep.spaces)
    (2, 'eval_loss', 'min', ['training.learning_rate', 'lora.r'])
    ```
    """
    file = Path(path)
    raw = read_yaml_file(file, "sweep")
    if not isinstance(raw, dict) or not isinstance(raw.get("sweep"), dict):
        raise SpecError(f"{file}: a sweep file is a job spec with a `sweep:` section (params, num_samples, ...)")
    section_raw = raw.pop("sweep")
    job_overrides = []
    problems: list[str] = []
    for item in overrides:
        if item.startswith("sweep."):
            try:
                keys, value = parse_override(item)
                if keys[1:2] == ["params"] and len(keys) > 2:  # `sweep.params.lora.r={choice: [4, 8]}`: a field path
                    keys = [keys[0], "params", ".".join(keys[2:])]
                apply_override({"sweep": section_raw}, keys, value)
            except SpecError as exc:
                problems += exc.problems
        else:
            job_overrides.append(item)
    job: Optional[JobSpec] = None
    try:
        job = load_spec(raw=raw, overrides=job_overrides, base_dir=file.resolve().parent)
    except SpecError as exc:
        problems += exc.problems
    section: Optional[SweepSection] = None
    try:
        section = SweepSection.model_validate(section_raw)
    except ValidationError as err:
        for error in err.errors():
            where = ".".join(str(p) for p in ("sweep", *error["loc"]))
            problems.append(f"{where}: {error['msg']}")
    if problems or job is None or section is None:
        raise SpecError(*problems)
    spaces: dict[str, Space] = {}
    for field_path, space_raw in section.params.items():
        if field_path in RESERVED:
            problems.append(f"sweep.params.{field_path}: set by the sweep for each trial, cannot be swept")
        elif not _field_exists(field_path):
            problems.append(f"sweep.params.{field_path}: no such job spec field (see `lorafleet spec-doc`)")
        else:
            try:
                spaces[field_path] = Space.parse(field_path, space_raw)
            except SpecError as exc:
                problems += exc.problems
    if not section.params:
        problems.append("sweep.params: nothing to sweep (give at least one field path and its space)")
    problems += _metric_problems(section, job)
    if section.scheduler == "asha" and (section.grace_period or 0) > job.training.steps:
        problems.append(f"sweep.grace_period: {section.grace_period} is more than training.steps "
                        f"({job.training.steps}); ASHA could never compare the trials")
    if section.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            problems.append("sweep.search: optuna is not installed here (pip install optuna), use `random`")
        if any(s.kind == "grid" for s in spaces.values()):
            problems.append("sweep.search: optuna does not take `grid` spaces (use `choice`)")
    if problems:
        raise SpecError(*problems)
    sweep = Sweep(section=section, job=job, spaces=spaces)
    _check_combinations(sweep)
    return sweep


def _metric_problems(section: SweepSection, job: JobSpec) -> list[str]:
    metric = section.metric
    if metric.startswith("eval_") and not job.data.evaluates:
        return [f"sweep.metric: the job produces no {metric}: set data.eval_fraction or data.eval_path"]
    if metric in ("eval_exact_match", "eval_contains") and job.eval.generate is None:
        return [f"sweep.metric: the job produces no {metric}: set eval.generate"]
    return []


def _check_combinations(sweep: Sweep) -> None:
    """Every combination of corner values must make a valid job (a seeded sample of them beyond
    `MAX_CHECKED_COMBINATIONS`); the first bad combination for each distinct cause is reported."""
    paths = list(sweep.spaces)
    corners = [sweep.spaces[p].corners() for p in paths]
    combos = itertools.product(*corners)
    total = math.prod(len(c) for c in corners)
    if total > MAX_CHECKED_COMBINATIONS:
        rng = random.Random(0)
        combos = (tuple(rng.choice(c) for c in corners) for _ in range(MAX_CHECKED_COMBINATIONS))
    seen: dict[str, str] = {}
    for combo in combos:
        try:
            sweep.trial_spec(dict(zip(paths, combo)), "trial-check")
        except SpecError as exc:
            for problem in exc.problems:
                cause = problem.split(" makes an invalid job: ", 1)[-1]
                seen.setdefault(cause, problem)
    if seen:
        raise SpecError(*seen.values())


def copy_params(params: dict[str, Any]) -> dict[str, Any]:
    """The swept values of a Ray Tune trial config, as plain JSON values (Tune may hand numpy scalars)."""
    out = {}
    for key, value in copy.deepcopy(params).items():
        out[key] = value.item() if hasattr(value, "item") else value
    return out
