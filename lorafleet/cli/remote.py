"""Remote-job and monitoring commands: `status`, `logs`, `list`, `stop`, `pull`, `report`.

`lorafleet submit --address http://HEAD:8265` dispatches to [`submit_remote_command`]. Like the rest of the CLI, heavy modules (Ray, PEFT) are imported inside the commands, user
errors are one `error: ...` line on stderr with exit code 2, and stdout carries only results.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import click

from lorafleet.cli.errors import UsageError


def _remote_client(address: Optional[str]):
    from lorafleet.remote.client import RemoteClient, RemoteError

    try:
        return RemoteClient(address)
    except RemoteError as exc:
        raise UsageError(str(exc)) from None


def _guard(fn, *args, **kwargs):
    """Call `fn`, turning a [`~lorafleet.remote.RemoteError`] into the CLI's one-line exit-2 refusal."""
    from lorafleet.remote.client import RemoteError

    try:
        return fn(*args, **kwargs)
    except RemoteError as exc:
        raise UsageError(str(exc)) from None


address_option = click.option(
    "--address",
    default=None,
    metavar="URL",
    help="Ray dashboard URL of the cluster, e.g. http://HEAD:8265 (default: RAY_ADDRESS). "
    "The auth token comes from RAY_AUTH_TOKEN or ~/.ray/auth_token.",
)


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON result on stdout.")


def _done_lines(result: dict[str, Any], as_json: bool) -> None:
    """The end-of-run lines, worded as a local `lorafleet submit` words them."""
    name = result.get("job") or result.get("job_id")
    if result.get("status") == "SUCCEEDED":
        if result.get("first_loss") is not None:
            click.echo(f"lorafleet: {name}: done, loss {result['first_loss']:.4f} -> {result['final_loss']:.4f}", err=True)
        click.echo(f"adapter: {result.get('adapter_uri')}", err=as_json)
    else:
        click.echo(f"error: {name}: remote job {str(result.get('status')).lower()}: {result.get('error')}", err=True)


def submit_remote_command(spec: Any, address: Optional[str], wait: bool, as_json: bool) -> None:
    """What `lorafleet submit JOB.yaml --address http://...` does: submit, print the job id, optionally follow.

    Without `--wait` stdout is the job id (or, with `--json`, `{"job_id": ...}`). With `--wait` the progress view,
    end-of-run lines and `--json` summary match a local run's; the exit code is 1 if the remote run failed.

    Args:
        spec ([`~lorafleet.spec.JobSpec`]):
            The validated spec.
        address (`str`, *optional*):
            The dashboard URL (`--address`); defaults to `RAY_ADDRESS`.
        wait (`bool`):
            Follow the job until it ends.
        as_json (`bool`):
            End stdout with one JSON line.

    Example:

    ```python
    >>> from lorafleet.spec import load_spec
    >>> submit_remote_command(load_spec("jobs/llama.yaml"), "http://127.0.0.1:8265", wait=False, as_json=True)  # doctest: +SKIP
    {"job_id": "lorafleet-llama-tasks-1a2b3c4d", ...}
    ```
    """
    from lorafleet.cli.progress import ProgressView
    from lorafleet.remote.client import submit_remote

    view = None

    def submitted(job_id: str) -> None:
        nonlocal view
        # Said only once the cluster accepted the job, so a refusal stays the only line on stderr.
        click.echo(
            f"lorafleet: {spec.name}: submitted as {job_id} to {address or os.environ.get('RAY_ADDRESS')}: "
            f"{spec.scaling.num_workers} worker(s), {spec.training.steps} steps, storage {spec.checkpoint.storage or 'cluster default'}",
            err=True,
        )
        if wait:
            view = ProgressView(spec.name, spec.training.steps)

    def submitted_line(line: str) -> None:
        # Only the job's own complaints are worth showing while the progress view runs.
        if line.startswith(("error:", "Traceback")) or "Error" in line.split(":", 1)[0]:
            click.echo(line, err=True)

    try:
        result = _guard(
            submit_remote,
            spec,
            address,
            wait=wait,
            on_progress=lambda metrics: view.update(metrics),
            on_line=submitted_line if wait else None,
            on_submitted=submitted,
        )
    finally:
        if view is not None:
            view.close()
    if not wait:
        click.echo(f"lorafleet: follow it with: lorafleet logs {result['job_id']} --follow", err=True)
        click.echo(json.dumps(result) if as_json else result["job_id"])
        return
    _done_lines(result, as_json)
    if as_json:
        click.echo(json.dumps(result))
    if result.get("status") != "SUCCEEDED":
        sys.exit(1)


