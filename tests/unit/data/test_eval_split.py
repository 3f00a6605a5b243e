"""Held-out data: the spec fields (`data.eval_path`, `data.eval_fraction`, `eval:`), the deterministic split of
`eval_fraction`, and the held-out samples the driver prepares next to the training ones."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers.cli import JOBS, TEST_JOB

from lorafleet.data.dataset import TrainingData, held_out_split
from lorafleet.data.records import load_records
from lorafleet.spec import DataSpec, SpecError, load_spec


def write_records(path, count: int, start: int = 0):
    path.write_text("".join(
        json.dumps({"instruction": f"Repeat {i}.", "output": f"{i} {i}"}) + "\n" for i in range(start, start + count)
    ))
    return path


def one_problem(err) -> str:
    assert len(err.value.problems) == 1, err.value.problems
    return err.value.problems[0]


# --- the spec -------------------------------------------------------------------------------------------------------


def test_evaluation_is_off_by_default_and_follows_checkpoints_when_on():
    spec = load_spec(TEST_JOB)
    assert spec.data.evaluates is False and spec.eval_every_n_steps is None
    on = load_spec(TEST_JOB, ["data.eval_fraction=0.1", "checkpoint.every_n_steps=7"])
    assert on.data.evaluates and on.eval_every_n_steps == 7
    own = load_spec(TEST_JOB, ["data.eval_fraction=0.1", "eval.every_n_steps=3", "eval.max_samples=5"])
    assert (own.eval_every_n_steps, own.eval.max_samples) == (3, 5)


def test_eval_path_and_fraction_together_are_one_error():
    with pytest.raises(SpecError) as err:
        load_spec(TEST_JOB, ["data.eval_fraction=0.1", "data.eval_path=data/tasks.jsonl"])
    assert one_problem(err) == ("data: give at most one of `eval_path`, `eval_fraction` or `eval_hub` "
                                "(got eval_path, eval_fraction)")


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.2])
def test_fraction_must_lie_strictly_between_0_and_1(fraction):
    with pytest.raises(SpecError) as err:
        load_spec(TEST_JOB, [f"data.eval_fraction={fraction}"])
    assert one_problem(err).startswith("data.eval_fraction: Input should be")


def test_eval_section_without_held_out_data_is_refused():
    with pytest.raises(SpecError) as err:
        load_spec(TEST_JOB, ["eval.max_samples=10"])
    assert one_problem(err).startswith("eval: evaluation needs held-out data")


def test_eval_path_is_checked_and_resolved_like_data_path(tmp_path):
    with pytest.raises(SpecError) as err:
        load_spec(TEST_JOB, [f"data.eval_path={tmp_path / 'missing.jsonl'}"])
    assert one_problem(err) == f"data.eval_path: no such file or directory: {tmp_path / 'missing.jsonl'}"
    (tmp_path / "held.csv").write_text("a,b\n")
    with pytest.raises(SpecError) as err:
        load_spec(TEST_JOB, [f"data.eval_path={tmp_path / 'held.csv'}"])
    assert one_problem(err).startswith("data.eval_path: unsupported file type '.csv'")
    # In a spec file, relative to the file's folder.
    write_records(tmp_path / "held.jsonl", 3)
    raw = yaml.safe_load((TEST_JOB).read_text())
    raw["data"].update(path=str(JOBS / "data" / "tasks.jsonl"), eval_path="held.jsonl")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    assert load_spec(tmp_path / "job.yaml").data.eval_path == str(tmp_path / "held.jsonl")


def test_spec_with_evaluation_round_trips_through_json():
    from lorafleet.spec import spec_from_json

    spec = load_spec(TEST_JOB, ["data.eval_fraction=0.25", "eval.every_n_steps=4"])
    assert spec_from_json(spec.model_dump_json()) == spec
    # Without evaluation the JSON carries the `eval` section's defaults, which must not read as "set".
    plain = load_spec(TEST_JOB)
    assert spec_from_json(plain.model_dump_json()) == plain


# --- the split ------------------------------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_seeded():
    train, held = held_out_split(100, 0.2, seed=42)
    assert (train, held) == held_out_split(100, 0.2, seed=42)
    assert len(held) == 20 and len(train) == 80
    assert not set(train) & set(held) and sorted(train + held) == list(range(100))
    assert train == sorted(train) and held == sorted(held)  # file order on both sides
    assert held != held_out_split(100, 0.2, seed=43)[1]
    assert held != list(range(20))  # a random choice, not the head of the file
    assert len(held_out_split(101, 0.2, seed=42)[1]) == 20  # floor(0.2 x 101)


def test_split_leaving_a_side_empty_is_one_line_naming_the_field():
    with pytest.raises(SpecError) as err:
        held_out_split(9, 0.1, seed=42)
    line = one_problem(err)
    assert line.startswith("data.eval_fraction: 0.1 of 9 records leaves the held-out set empty"), line
    assert "\n" not in line


def test_training_data_holds_out_the_split_records(tmp_path, tok):
    path = write_records(tmp_path / "data.jsonl", 40)
    spec = load_spec(TEST_JOB, [f"data.path={path}", "data.eval_fraction=0.25", "training.seed=7"])
    data = TrainingData.from_spec(spec, tok)
    train, held = held_out_split(40, 0.25, seed=7)
    records = load_records(DataSpec(path=str(path)))

    def outputs(samples):
        return [tok.decode([t for t, label in zip(s["input_ids"], s["labels"]) if label != -100],
                           skip_special_tokens=True) for s in samples]

    assert outputs(data.eval_samples) == [records[i]["output"] for i in held]
    assert outputs(data.samples) == [records[i]["output"] for i in train]
    assert data.eval_targets == [len(s["input_ids"]) - s["labels"].count(-100) for s in data.eval_samples]
    assert len(data.plan(spec).epoch_order(0)) == 30  # the held-out records never enter a batch


def test_training_data_reads_eval_path_unpacked(tmp_path, tok):
    path = write_records(tmp_path / "data.jsonl", 20)
    held = write_records(tmp_path / "held.jsonl", 5, start=100)
    spec = load_spec(TEST_JOB, [f"data.path={path}", f"data.eval_path={held}", "data.packing=true"])
    data = TrainingData.from_spec(spec, tok)
    assert len(data.eval_samples) == 5 and all("position_ids" not in s for s in data.eval_samples)
    assert all("position_ids" in row for row in data.samples)  # training rows stay packed


def test_empty_split_and_bad_eval_file_fail_where_the_data_is_read(tmp_path, tok):
    path = write_records(tmp_path / "data.jsonl", 5)
    spec = load_spec(TEST_JOB, [f"data.path={path}", "data.eval_fraction=0.1"])
    with pytest.raises(SpecError) as err:
        TrainingData.from_spec(spec, tok)
    assert one_problem(err).startswith("data.eval_fraction: 0.1 of 5 records leaves the held-out set empty")
    bad = tmp_path / "held.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{"instruction": "x"}\n')
    spec = load_spec(TEST_JOB, [f"data.path={path}", f"data.eval_path={bad}"])
    with pytest.raises(SpecError) as err:
        TrainingData.from_spec(spec, tok)
    assert one_problem(err) == "data.eval_path: record 2: missing 'output'"


def test_preflight_refuses_a_resume_over_another_held_out_set(tmp_path, monkeypatch):
    # prepare() fingerprints the held-out set next to the training data; preflight names the field that changed.
    from types import SimpleNamespace

    from lorafleet.runstore.checkpoint import INFO_FILE
    from lorafleet.runstore.location import RunLocation
    from lorafleet.train import driver

    monkeypatch.setattr(driver, "resolve_base_model", lambda spec: "unused")
    monkeypatch.setattr(driver, "load_tokenizer_for", lambda base, trust=False: None)
    monkeypatch.setattr(driver.TrainingData, "from_spec", lambda spec, tok, warn=False: SimpleNamespace(source={}))
    path, held = write_records(tmp_path / "data.jsonl", 20), write_records(tmp_path / "held.jsonl", 3)
    storage = f"checkpoint.storage={tmp_path / 'runs'}"

    def prepared(*overrides):
        return driver.prepare(load_spec(TEST_JOB, ["name=ev", storage, f"data.path={path}", *overrides]))

    first = prepared(f"data.eval_path={held}")
    assert set(first.data.source) == {"size", "sha256", "eval_path"}
    folder = tmp_path / "runs" / "ev" / "checkpoint_2026-01-01_00-00-01.0"
    folder.mkdir(parents=True)
    (folder / INFO_FILE).write_text(json.dumps({"step": 4, "data": first.data.source}))
    location = RunLocation(str(tmp_path / "runs"), "ev")
    driver.preflight(first, location)  # the same held-out file resumes

    write_records(held, 4)
    with pytest.raises(SpecError) as err:
        driver.preflight(prepared(f"data.eval_path={held}"), location)
    assert one_problem(err).startswith("data.eval_path: the held-out data of run 'ev' differs from what it was "
                                       "evaluated on up to step 4 (size ")
    with pytest.raises(SpecError) as err:
        driver.preflight(prepared("data.eval_fraction=0.2"), location)
    assert one_problem(err).startswith("data.eval_fraction: run 'ev' was trained up to step 4 with another held-out "
                                       "split (none -> 0.2)")
    driver.preflight(prepared("data.eval_fraction=0.2"), location, fresh=True)


def test_alora_held_out_samples_carry_the_invocation_and_errors_number_file_records(tmp_path, tok):
    invocation = "<|reserved_0|>judge<|reserved_1|>"
    lines = [json.dumps({"text": f"claim {i} {invocation} yes"}) + "\n" for i in range(20)]
    path = tmp_path / "judge.jsonl"
    path.write_text("".join(lines))
    spec = load_spec(JOBS / "alora.yaml", [f"data.path={path}", "data.eval_fraction=0.25", "training.seed=3"])
    data = TrainingData.from_spec(spec, tok)
    assert len(data.eval_samples) == 5 and all("alora_start" in s for s in data.eval_samples)
    # Only the tokens after the invocation count, as in training.
    assert all(s["labels"][: s["alora_start"] + 1] == [-100] * (s["alora_start"] + 1) for s in data.eval_samples)

    held = held_out_split(20, 0.25, seed=3)[1]
    lines[held[-1]] = json.dumps({"text": "no invocation here"}) + "\n"
    path.write_text("".join(lines))
    with pytest.raises(SpecError) as err:
        TrainingData.from_spec(spec, tok)
    assert f"(records {held[-1] + 1});" in one_problem(err)  # the file's record number, not the held-out set's
