"""The tokenized cache (lorafleet.data.cache) built in this process (no Ray; tests/e2e/test_data_cache.py builds it
with Ray Data and trains on it): the same samples, targets, held-out split and batch plan as the in-memory path;
shards, globs and an S3 prefix read like one file; bad records named by file and line, or skipped and counted; the
cache reused for the same key and rebuilt for any change of it."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from helpers.cli import JOBS, TEST_JOB

from lorafleet.data import sources
from lorafleet.data.alora import Invocation
from lorafleet.data.cache import CachedRecords, CachedSamples, TokenCache, build_cache, uses_cache
from lorafleet.data.dataset import TrainingData
from lorafleet.data.sources import data_fingerprint, list_sources
from lorafleet.model.build import load_tokenizer_for, resolve_base_model
from lorafleet.spec import SpecError, load_spec

TASKS = JOBS / "data" / "tasks.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer_for(resolve_base_model(load_spec(TEST_JOB)))


def spec_for(storage, *overrides, job=None):
    return load_spec(JOBS / job if job else TEST_JOB, [f"checkpoint.storage={storage}", "data.cache=true", *overrides])


def cached(spec, tokenizer):
    """(TrainingData over the cache, its report), built here (or found)."""
    invocation = Invocation.from_spec(spec, tokenizer)
    cache, report = build_cache(spec, tokenizer, data_fingerprint(spec.data.path), invocation, use_ray=False)
    return TrainingData.from_cache(spec, tokenizer, cache, report, invocation), report


def assert_same_data(a: TrainingData, b: TrainingData, spec) -> None:
    assert len(a.samples) == len(b.samples)
    assert list(a.samples) == list(b.samples)
    assert list(a.targets) == list(b.targets)
    assert list(a.eval_samples) == list(b.eval_samples)
    assert list(a.eval_targets) == list(b.eval_targets)
    assert a.plan(spec) == b.plan(spec)
    plans = a.plan(spec), b.plan(spec)
    assert [[p.global_batch(step) for step in range(5)] for p in plans][0] == [plans[1].global_batch(s) for s in range(5)]


def split_into_shards(path: Path, folder: Path, count: int = 3, suffix: str = ".jsonl") -> list[Path]:
    lines = path.read_text().splitlines(keepends=True)
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(lines) // count)
    out = []
    for k in range(count):
        shard = folder / f"part-{k:03d}{suffix}"
        shard.write_text("".join(lines[k * per : (k + 1) * per]))
        out.append(shard)
    return out


@pytest.mark.parametrize("overrides", [
    [],
    ["data.eval_fraction=0.1"],
    ["data.group_by_length=true", "data.max_length=32", "training.seed=7"],
    ["data.format=chat", f"data.path={JOBS / 'data' / 'chat_sample.jsonl'}"],
    ["data.packing=true"],
    ["data.packing=true", "data.eval_fraction=0.2", "data.group_by_length=true", "data.max_length=128"],
])
def test_cache_gives_the_in_memory_samples_order_and_plan(tmp_path, tokenizer, overrides):
    spec = spec_for(tmp_path, *overrides)
    data, report = cached(spec, tokenizer)
    assert not report.reused and report.engine == "driver"
    assert_same_data(TrainingData.from_spec(spec, tokenizer), data, spec)
    assert isinstance(data.samples, CachedSamples)


@pytest.mark.parametrize("overrides", [[], ["data.packing=true"]])
def test_alora_job_cache_matches(tmp_path, tokenizer, overrides):
    spec = spec_for(tmp_path, *overrides, job="alora.yaml")
    alora_tokenizer = load_tokenizer_for(resolve_base_model(spec))
    data, _ = cached(spec, alora_tokenizer)
    assert_same_data(TrainingData.from_spec(spec, alora_tokenizer), data, spec)
    assert data.invocation_tokens and ("alora_spans" if spec.data.packing else "alora_start") in data.samples[0]


def test_pickled_samples_carry_no_per_sample_data_and_read_the_same(tmp_path, tokenizer):
    spec = spec_for(tmp_path, "data.eval_fraction=0.1")
    data, _ = cached(spec, tokenizer)
    blob = pickle.dumps(data)
    assert len(blob) < 100_000  # the cache's index and the spec's split, not 3000 samples
    again = pickle.loads(blob)
    assert list(again.samples) == list(data.samples) and list(again.targets) == list(data.targets)


def test_shards_folder_and_glob_read_like_the_one_file(tmp_path, tokenizer):
    folder = tmp_path / "shards"
    split_into_shards(TASKS, folder)
    (folder / "_SUCCESS").write_text("")  # writers' markers are not data
    one, _ = cached(spec_for(tmp_path), tokenizer)
    for path in (folder, f"{folder}/part-*.jsonl"):
        spec = spec_for(tmp_path, f"data.path={path}")
        assert len(list_sources(str(path))) == 3
        data, report = cached(spec, tokenizer)
        assert report.files == 3
        assert list(data.samples) == list(one.samples)


def test_parquet_and_json_shards_read_like_jsonl(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [json.loads(line) for line in TASKS.read_text().splitlines()]
    folder = tmp_path / "mixed"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(records[:1000]), folder / "a.parquet", row_group_size=300)
    (folder / "b.json").write_text(json.dumps(records[1000:2000]))
    (folder / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[2000:]))
    one, _ = cached(spec_for(tmp_path), tokenizer)
    data, _ = cached(spec_for(tmp_path, f"data.path={folder}"), tokenizer)
    assert list(data.samples) == list(one.samples)


def test_the_cache_is_reused_for_the_same_key_and_rebuilt_for_any_change(tmp_path, tokenizer):
    data_file = tmp_path / "data.jsonl"
    data_file.write_text(TASKS.read_text())
    base = [f"data.path={data_file}"]
    built = []

    def build(*overrides):
        _, report = cached(spec_for(tmp_path / "store", *base, *overrides), tokenizer)
        built.append(not report.reused)
        return report.key

    first = build()
    # Not part of the key: the job's name, its seed and split, batching.
    assert build("name=other", "training.seed=3", "data.eval_fraction=0.2", "data.group_by_length=true") == first
    keys = {first, build("data.max_length=32"), build("data.train_on_inputs=true"), build("data.on_bad_record=skip")}
    data_file.write_text(TASKS.read_text() + json.dumps({"instruction": "One more.", "output": "ok"}) + "\n")
    keys.add(build())
    assert build() in keys  # the changed file's cache, reused
    assert built == [True, False, True, True, True, True, False]
    assert len(keys) == 5
    assert len(list((tmp_path / "store" / "_cache" / "tokenized").iterdir())) == 5


def test_bad_record_in_a_shard_is_named_by_file_and_line(tmp_path, tokenizer, monkeypatch):
    folder = tmp_path / "shards"
    shards = split_into_shards(TASKS, folder)
    lines = shards[1].read_text().splitlines(keepends=True)
    lines[700] = json.dumps({"instruction": "No output here."}) + "\n"
    shards[1].write_text("".join(lines))
    # Chunks of a few KB: the bad line sits in a later chunk of its file and is still numbered in the file.
    monkeypatch.setattr(sources, "CHUNK_BYTES", 4096)
    with pytest.raises(SpecError) as err:
        cached(spec_for(tmp_path, f"data.path={folder}"), tokenizer)
    [problem] = err.value.problems
    assert problem.startswith(f"data.path: {shards[1]}: line 701: missing 'output'"), problem
    assert not (tmp_path / "_cache" / "tokenized").exists() or not any((tmp_path / "_cache" / "tokenized").iterdir())


def test_skipped_records_are_counted_and_located_like_in_memory(tmp_path, tokenizer):
    lines = TASKS.read_text().splitlines(keepends=True)
    lines[4] = "{not json\n"
    lines[9] = json.dumps({"instruction": "x", "output": ""}) + "\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(lines))
    spec = spec_for(tmp_path, f"data.path={bad}", "data.on_bad_record=skip")
    data, report = cached(spec, tokenizer)
    assert report.skipped == 2 and report.records == len(lines) - 2
    assert report.skipped_at == [f"{bad}: line 5: invalid JSON (Expecting property name enclosed in double quotes "
                                 "at column 2)", f"{bad}: line 10: 'output' is empty"]
    memory = TrainingData.from_spec(spec, tokenizer)
    assert memory.report["skipped"] == 2
    assert list(memory.samples) == list(data.samples)
    with pytest.raises(SpecError, match=r"bad.jsonl: line 5: invalid JSON"):
        cached(spec_for(tmp_path, f"data.path={bad}"), tokenizer)


def test_s3_prefix_source_and_storage(s3_server, tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    for shard in split_into_shards(TASKS, tmp_path / "shards"):
        s3_server.client.upload_file(str(shard), s3_server.bucket, f"data/{shard.name}")
    prefix = f"s3://{s3_server.bucket}/data/"
    spec = load_spec(TEST_JOB, [f"checkpoint.storage=s3://{s3_server.bucket}/runs", f"data.path={prefix}"])
    assert uses_cache(spec)  # auto: an object-store prefix
    data, report = cached(spec, tokenizer)
    assert report.uri.startswith(f"s3://{s3_server.bucket}/runs/_cache/tokenized/")
    assert any(key.startswith("runs/_cache/tokenized/") for key in s3_server.keys())
    one = TrainingData.from_spec(load_spec(TEST_JOB), tokenizer)
    assert list(data.samples) == list(one.samples)
    # A worker elsewhere: opens the cache by its URI, copies the shards to its own disk once.
    reopened = CachedSamples(TokenCache(report.uri))
    assert reopened[5] == one.samples[5]
    assert list((tmp_path / "home" / "cache" / "tokenized" / report.key).glob("*.arrow"))


def test_default_job_stays_in_memory(tmp_path, tokenizer):
    assert not uses_cache(load_spec(TEST_JOB))
    with pytest.raises(SpecError, match="data.path: no such file"):  # shards are read through the cache only
        load_spec(TEST_JOB, ["data.cache=false", f"data.path={JOBS / 'data'}/*.jsonl"])


def test_a_remote_job_ships_a_glob_as_a_folder_of_shards_and_leaves_a_prefix_alone(tmp_path):
    from lorafleet.remote.client import stage_job

    split_into_shards(TASKS, tmp_path / "shards")
    staged, staged_s3 = tmp_path / "staged", tmp_path / "staged-s3"
    staged.mkdir(), staged_s3.mkdir()
    spec = json.loads(stage_job(load_spec(TEST_JOB, [f"data.path={tmp_path}/shards/part-*.jsonl"]),
                                staged).read_text())
    assert spec["data"]["path"] == "data/shards"
    assert sorted(p.name for p in (staged / "data" / "shards").iterdir()) == ["part-000.jsonl", "part-001.jsonl",
                                                                            "part-002.jsonl"]
    prefix = json.loads(stage_job(load_spec(TEST_JOB, ["data.path=s3://bucket/data/"]),
                                  staged_s3).read_text())
    assert prefix["data"]["path"] == "s3://bucket/data/"


def test_held_out_shards_are_read_through_their_own_cache(tmp_path, tokenizer):
    from lorafleet.train.driver import prepare

    held_out, one_file = tmp_path / "held-out", tmp_path / "held-out.jsonl"
    one_file.write_text("".join(TASKS.read_text().splitlines(keepends=True)[:100]))
    split_into_shards(one_file, held_out, count=2)
    memory_spec = load_spec(TEST_JOB, [f"data.eval_path={one_file}"])
    spec = load_spec(TEST_JOB, [f"checkpoint.storage={tmp_path}", f"data.eval_path={held_out}"])
    assert uses_cache(spec)  # auto: the held-out data is a folder of shards
    data = prepare(spec).data
    memory = TrainingData.from_spec(memory_spec, tokenizer)
    assert isinstance(data.eval_samples, CachedSamples)
    assert list(data.eval_samples) == list(memory.eval_samples) and list(data.samples) == list(memory.samples)
    assert list(data.eval_targets) == list(memory.eval_targets)

    # eval.generate prompts with the first held-out records as read, from the cache as from the file.
    scored = prepare(load_spec(TEST_JOB, [f"checkpoint.storage={tmp_path}", f"data.eval_path={held_out}",
                                          "eval.generate.num_samples=3"])).data.eval_records
    assert isinstance(scored, CachedRecords)
    memory_scored = TrainingData.from_spec(load_spec(TEST_JOB, [f"data.eval_path={one_file}",
                                                                "eval.generate.num_samples=3"]), tokenizer).eval_records
    assert list(pickle.loads(pickle.dumps(scored))) == memory_scored and len(memory_scored) == 3


def test_generation_records_of_a_held_out_fraction_come_from_the_cache(tmp_path, tokenizer):
    # The default job: eval_fraction 0.05 and eval.generate over 60 records.
    memory = TrainingData.from_spec(load_spec("jobs/llama.yaml"), tokenizer)
    spec = load_spec("jobs/llama.yaml", [f"checkpoint.storage={tmp_path}", "data.cache=true"])
    cache, report = build_cache(spec, tokenizer, data_fingerprint(spec.data.path))
    data = TrainingData.from_cache(spec, tokenizer, cache, report)
    assert isinstance(data.eval_records, CachedRecords) and len(data.eval_records) == 60
    shipped = pickle.loads(pickle.dumps(data.eval_records))  # as a worker receives it: the index, no rows
    assert shipped._rows is None and list(shipped) == memory.eval_records
    assert list(data.eval_samples) == list(memory.eval_samples)


def test_a_broken_file_fails_whatever_on_bad_record_says(tmp_path, tokenizer):
    folder = tmp_path / "shards"
    split_into_shards(TASKS, folder, count=2)
    (folder / "part-002.json").write_text('{"note": "not a list"}')
    with pytest.raises(SpecError, match=r"part-002.json: a .json file must hold a list of records"):
        cached(spec_for(tmp_path, f"data.path={folder}", "data.on_bad_record=skip"), tokenizer)
    (folder / "part-002.json").unlink()
    (folder / "part-003.jsonl").write_bytes(b"\x1f\x8b\x08\x00rest")
    with pytest.raises(SpecError, match=r"part-003.jsonl: binary content, not JSON text \(it is gzip-compressed"):
        cached(spec_for(tmp_path, f"data.path={folder}"), tokenizer)


def saved_dataset(folder: Path, records: list[dict], as_dict: bool = False) -> Path:
    """`records` saved by `datasets.save_to_disk` in 2 Arrow shards (as a DatasetDict's `train` split, next to a
    `test` split, with `as_dict`)."""
    import datasets

    train = datasets.Dataset.from_list(records)
    if as_dict:
        datasets.DatasetDict({"train": train, "test": train.select(range(5))}).save_to_disk(
            str(folder), num_shards={"train": 2, "test": 1})
    else:
        train.save_to_disk(str(folder), num_shards=2)
    return folder


@pytest.mark.parametrize("as_dict", [False, True])
@pytest.mark.parametrize("overrides", [[], ["data.eval_fraction=0.1", "data.packing=true"]])
def test_a_saved_dataset_through_the_cache_gives_its_in_memory_samples(tmp_path, tokenizer, monkeypatch, as_dict,
                                                                        overrides):
    records = [json.loads(line) for line in TASKS.read_text().splitlines()]
    folder = saved_dataset(tmp_path / "saved", records, as_dict)
    # One chunk per record batch (datasets writes 1000 rows per batch): chunks that start inside a file.
    monkeypatch.setattr(sources, "CHUNK_BYTES", 1)
    files = sources.saved_dataset_sources(folder)
    assert [f.name for f in files] == [f"{'train/' if as_dict else ''}data-0000{k}-of-00002.arrow" for k in (0, 1)]
    assert [(c.start, c.end) for c in sources.plan_chunks(files)] == [(0, 1000), (1000, 1500)] * 2
    spec = spec_for(tmp_path, f"data.path={folder}", *overrides)
    data, report = cached(spec, tokenizer)
    assert report.files == 2 and report.records == 3000
    memory = TrainingData.from_spec(spec.model_copy(update={"data": spec.data.model_copy(update={"cache": False})}),
                                    tokenizer)
    assert_same_data(memory, data, spec)
    assert_same_data(TrainingData.from_spec(load_spec(TEST_JOB, overrides), tokenizer), data, spec)


def test_chat_records_of_a_saved_dataset_read_like_in_memory(tmp_path, tokenizer):
    chat = JOBS / "data" / "chat_sample.jsonl"
    folder = saved_dataset(tmp_path / "chat", [json.loads(line) for line in chat.read_text().splitlines()])
    spec = spec_for(tmp_path, f"data.path={folder}", "data.format=chat")
    data, _ = cached(spec, tokenizer)
    assert list(data.samples) == list(TrainingData.from_spec(spec_for(tmp_path, f"data.path={chat}",
                                                                     "data.format=chat"), tokenizer).samples)


def test_a_bad_row_of_a_saved_dataset_is_named_by_file_and_row(tmp_path, tokenizer):
    records = [json.loads(line) for line in TASKS.read_text().splitlines()]
    records[1700] = {**records[1700], "output": None}
    folder = saved_dataset(tmp_path / "saved", records)
    with pytest.raises(SpecError) as err:
        cached(spec_for(tmp_path, f"data.path={folder}"), tokenizer)
    assert err.value.problems == [f"data.path: {folder}/data-00001-of-00002.arrow: record 201: missing 'output' "
                                  "(data.on_bad_record: skip skips such records)"]
    spec = spec_for(tmp_path, f"data.path={folder}", "data.on_bad_record=skip")
    data, report = cached(spec, tokenizer)
    assert report.skipped == 1 and report.skipped_at == [f"{folder}/data-00001-of-00002.arrow: record 201: "
                                                         "missing 'output'"]
    in_memory = spec.model_copy(update={"data": spec.data.model_copy(update={"cache": False})})
    assert list(data.samples) == list(TrainingData.from_spec(in_memory, tokenizer).samples)
    (folder / "data-00001-of-00002.arrow").write_bytes(b"\xff\xff\xff\xff not arrow")
    with pytest.raises(SpecError, match=r"data-00001-of-00002.arrow: damaged Arrow file"):
        cached(spec_for(tmp_path, f"data.path={folder}", "data.max_length=64"), tokenizer)


def test_auto_caches_a_saved_dataset_by_the_size_of_its_arrow_files(tmp_path, monkeypatch):
    from lorafleet.data import cache

    folder = saved_dataset(tmp_path / "saved", [json.loads(line) for line in TASKS.read_text().splitlines()[:100]])
    spec = load_spec(TEST_JOB, [f"data.path={folder}"])
    assert not uses_cache(spec)
    monkeypatch.setattr(cache, "AUTO_BYTES", sum(f.size for f in sources.saved_dataset_sources(folder)))
    assert uses_cache(spec)
