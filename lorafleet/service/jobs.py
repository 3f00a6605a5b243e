"""Fine-tuning job requests: OpenAI's request body → a validated lorafleet job spec, and the OpenAI object shapes
(`fine_tuning.job`, `fine_tuning.job.event`, `fine_tuning.job.checkpoint`, `file`) the API answers with.

The spec is built in layers, later ones winning: the `models.yaml` entry's defaults, then the request's
`hyperparameters` (`n_epochs` → `training.steps` from the file's record count, `batch_size` → the per-worker
micro-batch, `learning_rate_multiplier` → a multiple of the entry's learning rate), `seed`, then the `lorafleet`
extension object (any spec field), validated by [`~lorafleet.spec.load_spec`] exactly like a YAML spec.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel as Model
from pydantic import ConfigDict, Field

from lorafleet.service.catalog import BaseModel
from lorafleet.spec import JobSpec, SpecError, load_spec, lorafleet_home

STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")

# Set by the service for every job; a request may not override them through the `lorafleet` extension.
# Storage is the service's too: a tenant must not write runs where the service (and other tenants) cannot see them.
RESERVED = (("name",), ("data", "path"), ("data", "eval_path"), ("checkpoint", "storage"), ("checkpoint", "endpoint"))


class _Strict(Model):
    # OpenAI refuses unknown request arguments ("Unrecognized request argument supplied"); so does this API.
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(_Strict):
    n_epochs: Union[Literal["auto"], int] = Field("auto", description="Passes over the training file.")
    batch_size: Union[Literal["auto"], int] = Field("auto", description="Samples per optimizer step.")
    learning_rate_multiplier: Union[Literal["auto"], float] = Field("auto", description="Times the model's rate.")


class Supervised(_Strict):
    hyperparameters: Optional[Hyperparameters] = None


class Method(_Strict):
    type: Literal["supervised"] = "supervised"
    supervised: Optional[Supervised] = None


class CreateJob(_Strict):
    """The body of `POST /v1/fine_tuning/jobs` (OpenAI's fields plus the `lorafleet` extension)."""

    model: str
    training_file: str
    validation_file: Optional[str] = None
    hyperparameters: Optional[Hyperparameters] = None
    method: Optional[Method] = None
    suffix: Optional[str] = Field(None, max_length=64)
    seed: Optional[int] = Field(None, ge=0, le=2**31 - 1)
    metadata: Optional[dict[str, str]] = None
    integrations: Optional[list[Any]] = None
    lorafleet: Optional[dict[str, Any]] = None

    def hyper(self) -> Hyperparameters:
        """The hyperparameters, from `method.supervised` or the older top-level field."""
        if self.method and self.method.supervised and self.method.supervised.hyperparameters:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or Hyperparameters()


class RequestError(ValueError):
    """A request the API refuses with 400: `message` and the `param` it names."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def count_records(path: Path) -> int:
    """Non-empty lines of a JSONL file (the record count `n_epochs` is turned into steps with)."""
    with open(path, "rb") as src:
        return sum(1 for line in src if line.strip())


def _merge(target: dict[str, Any], patch: dict[str, Any], prefix: str = "lorafleet") -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value, f"{prefix}.{key}")
        else:
            target[key] = value


def build_spec(
    request: CreateJob, base: BaseModel, job_id: str, training_path: Path, validation_path: Optional[Path] = None,
) -> JobSpec:
    """The validated job spec of a request.

    Args:
        request ([`CreateJob`]):
            The parsed request body.
        base ([`~lorafleet.service.catalog.BaseModel`]):
            The `models.yaml` entry of `request.model`.
        job_id (`str`):
            The job's id: the spec's `name` (the run's folder) and the Ray submission id.
        training_path (`Path`):
            A local copy of the training file.
        validation_path (`Path`, *optional*):
            A local copy of the validation file (`data.eval_path`: evaluated, never trained on).

    Returns:
        [`~lorafleet.spec.JobSpec`]: the spec.

    Raises:
        [`RequestError`]: a field that does not validate, named as the request spells it (`lorafleet.lora.r`,
        `hyperparameters.n_epochs`).

    Example:

    ```python
    >>> import tempfile
    >>> from pathlib import Path
    >>> from lorafleet.service.catalog import load_catalog
    >>> data = Path(tempfile.mkdtemp()) / "train.jsonl"
    >>> _ = data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\\n' * 32)
    >>> request = CreateJob(model="llama-demo", training_file="file-1", hyperparameters={"n_epochs": 2, "batch_size": 8},
    ...                     lorafleet={"lora": {"r": 8}})
    >>> spec = build_spec(request, load_catalog()["llama-demo"], "ftjob-1", data)
    >>> spec.training.steps, spec.training.micro_batch_size, spec.lora.r, spec.name
    (8, 4, 8, 'ftjob-1')
    ```
    """
    raw = base.raw_spec()
    extension = request.lorafleet or {}
    for path in RESERVED:
        node: Any = extension
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            field = "lorafleet." + ".".join(path)
            raise RequestError(f"{field}: set by the service for every job", param=field)
    raw["name"] = job_id
    # The service reads the run's checkpoints from where it was written: decided here, not by the cluster's home.
    raw.setdefault("checkpoint", {}).setdefault("storage", str(lorafleet_home() / "runs"))
    raw.setdefault("data", {})["path"] = str(training_path)
    raw["data"].setdefault("format", "chat")
    if validation_path is not None:
        raw["data"]["eval_path"] = str(validation_path)
        raw["data"].pop("eval_fraction", None)
    training = raw.setdefault("training", {})
    scaling = raw.get("scaling") or {}
    hyper = request.hyper()
    if hyper.batch_size != "auto":
        if hyper.batch_size < 1:
            raise RequestError("hyperparameters.batch_size: must be at least 1", param="hyperparameters.batch_size")
        workers = int(scaling.get("num_workers", 2))
        training["micro_batch_size"] = max(1, math.ceil(hyper.batch_size / workers))
        training["grad_accum"] = 1
    if hyper.learning_rate_multiplier != "auto":
        if hyper.learning_rate_multiplier <= 0:
            raise RequestError("hyperparameters.learning_rate_multiplier: must be greater than 0",
                               param="hyperparameters.learning_rate_multiplier")
        training["learning_rate"] = float(training.get("learning_rate", 2e-4)) * hyper.learning_rate_multiplier
    if hyper.n_epochs != "auto":
        if hyper.n_epochs < 1:
            raise RequestError("hyperparameters.n_epochs: must be at least 1", param="hyperparameters.n_epochs")
        global_batch = (int(training.get("micro_batch_size", 4)) * int(training.get("grad_accum", 1))
                        * int(scaling.get("num_workers", 2)))
        training["steps"] = max(1, math.ceil(hyper.n_epochs * count_records(training_path) / global_batch))
    if request.seed is not None:
        training["seed"] = request.seed
    _merge(raw, extension)
    # A short job from defaults may end before its warm-up; keep the warm-up inside the run rather than refuse it.
    if "warmup" not in (extension.get("training") or {}) and isinstance(training.get("steps"), int):
        training["warmup"] = min(int(training.get("warmup", 0)), max(0, training["steps"] - 1))
    try:
        return load_spec(raw=raw)
    except SpecError as exc:
        first = exc.problems[0]
        field = first.split(":", 1)[0].strip()
        param = f"lorafleet.{field}" if " " not in field else None
        message = "; ".join(f"lorafleet.{p}" if " " not in p.split(":", 1)[0] else p for p in exc.problems)
        raise RequestError(message.replace(str(training_path), request.training_file), param=param) from None


def demand(spec: JobSpec) -> dict[str, float]:
    """The Ray resources a job's workers take while it runs (what admission compares with the cluster's).

    Example:

    ```python
    >>> from lorafleet.spec import load_spec
    >>> demand(load_spec("jobs/llama.yaml"))
    {'CPU': 2.0}
    ```
    """
    per = dict(spec.scaling.resources_per_worker)
    per.setdefault("CPU", 1.0)
    if spec.scaling.use_gpu:
        per.setdefault("GPU", 1.0)
    return {k: float(v) * spec.scaling.num_workers for k, v in per.items() if v}


def hyperparameters_object(spec: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    """The `hyperparameters` a job object reports: what was asked, with `auto` resolved from the spec."""
    asked = CreateJob.model_validate(request).hyper()
    training, scaling = spec["training"], spec["scaling"]
    return {
        "n_epochs": asked.n_epochs,
        "batch_size": training["micro_batch_size"] * training["grad_accum"] * scaling["num_workers"],
        "learning_rate_multiplier": asked.learning_rate_multiplier,
    }


def job_object(row: dict[str, Any]) -> dict[str, Any]:
    """A `jobs` row as OpenAI's `fine_tuning.job` object (`organization_id` is the tenant)."""
    request, spec = row["request"], row["spec"]
    hyper = hyperparameters_object(spec, request)
    return {
        "id": row["id"],
        "object": "fine_tuning.job",
        "created_at": row["created_at"],
        "error": row["error"],
        "fine_tuned_model": row["fine_tuned_model"],
        "finished_at": row["finished_at"],
        "hyperparameters": hyper,
        "model": row["model"],
        "organization_id": row["tenant"],
        "result_files": [],
        "seed": spec["training"]["seed"],
        "status": row["status"],
        "trained_tokens": row["trained_tokens"],
        "training_file": row["training_file"],
        "validation_file": row["validation_file"],
        "estimated_finish": row["estimated_finish"],
        "integrations": [],
        "metadata": request.get("metadata"),
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
        "user_provided_suffix": request.get("suffix"),
        "lorafleet": {"steps": spec["training"]["steps"], "ray_job_id": row["id"], "priority": row["priority"]},
    }


def event_object(row: dict[str, Any]) -> dict[str, Any]:
    """An `events` row as OpenAI's `fine_tuning.job.event`."""
    return {
        "id": row["id"],
        "object": "fine_tuning.job.event",
        "created_at": row["created_at"],
        "level": row["level"],
        "message": row["message"],
        "type": row["type"],
        "data": row["data"] or {},
    }


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    """A `files` row as OpenAI's `file` object."""
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": row["created_at"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
        "status_details": None,
    }
