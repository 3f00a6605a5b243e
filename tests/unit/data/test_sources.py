"""Fingerprints of object-store data (lorafleet.data.sources.listed_fingerprint) by size + content tag, against real
servers (moto for S3, fake-gcs-server for GCS): the same files under another prefix, copied or uploaded again, keep
the fingerprint and reuse the tokenized cache; content changed at the same size changes both; a checkpoint recorded
with modification times still resumes."""

from __future__ import annotations

import pytest
from helpers.cli import JOBS, TEST_JOB

from lorafleet.data.cache import build_cache
from lorafleet.data.sources import data_fingerprint, list_sources, listed_fingerprint
from lorafleet.model.build import load_tokenizer_for, resolve_base_model
from lorafleet.runstore.location import filesystem_for
from lorafleet.spec import load_spec
from lorafleet.train.driver import data_change

TASKS = JOBS / "data" / "tasks.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer_for(resolve_base_model(load_spec(TEST_JOB)))


def shards(count: int = 3) -> dict[str, bytes]:
    lines = TASKS.read_bytes().splitlines(keepends=True)
    per = -(-len(lines) // count)
    return {f"part-{k:03d}.jsonl": b"".join(lines[k * per : (k + 1) * per]) for k in range(count)}


def same_size_change(data: bytes) -> bytes:
    """`data` with one letter changed: the same size, so only the content tells."""
    at = data.index(b'"output": "') + len(b'"output": "')
    return data[:at] + (b"X" if data[at:at + 1] != b"X" else b"Y") + data[at + 1:]


def test_s3_same_content_under_another_prefix_reuses_the_cache(s3_server, tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    client, bucket = s3_server.client, s3_server.bucket
    for name, data in shards().items():
        client.put_object(Bucket=bucket, Key=f"etag/a/{name}", Body=data)
        client.copy_object(Bucket=bucket, Key=f"etag/b/{name}", CopySource={"Bucket": bucket, "Key": f"etag/a/{name}"})
        client.put_object(Bucket=bucket, Key=f"etag/c/{name}", Body=data)  # uploaded again
    prints = {p: data_fingerprint(f"s3://{bucket}/etag/{p}/") for p in "abc"}
    assert prints["a"] == prints["b"] == prints["c"]
    assert set(prints["a"]["files"]["part-000.jsonl"]) == {"size", "etag"}
    built = []

    def cached(prefix: str) -> str:
        spec = load_spec(TEST_JOB, [f"checkpoint.storage={tmp_path / 'store'}", f"data.path={prefix}"])
        _, report = build_cache(spec, tokenizer, data_fingerprint(spec.data.path), use_ray=False)
        built.append(not report.reused)
        return report.key

    key = cached(f"s3://{bucket}/etag/a/")
    assert cached(f"s3://{bucket}/etag/b/") == key and cached(f"s3://{bucket}/etag/c/*.jsonl") == key
    # One shard's content changed, same size: another fingerprint, another cache.
    name, data = "part-001.jsonl", shards()["part-001.jsonl"]
    client.put_object(Bucket=bucket, Key=f"etag/c/{name}", Body=same_size_change(data))
    changed = data_fingerprint(f"s3://{bucket}/etag/c/")
    assert changed["files"][name]["size"] == prints["c"]["files"][name]["size"]
    assert data_change(prints["c"], changed) == f"{name} changed"
    assert cached(f"s3://{bucket}/etag/c/") != key
    assert built == [True, False, False, True]


def test_a_checkpoint_fingerprinted_by_mtime_still_resumes(s3_server):
    client, bucket = s3_server.client, s3_server.bucket
    for name, data in shards(2).items():
        client.put_object(Bucket=bucket, Key=f"legacy/{name}", Body=data)
    prefix = f"s3://{bucket}/legacy/"
    # What a checkpoint written before content tags recorded: size and modification time.
    recorded = {"files": {s.name: {"size": s.size, "mtime": s.mtime} for s in list_sources(prefix)}}
    current = data_fingerprint(prefix)
    assert recorded != current and data_change(recorded, current) is None
    recorded["files"]["part-000.jsonl"]["size"] += 1
    assert data_change(recorded, current) == "part-000.jsonl changed"


def test_gcs_fingerprint_by_md5(gcs_server):
    filesystem = filesystem_for("gs", gcs_server.endpoint)
    data = shards(2)
    for prefix in ("x", "y"):
        for name, content in data.items():
            with filesystem.open_output_stream(f"{gcs_server.bucket}/{prefix}/{name}") as out:
                out.write(content)
    first = data_fingerprint(f"gs://{gcs_server.bucket}/x/", gcs_server.endpoint)
    assert first == data_fingerprint(f"gs://{gcs_server.bucket}/y/", gcs_server.endpoint)
    assert set(first["files"]["part-000.jsonl"]) == {"size", "etag"}
    with filesystem.open_output_stream(f"{gcs_server.bucket}/y/part-000.jsonl") as out:
        out.write(same_size_change(data["part-000.jsonl"]))
    assert data_change(first, data_fingerprint(f"gs://{gcs_server.bucket}/y/", gcs_server.endpoint)) == (
        "part-000.jsonl changed"
    )


def test_local_globs_keep_modification_times(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "hi"}\n')
    print_ = listed_fingerprint(list_sources(f"{tmp_path}/*.jsonl"))
    assert set(print_["a.jsonl"]) == {"size", "mtime"}
