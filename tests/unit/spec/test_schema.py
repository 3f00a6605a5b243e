"""Job spec validation: every refusal is one stderr line naming the field, exit code 2, nothing started."""

import json
from pathlib import Path

import pytest
import yaml

from lorafleet.spec import JobSpec, SpecError, load_spec, parse_override
from lorafleet.sweep.space import load_sweep

from helpers.cli import JOBS, TEST_JOB


def write_spec(tmp_path: Path, **sections) -> Path:
    """A spec file in tmp_path: the default job with `sections` replacing or deleting (None) top-level keys."""
    raw = yaml.safe_load((TEST_JOB).read_text())
    raw["data"]["path"] = str(JOBS / "data" / "tasks.jsonl")
    for key, value in sections.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_default_job_validates():
    spec = load_spec(JOBS / "llama.yaml")
    assert spec.model.builtin == "tasks-llama" and spec.model.architecture is None
    assert spec.data.eval_fraction and spec.eval.generate is not None  # it shows before/after on held-out records
    assert Path(spec.data.path).is_file()
    assert spec.scaling.num_workers == 2
    assert spec.global_batch_size == spec.training.micro_batch_size * spec.training.grad_accum * 2


@pytest.mark.parametrize(
    "override, field, words",
    [
        ("training.steps=0", "training.steps", "greater than 0"),
        ("training.steps=abc", "training.steps", "integer"),
        ("training.learning_rte=0.1", "training.learning_rte", "unknown field"),
        ("lora.r=-4", "lora.r", "greater than 0"),
        ("lora.dropout=1.5", "lora.dropout", "less than 1"),
        ("lora.target_modules=[]", "lora.target_modules", "at least one"),
        ("quantization.type=int3", "quantization.type", "nf4"),
        ("scaling.strategy=fsdp", "scaling.strategy", "ddp"),
        ("scaling.zero_stage=1", "scaling.zero_stage", "2"),
        ("scaling.num_workers=0", "scaling.num_workers", "greater than 0"),
        ("checkpoint.storage=ftp://host/x", "checkpoint.storage", "unsupported scheme"),
        ("checkpoint.storage=s3://", "checkpoint.storage", "no bucket"),
        ("checkpoint.keep=0", "checkpoint.keep", "greater than 0"),
        ("checkpoint.endpoint=localhost:9000", "checkpoint.endpoint", "http"),
        ("name=../escape", "name", "not a safe job name"),
        ("name=has space", "name", "not a safe job name"),
        ("data.path=/no/such/file.jsonl", "data.path", "no such file"),
        ("data.format=csv", "data.format", "instruction"),
        ("model.name_or_path=./missing-model", "model", "exactly one"),
        ("model.builtin=tasks-llama", "model", "exactly one of `name_or_path`, `architecture` or `builtin`"),
        ("model.builtin=gpt-5", "model.builtin", "lorafleet ships: tasks-llama"),
        ("training.warmup=500", "training", "longer than"),
        ("alora.invocation_string=' '", "alora", "empty"),
        ("kernels.mlp=perhaps", "kernels.mlp", "boolean"),
        ("model.dtype=float8", "model.dtype", "bfloat16"),
    ],
)
def test_refusals_name_the_field(override, field, words):
    with pytest.raises(SpecError) as err:
        load_spec(TEST_JOB, [override])
    message = str(err.value)
    assert message.startswith(f"{field}:"), message
    assert words in message, message
    assert "\n" not in message


def test_missing_model_dir_and_hub_id(tmp_path):
    path = write_spec(tmp_path, model={"name_or_path": str(tmp_path / "nope")})
    with pytest.raises(SpecError, match=r"^model.name_or_path: no such model directory"):
        load_spec(path)
    (tmp_path / "empty").mkdir()
    path = write_spec(tmp_path, model={"name_or_path": str(tmp_path / "empty")})
    with pytest.raises(SpecError, match=r"^model.name_or_path: .* has no config.json"):
        load_spec(path)
    path = write_spec(tmp_path, model={"name_or_path": "meta-llama/Llama-3.2-1B"})
    assert load_spec(path).model.name_or_path == "meta-llama/Llama-3.2-1B"


