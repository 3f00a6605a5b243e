"""The tokenized cache end to end (slow: runs join the session's Ray cluster).

One in-memory run over one file is the reference. The same records given as a folder of shards go through the cache
(`data.cache: auto` turns it on for a folder): stopped after step 4 and re-submitted, the run must reproduce the
reference's losses and adapter bitwise (same samples, same plan, exact resume), and the re-submit must reuse the
cache, not rebuild it; both score generated answers to the same held-out records. Two bad records in a shard are skipped (`data.on_bad_record: skip`) on both paths and reported
in the summary and metrics.jsonl. `lorafleet data prepare` builds the same cache with Ray Data tasks (several chunks
per file, on the joined cluster) and its rows are the in-memory samples in order.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers.cli import JOBS, run_cli, submit_small, TEST_JOB
from helpers.runs import adapter, losses, records

pytestmark = pytest.mark.usefixtures("joined_ray")

COMMON = ("data.on_bad_record=skip", "data.group_by_length=true")
# Held-out records scored by generation: from the file on the in-memory path, from the cache's rows on the other.
GENERATE = ("data.eval_fraction=0.02", "eval.generate.num_samples=4", "eval.generate.max_new_tokens=4")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """tasks.jsonl with two bad records, as one file and as three shards."""
    root = tmp_path_factory.mktemp("cache-data")
    lines = (JOBS / "data" / "tasks.jsonl").read_text().splitlines(keepends=True)
    lines[1200] = "{broken\n"
    lines[1500] = json.dumps({"instruction": "No output."}) + "\n"
    (root / "all.jsonl").write_text("".join(lines))
    shards = root / "shards"
    shards.mkdir()
    for k in range(3):
        (shards / f"part-{k:03d}.jsonl").write_text("".join(lines[k * 1000 : (k + 1) * 1000]))
    return {"file": root / "all.jsonl", "folder": shards}


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache-runs")


@pytest.fixture(scope="module")
def memory_run(storage, data):
    proc, summary = submit_small("memory", storage, f"data.path={data['file']}", "data.cache=false", *COMMON,
                                 *GENERATE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return summary


@pytest.fixture(scope="module")
def cached_runs(storage, data):
    """Stopped after step 4, then re-submitted; with the cache's index.json mtime after each."""
    sets = (f"data.path={data['folder']}", *COMMON, *GENERATE)
    first = submit_small("cached", storage, *sets, faults=["--stop-after", "4"])
    assert first[0].returncode == 0, first[0].stderr[-3000:]
    index = Path(first[1]["data_cache"]) / "index.json"
    built = index.stat().st_mtime_ns
    second = submit_small("cached", storage, *sets)
    assert second[0].returncode == 0, second[0].stderr[-3000:]
    return first, second, built, index.stat().st_mtime_ns


def test_cache_run_equals_in_memory_run_and_resumes_exactly(memory_run, cached_runs, storage):
    (_, s1), (p2, s2), built, after = cached_runs
    assert s1["steps"] == 4 and s2["start_step"] == 4 and s2["steps"] == 6
    assert Path(s2["data_cache"]).parent == storage / "_cache" / "tokenized"
    assert "data_cache" not in memory_run
    assert built == after  # the re-submit reused the cache
    assert len(list((storage / "_cache" / "tokenized").iterdir())) == 1
    assert losses(storage, "cached") == losses(storage, "memory")
    assert s2["final_loss"] == memory_run["final_loss"]
    got, ref = adapter(s2), adapter(memory_run)
    assert got.keys() == ref.keys()
    for key in ref:
        assert torch.equal(got[key], ref[key]), key
    # The rank-0 worker generated answers to the cached held-out records at each evaluation, as from the file.
    scores = {name: [(r["step"], r.get("eval_exact_match"), r.get("eval_loss"))
                     for r in records(storage, name).values() if "eval_loss" in r] for name in ("memory", "cached")}
    assert len(scores["memory"]) >= 3 and all(s[1] is not None for s in scores["memory"]), scores
    assert scores["cached"] == scores["memory"]
    assert s1["base_exact_match"] is not None and s1["base_exact_match"] == memory_run["base_exact_match"]


def test_skipped_records_are_reported_in_summary_and_metrics(memory_run, cached_runs, storage, data):
    (p1, s1) = cached_runs[0]
    for summary in (memory_run, s1):
        assert summary["skipped_records"] == 2, summary
    assert s1["skipped_at"][0].startswith(f"{data['folder'] / 'part-001.jsonl'}: line 201: invalid JSON")
    assert "skipped 2 bad record(s)" in p1.stderr
    for name in ("memory", "cached"):
        first = records(storage, name)[1]
        assert first["skipped_records"] == 2


def test_data_prepare_builds_the_same_cache_with_ray_data(tmp_path, data, cached_runs):
    from lorafleet.data.cache import CachedSamples, TokenCache
    from lorafleet.data.dataset import TrainingData
    from lorafleet.model.build import load_tokenizer_for, resolve_base_model
    from lorafleet.spec import load_spec

    from helpers.cli import SMALL_RUN

    sets = [f"checkpoint.storage={tmp_path}", f"data.path={data['folder']}", *SMALL_RUN, *COMMON]
    args = [a for s in sets for a in ("--set", s)]
    # Every file in several chunks, all tokenized by Ray Data tasks on the joined cluster.
    env = {"LORAFLEET_CACHE_INLINE_BYTES": "0", "LORAFLEET_CACHE_CHUNK_BYTES": "20000"}
    proc = run_cli("data", "prepare", "tests/jobs/llama.yaml", "--json", *args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["engine"] == "ray-data" and not report["reused"]
    assert (report["records"], report["skipped"]) == (2998, 2)
    assert report["key"] == Path(cached_runs[1][1]["data_cache"]).name  # the inline build's key: same cache
    assert "cache built in" in proc.stderr and "INFO" not in proc.stderr
    spec = load_spec(TEST_JOB, [f"data.path={data['file']}", *SMALL_RUN, *COMMON])
    memory = TrainingData.from_spec(spec, load_tokenizer_for(resolve_base_model(spec)))
    assert list(CachedSamples(TokenCache(report["uri"]))) == list(memory.samples)
    again = run_cli("data", "prepare", "tests/jobs/llama.yaml", "--json", *args, env=env)
    assert json.loads(again.stdout.strip().splitlines()[-1])["reused"] is True