@click.command()
@click.argument("job_id")
@address_option
@json_option
def status(job_id: str, address: Optional[str], as_json: bool) -> None:
    """Show a remote job's status (and, once it has finished, its loss and adapter)."""
    client = _remote_client(address)
    info = _guard(client.info, job_id)
    summary = _guard(client.summary, job_id) or {}
    if as_json:
        click.echo(json.dumps({**info, "summary": summary or None}))
        return
    line = f"{info['job_id']}  {info['status']}  job {info['job'] or '-'}"
    if summary.get("first_loss") is not None:
        line += f"  loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f} ({summary.get('steps')} steps)"
    click.echo(line)
    if summary.get("adapter_uri"):
        click.echo(f"adapter: {summary['adapter_uri']}")
    if info["status"] in ("FAILED", "STOPPED") and (summary.get("error") or info["message"]):
        click.echo(f"reason: {summary.get('error') or info['message']}")


@click.command()
@click.argument("job_id")
@address_option
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the job ends.")
def logs(job_id: str, address: Optional[str], follow: bool) -> None:
    """Print a remote job's logs (the cluster-side driver's stdout and stderr)."""
    client = _remote_client(address)
    if not follow:
        click.echo(_guard(client.logs, job_id), nl=False)
        return
    final = _guard(client.follow, job_id, on_line=lambda line: click.echo(line), raw=True)
    click.echo(f"lorafleet: {job_id}: {final['status']}", err=True)


@click.command("list")
@address_option
@json_option
@click.option("--all", "show_all", is_flag=True, help="Also list jobs that lorafleet did not submit.")
def list_jobs(address: Optional[str], as_json: bool, show_all: bool) -> None:
    """List the cluster's lorafleet jobs, newest first."""
    client = _remote_client(address)
    rows = [r for r in _guard(client.list) if show_all or r["job"]]
    if as_json:
        click.echo(json.dumps(rows))
        return
    if not rows:
        click.echo("no jobs", err=True)
        return
    import datetime

    for row in rows:
        started = (
            datetime.datetime.fromtimestamp(row["start_time"] / 1000).strftime("%Y-%m-%d %H:%M:%S")
            if row["start_time"]
            else "-"
        )
        click.echo(f"{row['job_id']}\t{row['status']}\t{row['job'] or '-'}\t{started}")


@click.command()
@click.argument("job_id")
@address_option
def stop(job_id: str, address: Optional[str]) -> None:
    """Stop a remote job (its last checkpoint stays in storage; resubmitting the same spec resumes from it)."""
    client = _remote_client(address)
    if _guard(client.stop, job_id):
        click.echo(f"stopping {job_id}")
    else:
        click.echo(f"{job_id} had already finished ({_guard(client.info, job_id)['status']})")


@click.command()
@click.argument("job_id")
@click.argument("dest", type=click.Path(file_okay=False))
@address_option
@json_option
def pull(job_id: str, dest: str, address: Optional[str], as_json: bool) -> None:
    """Download a finished job's adapter into DEST (a PEFT adapter directory) and check that it loads."""
    from lorafleet.remote.client import pull_adapter

    result = _guard(pull_adapter, job_id, dest, address)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"{result['dest']}  ({result['tensors']} tensors from {result['adapter_uri']})")


