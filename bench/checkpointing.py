"""Benchmark: what streaming checkpoints to object storage costs the default job (run by hand, not a test).

Starts an S3 server (moto) on 127.0.0.1, then runs the default job twice in the same process and Ray instance:
once without intermediate checkpoints (`checkpoint.every_n_steps` > `training.steps`: only the final one) and once
with a checkpoint to S3 every 5 steps (`checkpoint_upload_mode=ASYNC`). Steps/s is measured on the driver from
the arrival of the step metrics, so it includes the time a worker spends writing and handing over a checkpoint;
the first `--skip` steps (warm-up) and the final checkpoint step are left out. Then it compares one checkpoint's
bytes in the bucket with the trainable state (LoRA weights + AdamW's two moments, float32) and the full model.

The S3 server is a process of its own (`moto_server`). It still runs on the two cores that train, and it is not
cheap: 65-85 ms of CPU per checkpoint here (printed as `s3_server_cpu_ms_per_checkpoint`; about 10 requests, 5 of
them Ray Train's own), work a real bucket does on other machines. By default it runs in Linux's idle scheduling class,
so it only gets cycles nothing else wants; even so, on two cores it still slows training about as much as it
computes (it takes the gaps where a worker waits for the other one and leaves the caches cold). `--server-priority 0`
charges it to training in full; `--storage local` leaves the server out and measures what lorafleet and Ray Train
cost on their own. Steps/s of one run varies by about ±10% from run to run on this small shared machine: the runs
alternate, each measures the whole default job (120 steps), and `--repeat N` (default 5) runs N pairs and reports the
median ratio and every pair's ratio.

Usage:

```bash
LORAFLEET_HOME=/tmp/lfbench python bench/checkpointing.py [--steps 120] [--repeat 5] [--storage s3|local]
    [--server-priority idle|NICE] [--json]
```
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _priority(value: str) -> str:
    if value != "idle" and not value.lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f"expected 'idle' or a nice value, got {value!r}")
    return value


def _lower_priority(priority: str):
    """`preexec_fn` for the server: Linux's idle scheduling class for "idle" (nice 19 where it is missing), else nice."""

    def apply() -> None:
        if priority == "idle" and hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        else:
            os.nice(19 if priority == "idle" else int(priority))

    return apply


def start_s3(priority: str = "0") -> tuple[subprocess.Popen, object, str]:
    """moto's S3 server (at CPU priority `priority`: "idle" or a nice value) on a free local port, a bucket, and the
    AWS_* variables the run (and Ray's workers) read."""
    import boto3

    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_lower_priority(priority),
    )
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    client = boto3.client("s3", endpoint_url=endpoint)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.create_bucket(Bucket="bench")
            return server, client, "bench"
        except Exception:  # noqa: BLE001 - not listening yet
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise SystemExit(f"moto_server did not start on {endpoint}")
            time.sleep(0.2)


