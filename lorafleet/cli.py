"""The `lorafleet` command line.

Commands only parse arguments and import their implementation lazily, so `--help` and spec errors are instant.
stdout carries results (the `--json` line); progress and errors go to stderr. Exit codes: 0 success, 1 the run
failed, 2 bad input (a one-line message naming the field; nothing was started).
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import click

from . import __version__


class _Exit(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = 2) -> None:
    """Stop the command with `error: <message>` on stderr and exit `code` (2: bad input)."""
    raise _Exit(message, code)


def _load(spec_path: str, overrides: tuple[str, ...]):
    from .spec import SpecError, load_spec

    try:
        return load_spec(spec_path, overrides)
    except SpecError as exc:
        fail(str(exc))


set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY.PATH=VALUE",
    help="Override a spec field (repeatable), e.g. --set training.steps=20. Validated like the file.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lorafleet")
def cli() -> None:
    """Distributed LoRA/QLoRA fine-tuning on Ray."""


@cli.command()
@click.argument("spec_path", metavar="JOB.yaml", type=click.Path(dir_okay=False))
@set_option
@click.option("--json", "as_json", is_flag=True, help="End stdout with one JSON summary line.")
@click.option("--verbose", "-v", is_flag=True, help="Show Ray's and the workers' logs.")
@click.option("--fresh", is_flag=True, help="Delete this job's earlier run in storage and start over instead of resuming.")
@click.option(
    "--address",
    default=None,
    metavar="URL",
    help="Submit through the Jobs API of the cluster whose dashboard is at URL (http://HEAD:8265); "
    "default: RAY_ADDRESS when it is such a URL, else run here.",
)
@click.option("--wait", is_flag=True, help="With a Jobs API address: follow the job to the end (default: print its id).")
def submit(
    spec_path: str, overrides: tuple[str, ...], as_json: bool, verbose: bool, fresh: bool, address: Optional[str], wait: bool
) -> None:
    """Validate JOB.yaml and run it on Ray Train until it finishes (or hand it to a cluster with --address).

    Re-submitting a job with the same name and storage continues from its latest checkpoint.
    """
    spec = _load(spec_path, overrides)
    from .remote import remote_address

    if remote_address(address) is not None:
        if fresh:
            fail("--fresh: not available with --address (delete the run's storage folder instead)")
        from .cli_remote import submit_remote_command

        return submit_remote_command(spec, address, wait, as_json)
    if wait:
        fail("--wait: needs a Jobs API address (--address http://HEAD:8265 or RAY_ADDRESS); a local run always waits")
    from .driver import run_job
    from .progress import ProgressView
    from .spec import SpecError

    view = ProgressView(spec.name, spec.training.steps)
    click.echo(
        f"lorafleet: {spec.name}: {spec.scaling.num_workers} worker(s), {spec.scaling.strategy}, "
        f"{spec.training.steps} steps, storage {spec.storage_uri}",
        err=True,
    )
    try:
        summary = run_job(spec, on_progress=view.update, verbose=verbose, fresh=fresh)
    except SpecError as exc:
        fail(str(exc))
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


@cli.command()
@click.argument("spec_path", metavar="JOB.yaml", type=click.Path(dir_okay=False))
@set_option
def validate(spec_path: str, overrides: tuple[str, ...]) -> None:
    """Check JOB.yaml (and overrides) and print the resolved spec as JSON."""
    spec = _load(spec_path, overrides)
    click.echo(spec.model_dump_json(indent=2))


@cli.command("spec-doc")
def spec_doc() -> None:
    """Print the Markdown reference of every job-spec field (the tables in jobs/README.md)."""
    from .spec import spec_reference

    click.echo(spec_reference())


# Command groups that live next to their implementation register themselves here.
from .cli_generate import register as _register_generate  # noqa: E402  (generate, merge)
from .cli_remote import register as _register_remote  # noqa: E402  (status, logs, list, stop, pull, report)

_register_generate(cli)
_register_remote(cli)


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point: run the CLI, turning refusals into one stderr line and an exit code."""
    try:
        cli.main(args=argv, prog_name="lorafleet", standalone_mode=False)
    except _Exit as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
