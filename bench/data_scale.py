"""Benchmark: the in-memory data path against the tokenized cache as datasets grow (run by hand, not a test).

For each size it generates an instruction dataset (`.jsonl`, records of varied length), then runs the default job
for one step (`training.steps=1`, 2 workers, its own Ray instance) three ways, each a fresh `lorafleet submit`:

- `memory`: `data.cache: false`, today's path (the driver tokenizes everything and ships the samples to the workers);
- `cache cold`: `data.cache: true` on an empty storage: the submit builds the cache (in the driver under 32 MB of
  data, Ray Data tasks above) and the workers read it memory-mapped;
- `cache warm`: the same storage, another job name: the cache is found and reused.

Reported per run: seconds from the command's start to the first step (the summary's phases), the driver's peak RSS
(VmHWM of the `lorafleet` process, polled), rank 0 worker's peak RSS (`peak_rss_mb` in metrics.jsonl), and for the
cold run the cache build time and records/s (the cache's index.json). Sizes: 10k and 1M records by default, 10M with
`--big`, any list with `--sizes`.

With `--rounds N` every size runs its modes N times, each round on a fresh storage (so `cold` builds again), the
in-memory run moving from first to last place every other round so that load from other processes hits the paths
alike; the table gives each number's median and [range] over the rounds, and the JSON every round.

Usage:

```bash
LORAFLEET_HOME=/tmp/lfbench python bench/data_scale.py [--sizes 10000,200000] [--big] [--modes memory,cold,warm]
    [--rounds 3] [--json]
```
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("alpha beta gamma delta river stone cloud light paper green quick slow north south seven three apple "
         "orange number letter count reverse repeat sort list word sentence answer").split()


def generate(path: Path, count: int, seed: int = 0) -> None:
    """`count` instruction records, 5-25 words of input and 2-15 of output each (most fit the default job's
    max_length of 128 tokens; the longest are truncated)."""
    rng = random.Random(seed)
    with open(path, "w") as out:
        for i in range(count):
            words = [rng.choice(WORDS) for _ in range(rng.randint(5, 25))]
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 15)))
            out.write(json.dumps({"instruction": f"Task {i}: repeat the words.", "input": " ".join(words),
                                  "output": answer}) + "\n")


def _vmhwm_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def submit(data: Path, storage: Path, name: str, cache: bool) -> dict:
    sets = [f"name={name}", f"checkpoint.storage={storage}", f"data.path={data}", f"data.cache={str(cache).lower()}",
            "training.steps=1", "training.warmup=0", "checkpoint.every_n_steps=1",
            "data.eval_fraction=null", "eval={}"]  # time to the first step, not the held-out evaluation of the default job
    args = [a for s in sets for a in ("--set", s)]
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lorafleet.cli", "submit", "jobs/llama.yaml", "--json", *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def poll() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _vmhwm_mb(proc.pid))
            time.sleep(0.2)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"submit {name} failed ({proc.returncode}): {err[-2000:]}")
    summary = json.loads(out.strip().splitlines()[-1])
    phases = summary.get("phases", {})
    metrics = [json.loads(line) for line in (storage / name / "metrics.jsonl").read_text().splitlines()]
    first_step = sum(v for k, v in phases.items() if k != "after_last_step") if phases else None
    return {
        "wall_s": round(time.perf_counter() - started, 1),
        "first_step_s": round(first_step, 1) if first_step else None,
        "driver_peak_mb": round(peak[0]),
        "worker_peak_mb": round(max(m.get("peak_rss_mb", 0) for m in metrics)),
        "data_cache": summary.get("data_cache"),
    }


def round_order(modes: list[str], round_index: int) -> list[str]:
    """The modes of one round: as given in even rounds; in odd ones the in-memory run moves behind the cache runs
    (`cold` always precedes `warm`, which needs its cache).

    Example:

    ```python
    >>> round_order(["memory", "cold", "warm"], 1)
    ['cold', 'warm', 'memory']
    ```
    """
    if round_index % 2 == 0 or "memory" not in modes:
        return list(modes)
    return [m for m in modes if m != "memory"] + ["memory"]


NUMBERS = ("first_step_s", "driver_peak_mb", "worker_peak_mb", "build_s", "records_per_s")


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (records, mode): each number's median, min and max over the rounds that measured it."""
    groups: dict[tuple[int, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["records"], row["mode"]), []).append(row)
    table = []
    for (records, mode), runs in groups.items():
        entry: dict = {"records": records, "mode": mode, "rounds": len(runs), "engine": runs[0].get("engine", "")}
        for key in NUMBERS:
            values = [r[key] for r in runs if r.get(key) is not None]
            if values:
                entry[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        table.append(entry)
    return table


def _cell(entry: dict, key: str, fmt: str) -> str:
    stats = entry.get(key)
    if stats is None:
        return ""
    text = fmt.format(stats["median"])
    return text if entry["rounds"] == 1 else f"{text} [{fmt.format(stats['min'])}-{fmt.format(stats['max'])}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,1000000")
    parser.add_argument("--big", action="store_true", help="add 10M records")
    parser.add_argument("--modes", default="memory,cold,warm")
    parser.add_argument("--rounds", type=int, default=1, help="runs of every mode per size, alternating (see above)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")] + ([10_000_000] if args.big else [])
    modes = args.modes.split(",")
    root = Path(tempfile.mkdtemp(prefix="lorafleet-data-scale-"))
    rows = []
    for size in sizes:
        data = root / f"records-{size}.jsonl"
        t = time.perf_counter()
        generate(data, size)
        print(f"# {size:,} records, {data.stat().st_size / 1e6:.1f} MB (generated in {time.perf_counter() - t:.1f} s)",
              file=sys.stderr, flush=True)
        for r in range(args.rounds):
            storage = root / f"runs-{size}-round{r}"
            for mode in round_order(modes, r):
                name = f"{mode}-{size}"
                row = {"records": size, "mode": mode, "round": r, "load_avg": round(os.getloadavg()[0], 1),
                       **submit(data, storage, name, cache=mode != "memory")}
                if mode == "cold" and row["data_cache"]:
                    report = json.loads((Path(row["data_cache"]) / "index.json").read_text())["report"]
                    row.update(build_s=report["build_s"], engine=report["engine"],
                               records_per_s=round(report["records"] / max(report["build_s"], 1e-9)))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    table = summarize(rows)
    if args.json:
        print(json.dumps({"rounds": args.rounds, "summary": table, "runs": rows}))
        return
    print(f"{'records':>10} {'mode':>7} {'first step s':>20} {'driver MB':>18} {'worker MB':>18} {'build s':>18} "
          f"{'records/s':>22} {'engine':>9}")
    for e in table:
        print(f"{e['records']:>10,} {e['mode']:>7} {_cell(e, 'first_step_s', '{:.1f}'):>20} "
              f"{_cell(e, 'driver_peak_mb', '{:,.0f}'):>18} {_cell(e, 'worker_peak_mb', '{:,.0f}'):>18} "
              f"{_cell(e, 'build_s', '{:.1f}'):>18} {_cell(e, 'records_per_s', '{:,.0f}'):>22} {e['engine']:>9}")


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    main()
