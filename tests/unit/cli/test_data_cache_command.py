"""`lorafleet data cache list|prune`, run as a user runs it (a fresh interpreter), over real caches built by
`build_cache` in this process: the listing (table and `--json`), a dry run that removes nothing, eviction by age with
what was freed, bad input refused with one `error:` line and nothing removed, and an S3 storage (moto)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from helpers.cli import TEST_JOB, one_line_error

from lorafleet.data.cache import LAST_USED_FILE, build_cache
from lorafleet.data.eviction import format_size
from lorafleet.data.sources import data_fingerprint
from lorafleet.model.build import load_tokenizer_for, resolve_base_model
from lorafleet.spec import load_spec

DAY = 86400


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer_for(resolve_base_model(load_spec(TEST_JOB)))


def build(storage, tokenizer, max_length: int):
    spec = load_spec(TEST_JOB, [f"checkpoint.storage={storage}", "data.cache=true", f"data.max_length={max_length}"])
    return build_cache(spec, tokenizer, data_fingerprint(spec.data.path), use_ray=False)[1]


def test_list_and_prune_a_local_storage(cli, tmp_path, tokenizer):
    old, new = build(tmp_path, tokenizer, 32), build(tmp_path, tokenizer, 64)
    stale = time.time() - 9 * DAY
    for name in (LAST_USED_FILE, "index.json"):
        os.utime(Path(old.uri) / name, (stale, stale))

    listed = cli("data", "cache", "list", "--storage", str(tmp_path))
    assert listed.returncode == 0, listed.stderr
    table = listed.stdout.splitlines()
    assert table[0].split() == ["KEY", "SIZE", "RECORDS", "CREATED", "USED", "STATE", "SOURCE"]
    assert [line.split()[0] for line in table[1:]] == [new.key, old.key]  # most recently used first
    assert "9d" in table[2] and "3,000" in table[2] and "complete" in table[2]
    as_json = json.loads(cli("data", "cache", "list", "--storage", str(tmp_path), "--json").stdout)
    assert {c["key"]: c["records"] for c in as_json["caches"]} == {old.key: 3000, new.key: 3000}
    assert as_json["total_bytes"] == sum(c["size"] for c in as_json["caches"])

    dry = cli("data", "cache", "prune", "--storage", str(tmp_path), "--older-than", "7d", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert report["dry_run"] and [r["key"] for r in report["removed"]] == [old.key]
    assert Path(old.uri, "index.json").exists()

    pruned = cli("data", "cache", "prune", "--storage", str(tmp_path), "--older-than", "7d")
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stdout.startswith(f"removed {old.key}") and "(unused for 9d)" in pruned.stdout
    assert f"{format_size(report['freed_bytes'])} freed" in pruned.stderr
    assert not Path(old.uri).exists() and Path(new.uri, "index.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--older-than", "7x"], "error: --older-than: cannot read '7x' as a duration (e.g. 7d, 12h, 30m)"),
    (["--max-size", "lots"], "error: --max-size: cannot read 'lots' as a size (e.g. 20GB, 500MB, 1.5TiB)"),
    (["--key", "feedfeed", "--older-than", "0s"], "error: --key feedfeed: no cache with that key in {caches}"),
    (["--storage", "{storage}/file/runs"], "error: {storage}/file/runs/_cache/tokenized: cannot list ({storage}/file "
     "is a file)"),
])
def test_bad_input_is_one_error_line_and_removes_nothing(cli, tmp_path, tokenizer, args, message):
    built = build(tmp_path, tokenizer, 32)
    (tmp_path / "file").write_text("")
    args = [a.format(storage=tmp_path) for a in args]
    storage = [] if "--storage" in args else ["--storage", str(tmp_path)]
    result = cli("data", "cache", "prune", *storage, *args)
    assert one_line_error(result) == message.format(storage=tmp_path, caches=f"{tmp_path}/_cache/tokenized")
    assert Path(built.uri, "index.json").exists()


def test_prune_an_s3_storage(cli, s3_server, tmp_path, tokenizer):
    storage = f"s3://{s3_server.bucket}/cli"
    built = build(storage, tokenizer, 32)
    listed = json.loads(cli("data", "cache", "list", "--storage", storage, "--json").stdout)
    assert [(c["key"], c["state"], c["uri"]) for c in listed["caches"]] == [(built.key, "complete", built.uri)]
    pruned = json.loads(cli("data", "cache", "prune", "--storage", storage, "--key", built.key[:6], "--json").stdout)
    assert [r["key"] for r in pruned["removed"]] == [built.key] and pruned["left_bytes"] == 0
    # pyarrow leaves an empty marker object for the parent "folder" of what it deletes: no data.
    assert s3_server.keys("cli/_cache/tokenized/") == ["cli/_cache/tokenized/"]
    missing = cli("data", "cache", "list", "--storage", "s3://no-such-bucket-here/runs")
    assert one_line_error(missing) == "error: s3://no-such-bucket-here: no such bucket"
