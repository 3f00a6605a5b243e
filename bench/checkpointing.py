"""Benchmark: what streaming checkpoints to object storage costs the default job (run by hand, not a test).

Starts an S3 server (moto) on 127.0.0.1, then runs the default job twice in the same process and Ray instance:
once without intermediate checkpoints (`checkpoint.every_n_steps` > `training.steps`: only the final one) and once
with a checkpoint to S3 every 5 steps (`checkpoint_upload_mode=ASYNC`). Steps/s is measured on the driver from
the arrival of the step metrics, so it includes the time a worker spends writing and handing over a checkpoint;
the first `--skip` steps (warm-up) and the final checkpoint step are left out. Then it compares one checkpoint's
bytes in the bucket with the trainable state (LoRA weights + AdamW's two moments, float32) and the full model.

Usage:

```bash
LORAFLEET_HOME=/tmp/lfbench python bench/checkpointing.py --steps 40 --json
```
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_s3() -> tuple[object, object, str]:
    """moto's S3 server on a free local port, a bucket, and the AWS_* variables the run (and Ray's workers) read."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="bench")
    return server, client, "bench"


def timed_run(spec, skip: int) -> dict:
    """Run `spec`; steps/s from driver-side arrival times of steps (skip+1 .. last-1)."""
    from lorafleet.driver import run_job

    arrivals: dict[int, float] = {}
    summary = run_job(spec, on_progress=lambda m: arrivals.setdefault(int(m["step"]), time.perf_counter()), fresh=True)
    if summary.status != "succeeded":
        raise SystemExit(f"run failed: {summary.error}")
    first, last = skip + 1, spec.training.steps - 1
    rate = (last - first) / (arrivals[last] - arrivals[first])
    return {"steps_per_s": rate, "summary": summary.to_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="Steps per run.")
    parser.add_argument("--every", type=int, default=5, help="Checkpoint interval of the checkpointing run.")
    parser.add_argument("--skip", type=int, default=3, help="Warm-up steps left out of steps/s.")
    parser.add_argument("--set", dest="overrides", action="append", default=["kernels.enabled=false"], help="Extra spec overrides.")
    parser.add_argument("--json", action="store_true", help="Print one JSON line.")
    args = parser.parse_args()

    os.environ.setdefault("LORAFLEET_HOME", "/tmp/lorafleet-bench-home")
    server, client, bucket = start_s3()
    from lorafleet.model import resolve_base_model
    from lorafleet.spec import load_spec

    common = [f"training.steps={args.steps}", "checkpoint.keep=2", f"checkpoint.storage=s3://{bucket}/bench", *args.overrides]
    base_spec = load_spec(REPO / "jobs/llama.yaml", [*common, "name=bench-none", f"checkpoint.every_n_steps={args.steps + 1}"])
    ckpt_spec = load_spec(REPO / "jobs/llama.yaml", [*common, "name=bench-ckpt", f"checkpoint.every_n_steps={args.every}"])
    # Alternate the two so that load from other processes on the machine hits both alike; the first run also pays
    # for Ray start, so it is a throwaway warm-up of the whole stack.
    timed_run(base_spec.model_copy(update={"name": "bench-warmup"}), args.skip)
    none = timed_run(base_spec, args.skip)
    ckpt = timed_run(ckpt_spec, args.skip)

    objects = client.list_objects_v2(Bucket=bucket, Prefix="bench/bench-ckpt/")["Contents"]
    folders: dict[str, int] = {}
    for obj in objects:
        parts = obj["Key"].split("/")
        # Folders only: Ray's checkpoint_manager_snapshot.json sits beside them and sorts after them.
        if len(parts) > 3 and parts[2].startswith("checkpoint_"):
            folders[parts[2]] = folders.get(parts[2], 0) + obj["Size"]
    checkpoint_bytes = folders[sorted(folders)[-1]]

    base = Path(resolve_base_model(ckpt_spec))
    model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    from lorafleet.model import build_model

    model, _ = build_model(ckpt_spec, str(base))
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    result = {
        "steps": args.steps,
        "every_n_steps": args.every,
        "steps_per_s_no_checkpoints": round(none["steps_per_s"], 3),
        "steps_per_s_checkpoint_every_n": round(ckpt["steps_per_s"], 3),
        "ratio": round(ckpt["steps_per_s"] / none["steps_per_s"], 3),
        "checkpoint_bytes": checkpoint_bytes,
        "trainable_bytes": trainable,
        "trainable_plus_adamw_bytes": 3 * trainable,
        "full_model_bytes": model_bytes,
        "checkpoint_vs_full_model": round(checkpoint_bytes / model_bytes, 4),
        "checkpoints_in_bucket": len(folders),
    }
    server.stop()
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:32s} {value}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
