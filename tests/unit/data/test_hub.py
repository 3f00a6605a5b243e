"""`data.hub` (lorafleet.data.hub), tested with local dataset folders that `datasets.load_dataset` reads by path
offline (the json builder; no hub here): hub data goes through the tokenized cache and gives the samples the same
records give as a file; the cache key follows the split and config; bad records are named by dataset and row; bad
`data.hub` fields, unknown datasets, splits and configs are one line each; the resume check sees the data change."""

from __future__ import annotations

import json

import pytest
from helpers.cli import JOBS, TEST_JOB
from helpers.hub import config_folder, dataset_folder

from lorafleet.data.cache import CachedSamples, uses_cache
from lorafleet.data.dataset import TrainingData
from lorafleet.data.hub import load_hub
from lorafleet.model.build import load_tokenizer_for, resolve_base_model
from lorafleet.runstore.checkpoint import INFO_FILE
from lorafleet.runstore.location import RunLocation
from lorafleet.spec import HubSpec, SpecError, load_spec
from lorafleet.train.driver import preflight, prepare

TASKS = JOBS / "data" / "tasks.jsonl"
LINES = TASKS.read_text().splitlines()

pytestmark = pytest.mark.usefixtures("offline_hub")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer_for(resolve_base_model(load_spec(TEST_JOB)))


def hub_spec(storage, name, *overrides):
    return load_spec(TEST_JOB, [f"checkpoint.storage={storage}", "data.path=null", f"data.hub.name={name}", *overrides])


@pytest.mark.parametrize("overrides", [[], ["data.eval_fraction=0.1", "data.packing=true"]])
def test_hub_data_gives_the_samples_of_the_same_records_as_a_file(tmp_path, tokenizer, overrides):
    folder = dataset_folder(tmp_path / "tasks", {"train": LINES})
    spec = hub_spec(tmp_path, folder, *overrides)
    assert uses_cache(spec)  # always, whatever the size
    data = prepare(spec).data
    memory = TrainingData.from_spec(load_spec(TEST_JOB, overrides), tokenizer)
    assert isinstance(data.samples, CachedSamples)
    assert list(data.samples) == list(memory.samples) and list(data.targets) == list(memory.targets)
    assert list(data.eval_samples) == list(memory.eval_samples)
    assert data.plan(spec) == memory.plan(spec)
    assert data.source["hub"] == {"name": str(folder), "config": None, "split": "train", "revision": None}
    assert data.report["records"] == 3000 and not data.report["reused"]
    assert prepare(spec).data.report["reused"]  # loaded again, same fingerprint: same cache


def test_held_out_hub_split_reads_like_the_held_out_file(tmp_path, tokenizer):
    folder = dataset_folder(tmp_path / "tasks", {"train": LINES[:2000], "validation": LINES[2000:2100]})
    held_out = tmp_path / "held-out.jsonl"
    held_out.write_text("\n".join(LINES[2000:2100]) + "\n")
    spec = hub_spec(tmp_path, folder, f"data.eval_hub.name={folder}", "data.eval_hub.split=validation")
    data = prepare(spec).data
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(LINES[:2000]) + "\n")
    memory = TrainingData.from_spec(load_spec(TEST_JOB, [f"data.path={train}", f"data.eval_path={held_out}"]),
                                    tokenizer)
    assert isinstance(data.eval_samples, CachedSamples)
    assert list(data.eval_samples) == list(memory.eval_samples) and list(data.samples) == list(memory.samples)
    assert data.source["eval_hub"]["hub"]["split"] == "validation"


def test_the_cache_key_follows_split_config_and_content(tmp_path):
    splits = dataset_folder(tmp_path / "splits", {"train": LINES[:300], "test": LINES[300:600]})
    configs = config_folder(tmp_path / "configs", {"first": LINES[:300], "second": LINES[300:600]})
    keys = {
        prepare(hub_spec(tmp_path, splits)).data.report["key"],
        prepare(hub_spec(tmp_path, splits, "data.hub.split=test")).data.report["key"],
        prepare(hub_spec(tmp_path, configs, "data.hub.config=first")).data.report["key"],
        prepare(hub_spec(tmp_path, configs, "data.hub.config=second")).data.report["key"],
    }
    assert len(keys) == 4
    before = load_hub(HubSpec(name=str(splits)))
    (splits / "train.jsonl").write_text("\n".join(LINES[:301]) + "\n")
    after = load_hub(HubSpec(name=str(splits)))
    assert before.fingerprint["fingerprint"] != after.fingerprint["fingerprint"] and after.rows == 301
    assert prepare(hub_spec(tmp_path, splits)).data.report["key"] not in keys


def test_a_bad_record_is_named_by_dataset_and_row(tmp_path):
    lines = list(LINES)
    lines[1700] = json.dumps({"instruction": "No output here.", "input": "", "output": None})
    folder = dataset_folder(tmp_path / "tasks", {"train": lines})
    with pytest.raises(SpecError) as err:
        prepare(hub_spec(tmp_path, folder))
    assert err.value.problems == [f"data.hub: {folder} (split train): record 1701: missing 'output' "
                                  "(data.on_bad_record: skip skips such records)"]
    data = prepare(hub_spec(tmp_path, folder, "data.on_bad_record=skip")).data
    assert data.report["skipped"] == 1 and len(data.samples) == 2999
    assert data.report["skipped_at"] == [f"{folder} (split train): record 1701: missing 'output'"]