def test_required_sections_and_yaml_errors(tmp_path):
    with pytest.raises(SpecError, match=r"^data: required field is missing"):
        load_spec(write_spec(tmp_path, data=None))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: [unclosed\n")
    with pytest.raises(SpecError, match=r"invalid YAML at line"):
        load_spec(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(SpecError, match=r"YAML mapping"):
        load_spec(bad)
    with pytest.raises(SpecError, match=r"no such spec file"):
        load_spec(tmp_path / "absent.yaml")


def test_relative_paths_follow_the_file_and_overrides_follow_cwd(tmp_path, monkeypatch):
    data = tmp_path / "mine.jsonl"
    data.write_text((JOBS / "data" / "tasks.jsonl").read_text())
    spec = load_spec(TEST_JOB, ["checkpoint.storage=runs"])
    assert spec.data.path == str((JOBS / "data" / "tasks.jsonl").resolve())
    monkeypatch.chdir(tmp_path)
    spec = load_spec(TEST_JOB, ["data.path=mine.jsonl", "checkpoint.storage=runs"])
    assert spec.data.path == str(data)
    assert spec.checkpoint.storage == str(tmp_path / "runs")
    assert load_spec(TEST_JOB, ["checkpoint.storage=s3://bucket/p"]).storage_uri == "s3://bucket/p"


def test_override_parsing():
    assert parse_override("lora.target_modules=[q_proj, v_proj]") == (["lora", "target_modules"], ["q_proj", "v_proj"])
    assert parse_override("kernels.enabled=false") == (["kernels", "enabled"], False)
    with pytest.raises(SpecError, match="expected key.path=value"):
        parse_override("training.steps")
    with pytest.raises(SpecError, match="^training.steps: is not a section"):
        load_spec(TEST_JOB, ["training.steps.x=1"])


def test_exponent_numbers_are_floats_in_files_and_overrides(tmp_path):
    # YAML 1.1 (PyYAML's default) reads `1e-4` as a string; specs read it as the number users mean.
    assert parse_override("training.learning_rate=1e-4") == (["training", "learning_rate"], 1e-4)
    assert parse_override("x=[1e-7, 2.5E+3, 3]")[1] == [1e-7, 2500.0, 3]
    assert parse_override("name=run-1e5")[1] == "run-1e5"
    job = tmp_path / "job.yaml"
    job.write_text((TEST_JOB).read_text().replace("learning_rate:", "learning_rate: 3e-4 #", 1))
    assert load_spec(job, [f"data.path={JOBS / 'data' / 'tasks.jsonl'}"]).training.learning_rate == 3e-4


def test_alora_section():
    spec = load_spec(TEST_JOB, ["alora.invocation_string=<|reserved_0|>judge<|reserved_1|>"])
    assert spec.alora.invocation_string.startswith("<|reserved_0|>")
    with pytest.raises(SpecError, match="^alora: give exactly one"):
        load_spec(TEST_JOB, ["alora.drop_samples_without_invocation=true"])
    with pytest.raises(SpecError, match="^alora: `invocation_tokens` must be"):
        load_spec(TEST_JOB, ["alora.invocation_tokens=[]"])


def test_spec_round_trips_through_json():
    spec = load_spec(TEST_JOB)
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec


def test_cli_refusal_is_one_line_exit_2_and_starts_nothing(cli, tmp_path):
    storage = tmp_path / "storage"
    result = cli("submit", str(TEST_JOB), "--set", "training.steps=-3", "--set", f"checkpoint.storage={storage}")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: training.steps: Input should be greater than 0 (got -3)"
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not storage.exists()


def test_cli_refuses_a_missing_spec_file(cli, tmp_path):
    result = cli("submit", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert result.stderr.strip().endswith("nope.yaml: no such spec file")


def test_cli_validate_prints_resolved_spec(cli):
    result = cli("validate", str(TEST_JOB), "--set", "training.steps=17")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["training"]["steps"] == 17


def test_jobs_readme_reference_is_current():
    from lorafleet.spec.reference import spec_reference

    text = (JOBS / "README.md").read_text()
    generated = text.split("<!-- spec-doc:begin -->\n", 1)[1].split("<!-- spec-doc:end -->", 1)[0]
    assert generated.strip() == spec_reference().strip(), "run: lorafleet spec-doc, and paste into jobs/README.md"


def test_every_shipped_job_validates():
    paths = sorted(JOBS.glob("*.yaml"))
    assert {"llama.yaml", "alora.yaml"} <= {p.name for p in paths}
    for path in paths:
        # A sweep file is a job spec plus a `sweep:` section, read by lorafleet.sweep (tests/unit/sweep).
        spec = load_sweep(path).job if "sweep" in yaml.safe_load(path.read_text()) else load_spec(path)
        assert spec.name == yaml.safe_load(path.read_text())["name"], path
        # Relative data paths resolve against the job file, so every shipped job runs from any directory.
        assert Path(spec.data.path).is_file(), (path, spec.data.path)
    assert load_spec(JOBS / "alora.yaml").alora is not None


def test_cli_wait_without_an_address_is_refused(cli, tmp_path):
    result = cli("submit", str(TEST_JOB), "--wait", "--set", f"checkpoint.storage={tmp_path / 'x'}",
                 env={"RAY_ADDRESS": ""})
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --wait: needs a Jobs API address")
    assert "Traceback" not in result.stderr and not (tmp_path / "x").exists()