def timed_run(spec, skip: int) -> dict:
    """Run `spec`; steps/s from driver-side arrival times of steps (skip+1 .. last-1)."""
    from lorafleet.train.driver import run_job

    arrivals: dict[int, float] = {}
    summary = run_job(spec, on_progress=lambda m: arrivals.setdefault(int(m["step"]), time.perf_counter()), fresh=True)
    if summary.status != "succeeded":
        raise SystemExit(f"run failed: {summary.error}")
    first, last = skip + 1, spec.training.steps - 1
    rate = (last - first) / (arrivals[last] - arrivals[first])
    return {"steps_per_s": rate, "summary": summary.to_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120, help="Steps per run.")
    parser.add_argument("--every", type=int, default=5, help="Checkpoint interval of the checkpointing run.")
    parser.add_argument("--skip", type=int, default=3, help="Warm-up steps left out of steps/s.")
    parser.add_argument("--repeat", type=int, default=5, help="Pairs of runs (without, with checkpoints); medians are reported.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="Extra spec overrides (default: the job as shipped).")
    parser.add_argument(
        "--server-priority",
        default="idle",
        type=_priority,
        help="CPU priority of the S3 server: 'idle' (Linux's idle class: only cycles nothing else wants) or a nice value "
        "(0: the same as the machine's own processes; Ray's workers run at 15).",
    )
    parser.add_argument(
        "--storage",
        choices=["s3", "local"],
        default="s3",
        help="Where checkpoints go: the S3 server, or a local folder (lorafleet's and Ray's own cost, without a server "
        "on the training cores).",
    )
    parser.add_argument("--json", action="store_true", help="Print one JSON line.")
    args = parser.parse_args()

    os.environ.setdefault("LORAFLEET_HOME", "/tmp/lorafleet-bench-home")
    if args.storage == "s3":
        server, client, bucket = start_s3(args.server_priority)
        storage = f"s3://{bucket}/bench"
    else:
        server = None
        storage = tempfile.mkdtemp(prefix="lorafleet-bench-storage-")
    from lorafleet.model.build import resolve_base_model
    from lorafleet.spec import load_spec

    # Without the default job's held-out evaluation: it runs at each checkpoint and would be billed to checkpointing.
    common = [f"training.steps={args.steps}", "checkpoint.keep=2", f"checkpoint.storage={storage}",
              "data.eval_fraction=null", "eval={}", *args.overrides]
    base_spec = load_spec(REPO / "jobs/llama.yaml", [*common, "name=bench-none", f"checkpoint.every_n_steps={args.steps + 1}"])
    ckpt_spec = load_spec(REPO / "jobs/llama.yaml", [*common, "name=bench-ckpt", f"checkpoint.every_n_steps={args.every}"])
    # Alternate the two so that load from other processes on the machine hits both alike; the first run also pays
    # for Ray start, so it is a throwaway warm-up of the whole stack.
    timed_run(base_spec.model_copy(update={"name": "bench-warmup"}), args.skip)
    import psutil

    def server_cpu_s() -> float:
        if server is None:
            return 0.0
        times = psutil.Process(server.pid).cpu_times()
        return times.user + times.system

    pairs, server_cpu = [], 0.0
    for _ in range(args.repeat):
        none = timed_run(base_spec, args.skip)["steps_per_s"]
        before = server_cpu_s()
        ckpt = timed_run(ckpt_spec, args.skip)["steps_per_s"]
        server_cpu += server_cpu_s() - before
        pairs.append((none, ckpt))
    ratios = [ckpt / none for none, ckpt in pairs]

    folders: dict[str, int] = {}
    if server is not None:
        for obj in client.list_objects_v2(Bucket=bucket, Prefix="bench/bench-ckpt/checkpoint_")["Contents"]:
            parts = obj["Key"].split("/")
            if len(parts) > 3:  # files in checkpoint folders, not Ray's checkpoint_manager_snapshot.json beside them
                folders[parts[2]] = folders.get(parts[2], 0) + obj["Size"]
    else:
        for path in Path(storage, "bench-ckpt").glob("checkpoint_*/*"):
            folders[path.parent.name] = folders.get(path.parent.name, 0) + path.stat().st_size
    checkpoint_bytes = folders[sorted(folders)[-1]]

    base = Path(resolve_base_model(ckpt_spec))
    model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    from lorafleet.model.build import build_model

    model, _ = build_model(ckpt_spec, str(base))
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    result = {
        "steps": args.steps,
        "every_n_steps": args.every,
        "steps_per_s_no_checkpoints": round(statistics.median(none for none, _ in pairs), 3),
        "steps_per_s_checkpoint_every_n": round(statistics.median(ckpt for _, ckpt in pairs), 3),
        "ratio": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "storage": args.storage,
        "s3_server_priority": args.server_priority if server is not None else None,
        "s3_server_cpu_ms_per_checkpoint": (
            round(1000 * server_cpu / (args.repeat * (args.steps // args.every)), 1) if server is not None else None
        ),
        "checkpoint_bytes": checkpoint_bytes,
        "trainable_bytes": trainable,
        "trainable_plus_adamw_bytes": 3 * trainable,
        "full_model_bytes": model_bytes,
        "checkpoint_vs_full_model": round(checkpoint_bytes / model_bytes, 4),
        "checkpoints_kept": len(folders),
    }
    if server is not None:
        server.terminate()
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:32s} {value}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
