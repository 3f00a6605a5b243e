"""`lorafleet data prepare`: build (or find) a job's tokenized cache without training; `lorafleet data cache list|prune`:
see the caches of a storage (or this machine's copies of object-store caches) and evict them."""

from __future__ import annotations

import json
import time
from typing import Optional

import click

from lorafleet.cli.console import configure_console
from lorafleet.cli.errors import fail
from lorafleet.cli.jobs import load_or_fail, set_option


@click.group("data")
def data_group() -> None:
    """Data commands: the tokenized cache (`data prepare`, `data cache list|prune`)."""


@data_group.command("prepare")
@click.argument("spec_path", metavar="JOB.yaml", type=click.Path(dir_okay=False))
@set_option
@click.option("--json", "as_json", is_flag=True, help="End stdout with one JSON line: the cache's report.")
@click.option("--verbose", "-v", is_flag=True, help="Show Ray's and Ray Data's logs.")
@click.option("--address", default=None, help="Build on this Ray cluster (auto, HOST:PORT); default: RAY_ADDRESS, "
              "else a Ray instance of its own (not for small local data, built here).")
def prepare_command(spec_path: str, overrides: tuple[str, ...], as_json: bool, verbose: bool,
                    address: Optional[str]) -> None:
    """Read, check and tokenize JOB.yaml's data into the storage's tokenized cache, or find it there already.

    Reports records, tokens, trained tokens, skipped records, how full max_length rows are, the time and the
    cache's location; `submit` then reads the same cache (with data.cache: true or auto).
    """
    configure_console(verbose)
    spec = load_or_fail(spec_path, overrides)
    spec = spec.model_copy(update={"data": spec.data.model_copy(update={"cache": True})})
    from lorafleet.spec import SpecError
    from lorafleet.train.driver import prepare

    started = time.perf_counter()
    try:
        prepared = prepare(spec, address, verbose)
    except SpecError as exc:
        fail(*exc.problems)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    report = dict(prepared.data.report, time_s=round(time.perf_counter() - started, 3))
    how = "reused" if report["reused"] else f"built in {report['build_s']:.1f} s ({report['engine']})"
    click.echo(
        f"lorafleet: data: {report['records']:,} records, {report['samples']:,} samples, {report['tokens']:,} tokens "
        f"({report['target_tokens']:,} trained), {report['skipped']:,} skipped, rows {report['fill']:.1%} full; "
        f"cache {how}: {report['uri']}",
        err=True,
    )
    for line in report["skipped_at"]:
        click.echo(f"lorafleet: data: skipped {line}", err=True)
    if as_json:
        click.echo(json.dumps(report))


@data_group.group("cache")
def cache_group() -> None:
    """The tokenized caches of a storage: list them, evict them."""


def _store_options(command):
    command = click.option("--local", is_flag=True,
                           help="This machine's copies of object-store caches ($LORAFLEET_HOME/cache/tokenized) "
                           "instead of a storage's caches.")(command)
    command = click.option("--job", "job_path", metavar="JOB.yaml", type=click.Path(dir_okay=False), default=None,
                           help="The storage (and checkpoint.endpoint) of this job spec.")(command)
    command = click.option("--storage", metavar="URI", default=None,
                           help="A checkpoint.storage: a local path, s3://bucket/prefix or gs://bucket/prefix; "
                           "default: the jobs' default, $LORAFLEET_HOME/runs.")(command)
    return command


def _store(storage: Optional[str], job_path: Optional[str], local: bool):
    from lorafleet.data.eviction import CacheStore
    from lorafleet.spec.schema import default_storage

    if sum(x is not None and x is not False for x in (storage, job_path, local or None)) > 1:
        fail("--storage, --job and --local: give one of them")
    if local:
        return CacheStore.local()
    if job_path is not None:
        spec = load_or_fail(job_path, ())
        return CacheStore.of_storage(spec.storage_uri, spec.checkpoint.endpoint)
    try:
        return CacheStore.of_storage(storage or default_storage())
    except ValueError as exc:
        fail(f"--storage: {exc}")


