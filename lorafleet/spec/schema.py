"""The job spec: one validated object that the driver hands to every worker.

A spec is a YAML file with fixed top-level sections (`name`, `model`, `quantization`, `lora`, `alora`, `data`,
`training`, `scaling`, `checkpoint`, `eval`, `kernels`). Each field's `description` below is its documentation;
`jobs/README.md` is generated from the same text by `lorafleet spec-doc`.

Every problem with a spec is reported at once by one [`SpecError`]: one line per problem, each naming its field, in
the order the fields appear in the file (then `--set` overrides, in the order given), so the CLI can print them all
and exit with code 2 before anything starts.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorafleet.bases import builtin_bases
from lorafleet.constants import GENERATION_METRICS, GROUP_WINDOW
from lorafleet.families import FAMILY_NAMES


STORAGE_SCHEMES = ("s3", "gs", "file")


DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


_DTYPE_ALIASES = {
    "auto": "auto",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp32": "float32",
    "float32": "float32",
    "fp16": "float16",
    "float16": "float16",
}


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


Dtype = Literal["auto", "bfloat16", "float32", "float16"]


StorageDtype = Literal["bfloat16", "float32", "float16"]


class SpecError(ValueError):
    """One or more spec problems, each worded as one line that names the field (`field: what is wrong`).

    Args:
        *problems (`str`):
            The problems, one line each; `str(error)` is them joined by newlines.

    Example:

    ```python
    >>> err = SpecError("lora.r: Input should be greater than 0 (got -1)", "training.bogus: unknown field")
    >>> err.problems[1]
    'training.bogus: unknown field'
    >>> print(err)
    lora.r: Input should be greater than 0 (got -1)
    training.bogus: unknown field
    ```
    """

    def __init__(self, *problems: str):
        # Every problem stays in `args`, so the error survives pickling (Ray ships errors between processes).
        super().__init__(*problems)
        self.problems = list(problems)

    def __str__(self) -> str:
        return "\n".join(self.problems)


def lorafleet_home() -> Path:
    """Where lorafleet keeps materialized models and default run storage (`$LORAFLEET_HOME`, else `~/.lorafleet`)."""
    return Path(os.environ.get("LORAFLEET_HOME", "~/.lorafleet")).expanduser()


def default_storage() -> str:
    """`checkpoint.storage` when a job leaves it unset: `$LORAFLEET_HOME/runs`."""
    return str(lorafleet_home() / "runs")


def _dtype(value: Any) -> Any:
    if isinstance(value, str) and value.lower() in _DTYPE_ALIASES:
        return _DTYPE_ALIASES[value.lower()]
    return value


class _Section(BaseModel):
    # Unknown keys are refused: a typo such as `learning_rte` must fail at submit time, not be ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ModelSpec(_Section):
    name_or_path: Optional[str] = Field(
        None,
        description="A local model directory (with config.json) or a Hugging Face hub id. Exclusive with `architecture` "
        "and `builtin`.",
    )
    builtin: Optional[str] = Field(
        None,
        description="A base model shipped inside lorafleet: `tasks-llama` (4M parameters, pretrained on the demo tasks' "
        "skills by scripts/build_demo_base.py; the default job's base). Exclusive with `name_or_path` and `architecture`.",
    )
    architecture: Optional[Literal[FAMILY_NAMES]] = Field(  # type: ignore[valid-type]
        None,
        description="Build a small model of this family from a config instead of loading one: "
        f"{', '.join(FAMILY_NAMES[:-1])} or {FAMILY_NAMES[-1]}. "
        "It is materialized once (cached) with lorafleet's tokenizer.",
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides for the built model's config (hidden_size, num_hidden_layers, ...). Only with `architecture`.",
    )
    dtype: Dtype = Field(
        "auto",
        description="Dtype of the non-quantized weights: auto, bfloat16, float32 or float16. auto: bfloat16 where the "
        "device computes it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX), else float32.",
    )
    trust_remote_code: bool = Field(False, description="Passed to `from_pretrained` for hub models with custom code.")

    _dtype = field_validator("dtype", mode="before")(_dtype)

    @field_validator("builtin")
    @classmethod
    def _shipped(cls, value: Optional[str]) -> Optional[str]:
        shipped = builtin_bases()
        if value is not None and value not in shipped:
            raise ValueError(f"unknown built-in base '{value}' (lorafleet ships: {', '.join(sorted(shipped))})")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        if sum(v is not None for v in (self.name_or_path, self.architecture, self.builtin)) != 1:
            raise ValueError("give exactly one of `name_or_path`, `architecture` or `builtin`")
        if self.config and self.architecture is None:
            raise ValueError("`config` overrides need `architecture`")
        return self


class QuantizationSpec(_Section):
    type: Literal["nf4", "fp4", "none"] = Field("nf4", description="4-bit data type of the frozen base weights, or none.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Dtype = Field("auto", description="Dtype the 4-bit weights are dequantized to for matmuls (auto: as model.dtype).")
    storage_dtype: Optional[StorageDtype] = Field(
        None,
        description="Dtype the packed 4-bit weights are stored in. Defaults to uint8; DeepSpeed ZeRO-3 needs it equal "
        "to `compute_dtype` (set automatically).",
    )

    _dtype = field_validator("compute_dtype", "storage_dtype", mode="before")(_dtype)


class LoraSpec(_Section):
    r: int = Field(16, gt=0, le=4096, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input, in [0, 1).")
    target_modules: Union[list[str], Literal["all-linear"]] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        description="Module names to adapt (suffix match), or `all-linear`.",
    )
    bias: Literal["none", "lora_only", "all"] = Field("none", description="Which biases are trained (PEFT's `bias`).")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and (not value or any(not str(m).strip() for m in value)):
            raise ValueError("must name at least one module and no empty names")
        return value


class AloraSpec(_Section):
    invocation_string: Optional[str] = Field(
        None,
        description="Text whose tokens switch the adapter on; tokens before its last occurrence see the base model "
        "only, so the base model's KV cache for them stays valid. Best framed by special tokens.",
    )
    invocation_tokens: Optional[list[int]] = Field(None, description="The same, as token ids (exclusive with the string).")
    drop_samples_without_invocation: bool = Field(
        False, description="Drop training samples that do not contain the invocation, instead of refusing the data."
    )

    @model_validator(mode="after")
    def _one_invocation(self) -> "AloraSpec":
        if (self.invocation_string is None) == (self.invocation_tokens is None):
            raise ValueError("give exactly one of `invocation_string` or `invocation_tokens`")
        if self.invocation_string is not None and not self.invocation_string.strip():
            raise ValueError("`invocation_string` is empty")
        if self.invocation_tokens is not None and (
            not self.invocation_tokens or any(t < 0 for t in self.invocation_tokens)
        ):
            raise ValueError("`invocation_tokens` must be a non-empty list of non-negative token ids")
        return self


class HubSpec(_Section):
    name: str = Field(
        ...,
        min_length=1,
        description="A Hugging Face Hub dataset id (`org/name`), or anything else `datasets.load_dataset` takes as a "
        "name (a local folder of .jsonl/.json/.parquet/.csv files, relative to the spec file). Loaded by the driver, "
        "which needs internet for a hub id; the workers read only the tokenized cache.",
    )
    config: Optional[str] = Field(None, description="The dataset's configuration (subset), if it has several.")
    split: str = Field(
        "train",
        min_length=1,
        description="The split to read, whole (no `train[:10%]` slices: hold records out with `data.eval_fraction`).",
    )
    revision: Optional[str] = Field(None, description="A branch, tag or commit of the dataset repository (pin one for "
                                    "a run that reads the same data on every submit).")

    @field_validator("split")
    @classmethod
    def _whole_split(cls, value: str) -> str:
        if any(c in value for c in "[]+"):
            raise ValueError(f"a whole split name, not a slice or sum ('{value}'): hold out records with "
                             "`data.eval_fraction`")
        return value

    def describe(self) -> str:
        """The dataset in a few words, as messages name it: `NAME (config C, split S, revision R)`.

        Example:

        ```python
        >>> HubSpec(name="org/tasks", split="test").describe()
        'org/tasks (split test)'
        ```
        """
        parts = [f"config {self.config}"] if self.config else []
        parts.append(f"split {self.split}")
        parts += [f"revision {self.revision}"] if self.revision else []
        return f"{self.name} ({', '.join(parts)})"


class DataSpec(_Section):
    path: Optional[str] = Field(
        None,
        description="A .jsonl, .json or .parquet file, a directory saved by `datasets`, or (read through the tokenized "
        "cache, see `cache`) a folder of such files, a glob (`data/part-*.jsonl`), or an `s3://` / `gs://` prefix of "
        "them (read with the checkpoint storage's credentials and `checkpoint.endpoint`); files are read sorted by path. "
        "Give it or `hub`, not both.",
    )
    hub: Optional[HubSpec] = Field(
        None,
        description="A dataset loaded with `datasets.load_dataset(name, config, split=split, revision=revision)` by the "
        "driver (which needs internet for a hub id), always read through the tokenized cache. Exclusive with `path`.",
    )
    format: Literal["text", "instruction", "chat"] = Field(
        "instruction",
        description="text: a `text` field, trained on whole. instruction: `instruction`, optional `input`, "
        "`output`; only the output is trained on. chat: `messages` of {role, content}; only assistant turns are trained on.",
    )
    max_length: int = Field(256, ge=8, le=131072, description="Tokens per sample (longer ones are truncated) or per packed row.")
    packing: bool = Field(
        False,
        description="Pack several samples into each row of `max_length` tokens (attention stays within each sample; "
        "with `alora`, each packed sample is activated from its own invocation).",
    )
    train_on_inputs: bool = Field(False, description="Also train on prompt tokens (instruction and chat formats).")
    shuffle: bool = Field(True, description="Shuffle samples every epoch (seeded by `training.seed`).")
    group_by_length: bool = Field(
        False,
        description=f"Build each step from samples of similar length (windows of {GROUP_WINDOW} global batches sorted "
        "by length, read in a seeded order): less padding per micro-batch; every sample is still read once per epoch, and "
        "resume and the 1-vs-N-worker equivalence hold as without it.",
    )
    eval_path: Optional[str] = Field(
        None,
        description="A held-out file (any format `path` accepts) whose loss is measured during training (see `eval`). "
        "Shards, a glob or a prefix are read through their own tokenized cache (with `cache` not false). Exclusive with "
        "`eval_fraction` and `eval_hub`.",
    )
    eval_hub: Optional[HubSpec] = Field(
        None,
        description="A held-out dataset loaded like `hub` (e.g. its `validation` split), read through its own tokenized "
        "cache. Exclusive with `eval_path` and `eval_fraction`.",
    )
    eval_fraction: Optional[float] = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="Hold out this fraction of the records of `path` for evaluation (floor of fraction x records, "
        "chosen by a permutation seeded by `training.seed`); held-out records never train. Exclusive with `eval_path` "
        "and `eval_hub`.",
    )

    cache: Union[Literal["auto"], bool] = Field(
        "auto",
        description="Tokenize once into a cache shared by the jobs on the same `checkpoint.storage` "
        "(`<storage>/_cache/tokenized/<key>/`: Arrow shards keyed by the data files, tokenizer and every field that "
        "changes a sample), built by Ray Data tasks on the cluster's CPUs (in the driver for under 32 MB of local "
        "data), and read by the workers memory-mapped, so their memory does not grow with the dataset; same samples, "
        "order and losses as without it. auto: on for a folder of files, a glob, an object-store prefix or a file of "
        "256 MB or more (a saved `datasets` folder counts its Arrow files); always on for `hub` data. `lorafleet data "
        "prepare` builds it ahead.",
    )
    on_bad_record: Literal["fail", "skip"] = Field(
        "fail",
        description="fail: the first bad record (unreadable JSON, a missing or empty field) stops the job before "
        "training, naming its file and line. skip: bad records are left out; their count and first locations are in "
        "the summary (`skipped_records`) and `metrics.jsonl`.",
    )

    @model_validator(mode="after")
    def _one_source_and_held_out_set(self) -> "DataSpec":
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of `path` or `hub` (set the other to null)")
        held_out = [k for k in ("eval_path", "eval_fraction", "eval_hub") if getattr(self, k) is not None]
        if len(held_out) > 1:
            raise ValueError(f"give at most one of `eval_path`, `eval_fraction` or `eval_hub` (got {', '.join(held_out)})")
        if self.cache is False and (self.hub is not None or self.eval_hub is not None):
            raise ValueError("`hub` / `eval_hub` data is read through the tokenized cache only: `cache` cannot be false")
        return self

    @property
    def evaluates(self) -> bool:
        """Whether the job has a held-out set (`eval_path`, `eval_fraction` or `eval_hub`), i.e. evaluation is on."""
        return self.eval_path is not None or self.eval_fraction is not None or self.eval_hub is not None

    @property
    def source_field(self) -> str:
        """The field that names the training data: `data.path` or `data.hub` (what errors about the data start
        with)."""
        return "data.path" if self.path is not None else "data.hub"

    @property
    def source_name(self) -> str:
        """The training data in a few words: `data.path` itself, or the hub dataset ([`HubSpec.describe`])."""
        return self.path if self.path is not None else self.hub.describe()


class TrainingSpec(_Section):
    steps: int = Field(100, gt=0, description="Optimizer steps to run.")
    learning_rate: float = Field(2e-4, gt=0, le=1.0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    micro_batch_size: int = Field(4, gt=0, description="Samples per worker per forward/backward.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per worker accumulated into one optimizer step.")
    warmup: int = Field(0, ge=0, description="Linear warm-up steps.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warm-up.")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="Gradient clipping norm (null: no clipping).")
    seed: int = Field(42, ge=0, description="Seeds weights of new LoRA layers, data order and dropout.")
    dtype: Dtype = Field(
        "auto",
        description="Autocast dtype for forward/backward; float32 turns autocast off. auto: bfloat16 where the device "
        "computes it natively, else float32 (on an AVX2-only CPU bf16 matmuls are emulated and ~20x slower).",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")

    _dtype = field_validator("dtype", mode="before")(_dtype)

    @model_validator(mode="after")
    def _warmup_fits(self) -> "TrainingSpec":
        if self.warmup > self.steps:
            raise ValueError(f"`warmup` ({self.warmup}) is longer than `steps` ({self.steps})")
        return self


class ScalingSpec(_Section):
    num_workers: int = Field(2, gt=0, le=4096, description="Ray Train workers (one process each).")
    strategy: Literal["ddp", "deepspeed"] = Field("ddp", description="Data parallelism: DDP, or DeepSpeed ZeRO.")
    zero_stage: Literal[2, 3] = Field(2, description="DeepSpeed ZeRO stage (only with strategy: deepspeed).")
    deepspeed_config: Optional[dict[str, Any]] = Field(
        None, description="Raw DeepSpeed config merged over the one lorafleet derives (experts only)."
    )
    use_gpu: Optional[bool] = Field(None, description="Workers on GPUs. Default: yes when the cluster has GPUs.")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description='Ray resources per worker, e.g. {"CPU": 4, "GPU": 1}. Default: 1 CPU (+1 GPU).'
    )
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts from the last checkpoint (-1: unlimited).")

    @field_validator("resources_per_worker")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        for key, amount in value.items():
            if amount < 0:
                raise ValueError(f"`{key}` must not be negative")
        return value

    @model_validator(mode="after")
    def _deepspeed_only(self) -> "ScalingSpec":
        if self.deepspeed_config is not None and self.strategy != "deepspeed":
            raise ValueError("`deepspeed_config` needs `strategy: deepspeed`")
        return self


class CheckpointSpec(_Section):
    storage: Optional[str] = Field(
        None,
        description="Where runs are stored: a local path, file://, s3://bucket/prefix or gs://bucket/prefix. "
        "Default: $LORAFLEET_HOME/runs (~/.lorafleet/runs).",
    )
    every_n_steps: int = Field(50, gt=0, description="Save (adapter + optimizer state) every this many steps and at the end.")
    keep: int = Field(
        2,
        gt=0,
        description="Checkpoints kept in storage: the newest ones, or with `keep_best_by` the best ones by it; the "
        "latest checkpoint is always kept as well (so at most `keep` + 1 folders).",
    )
    keep_best_by: Optional[Literal["eval_loss"]] = Field(
        None,
        description="Rank checkpoints by this metric (lowest best) and keep the best `keep` of them plus the latest, "
        "so pruning never deletes the best adapter; every checkpoint step is then evaluated too. Default: `eval_loss` "
        "when evaluation is on (`data.eval_path` or `data.eval_fraction`), else null (keep the newest); set null to "
        "keep the newest with evaluation on.",
    )
    endpoint: Optional[str] = Field(None, description="Object-store endpoint URL: an S3-compatible server (default `AWS_ENDPOINT_URL`), or a GCS emulator (default `STORAGE_EMULATOR_HOST`; `http://` goes without credentials).")

    @field_validator("storage")
    @classmethod
    def _scheme(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return value
        if not value.strip():
            raise ValueError("is empty")
        match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", value)
        if match:
            scheme = match.group(1).lower()
            if scheme not in STORAGE_SCHEMES:
                raise ValueError(f"unsupported scheme '{scheme}://' (use s3://, gs://, file:// or a local path)")
            if scheme in ("s3", "gs") and not value[len(scheme) + 3 :].strip("/"):
                raise ValueError(f"'{value}' names no bucket")
        return value

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value


class GenerateEvalSpec(_Section):
    max_new_tokens: int = Field(32, gt=0, description="Tokens generated at most per held-out record (greedy).")
    metrics: list[Literal[GENERATION_METRICS]] = Field(
        default_factory=lambda: list(GENERATION_METRICS),
        min_length=1,
        description="Scores of each answer against the record's target (`output` for instruction data, the last "
        "assistant turn for chat): `exact_match` (the same text, surrounding whitespace aside) and `contains` (the "
        "target appears in the answer). Each becomes `eval_<name>` in metrics.jsonl and the summary.",
    )
    num_samples: int = Field(
        32, gt=0, description="Generate for the first this many held-out records (at most `eval.max_samples`)."
    )


class EvalSpec(_Section):
    every_n_steps: Optional[int] = Field(
        None,
        gt=0,
        description="Measure the held-out loss every this many steps and at the last step. Default: "
        "`checkpoint.every_n_steps`.",
    )
    max_samples: Optional[int] = Field(
        None, gt=0, description="Evaluate only the first this many held-out samples (default: all of them)."
    )
    early_stopping_patience: Optional[int] = Field(
        None,
        ge=1,
        description="Stop the run after this many evaluations in a row without an improvement of more than "
        "`min_delta` over the best held-out loss so far; it ends as succeeded, with a checkpoint at that step "
        "(`stopped_early` and `best_adapter_uri` in the summary). Default: never stop early.",
    )
    min_delta: float = Field(
        0.0,
        ge=0.0,
        description="How much lower than the best so far a held-out loss must be to count as an improvement "
        "(with `early_stopping_patience`).",
    )
    generate: Optional[GenerateEvalSpec] = Field(
        None,
        description="Also generate answers (greedy, with the job's template) for held-out records at each evaluation "
        "and score them (`eval_exact_match`, `eval_contains`); also measured once before the first step, for the "
        "base model. Runs on the rank-0 worker. Default: off (the held-out loss only).",
    )


class KernelsSpec(_Section):
    enabled: bool = Field(True, description="Use lorafleet's fused LoRA paths where the layer layout allows.")
    mlp: bool = Field(True, description="Fuse gate/up/down projections, their LoRA and the gated activation.")
    qkv: bool = Field(True, description="Fuse the Q, K and V projections with their LoRA.")
    o: bool = Field(True, description="Fuse the attention output projection with its LoRA.")
    loss: bool = Field(True, description="LM head + cross-entropy in chunks, never materializing all logits.")


class JobSpec(_Section):
    name: str = Field(..., description="Job name: letters, digits, `.`, `_`, `-`; the run's folder in storage.")
    model: ModelSpec
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    alora: Optional[AloraSpec] = None
    data: DataSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    eval: EvalSpec = Field(
        default_factory=EvalSpec,
        description="Held-out evaluation, on when `data.eval_path` or `data.eval_fraction` is set.",
    )
    kernels: KernelsSpec = Field(default_factory=KernelsSpec)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not _NAME_RE.match(value) or ".." in value:
            raise ValueError(
                f"'{value}' is not a safe job name (1-64 of letters, digits, '.', '_', '-'; starting with a letter or digit)"
            )
        return value

    @model_validator(mode="after")
    def _eval_needs_held_out_data(self) -> "JobSpec":
        # By value, not `model_fields_set`: a spec sent to the workers as JSON carries every field, defaults included.
        e = self.eval
        asked = (e.every_n_steps, e.max_samples, e.early_stopping_patience, e.generate)
        if (any(v is not None for v in asked) or e.min_delta) and not self.data.evaluates:
            # A loc-less error: the message names the section itself.
            raise ValueError("eval: evaluation needs held-out data: set `data.eval_path` or `data.eval_fraction`")
        if e.min_delta and e.early_stopping_patience is None:
            raise ValueError("eval.min_delta: only counts with `eval.early_stopping_patience`; set that too")
        if e.generate is not None:
            if self.data.format == "text" and self.alora is None:
                raise ValueError("eval.generate: `text` records have no prompt and target to generate from (use "
                                 "instruction or chat data, or an aLoRA invocation)")
            if self.scaling.strategy == "deepspeed" and self.scaling.zero_stage == 3:
                raise ValueError("eval.generate: not available with ZeRO-3 (rank 0 holds only a shard of the model); "
                                 "use zero_stage 2, or `lorafleet eval` on a checkpoint")
        return self

    @model_validator(mode="after")
    def _keep_best_by_default(self) -> "JobSpec":
        # The one place the default is decided. Absent (not in `model_fields_set`): `eval_loss` when evaluation is on;
        # an explicit null keeps the newest. A spec sent to the workers as JSON carries the resolved value.
        ckpt = self.checkpoint
        if "keep_best_by" not in ckpt.model_fields_set:
            if self.data.evaluates:
                ckpt.keep_best_by = "eval_loss"
        elif ckpt.keep_best_by is not None and not self.data.evaluates:
            raise ValueError(
                f"checkpoint.keep_best_by: ranking checkpoints by {ckpt.keep_best_by} needs held-out data: set "
                "`data.eval_path` or `data.eval_fraction`"
            )
        return self

    @property
    def eval_every_n_steps(self) -> Optional[int]:
        """Steps between held-out evaluations (`eval.every_n_steps`, else `checkpoint.every_n_steps`); `None` when
        evaluation is off. The last step is always evaluated too."""
        if not self.data.evaluates:
            return None
        return self.eval.every_n_steps or self.checkpoint.every_n_steps

    def evaluates_at(self, step: int) -> bool:
        """Whether the held-out set is evaluated after `step` (1-based): every `eval_every_n_steps`, at the last step,
        and, with `checkpoint.keep_best_by`, at every checkpoint step, so each checkpoint carries its own adapter's
        score. An early stop's own step is evaluated by definition (it is decided by an evaluation).

        Example:

        ```python
        >>> spec = load_spec("jobs/llama.yaml", ["data.eval_fraction=0.1", "eval.every_n_steps=3",
        ...                                       "checkpoint.every_n_steps=2", "training.steps=7", "training.warmup=1"])
        >>> [step for step in range(1, 8) if spec.evaluates_at(step)]
        [2, 3, 4, 6, 7]
        ```
        """
        every = self.eval_every_n_steps
        if every is None:
            return False
        if step % every == 0 or step == self.training.steps:
            return True
        return self.checkpoint.keep_best_by is not None and self.checkpoints_at(step)

    def checkpoints_at(self, step: int) -> bool:
        """Whether a checkpoint is taken after `step` (1-based) on schedule: every `checkpoint.every_n_steps` and at
        the last step (an early stop or a stop request adds its own)."""
        return step % self.checkpoint.every_n_steps == 0 or step == self.training.steps

    @property
    def storage_uri(self) -> str:
        """`checkpoint.storage` with the default filled in."""
        return self.checkpoint.storage or default_storage()

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step across all workers."""
        return self.training.micro_batch_size * self.training.grad_accum * self.scaling.num_workers


