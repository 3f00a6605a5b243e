"""`lorafleet sweep`: a hyperparameter search over a job on Ray Tune (lorafleet.sweep)."""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any, Optional

import click

from lorafleet.cli.console import configure_console
from lorafleet.cli.errors import fail
from lorafleet.cli.jobs import set_option


def _table(summary) -> str:
    """The trials, best first: one row each."""
    rows = [("trial", "status", summary.metric, "steps", "params")]
    for t in summary.trials:
        value = f"{t.metric:.4f}" if t.metric is not None else "-"
        params = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
        rows.append((t.trial, t.status, value, str(t.steps), params))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows)


@click.command()
@click.argument("sweep_path", metavar="SWEEP.yaml", type=click.Path(dir_okay=False))
@set_option
@click.option("--json", "as_json", is_flag=True, help="End stdout with one JSON summary line.")
@click.option("--verbose", "-v", is_flag=True, help="Show Ray's, Tune's, the workers' and the libraries' logs.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted sweep (re-running the same sweep continues it anyway); refused if none.")
@click.option("--fresh", is_flag=True, help="Delete this sweep's earlier trials in storage and start over.")
@click.option("--address", default=None, metavar="ADDRESS",
              help="http://HEAD:8265: hand the sweep to that cluster's Jobs API (status, logs, list, stop and pull "
              "work on its job id). HOST:PORT or auto: run the trials on that Ray cluster from here. Default: "
              "RAY_ADDRESS, else a Ray instance started for this sweep alone.")
@click.option("--wait", is_flag=True,
              help="With a Jobs API address: follow the sweep to the end (default: print its job id).")
def sweep(
    sweep_path: str, overrides: tuple[str, ...], as_json: bool, verbose: bool, resume: bool, fresh: bool,
    address: Optional[str], wait: bool,
) -> None:
    """Search hyperparameters of a job: SWEEP.yaml is a job spec plus a `sweep:` section.

    Every trial is an ordinary run in <storage>/<name>/trial-NNN; ASHA stops trials that fall behind at their
    evaluations. At the end: the trials ranked by the metric, and where the best adapter is.
    """
    configure_console(verbose)
    from lorafleet.spec import SpecError
    from lorafleet.sweep.space import load_sweep

    if resume and fresh:
        fail("--resume: cannot be given with --fresh")
    try:
        definition = load_sweep(sweep_path, overrides)
    except SpecError as exc:
        fail(*exc.problems)
    from lorafleet.remote.client import remote_address

    if remote_address(address) is not None:
        if fresh or resume:
            fail(f"--{'fresh' if fresh else 'resume'}: not available with a Jobs API address (submitting the same "
                 "sweep again continues it; delete its storage folder to start over)")
        return _submit_sweep(definition, address, wait, as_json)
    if wait:
        fail("--wait: needs a Jobs API address (--address http://HEAD:8265 or RAY_ADDRESS); a local sweep always waits")
    from lorafleet.sweep.runner import TermAsInterrupt, run_sweep

    section = definition.section
    click.echo(
        f"lorafleet: {definition.name}: sweep of {section.num_samples} sample(s) over {', '.join(definition.spaces)}, "
        f"by {section.metric} ({definition.mode}), scheduler {section.scheduler}, storage {definition.storage_uri}",
        err=True,
    )
    stop = TermAsInterrupt()
    try:
        with stop:
            summary = run_sweep(definition, address=address, resume=resume, fresh=fresh, verbose=verbose)
    except SpecError as exc:
        fail(*exc.problems)
    except KeyboardInterrupt:
        click.echo(f"lorafleet: {definition.name}: interrupted; run the same command to continue the sweep", err=True)
        sys.exit(stop.exit_code)
    _end_lines(summary, as_json, stop.exit_code)


def _end_lines(summary: Any, as_json: bool, interrupted_code: int, extra: Optional[dict] = None) -> None:
    """The table, the best trial and its adapter, the `--json` line and the exit code, for a local or remote sweep."""
    click.echo(_table(summary), err=True)
    if summary.status == "interrupted":
        click.echo(f"lorafleet: {summary.sweep}: interrupted; run the same command to continue the sweep", err=True)
    elif summary.best is not None:
        click.echo(f"lorafleet: {summary.sweep}: best {summary.best['trial']} ({summary.metric} "
                   f"{summary.best['metric']:.4f})", err=True)
        click.echo(f"adapter: {summary.best['adapter_uri']}", err=as_json)
    else:
        click.echo(f"error: {summary.sweep}: no trial finished", err=True)
    if as_json:
        click.echo(json.dumps({**summary.to_dict(), **(extra or {})}))
    if summary.status == "interrupted":
        sys.exit(interrupted_code)
    if summary.status != "succeeded":
        sys.exit(1)


def _submit_sweep(definition: Any, address: Optional[str], wait: bool, as_json: bool) -> None:
    """`lorafleet sweep SWEEP.yaml --address http://...`: submit the sweep as a Jobs API job, optionally follow it.

    Without `--wait` stdout is the job id (or `{"job_id": ...}` with `--json`); with `--wait` the trials' progress
    lines, the table and the `--json` summary are those of a local sweep, plus `job_id`.
    """
    from lorafleet.cli.remote import _guard
    from lorafleet.remote.client import submit_remote_sweep
    from lorafleet.sweep.runner import SweepSummary

    def submitted(job_id: str) -> None:
        click.echo(f"lorafleet: {definition.name}: submitted as {job_id} to "
                   f"{address or os.environ.get('RAY_ADDRESS')}", err=True)

    def line(text: str) -> None:
        if text.startswith(("lorafleet:", "error:", "Traceback")):
            click.echo(text, err=True)

    result = _guard(submit_remote_sweep, definition, address, wait=wait, on_line=line if wait else None,
                    on_submitted=submitted)
    if not wait:
        click.echo(f"lorafleet: follow it with: lorafleet logs {result['job_id']} --follow", err=True)
        click.echo(json.dumps(result) if as_json else result["job_id"])
        return
    if "trials" not in result:
        click.echo(f"error: {definition.name}: remote sweep {result['status'].lower()}: {result.get('error')}",
                   err=True)
        sys.exit(1)
    summary = SweepSummary.from_dict({**result, "status": result.get("sweep_status", "failed")})
    # Stopped on the cluster (`lorafleet stop`): Ray's job supervisor sent SIGTERM.
    _end_lines(summary, as_json, 128 + signal.SIGTERM, extra={"job_id": result["job_id"]})


COMMANDS = (sweep,)