@cache_group.command("list")
@_store_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def cache_list_command(storage: Optional[str], job_path: Optional[str], local: bool, as_json: bool) -> None:
    """List the tokenized caches: key, size, records, created, last used, state (complete, building, abandoned) and
    the data they were built from."""
    from lorafleet.data.eviction import CacheStoreError, format_age, format_size, list_caches

    store = _store(storage, job_path, local)
    try:
        entries = list_caches(store)
    except CacheStoreError as exc:
        fail(str(exc))
    total = sum(e.size for e in entries)
    if as_json:
        click.echo(json.dumps({"store": store.uri, "total_bytes": total,
                               "caches": [e.as_dict(store) for e in entries]}))
        return
    now = time.time()
    rows = [("KEY", "SIZE", "RECORDS", "CREATED", "USED", "STATE", "SOURCE")]
    for e in sorted(entries, key=lambda e: -(e.last_used or 0.0)):
        rows.append((e.key, format_size(e.size), "-" if e.records is None else f"{e.records:,}",
                     format_age(None if e.created is None else now - e.created),
                     format_age(None if e.last_used is None else now - e.last_used), e.state, e.source or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows if entries else []:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    click.echo(f"lorafleet: {len(entries)} cache folder(s), {format_size(total)} in {store.uri} "
               "(CREATED and USED: how long ago)", err=True)


@cache_group.command("prune")
@_store_options
@click.option("--older-than", "older_than", metavar="DURATION", default=None,
              help="Remove caches not used for this long: 7d, 12h, 30m, 2w, 1d12h.")
@click.option("--max-size", "max_size", metavar="SIZE", default=None,
              help="Evict the least recently used caches until at most SIZE is left: 20GB, 500MB, 1.5TiB (caches "
              "used in the last hour are kept).")
@click.option("--key", "keys", metavar="KEY", multiple=True, help="Remove this cache (a key or a unique prefix of "
              "one; repeatable).")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: what was removed and the bytes freed.")
def cache_prune_command(storage: Optional[str], job_path: Optional[str], local: bool, older_than: Optional[str],
                        max_size: Optional[str], keys: tuple[str, ...], dry_run: bool, as_json: bool) -> None:
    """Remove tokenized caches: abandoned builds always (incomplete, nothing written for 6 hours; a build in
    progress is never touched), and those named by --key, unused for --older-than, or least recently used beyond
    --max-size. Removing a storage's cache also removes this machine's copy of it; jobs already reading a cache on
    this machine keep reading it (memory-mapped).
    """
    from lorafleet.data.eviction import CacheStoreError, format_size, parse_duration, parse_size, prune_caches

    problems, seconds, limit = [], None, None
    if older_than is not None:
        try:
            seconds = parse_duration(older_than)
        except ValueError as exc:
            problems.append(f"--older-than: {exc}")
    if max_size is not None:
        try:
            limit = parse_size(max_size)
        except ValueError as exc:
            problems.append(f"--max-size: {exc}")
    if problems:
        fail(*problems)
    store = _store(storage, job_path, local)
    try:
        report = prune_caches(store, seconds, limit, keys, dry_run=dry_run)
    except ValueError as exc:
        fail(f"{exc} in {store.uri}")
    except CacheStoreError as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(report.as_dict(store)))
        return
    verb = "would remove" if dry_run else "removed"
    for removal in report.removed:
        entry = removal.entry
        click.echo(f"{verb} {entry.key}  {format_size(entry.size)}  {entry.state}  ({removal.reason})  "
                   f"{entry.source or ''}".rstrip())
    for mirror in report.mirrors:
        click.echo(f"{verb} this machine's copy {mirror}")
    freed = report.freed_bytes + report.mirror_bytes
    click.echo(f"lorafleet: {verb} {len(report.removed)} cache folder(s), {format_size(freed)} freed; "
               f"{format_size(report.left_bytes)} left in {store.uri}", err=True)
    if report.kept_recent:
        click.echo(f"lorafleet: still over --max-size {max_size}: kept {len(report.kept_recent)} cache(s) used in "
                   "the last hour or being built", err=True)


COMMANDS = (data_group,)