Loc = tuple[Union[str, int], ...]


def _format_error(error: dict[str, Any]) -> str:
    """One pydantic error (an item of `ValidationError.errors()`) as `field: what is wrong`."""
    loc = ".".join(str(p) for p in error["loc"])
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return f"{loc}: unknown field"
    if kind == "missing":
        return f"{loc}: required field is missing"
    msg = re.sub(r"^(Value error|Assertion failed), ", "", msg)
    if kind not in ("value_error", "assertion_error") and "input" in error and not isinstance(error["input"], dict):
        msg = f"{msg} (got {error['input']!r})"
    return f"{loc}: {msg}" if loc else msg


def _members(annotation: Any) -> list[Any]:
    if get_origin(annotation) in (Union, UnionType):
        return [a for a in get_args(annotation) if a is not type(None)]
    return [annotation]


def _union_field(loc: Loc) -> Optional[Loc]:
    """The start of `loc` that names a field typed as a union of several kinds, if the error lies inside one."""
    model: type[BaseModel] = JobSpec
    for i, part in enumerate(loc):
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        members = _members(field.annotation)
        if len(members) > 1:
            return loc[: i + 1]
        section = members[0]
        if get_origin(section) is not None or not (isinstance(section, type) and issubclass(section, BaseModel)):
            return None
        model = section
    return None


