"""A bounded load on a running `lorafleet api`: N requests, C at a time, over loopback; latency per operation.

The mix (by default, of 500 requests): job creation (each created job asks for more CPUs than any cluster has and
the lowest priority, so it waits in the queue and the load trains nothing; it is cancelled at once, the cancel timed
as its own operation), job list, job retrieve and events list, against one uploaded
training file. Reports throughput, p50/p99 latency per operation and overall, and errors (5xx apart). Target on a
2-core machine: zero 5xx and a p99 of the reads under 100 ms.

    lorafleet api keys create --tenant bench --max-concurrent 1      # the key: last line
    lorafleet api --address auto &                                   # or embedded: lorafleet api
    python bench/api_load.py --url http://127.0.0.1:8000/v1 --key lf-... [--requests 500] [--concurrency 32] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

CHAT = Path(__file__).resolve().parents[1] / "jobs" / "data" / "chat_sample.jsonl"
MIX = {"create": 0.1, "list": 0.3, "retrieve": 0.3, "events": 0.3}
# Never admitted (no cluster has a million CPUs per worker) and last in the queue: job creation without training.
NEVER_RUNS = {"metadata": {"priority": "-1000"}, "lorafleet": {"scaling": {"resources_per_worker": {"CPU": 1e6}}}}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--key", required=True)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--model", default="llama-demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mix", default=",".join(f"{k}={v}" for k, v in MIX.items()),
                        help="Operation weights, e.g. create=0,list=1,retrieve=1,events=1 (reads only).")
    parser.add_argument("--json", action="store_true", help="End stdout with one JSON line.")
    args = parser.parse_args()

    headers = {"Authorization": f"Bearer {args.key}"}
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    client = httpx.Client(base_url=args.url, headers=headers, timeout=60, limits=limits)
    uploaded = client.post("/files", files={"file": ("bench.jsonl", CHAT.read_bytes())}, data={"purpose": "fine-tune"})
    uploaded.raise_for_status()
    file_id = uploaded.json()["id"]

    def create_one() -> str:
        created = client.post("/fine_tuning/jobs", json={"model": args.model, "training_file": file_id,
                                                         **NEVER_RUNS})
        created.raise_for_status()
        job_id = created.json()["id"]
        client.post(f"/fine_tuning/jobs/{job_id}/cancel").raise_for_status()
        return job_id

    job_ids = [create_one()]  # something to retrieve from the first request on
    lock = threading.Lock()
    rng = random.Random(args.seed)
    mix = {k: float(v) for k, v in (item.split("=") for item in args.mix.split(","))}
    ops = rng.choices(list(mix), weights=list(mix.values()), k=args.requests)
    latencies: dict[str, list[float]] = {op: [] for op in [*MIX, "cancel"]}
    errors = {"4xx": 0, "5xx": 0, "transport": 0}

    def timed(op: str, method: str, path: str, **kwargs) -> httpx.Response | None:
        started = time.perf_counter()
        try:
            response = client.request(method, path, **kwargs)
        except httpx.HTTPError:
            with lock:
                errors["transport"] += 1
            return None
        elapsed = time.perf_counter() - started
        with lock:
            latencies[op].append(elapsed)
            if response.status_code >= 500:
                errors["5xx"] += 1
            elif response.status_code >= 400:
                errors["4xx"] += 1
        return response

    def one(op: str) -> None:
        with lock:
            job_id = rng.choice(job_ids)
        if op == "create":
            response = timed("create", "POST", "/fine_tuning/jobs", json={
                "model": args.model, "training_file": file_id, **NEVER_RUNS})
            if response is not None and response.status_code == 200:
                new_id = response.json()["id"]
                timed("cancel", "POST", f"/fine_tuning/jobs/{new_id}/cancel")
                with lock:
                    job_ids.append(new_id)
        elif op == "list":
            timed("list", "GET", "/fine_tuning/jobs", params={"limit": 20})
        elif op == "retrieve":
            timed("retrieve", "GET", f"/fine_tuning/jobs/{job_id}")
        else:
            timed("events", "GET", f"/fine_tuning/jobs/{job_id}/events", params={"limit": 20})

    started = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(one, ops))
    wall = time.perf_counter() - started
    total = sum(len(v) for v in latencies.values())
    reads = [x for op in ("list", "retrieve", "events") for x in latencies[op]]
    rows = {op: {"n": len(v), "p50_ms": percentile(v, 50) * 1e3, "p99_ms": percentile(v, 99) * 1e3,
                 "mean_ms": (statistics.fmean(v) * 1e3) if v else float("nan")} for op, v in latencies.items()}
    result = {"requests": total, "concurrency": args.concurrency, "wall_s": wall, "throughput_rps": total / wall,
              "reads_p50_ms": percentile(reads, 50) * 1e3, "reads_p99_ms": percentile(reads, 99) * 1e3,
              "errors": errors, "operations": rows}
    print(f"{'operation':<10} {'n':>5} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9}")
    for op, row in rows.items():
        print(f"{op:<10} {row['n']:>5} {row['p50_ms']:>9.1f} {row['p99_ms']:>9.1f} {row['mean_ms']:>9.1f}")
    print(f"{total} requests in {wall:.1f}s ({result['throughput_rps']:.0f}/s) at concurrency {args.concurrency}; "
          f"reads p50 {result['reads_p50_ms']:.1f} ms, p99 {result['reads_p99_ms']:.1f} ms; errors {errors}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
