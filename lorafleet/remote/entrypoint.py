"""The cluster side of a remote job: `python -m lorafleet.remote.entrypoint spec.json` runs a shipped spec.

[`~lorafleet.remote.client.RemoteClient.submit`] ships the spec and its data in the job's `working_dir` and makes
this module the entrypoint. It runs the job with [`~lorafleet.train.driver.run_job`] and prints one
`LORAFLEET_STEP {...}` line per step and a final `LORAFLEET_SUMMARY {...}` line, which the client reads back from
the job's logs. A bad spec is one `error:` line and exit code 2, as on the command line.
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
from lorafleet.train.driver import run_job


def run_shipped_spec(spec_json: str) -> int:
    """Run the spec a remote job shipped, printing the step and summary lines the client parses.

    Args:
        spec_json (`str`): The shipped `spec.json`; its relative `data.path` is taken from its own folder.

    Returns:
        `int`: The exit code: 0 succeeded, 1 the run failed, 2 the spec was refused.
    """
    raw = json.loads(Path(spec_json).read_text())
    data = raw.get("data") or {}
    for key in ("path", "eval_path"):
        if isinstance(data.get(key), str) and not Path(data[key]).is_absolute():
            # Absolute in the job's working_dir: Ray unpacks it at the same path on every node of the cluster.
            data[key] = str((Path(spec_json).resolve().parent / data[key]).resolve())
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


def main(argv: Optional[list[str]] = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_file():
        print("error: usage: python -m lorafleet.remote.entrypoint SPEC.json (an existing file)", file=sys.stderr)
        sys.exit(2)
    sys.exit(run_shipped_spec(args[0]))


if __name__ == "__main__":
    main()
