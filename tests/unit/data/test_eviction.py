"""Listing and evicting tokenized caches (lorafleet.data.eviction) over real caches built by `build_cache` in this
process: what a listing says, the last use a job records, least-recently-used order under `max_bytes`, `older_than`,
named keys, builds in progress kept and abandoned ones removed, a dry run that removes nothing, a job that keeps
reading a removed cache, and the same on an S3 storage (moto) with this machine's copies removed along."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from helpers.cli import TEST_JOB

from lorafleet.data.cache import LAST_USED_FILE, USE_RECORD_EVERY_S, CachedSamples, TokenCache, build_cache
from lorafleet.data.eviction import (
    BUILD_GRACE_S,
    RECENT_USE_S,
    CacheStore,
    CacheStoreError,
    list_caches,
    prune_caches,
)
from lorafleet.data.sources import data_fingerprint
from lorafleet.model.build import load_tokenizer_for, resolve_base_model
from lorafleet.spec import load_spec

HOUR, DAY = 3600, 86400


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer_for(resolve_base_model(load_spec(TEST_JOB)))


def build(storage, tokenizer, max_length: int = 64):
    """A real cache on `storage` (the test job's data; `max_length` makes the key), built here without Ray."""
    spec = load_spec(TEST_JOB, [f"checkpoint.storage={storage}", "data.cache=true", f"data.max_length={max_length}"])
    return build_cache(spec, tokenizer, data_fingerprint(spec.data.path), use_ray=False)


def used_ago(cache_folder: str | Path, seconds: float) -> None:
    """Make a local cache's last use `seconds` ago (its marker's time, as a job's write would have left it)."""
    marker = Path(cache_folder) / LAST_USED_FILE
    when = time.time() - seconds
    os.utime(marker, (when, when))
    os.utime(Path(cache_folder) / "index.json", (when - 60, when - 60))


def test_listing_describes_each_cache(tmp_path, tokenizer):
    _, first = build(tmp_path, tokenizer, 64)
    _, second = build(tmp_path, tokenizer, 32)
    entries = {e.key: e for e in list_caches(CacheStore.of_storage(str(tmp_path)))}
    assert set(entries) == {first.key, second.key}
    entry = entries[first.key]
    files = list(Path(first.uri).iterdir())
    assert entry.complete and entry.state == "complete" and entry.records == 3000
    assert entry.size == sum(p.stat().st_size for p in files) > 0
    assert entry.source == str(TEST_JOB.parent.parent.parent / "jobs" / "data" / "tasks.jsonl")
    assert abs(entry.last_used - time.time()) < 60 and entry.created <= entry.last_used
    as_json = entry.as_dict(CacheStore.of_storage(str(tmp_path)))
    assert as_json["uri"] == first.uri and as_json["complete"] and as_json["created"].endswith("+00:00")


def test_a_job_records_its_use_at_most_every_interval(tmp_path, tokenizer):
    _, report = build(tmp_path, tokenizer)
    marker = Path(report.uri) / LAST_USED_FILE
    assert marker.exists()  # a build is a use
    old = time.time() - USE_RECORD_EVERY_S - 60
    os.utime(marker, (old, old))
    assert build(tmp_path, tokenizer)[1].reused
    assert time.time() - marker.stat().st_mtime < 60  # rewritten: the last record was older than the interval
    recent = time.time() - 30
    os.utime(marker, (recent, recent))
    build(tmp_path, tokenizer)
    assert marker.stat().st_mtime == pytest.approx(recent)  # within the interval: not rewritten


def test_max_size_evicts_least_recently_used_first_and_keeps_recent_ones(tmp_path, tokenizer):
    reports = [build(tmp_path, tokenizer, n)[1] for n in (16, 32, 64, 128)]
    for report, ago in zip(reports, (2 * HOUR, 3 * DAY, 10 * 60, DAY)):
        used_ago(report.uri, ago)
    store = CacheStore.of_storage(str(tmp_path))
    sizes = {e.key: e.size for e in list_caches(store)}
    # Room for two: the 3-day and then the 1-day one go, in that order.
    bound = sizes[reports[0].key] + sizes[reports[2].key]
    report = prune_caches(store, max_bytes=bound)
    assert [r.entry.key for r in report.removed] == [reports[1].key, reports[3].key]
    assert {r.reason for r in report.removed} == {"least recently used"}
    assert report.left_bytes <= bound and report.freed_bytes == sizes[reports[1].key] + sizes[reports[3].key]
    assert {e.key for e in list_caches(store)} == {reports[0].key, reports[2].key}
    # Room for none: the 2-hour one goes, the one used 10 minutes ago stays (a job may be starting on it).
    report = prune_caches(store, max_bytes=0)
    assert [r.entry.key for r in report.removed] == [reports[0].key]
    assert report.kept_recent == [reports[2].key] and 10 * 60 < RECENT_USE_S
    assert [e.key for e in list_caches(store)] == [reports[2].key]


def test_older_than_and_named_keys(tmp_path, tokenizer):
    reports = [build(tmp_path, tokenizer, n)[1] for n in (16, 32, 64)]
    for report, ago in zip(reports, (8 * DAY, 2 * DAY, 5 * 60)):
        used_ago(report.uri, ago)
    store = CacheStore.of_storage(str(tmp_path))
    report = prune_caches(store, older_than=7 * DAY)
    assert [(r.entry.key, r.reason) for r in report.removed] == [(reports[0].key, "unused for 8d")]
    # A key prefix is enough; a named cache goes even when just used.
    report = prune_caches(store, keys=[reports[2].key[:8]])
    assert [(r.entry.key, r.reason) for r in report.removed] == [(reports[2].key, "named")]
    assert [e.key for e in list_caches(store)] == [reports[1].key]
    with pytest.raises(ValueError, match="no cache with that key"):
        prune_caches(store, keys=["ffffffff"], older_than=0)
    assert [e.key for e in list_caches(store)] == [reports[1].key]  # a bad key: nothing removed


def test_dry_run_removes_nothing(tmp_path, tokenizer):
    _, built = build(tmp_path, tokenizer)
    used_ago(built.uri, 30 * DAY)
    store = CacheStore.of_storage(str(tmp_path))
    before = sorted(p.name for p in Path(built.uri).iterdir())
    report = prune_caches(store, older_than=DAY, dry_run=True)
    assert report.dry_run and [r.entry.key for r in report.removed] == [built.key] and report.freed_bytes > 0
    assert sorted(p.name for p in Path(built.uri).iterdir()) == before


def test_builds_in_progress_are_kept_and_abandoned_ones_removed(tmp_path, tokenizer):
    _, built = build(tmp_path, tokenizer)
    root = Path(built.uri).parent
    # A local build's staging folder, and an object-store style folder of shards without its index.json yet.
    staging, uploading = root / ".0123456789abcdef01234567-x1y2", root / "fedcba9876543210fedcba98"
    for folder in (staging, uploading):
        folder.mkdir()
        (folder / "shard-00000.arrow").write_bytes(b"\0" * 1000)
    store = CacheStore.of_storage(str(tmp_path))
    states = {e.path: e.state for e in list_caches(store)}
    assert states == {built.uri: "complete", str(staging): "building", str(uploading): "building"}
    report = prune_caches(store, older_than=0, max_bytes=0)
    assert [r.entry.key for r in report.removed] == [built.key]
    assert staging.exists() and uploading.exists()
    with pytest.raises(ValueError, match="being built"):
        prune_caches(store, keys=["fedcba98"])
    stale = time.time() - BUILD_GRACE_S - 60
    for folder in (staging, uploading):
        for path in (folder / "shard-00000.arrow", folder):
            os.utime(path, (stale, stale))
    assert {e.state for e in list_caches(store)} == {"abandoned"}
    report = prune_caches(store)  # no criterion: garbage only
    assert sorted(r.reason for r in report.removed) == ["abandoned build"] * 2
    assert not staging.exists() and not uploading.exists()


def test_a_job_reading_a_removed_cache_keeps_reading(tmp_path, tokenizer):
    cache, built = build(tmp_path, tokenizer)
    samples = CachedSamples(cache)
    first = samples[0]  # mapped now, as a worker's shards are once it reads
    prune_caches(CacheStore.of_storage(str(tmp_path)), keys=[built.key])
    assert not Path(built.uri).exists()
    assert samples[0] == first and len(list(samples)) == 3000
    with pytest.raises(FileNotFoundError):
        TokenCache(built.uri)  # a job starting now finds no cache (and builds it again)


def test_unreadable_storage_is_one_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(CacheStoreError, match="cannot list"):
        list_caches(CacheStore.of_storage(str(tmp_path / "file" / "runs")))


def test_prune_on_s3_removes_objects_and_this_machines_copy(s3_server, tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    storage = f"s3://{s3_server.bucket}/evict"
    caches = [build(storage, tokenizer, n) for n in (32, 64)]
    keep, drop = caches[0][1], caches[1][1]
    CachedSamples(TokenCache(drop.uri))[0]  # a worker here: copies the shards to this machine
    mirror = tmp_path / "home" / "cache" / "tokenized" / drop.key
    assert (mirror / "index.json").exists()
    store = CacheStore.of_storage(storage)
    entries = {e.key: e for e in list_caches(store)}
    assert {k: e.state for k, e in entries.items()} == {keep.key: "complete", drop.key: "complete"}
    assert entries[drop.key].records == 3000 and entries[drop.key].size > 0
    assert entries[drop.key].last_used is not None
    local = {e.key: e.state for e in list_caches(CacheStore.local())}
    assert local == {drop.key: "complete"}

    dry = prune_caches(store, keys=[drop.key], dry_run=True)
    assert dry.mirrors == [str(mirror)] and dry.mirror_bytes > 0
    assert mirror.exists() and s3_server.keys(f"evict/_cache/tokenized/{drop.key}/")
    report = prune_caches(store, keys=[drop.key])
    assert [r.entry.key for r in report.removed] == [drop.key] and report.freed_bytes == entries[drop.key].size
    assert not s3_server.keys(f"evict/_cache/tokenized/{drop.key}/") and not mirror.exists()
    assert [e.key for e in list_caches(store)] == [keep.key]
    with pytest.raises(CacheStoreError, match="no such bucket"):
        list_caches(CacheStore.of_storage("s3://no-such-bucket-here/runs"))
