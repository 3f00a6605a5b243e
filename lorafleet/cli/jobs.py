"""Job commands that run here: `submit` (or hand a job to a cluster), `validate` and `spec-doc`."""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, Optional

import click

from lorafleet.cli.console import configure_console
from lorafleet.cli.errors import fail
from lorafleet.cli.progress import ProgressView
from lorafleet.cli.remote import submit_remote_command

if TYPE_CHECKING:  # the driver (and Ray, torch) is imported only when a run starts: `lorafleet --help` stays fast
    from lorafleet.train.driver import RunSummary


def load_or_fail(spec_path: str, overrides: tuple[str, ...]):
    """The validated spec, or the command refused with every problem of the spec, one line each."""
    # Imported here: the spec schema costs ~175 ms to import, three times all of `lorafleet --help`.
    from lorafleet.spec import SpecError, load_spec

    try:
        return load_spec(spec_path, overrides)
    except SpecError as exc:
        fail(*exc.problems)


class StopOnSignal:
    """While a local run trains: Ctrl-C (SIGINT) and SIGTERM stop it cleanly instead of killing the command.

    The first signal raises `KeyboardInterrupt` in the main thread, which [`~lorafleet.train.driver.run_job`] turns
    into a clean stop (workers stopped, Ray shut down, the run's lease released) and an `interrupted` summary; the
    signal is kept for the exit code (128 + its number: 130 for SIGINT, 143 for SIGTERM). A second signal while the
    run stops ends the command at once, leaving that cleanup undone (Ray reaps its own processes; the lease goes stale).

    Args:
        job (`str`):
            The job's name, for the line a second signal prints.

    Example:

    ```python
    >>> with StopOnSignal("demo") as stop:
    ...     try:
    ...         os.kill(os.getpid(), signal.SIGTERM)
    ...     except KeyboardInterrupt:
    ...         print("stopping")
    stopping
    >>> stop.exit_code
    143
    ```
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, job: str):
        self.job = job
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    @property
    def exit_code(self) -> int:
        """128 + the signal received (130 when the interrupt came some other way)."""
        return 128 + (self.signum or signal.SIGINT)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            raise KeyboardInterrupt
        os.write(2, f"lorafleet: {self.job}: second signal: exiting without cleaning up\n".encode())
        os._exit(128 + signum)

    def __enter__(self) -> StopOnSignal:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


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
    metavar="ADDRESS",
    help="Where the job runs. http://HEAD:8265: hand it to that cluster's Jobs API. HOST:PORT or auto: join that "
    "Ray cluster from here (said in one line); this shell's storage settings (AWS_*, STORAGE_EMULATOR_HOST, "
    "GOOGLE_APPLICATION_CREDENTIALS) go to its workers in the job's runtime environment. Default: RAY_ADDRESS, "
    "else a Ray instance started for this job alone, never one already running here (ray start).",
)
@click.option("--wait", is_flag=True,
              help="With a Jobs API address: follow the job to the end (default: print its id).")
def submit(
    spec_path: str, overrides: tuple[str, ...], as_json: bool, verbose: bool, fresh: bool, address: Optional[str],
    wait: bool,
) -> None:
    """Validate JOB.yaml and run it on Ray Train until it finishes (or hand it to a cluster with --address).

    Re-submitting a job with the same name and storage continues from its latest checkpoint, unless its data
    changed since (refused; --fresh starts over). Storage that cannot be written is refused before anything starts.
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
    import psutil

    from lorafleet.spec import SpecError
    from lorafleet.train.cluster import start_ray_in_background, stop_background_ray
    from lorafleet.train.timings import PhaseClock

    # From the process's start: the interpreter's and the imports' seconds are part of what a user waits for.
    clock = PhaseClock(started=psutil.Process().create_time())

    view = ProgressView(spec.name, spec.training.steps)
    stop = StopOnSignal(spec.name)
    try:
        with stop:
            # The run's own Ray instance boots while this process imports torch and runs the pre-flight checks. Its
            # start keeps the signal handlers just installed; a refusal stops it again.
            start_ray_in_background(address, verbose)
            from lorafleet.train.driver import run_job

            click.echo(
                f"lorafleet: {spec.name}: {spec.scaling.num_workers} worker(s), {spec.scaling.strategy}, "
                f"{spec.training.steps} steps, storage {spec.storage_uri}",
                err=True,
            )
            clock.lap("command_start")
            summary = run_job(spec, address=address, on_progress=view.update, verbose=verbose, fresh=fresh,
                              clock=clock)
    except SpecError as exc:
        stop_background_ray()
        fail(*exc.problems)
    except KeyboardInterrupt:
        # Before training started or after it ended: the run's checkpoints are as they were.
        view.close()
        click.echo(f"lorafleet: {spec.name}: interrupted; re-submit the same command to resume", err=True)
        sys.exit(stop.exit_code)
    finally:
        view.close()
    if summary.status == "interrupted":
        where = f"at step {summary.steps}" if summary.steps else "before its first step"
        resume = (
            f"resume from step {summary.resume_step}"
            if summary.resume_step
            else "start over (no checkpoint was complete yet)"
        )
        click.echo(f"lorafleet: {spec.name}: interrupted {where}; re-submit the same command to {resume}", err=True)
        if as_json:
            click.echo(json.dumps(summary.to_dict()))
        sys.exit(stop.exit_code)
    if summary.skipped_records:
        click.echo(f"lorafleet: {spec.name}: skipped {summary.skipped_records:,} bad record(s) "
                   f"(data.on_bad_record: skip), first: {summary.skipped_at[0]}", err=True)
    # One line per distinct reason a fused path was left unfused (the same reason usually holds for every layer).
    for reason in dict.fromkeys(line.split("): ", 1)[-1] for line in summary.kernels_skipped):
        click.echo(f"lorafleet: {spec.name}: not fused: {reason}", err=True)
    if summary.status == "succeeded":
        stopped = f", stopped early at step {summary.steps}" if summary.stopped_early else ""
        click.echo(
            f"lorafleet: {spec.name}: done, loss {summary.first_loss:.4f} -> {summary.final_loss:.4f}{stopped}"
            if summary.first_loss is not None
            else f"lorafleet: {spec.name}: already complete{stopped}",
            err=True,
        )
        if summary.eval_exact_match is not None or summary.eval_contains is not None:
            click.echo(f"lorafleet: {spec.name}: held-out answers: {_scores(summary)}", err=True)
        click.echo(f"adapter: {summary.adapter_uri}", err=as_json)
        if summary.best_adapter_uri and summary.best_adapter_uri != summary.adapter_uri:
            # On stderr: stdout stays the one result line (the latest adapter) scripts read.
            click.echo(f"lorafleet: {spec.name}: best adapter (lowest held-out loss): {summary.best_adapter_uri}",
                       err=True)
    else:
        click.echo(f"error: {spec.name}: run failed: {summary.error}", err=True)
    if as_json:
        click.echo(json.dumps(summary.to_dict()))
    if summary.status != "succeeded":
        sys.exit(1)


def _scores(summary: RunSummary) -> str:
    """`eval.generate`'s scores at the end of a run, the base model's first: "exact match 0% -> 45%, contains ..."."""
    parts = []
    for name, label in (("exact_match", "exact match"), ("contains", "contains")):
        after = getattr(summary, f"eval_{name}")
        if after is not None:
            before = getattr(summary, f"base_{name}")
            parts.append(f"{label} {before:.0%} -> {after:.0%}" if before is not None else f"{label} {after:.0%}")
    return ", ".join(parts)


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
