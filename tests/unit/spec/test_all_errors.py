"""A spec with several mistakes is refused with all of them at once: one line each, in the order of the file, then
the `--set` overrides in the order given."""

import pickle
from pathlib import Path

import pytest

from lorafleet.spec import SpecError, load_spec

from helpers.cli import JOBS, run_cli, TEST_JOB

TASKS = JOBS / "data" / "tasks.jsonl"


def spec_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


THREE_MISTAKES = """\
name: three-mistakes
model:
  architecture: llama
lora:
  r: -1
data:
  path: nowhere.jsonl
training:
  steps: 5
  learning_rte: 0.1
"""


def three_mistakes(tmp_path: Path) -> list[str]:
    return [
        "lora.r: Input should be greater than 0 (got -1)",
        f"data.path: no such file or directory: {(tmp_path / 'nowhere.jsonl').resolve()}",
        "training.learning_rte: unknown field",
    ]


def test_three_mistakes_are_all_reported_in_file_order(tmp_path):
    with pytest.raises(SpecError) as err:
        load_spec(spec_file(tmp_path, THREE_MISTAKES))
    assert err.value.problems == three_mistakes(tmp_path)
    assert str(err.value) == "\n".join(three_mistakes(tmp_path))


def test_order_follows_the_file_not_the_schema(tmp_path):
    # `training` comes before `lora` here, the reverse of the schema's order.
    path = spec_file(
        tmp_path,
        f"training:\n  seed: -2\nname: two\nlora:\n  dropout: 1.5\n"
        f"model:\n  architecture: llama\ndata:\n  path: {TASKS}\n",
    )
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert err.value.problems == [
        "training.seed: Input should be greater than or equal to 0 (got -2)",
        "lora.dropout: Input should be less than 1 (got 1.5)",
    ]


def test_override_problems_come_after_the_file_in_the_order_given(tmp_path):
    path = spec_file(tmp_path, f"name: ok\nmodel:\n  architecture: llama\nlora:\n  r: 0\ndata:\n  path: {TASKS}\n")
    with pytest.raises(SpecError) as err:
        load_spec(path, ["training.steps=0", "no-equals-sign", "name=../escape", "kernels.mlp=perhaps"])
    assert err.value.problems == [
        "lora.r: Input should be greater than 0 (got 0)",
        "training.steps: Input should be greater than 0 (got 0)",
        "--set no-equals-sign: expected key.path=value",
        "name: '../escape' is not a safe job name "
        "(1-64 of letters, digits, '.', '_', '-'; starting with a letter or digit)",
        "kernels.mlp: Input should be a valid boolean, unable to interpret input (got 'perhaps')",
    ]


def test_an_override_that_fixes_a_file_mistake_leaves_the_others(tmp_path):
    path = spec_file(tmp_path, THREE_MISTAKES)
    with pytest.raises(SpecError) as err:
        load_spec(path, ["lora.r=8"])
    assert err.value.problems == three_mistakes(tmp_path)[1:]


def test_a_bad_union_value_is_one_problem():
    # pydantic reports it once per member of `list[str] | "all-linear"`; that is one mistake.
    with pytest.raises(SpecError) as err:
        load_spec(TEST_JOB, ["lora.target_modules=5", "lora.r=-1"])
    assert err.value.problems == [
        "lora.target_modules.list[str]: Input should be a valid list (got 5)",
        "lora.r: Input should be greater than 0 (got -1)",
    ]


def problems_of(*overrides: str) -> list[str]:
    with pytest.raises(SpecError) as err:
        load_spec(TEST_JOB, list(overrides))
    return err.value.problems


def test_files_are_checked_alongside_other_problems_but_never_for_a_bad_field(tmp_path):
    # A missing model directory is reported next to a bad field elsewhere...
    no_model = tmp_path / "no-model"
    overrides = ["model.architecture=null", "model.config={}", f"model.name_or_path={no_model}", "lora.alpha=0"]
    assert problems_of(*overrides) == [
        f"model.name_or_path: no such model directory: {no_model}",
        "lora.alpha: Input should be greater than 0 (got 0)",
    ]
    # ...but a model section that is wrong as a whole is one problem, not also a missing directory.
    assert problems_of(f"model.name_or_path={tmp_path / 'no-model'}") == [
        "model: give exactly one of `name_or_path`, `architecture` or `builtin`"
    ]


def test_spec_error_survives_pickling():
    err = pickle.loads(pickle.dumps(SpecError("lora.r: bad", "data.path: worse")))
    assert err.problems == ["lora.r: bad", "data.path: worse"] and str(err) == "lora.r: bad\ndata.path: worse"


def test_cli_prints_every_problem_as_its_own_error_line_and_starts_nothing(tmp_path):
    storage = tmp_path / "storage"
    result = run_cli("submit", str(spec_file(tmp_path, THREE_MISTAKES)), "--set", f"checkpoint.storage={storage}",
                     "--set", "scaling.num_workers=0")
    assert result.returncode == 2, result.stderr
    expected = [f"error: {line}" for line in three_mistakes(tmp_path)]
    expected.append("error: scaling.num_workers: Input should be greater than 0 (got 0)")
    assert result.stderr.splitlines() == expected
    assert result.stdout == "" and not storage.exists()


def test_cli_validate_two_mistakes(tmp_path):
    path = spec_file(tmp_path, f"name: two\nmodel:\n  architecture: llama\ndata:\n  path: {TASKS}\n  format: csv\n")
    result = run_cli("validate", str(path), "--set", "checkpoint.keep=0")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: data.format: Input should be 'text', 'instruction' or 'chat' (got 'csv')",
        "error: checkpoint.keep: Input should be greater than 0 (got 0)",
    ]
    assert result.stdout == ""
