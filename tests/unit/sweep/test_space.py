"""Reading and checking a sweep file (`lorafleet.sweep.space`): every bad sweep refused with one line naming its
field before anything starts, the trial specs it makes, and the Tune spaces it hands over."""

from __future__ import annotations

import pytest
import yaml

from helpers.cli import JOBS, TEST_JOB

from lorafleet.spec import SpecError
from lorafleet.sweep.space import Space, Sweep, load_sweep

SWEEP = JOBS / "sweep.yaml"


def problems(*overrides: str, path=SWEEP) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_sweep(path, overrides)
    return info.value.problems


def test_shipped_sweep_loads_with_its_spaces():
    sweep = load_sweep(SWEEP)
    assert sweep.name == "llama-sweep"
    assert sweep.spaces["training.learning_rate"] == Space("loguniform", (1e-4, 1e-2))
    assert sweep.spaces["lora.r"] == Space("choice", (4, 16))
    assert sweep.storage_uri.endswith("/llama-sweep")
    assert sweep.grace_period == 10 and sweep.mode == "min"


def test_overrides_reach_the_section_and_the_job():
    sweep = load_sweep(SWEEP, ["sweep.num_samples=3", "sweep.params.lora.alpha={choice: [8, 64]}",
                               "training.steps=30", "sweep.metric=loss"])
    assert sweep.section.num_samples == 3 and sweep.job.training.steps == 30
    assert list(sweep.spaces) == ["training.learning_rate", "lora.r", "lora.alpha"]
    assert sweep.mode == "min"


def test_exponent_values_in_a_space_are_numbers():
    sweep = load_sweep(SWEEP, ["sweep.params.training.learning_rate={grid: [1e-7, 1e-3]}"])
    assert sweep.spaces["training.learning_rate"].corners() == [1e-7, 1e-3]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("sweep.params.lora.rank={choice: [4]}", "sweep.params.lora.rank: no such job spec field"),
        ("sweep.params.name={choice: [a, b]}", "sweep.params.name: set by the sweep for each trial"),
        ("sweep.params.lora.r={normal: [1, 2]}", "sweep.params.lora.r: unknown space 'normal'"),
        ("sweep.params.lora.r={uniform: [8, 4]}", "sweep.params.lora.r: uniform needs [low, high] with low < high"),
        ("sweep.params.training.learning_rate={loguniform: [0, 1]}", "loguniform needs 0 < low"),
        ("sweep.params.lora.r={randint: [1.5, 4]}", "sweep.params.lora.r: randint needs two integers"),
        ("sweep.params.lora.r=8", "sweep.params.lora.r: expected one of"),
        ("sweep.num_samples=0", "sweep.num_samples: Input should be greater than 0"),
        ("sweep.scheduler=hyperband", "sweep.scheduler: Input should be 'asha' or 'none'"),
        ("sweep.metric=accuracy", "sweep.metric: Input should be"),
        ("sweep.typo=1", "sweep.typo: Extra inputs are not permitted"),
        ("training.steps=-1", "training.steps"),
        ("training.steps=8", "sweep.grace_period: 10 is more than training.steps (8)"),
    ],
)
def test_a_bad_sweep_is_one_line_naming_its_field(override, expected):
    found = problems(override)
    assert len(found) == 1 and expected in found[0], found


def test_a_space_that_can_produce_an_invalid_job_is_refused():
    (problem,) = problems("sweep.params.lora.r={choice: [0, 8]}")
    assert problem.startswith("sweep.params: training.learning_rate=0.0001, lora.r=0 makes an invalid job: lora.r")


def test_a_metric_the_job_does_not_produce_is_refused():
    (problem,) = problems("data.eval_fraction=null", "eval.max_samples=null")
    assert problem == "sweep.metric: the job produces no eval_loss: set data.eval_fraction or data.eval_path"
    (problem,) = problems("sweep.metric=eval_exact_match")
    assert problem == "sweep.metric: the job produces no eval_exact_match: set eval.generate"


def test_a_job_without_a_sweep_section_is_refused():
    (problem,) = problems(path=TEST_JOB)
    assert "a sweep file is a job spec with a `sweep:` section" in problem


def test_optuna_absent_is_said(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_optuna(name, *args, **kwargs):
        if name == "optuna":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_optuna)
    (problem,) = problems("sweep.search=optuna")
    assert problem.startswith("sweep.search: optuna is not installed here")


def test_trial_spec_sets_the_values_name_and_storage(tmp_path):
    sweep = load_sweep(SWEEP, [f"checkpoint.storage={tmp_path}"])
    spec = sweep.trial_spec({"training.learning_rate": 0.001, "lora.r": 4}, "trial-003")
    assert spec.training.learning_rate == 0.001 and spec.lora.r == 4
    assert spec.name == "trial-003" and spec.storage_uri == f"{tmp_path}/llama-sweep"
    assert spec.data.path == sweep.job.data.path  # the file's relative path, resolved once
    # What a trial receives round-trips.
    again = Sweep.from_json(__import__("json").dumps(sweep.to_json()))
    assert again.to_json() == sweep.to_json() and again.spaces == sweep.spaces


def test_a_relative_data_path_resolves_against_the_sweep_file(tmp_path):
    raw = yaml.safe_load(SWEEP.read_text())
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tasks.jsonl").write_text((JOBS / "data" / "tasks.jsonl").read_text())
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(raw))
    assert load_sweep(tmp_path / "mine.yaml").job.data.path == str(tmp_path / "data" / "tasks.jsonl")


def test_randint_reaches_tune_with_its_upper_end_included():
    domain = Space.parse("lora.r", {"randint": [2, 3]}).to_tune()
    assert sorted({domain.sample() for _ in range(100)}) == [2, 3]


def test_every_sweep_field_is_documented():
    from lorafleet.sweep.space import SweepSection

    text = (JOBS / "README.md").read_text().split("## Sweeps", 1)[1]
    for name, field in SweepSection.model_fields.items():
        assert f"| `sweep.{name}` |" in text and field.description in text, name
