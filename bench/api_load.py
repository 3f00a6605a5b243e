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
import asyncio
import json
import random
import ssl
import statistics
import time
from pathlib import Path
from typing import Optional

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


async def drive(args: argparse.Namespace, mix: dict[str, float]) -> tuple[dict[str, list[float]], dict[str, int], float]:
    """Upload the file, create the first job, then run the mix: `args.concurrency` tasks on one event loop.

    One loop instead of a thread per connection: the client shares the machine's cores with the service. Each task
    has its own `httpx.AsyncClient` of one connection: with one client of 32 connections, httpcore's pool scans every
    connection for every request (`_assign_requests_to_connections`), and the client spent 3x the CPU of 32 threads
    of sync httpx (cProfile; bench/README.md).

    Returns:
        `tuple`: latencies per operation (seconds), error counts, wall time of the mix (seconds).
    """
    headers = {"Authorization": f"Bearer {args.key}"}
    # Each client would otherwise load the CA bundle itself (~40 ms of CPU each), even for http://.
    tls = ssl.create_default_context()

    def new_client() -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=args.url, headers=headers, timeout=60, verify=tls,
                                 limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))

    async with new_client() as client:
        uploaded = await client.post("/files", files={"file": ("bench.jsonl", CHAT.read_bytes())},
                                     data={"purpose": "fine-tune"})
        uploaded.raise_for_status()
        file_id = uploaded.json()["id"]
        created = await client.post("/fine_tuning/jobs", json={"model": args.model, "training_file": file_id,
                                                               **NEVER_RUNS})
        created.raise_for_status()
        job_ids = [created.json()["id"]]  # something to retrieve from the first request on
        (await client.post(f"/fine_tuning/jobs/{job_ids[0]}/cancel")).raise_for_status()

    rng = random.Random(args.seed)
    ops = iter(rng.choices(list(mix), weights=list(mix.values()), k=args.requests))
    latencies: dict[str, list[float]] = {op: [] for op in [*MIX, "cancel"]}
    errors = {"4xx": 0, "5xx": 0, "transport": 0}

    async def timed(client: httpx.AsyncClient, op: str, method: str, path: str, **kwargs) -> Optional[httpx.Response]:
        started = time.perf_counter()
        try:
            response = await client.request(method, path, **kwargs)
        except httpx.HTTPError:
            errors["transport"] += 1
            return None
        latencies[op].append(time.perf_counter() - started)
        if response.status_code >= 500:
            errors["5xx"] += 1
        elif response.status_code >= 400:
            errors["4xx"] += 1
        return response

    async def one(client: httpx.AsyncClient, op: str) -> None:
        job_id = rng.choice(job_ids)
        if op == "create":
            response = await timed(client, "create", "POST", "/fine_tuning/jobs", json={
                "model": args.model, "training_file": file_id, **NEVER_RUNS})
            if response is not None and response.status_code == 200:
                new_id = response.json()["id"]
                await timed(client, "cancel", "POST", f"/fine_tuning/jobs/{new_id}/cancel")
                job_ids.append(new_id)
        elif op == "list":
            await timed(client, "list", "GET", "/fine_tuning/jobs", params={"limit": 20})
        elif op == "retrieve":
            await timed(client, "retrieve", "GET", f"/fine_tuning/jobs/{job_id}")
        else:
            await timed(client, "events", "GET", f"/fine_tuning/jobs/{job_id}/events", params={"limit": 20})

    async def worker(client: httpx.AsyncClient) -> None:
        # `concurrency` requests in flight at most, each task on its own keep-alive connection, as the thread pool
        # of the sync client had.
        async with client:
            for op in ops:
                await one(client, op)

    clients = [new_client() for _ in range(args.concurrency)]
    started = time.perf_counter()
    await asyncio.gather(*(worker(client) for client in clients))
    return latencies, errors, time.perf_counter() - started


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

    mix = {k: float(v) for k, v in (item.split("=") for item in args.mix.split(","))}
    latencies, errors, wall = asyncio.run(drive(args, mix))
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