@pytest.mark.parametrize("overrides, problem", [
    (["data.hub.name=org/tasks"], "data: give exactly one of `path` or `hub` (set the other to null)"),
    (["data.path=null"], "data: give exactly one of `path` or `hub` (set the other to null)"),
    (["data.path=null", "data.hub.split=train"], "data.hub.name: required field is missing"),
    (["data.path=null", "data.hub.name=org/tasks", "data.hub.split=train[:10%]"],
     "data.hub.split: a whole split name, not a slice or sum ('train[:10%]'): hold out records with "
     "`data.eval_fraction`"),
    (["data.path=null", "data.hub.name=org/tasks", "data.cache=false"],
     "data: `hub` / `eval_hub` data is read through the tokenized cache only: `cache` cannot be false"),
    (["data.eval_hub.name=org/tasks", "data.eval_fraction=0.1"],
     "data: give at most one of `eval_path`, `eval_fraction` or `eval_hub` (got eval_fraction, eval_hub)"),
    (["data.path=null", "data.hub.name=org/tasks", "data.hub.splt=test"], "data.hub.splt: unknown field"),
])
def test_bad_hub_fields_are_one_line(overrides, problem):
    with pytest.raises(SpecError) as err:
        load_spec(TEST_JOB, overrides)
    assert err.value.problems == [problem]


def test_loading_errors_name_the_field(tmp_path):
    folder = dataset_folder(tmp_path / "tasks", {"train": LINES[:10]})
    cases = {
        "name": (HubSpec(name=str(tmp_path / "nothing")), f"data.hub.name: no dataset '{tmp_path / 'nothing'}'"),
        "split": (HubSpec(name=str(folder), split="validation"), "data.hub.split: 'validation' of"),
        "config": (HubSpec(name=str(folder), config="other"), "data.hub.config: 'other' of"),
        "offline": (HubSpec(name="lorafleet-tests/no-such-dataset"),
                    "data.hub.name: cannot reach 'lorafleet-tests/no-such-dataset' on the Hugging Face Hub"),
    }
    for hub, start in cases.values():
        with pytest.raises(SpecError) as err:
            load_hub(hub)
        [line] = err.value.problems
        assert line.startswith(start) and "\n" not in line, line
    with pytest.raises(SpecError, match=r"^data.eval_hub.split: 'nope'"):
        prepare(hub_spec(tmp_path, folder, f"data.eval_hub.name={folder}", "data.eval_hub.split=nope"))


def test_a_hub_that_does_not_resolve_fails_at_once_in_one_line(monkeypatch):
    import datasets

    # Online mode, no proxy, and a Hub whose host name cannot resolve (.invalid never does): the case of a driver
    # without network, which huggingface_hub alone would retry for ~30 s, logging each retry.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.lorafleet-test.invalid")
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    with pytest.raises(SpecError) as err:
        load_hub(HubSpec(name="someorg/somedata"))
    [line] = err.value.problems
    assert line.startswith("data.hub.name: cannot reach 'someorg/somedata': hub.lorafleet-test.invalid does not "
                           "resolve"), line


def test_resume_check_sees_a_changed_hub_dataset(tmp_path):
    folder = dataset_folder(tmp_path / "tasks", {"train": LINES[:400]})
    spec = hub_spec(tmp_path / "store", folder, "name=hub-run")
    location = RunLocation.of(spec)
    prepared = prepare(spec)
    checkpoint = tmp_path / "store" / "hub-run" / "checkpoint_000001"
    checkpoint.mkdir(parents=True)
    (checkpoint / INFO_FILE).write_text(json.dumps({"step": 2, "data": prepared.data.source}))
    preflight(prepare(spec), location)  # same data: resumes
    (folder / "train.jsonl").write_text("\n".join(LINES[:401]) + "\n")
    with pytest.raises(SpecError) as err:
        preflight(prepare(spec), location)
    [line] = err.value.problems
    assert line.startswith(f"data.hub: {folder} (split train) is not the data run 'hub-run' was trained on up to "
                           "step 2 (the dataset's fingerprint changed ("), line
    as_file = load_spec(TEST_JOB, [f"checkpoint.storage={tmp_path / 'store'}", "name=hub-run"])
    with pytest.raises(SpecError, match=r"\(was hub dataset .* now a file\)"):
        preflight(prepare(as_file), location)


def test_a_remote_job_ships_no_hub_data(tmp_path):
    from lorafleet.remote.client import stage_job

    spec = load_spec(TEST_JOB, ["data.path=null", "data.hub.name=org/tasks", "data.hub.split=test"])
    shipped = json.loads(stage_job(spec, tmp_path).read_text())
    assert shipped["data"]["path"] is None and shipped["data"]["hub"]["name"] == "org/tasks"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.json"]
