"""The job spec: the validated object every later stage reads (`schema`), and its Markdown reference (`reference`).

The names a user needs are importable from here: `from lorafleet.spec import load_spec, JobSpec, SpecError`.
"""

from lorafleet.spec.schema import (
    AloraSpec,
    CheckpointSpec,
    DataSpec,
    HubSpec,
    EvalSpec,
    JobSpec,
    KernelsSpec,
    LoraSpec,
    ModelSpec,
    QuantizationSpec,
    ScalingSpec,
    SpecError,
    TrainingSpec,
    apply_override,
    load_spec,
    lorafleet_home,
    parse_override,
    read_yaml,
    read_yaml_file,
    spec_from_json,
)

__all__ = [
    "AloraSpec",
    "CheckpointSpec",
    "DataSpec",
    "HubSpec",
    "EvalSpec",
    "JobSpec",
    "KernelsSpec",
    "LoraSpec",
    "ModelSpec",
    "QuantizationSpec",
    "ScalingSpec",
    "SpecError",
    "TrainingSpec",
    "apply_override",
    "load_spec",
    "lorafleet_home",
    "parse_override",
    "read_yaml",
    "read_yaml_file",
    "spec_from_json",
]
