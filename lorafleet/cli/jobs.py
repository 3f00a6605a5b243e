"""Job commands that run here: `submit` (or hand a job to a cluster), `validate` and `spec-doc`."""

from __future__ import annotations

import json
import sys
from typing import Optional

import click

from lorafleet.cli.console import configure_console
from lorafleet.cli.errors import fail
from lorafleet.cli.progress import ProgressView
from lorafleet.cli.remote import submit_remote_command


def load_or_fail(spec_path: str, overrides: tuple[str, ...]):
    """The validated spec, or the command refused with every problem of the spec, one line each."""
    # Imported here: the spec schema costs ~175 ms to import, three times all of `lorafleet --help`.
    from lorafleet.spec import SpecError, load_spec

    try:
        return load_spec(spec_path, overrides)
    except SpecError as exc:
        fail(*exc.problems)


set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY.PATH=VALUE",
    help="Override a spec field (repeatable), e.g. --set training.steps=20. Validated like the file.",
)


@click.command()
@click.argument("spec_path", metavar="JOB.yaml", type=click.Path(dir_okay=False))
@set_option
@click.option("--json", "as_json", is_flag=True, help="End stdout with one JSON summary line.")
@click.option("--verbose", "-v", is_flag=True, help="Show Ray's, the workers' and the libraries' logs.")
@click.option("--fresh", is_flag=True,
              help="Delete this job's earlier run in storage and start over instead of resuming.")
@click.option(
    "--address",
    default=None,
    metavar="URL",
    help="Submit through the Jobs API of the cluster whose dashboard is at URL (http://HEAD:8265); "
    "default: RAY_ADDRESS when it is such a URL, else run here.",
)
@click.option("--wait", is_flag=True,
              help="With a Jobs API address: follow the job to the end (default: print its id).")
def submit(
    spec_path: str, overrides: tuple[str, ...], as_json: bool, verbose: bool, fresh: bool, address: Optional[str],
    wait: bool,
) -> None:
    """Validate JOB.yaml and run it on Ray Train until it finishes (or hand it to a cluster with --address).

    Re-submitting a job with the same name and storage continues from its latest checkpoint.
    """
    configure_console(verbose)
    spec = load_or_fail(spec_path, overrides)
    from lorafleet.remote.client import remote_address

    if remote_address(address) is not None:
        if fresh:
            fail("--fresh: not available with --address (delete the run's storage folder instead)")
        return submit_remote_command(spec, address, wait, as_json)
    if wait:
        fail("--wait: needs a Jobs API address (--address http://HEAD:8265 or RAY_ADDRESS); a local run always waits")
    from lorafleet.spec import SpecError
    from lorafleet.train.driver import run_job

    view = ProgressView(spec.name, spec.training.steps)
    click.echo(
        f"lorafleet: {spec.name}: {spec.scaling.num_workers} worker(s), {spec.scaling.strategy}, "
        f"{spec.training.steps} steps, storage {spec.storage_uri}",
        err=True,
    )
    try:
        summary = run_job(spec, on_progress=view.update, verbose=verbose, fresh=fresh)
    except SpecError as exc:
        fail(*exc.problems)
    finally:
        view.close()
    if summary.status == "succeeded":
        click.echo(
            f"lorafleet: {spec.name}: done, loss {summary.first_loss:.4f} -> {summary.final_loss:.4f}"
            if summary.first_loss is not None
            else f"lorafleet: {spec.name}: already complete",
            err=True,
        )
        click.echo(f"adapter: {summary.adapter_uri}", err=as_json)
    else:
        click.echo(f"error: {spec.name}: run failed: {summary.error}", err=True)
    if as_json:
        click.echo(json.dumps(summary.to_dict()))
    if summary.status != "succeeded":
        sys.exit(1)


@click.command()
@click.argument("spec_path", metavar="JOB.yaml", type=click.Path(dir_okay=False))
@set_option
def validate(spec_path: str, overrides: tuple[str, ...]) -> None:
    """Check JOB.yaml (and overrides) and print the resolved spec as JSON."""
    spec = load_or_fail(spec_path, overrides)
    click.echo(spec.model_dump_json(indent=2))


@click.command("spec-doc")
def spec_doc() -> None:
    """Print the Markdown reference of every job-spec field (the tables in jobs/README.md)."""
    from lorafleet.spec.reference import spec_reference

    click.echo(spec_reference())


COMMANDS = (submit, validate, spec_doc)
