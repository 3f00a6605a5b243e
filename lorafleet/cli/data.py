"""`lorafleet data prepare`: build (or find) a job's tokenized cache without training."""

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
    """Data commands: the tokenized cache (`data prepare`)."""


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


COMMANDS = (data_group,)