@click.command()
@click.argument("job")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Spec overrides, as for submit.")
@click.option("--storage", default=None, help="Run storage to look in when JOB is a job name (default: $LORAFLEET_HOME/runs).")
@address_option
@json_option
def report(job: str, overrides: tuple[str, ...], storage: Optional[str], address: Optional[str], as_json: bool) -> None:
    """Show where a run's metrics.jsonl and loss.png are, and its loss.

    JOB is a job spec (JOB.yaml, with the same --set overrides as submit), a job name (looked up in --storage), or,
    with --address, a remote job id.
    """
    from lorafleet.remote.client import remote_address

    if remote_address(address) is not None:
        client = _remote_client(address)
        summary = _guard(client.summary, job)
        if not summary or not summary.get("metrics_uri"):
            raise UsageError(f"job '{job}' has not finished a run yet (see `lorafleet status {job}`)")
        out = {
            "job": summary.get("job"),
            "run_dir": summary["metrics_uri"].rsplit("/", 1)[0],
            "metrics": summary["metrics_uri"],
            "plot": summary["plot_uri"],
            "steps": summary.get("steps"),
            "first_loss": summary.get("first_loss"),
            "final_loss": summary.get("final_loss"),
            **{k: summary[k] for k in ("eval_loss", "best_eval_loss", "best_step", "best_adapter_uri", "stopped_early")
               if summary.get(k) is not None},
        }
    else:
        out = _local_report(job, overrides, storage)
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"run:     {out['run_dir']}")
    click.echo(f"metrics: {out['metrics']}")
    click.echo(f"plot:    {out['plot']}")
    if out.get("first_loss") is not None:
        click.echo(f"loss:    {out['first_loss']:.4f} -> {out['final_loss']:.4f} over {out['steps']} steps")
    if out.get("eval_loss") is not None:
        best = f", best {out['best_eval_loss']:.4f} at step {out['best_step']}" if out.get("best_step") else ""
        click.echo(f"eval:    {out['eval_loss']:.4f} (held-out loss, last){best}")
    if out.get("stopped_early"):
        click.echo(f"stopped: early, at step {out['steps']} (eval.early_stopping_patience)")
    if out.get("best_adapter_uri"):
        click.echo(f"best:    {out['best_adapter_uri']} (the kept adapter with the lowest held-out loss)")


def _local_report(job: str, overrides: tuple[str, ...], storage: Optional[str]) -> dict[str, Any]:
    from lorafleet.runstore.location import RunLocation
    from lorafleet.runstore.monitoring import eval_summary, read_metrics
    from lorafleet.spec import SpecError, load_spec, lorafleet_home
    from lorafleet.spec.schema import _NAME_RE

    endpoint = None
    if job.endswith((".yaml", ".yml")) or Path(job).is_file():
        try:
            spec = load_spec(job, overrides)
        except SpecError as exc:
            raise UsageError(*exc.problems) from None
        name, storage_uri, endpoint = spec.name, storage or spec.storage_uri, spec.checkpoint.endpoint
    else:
        if not _NAME_RE.match(job):
            raise UsageError(f"'{job}' is neither a job spec file nor a job name")
        name, storage_uri = job, storage or str(lorafleet_home() / "runs")
    location = RunLocation(storage_uri, name, endpoint)
    try:
        records = read_metrics(location)
    except OSError as exc:
        raise UsageError(f"cannot read run storage {storage_uri}: {str(exc).splitlines()[0]}") from None
    if not records:
        raise UsageError(f"no metrics for job '{name}' in {storage_uri} (has it run? pass --storage if elsewhere)")
    out = {
        "job": name,
        **location.artifacts(),
        "steps": records[-1]["step"],
        "first_loss": records[0]["loss"],
        "final_loss": records[-1]["loss"],
        **eval_summary(records),
    }
    if records[-1].get("stopped_early"):
        out["stopped_early"] = True
    if "eval_loss" in out:
        best = _best_adapter(location)
        if best is not None:
            out["best_adapter_uri"] = best
    return out


def _best_adapter(location) -> Optional[str]:
    """The kept checkpoint with the lowest held-out loss its `lorafleet.json` records (`eval_loss`), the earliest on
    ties; `None` when none records one. One small file per kept checkpoint (`checkpoint.keep` + 1 at most)."""
    import math

    from lorafleet.runstore.checkpoint import INFO_FILE

    best = None
    for path in location.checkpoint_dirs():
        try:
            with location.filesystem.open_input_stream(f"{path}/{INFO_FILE}") as stream:
                info = json.loads(stream.read())
        except (OSError, ValueError):
            continue
        loss = info.get("eval_loss") if isinstance(info, dict) else None
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            key = (loss, int(info.get("step", 0)))
            if best is None or key < best[0]:
                best = (key, path)
    return location.display_uri(best[1]) if best is not None else None


COMMANDS = (status, logs, list_jobs, stop, pull, report)
