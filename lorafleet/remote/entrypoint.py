"""The cluster side of a remote job: `python -m lorafleet.remote.entrypoint spec.json` runs a shipped spec, and
`... sweep.json` a shipped sweep.

[`~lorafleet.remote.client.RemoteClient.submit`] ships the spec and its data in the job's `working_dir` and makes
this module the entrypoint. It runs the job with [`~lorafleet.train.driver.run_job`] and prints one
`LORAFLEET_STEP {...}` line per step and a final `LORAFLEET_SUMMARY {...}` line, which the client reads back from
the job's logs. A sweep ([`~lorafleet.remote.client.RemoteClient.submit_sweep`]) runs with
[`~lorafleet.sweep.runner.run_sweep`]: one `lorafleet: NAME: [trial-NNN] ...` line per trial event, then the sweep's
summary line. A bad spec is one `error:` line and exit code 2, as on the command line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from lorafleet.remote.client import STEP_MARK, SUMMARY_MARK
from lorafleet.runstore.location import RunLocation
from lorafleet.spec import SpecError, load_spec
from lorafleet.sweep.runner import TermAsInterrupt, run_sweep
from lorafleet.sweep.space import Sweep
from lorafleet.train.driver import run_job


def _resolve_data(raw: dict[str, Any], folder: Path) -> None:
    """Make the shipped job's relative data paths absolute in the job's `working_dir` (Ray unpacks it at the same
    path on every node of the cluster); object-store URIs (`s3://`, `gs://`, shipped as given) stay as they are."""
    data = raw.get("data") or {}
    for key in ("path", "eval_path"):
        value = data.get(key)
        if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
            data[key] = str((folder / value).resolve())


def run_shipped_spec(spec_json: str) -> int:
    """Run the spec a remote job shipped, printing the step and summary lines the client parses.

    Args:
        spec_json (`str`): The shipped `spec.json`; its relative `data.path` is taken from its own folder.

    Returns:
        `int`: The exit code: 0 succeeded, 1 the run failed, 2 the spec was refused.
    """
    raw = json.loads(Path(spec_json).read_text())
    _resolve_data(raw, Path(spec_json).resolve().parent)
    try:
        spec = load_spec(raw=raw)
        print(f"lorafleet: {spec.name}: {spec.scaling.num_workers} worker(s), storage {spec.storage_uri}", file=sys.stderr)
        summary = run_job(spec, on_progress=lambda metrics: print(STEP_MARK + json.dumps(metrics), flush=True))
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out: dict[str, Any] = summary.to_dict()
    out["job_id"] = os.environ.get("LORAFLEET_JOB_ID")
    artifacts = RunLocation.of(spec).artifacts()
    out["metrics_uri"], out["plot_uri"] = artifacts["metrics"], artifacts["plot"]
    if spec.checkpoint.endpoint:
        out["storage_endpoint"] = spec.checkpoint.endpoint  # `pull` reads the adapter through the same endpoint
    print(SUMMARY_MARK + json.dumps(out), flush=True)
    if summary.status != "succeeded":
        print(f"error: {spec.name}: run failed: {summary.error}", file=sys.stderr)
        return 1
    return 0


def run_shipped_sweep(sweep_json: str) -> int:
    """Run the sweep a remote job shipped, printing one line per trial event and the sweep's summary line.

    Args:
        sweep_json (`str`): The shipped `sweep.json`; its job's relative data paths are taken from its own folder.

    Returns:
        `int`: The exit code: 0 succeeded, 1 no trial succeeded, 2 the sweep was refused, 128 + the signal when
        stopped (`lorafleet stop`; a re-submitted sweep continues it).
    """
    raw = json.loads(Path(sweep_json).read_text())
    _resolve_data(raw["job"], Path(sweep_json).resolve().parent)
    try:
        sweep = Sweep.from_json(json.dumps(raw))
        print(f"lorafleet: {sweep.name}: sweep of {sweep.section.num_samples} sample(s), storage {sweep.storage_uri}",
              file=sys.stderr, flush=True)
        with TermAsInterrupt() as stop:
            summary = run_sweep(sweep)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorafleet: {sweep.name}: stopped; submit the same sweep again to continue it", file=sys.stderr)
        return stop.exit_code
    out: dict[str, Any] = summary.to_dict()
    out["sweep_status"] = out.pop("status")
    out["job_id"] = os.environ.get("LORAFLEET_JOB_ID")
    # `lorafleet pull` and `status` find the best trial's adapter where they find a job's.
    out["adapter_uri"] = (summary.best or {}).get("adapter_uri")
    if sweep.job.checkpoint.endpoint:
        out["storage_endpoint"] = sweep.job.checkpoint.endpoint
    print(SUMMARY_MARK + json.dumps(out), flush=True)
    if summary.status == "interrupted":
        return stop.exit_code
    if summary.status != "succeeded":
        print(f"error: {sweep.name}: no trial succeeded", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[list[str]] = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_file():
        print("error: usage: python -m lorafleet.remote.entrypoint SPEC.json|SWEEP.json (an existing file)",
              file=sys.stderr)
        sys.exit(2)
    shipped = json.loads(Path(args[0]).read_text())
    sys.exit(run_shipped_sweep(args[0]) if "sweep" in shipped else run_shipped_spec(args[0]))


if __name__ == "__main__":
    main()