def _distinct(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One error per problem: pydantic reports a bad union value once per member (`lora.target_modules.list[str]`,
    `lora.target_modules.literal['all-linear']`), which is one problem; the first is kept."""
    seen: set[Loc] = set()
    kept = []
    for error in errors:
        key = _union_field(error["loc"]) or error["loc"]
        if key not in seen:
            seen.add(key)
            kept.append(error)
    return kept


def _positions(tree: Any, prefix: Loc = (), out: Optional[dict[Loc, int]] = None) -> dict[Loc, int]:
    """Every key path of `tree` numbered in the order it appears (depth first). YAML mappings load in file order,
    so for a spec file this is the order of its lines."""
    out = {} if out is None else out
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        out[prefix + (key,)] = len(out)
        _positions(value, prefix + (key,), out)
    return out


def _rank(loc: Loc, positions: dict[Loc, int], overrides: list[Optional[list[str]]]) -> tuple[int, int]:
    """Where a problem at `loc` is listed: `(0, place in the file)`, or `(1, override index)` when a `--set`
    override set that field, a field inside it, or a section around it."""
    parts = [str(p) for p in loc]
    for index, keys in enumerate(overrides):
        if parts and keys is not None and (parts[: len(keys)] == keys or keys[: len(parts)] == parts):
            return (1, index)
    for end in range(len(loc), 0, -1):
        if loc[:end] in positions:
            return (0, positions[loc[:end]])
    return (0, len(positions))


def _looks_local(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or value in (".", "..")


def _resolve_paths(raw: dict, base: Path) -> None:
    """Make relative local paths in `raw` absolute against `base` (the spec file's folder, or the working
    directory for `--set` values), so a spec means the same thing wherever `lorafleet` is run from."""
    data = raw.get("data")
    for key in ("path", "eval_path"):
        if isinstance(data, dict) and isinstance(data.get(key), str) and "://" not in data[key]:
            data[key] = str((base / Path(data[key]).expanduser()).resolve())
    for key in ("hub", "eval_hub"):
        hub = data.get(key) if isinstance(data, dict) else None
        if isinstance(hub, dict) and isinstance(hub.get("name"), str) and hub["name"]:
            # A local dataset folder, like a local model: relative to the spec; a hub id stays as written.
            candidate = base / Path(hub["name"]).expanduser()
            if _looks_local(hub["name"]) or candidate.exists():
                hub["name"] = str(candidate.resolve())
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("name_or_path"), str):
        value = model["name_or_path"]
        candidate = base / Path(value).expanduser()
        if _looks_local(value) or candidate.exists():
            model["name_or_path"] = str(candidate.resolve())
    ckpt = raw.get("checkpoint")
    if isinstance(ckpt, dict) and isinstance(ckpt.get("storage"), str):
        value = ckpt["storage"]
        if value.strip() and "://" not in value:
            ckpt["storage"] = str((base / Path(value).expanduser()).resolve())


def _sharded_data(value: str, raw: dict) -> bool:
    """Whether `data.path` names data the tokenized cache reads: an `s3://` / `gs://` prefix, a glob, or a local
    folder of .jsonl/.json/.parquet files (not a `datasets` save), unless `data.cache` is false."""
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    if data.get("cache") is False:
        return False
    if re.match(r"^(s3|gs)://", value):
        return True
    if any(c in value for c in "*?["):
        return True
    folder = Path(value).expanduser()
    return folder.is_dir() and not any((folder / n).exists() for n in ("dataset_info.json", "state.json",
                                                                         "dataset_dict.json")) and any(
        p.suffix in (".jsonl", ".json", ".parquet") for p in folder.rglob("*") if p.is_file())


def _file_problems(raw: dict, invalid: list[Loc]) -> list[tuple[Loc, str]]:
    """Problems with the data and model paths `raw` names, each checked only when it (and every section around it)
    has no other problem, so a field is never reported twice. `invalid` holds the locations of the other problems."""

    def valid_str(*loc: str) -> Optional[str]:
        if any(loc[: len(bad)] == bad for bad in invalid):
            return None
        node: Any = raw
        for key in loc:
            node = node.get(key) if isinstance(node, dict) else None
        return node if isinstance(node, str) else None

    problems: list[tuple[Loc, str]] = []
    for where in (("data", "path"), ("data", "eval_path")):
        value = valid_str(*where)
        if value is None:
            continue
        field, data = ".".join(where), Path(value)
        saved = ("dataset_info.json", "state.json", "dataset_dict.json")
        if _sharded_data(value, raw):
            continue  # read through the tokenized cache, which lists (and checks) the files itself
        if not data.exists():
            problems.append((where, f"{field}: no such file or directory: {data}"))
        elif data.is_file() and data.suffix not in (".jsonl", ".json", ".parquet"):
            problems.append((where, f"{field}: unsupported file type '{data.suffix}' "
                                    "(use .jsonl, .json, .parquet or a saved dataset dir)"))
        elif data.is_dir() and not any((data / name).exists() for name in saved):
            problems.append((where, f"{field}: {data} is not a directory saved by datasets' save_to_disk"))
    where = ("model", "name_or_path")
    name = valid_str(*where)
    if name is not None:
        path = Path(name)
        if path.is_absolute():
            if not path.is_dir():
                problems.append((where, f"model.name_or_path: no such model directory: {path}"))
            elif not (path / "config.json").exists():
                problems.append((where, f"model.name_or_path: {path} has no config.json"))
        elif not _HUB_ID_RE.match(name):
            problems.append((where, f"model.name_or_path: '{name}' is neither a local directory nor a hub id"))
    return problems


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but `1e-4` is a float as in YAML 1.2 (YAML 1.1 wants `1.0e-4`, and reads `1e-4` as a
    string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(text: str) -> Any:
    """Parse YAML text the way every spec and sweep file is read.

    Args:
        text (`str`): The YAML text.

    Returns:
        `Any`: The parsed value.

    Example:

    ```python
    >>> read_yaml("learning_rate: 1e-4")
    {'learning_rate': 0.0001}
    ```
    """
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def read_yaml_file(file: Path, kind: str = "spec") -> Any:
    """Read a spec (or sweep) file with [`read_yaml`]; a missing file or bad YAML is a one-line [`SpecError`].

    Args:
        file (`Path`): The file.
        kind (`str`, *optional*, defaults to `"spec"`): What the file is, for the messages.

    Returns:
        `Any`: The parsed value.

    Example:

    ```python
    >>> read_yaml_file(Path("jobs/llama.yaml"))["name"]
    'llama-tasks'
    ```
    """
    if not file.is_file():
        raise SpecError(f"{file}: no such {kind} file")
    try:
        return read_yaml(file.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise SpecError(f"{file}: invalid YAML{where}: {problem}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse one `--set key.path=value` item; the value is read as YAML (`5` is an int, `[a, b]` a list).

    Args:
        item (`str`): The `key.path=value` text.

    Returns:
        `tuple[list[str], Any]`: The key path and the parsed value.

    Example:

    ```python
    >>> parse_override("training.steps=20")
    (['training', 'steps'], 20)
    ```
    """
    key, sep, value = item.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise SpecError(f"--set {item}: expected key.path=value")
    try:
        parsed = read_yaml(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def apply_override(raw: dict, path: list[str], value: Any) -> None:
    """Set `value` at the key `path` of a raw (parsed, not yet validated) spec, creating the sections on the way.

    Raises:
        [`SpecError`]: A key on the way holds a value, not a section.

    Example:

    ```python
    >>> raw = {"lora": {"r": 8}}
    >>> apply_override(raw, ["eval", "generate", "num_samples"], 4)
    >>> raw
    {'lora': {'r': 8}, 'eval': {'generate': {'num_samples': 4}}}
    ```
    """
    node = raw
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SpecError(f"{'.'.join(path[: i + 1])}: is not a section, cannot set {'.'.join(path)}")
        node = child
    node[path[-1]] = value


def load_spec(
    path: Union[str, Path, None] = None,
    overrides: tuple[str, ...] | list[str] = (),
    raw: Optional[dict] = None,
    base_dir: Union[str, Path, None] = None,
) -> JobSpec:
    """Read, override and validate a job spec.

    Relative paths in the file are taken from the file's folder; relative paths given with `overrides` are taken
    from the working directory.

    Args:
        path (`str` or `Path`, *optional*):
            The YAML file. Exclusive with `raw`.
        overrides (`list[str]`, *optional*, defaults to `()`):
            `key.path=value` items applied over the file, validated the same way.
        raw (`dict`, *optional*):
            An already-parsed spec (e.g. built in a notebook); relative paths are taken from `base_dir`.
        base_dir (`str` or `Path`, *optional*):
            With `raw`: the folder its relative paths are taken from (the file `raw` was read from); default the
            working directory.

    Returns:
        [`JobSpec`]: The validated spec.

    Raises:
        [`SpecError`]: With every problem of the spec, one line each naming its field, in file order (problems of
            `overrides` last, in their order).

    Example:

    ```python
    >>> spec = load_spec("jobs/llama.yaml", ["training.steps=50"])
    >>> spec.training.steps, spec.model.builtin
    (50, 'tasks-llama')
    ```
    """
    if raw is None:
        if path is None:
            raise SpecError("no spec given")
        file = Path(path)
        raw = read_yaml_file(file)
        if not isinstance(raw, dict):
            raise SpecError(f"{file}: a job spec is a YAML mapping of sections (name, model, data, ...)")
        base = file.resolve().parent
    else:
        raw = copy.deepcopy(raw)
        base = Path(base_dir).resolve() if base_dir is not None else Path.cwd()
    positions = _positions(raw)
    _resolve_paths(raw, base)
    problems: list[tuple[tuple[int, int], str]] = []
    applied: list[Optional[list[str]]] = []
    for index, item in enumerate(overrides):
        try:
            keys, value = parse_override(item)
            single: dict = {}
            apply_override(single, keys, value)
            _resolve_paths(single, Path.cwd())
            apply_override(raw, keys, _get(single, keys))
        except SpecError as exc:
            problems += [((1, index), problem) for problem in exc.problems]
            applied.append(None)
        else:
            applied.append(keys)
    try:
        spec = JobSpec.model_validate(raw)
        located: list[tuple[Loc, str]] = []
    except ValidationError as err:
        located = [(error["loc"], _format_error(error)) for error in _distinct(err.errors())]
    located += _file_problems(raw, [loc for loc, _ in located])
    problems += [(_rank(loc, positions, applied), message) for loc, message in located]
    if problems:
        problems.sort(key=lambda problem: problem[0])
        raise SpecError(*(message for _, message in problems))
    return spec


def spec_from_json(text: str) -> JobSpec:
    """Rebuild a spec that [`JobSpec.model_dump_json`] wrote (workers and remote entrypoints use this)."""
    return JobSpec.model_validate_json(text)


def _get(tree: dict, keys: list[str]) -> Any:
    for key in keys:
        tree = tree[key]
    return tree

