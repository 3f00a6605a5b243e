"""Benchmark: `lorafleet sweep` with ASHA against the same trials run one `lorafleet submit` after another (run by
hand, not a test).

The same N trials (the `jobs/sweep.yaml` job at each of `--rates`' learning rates, LoRA rank `--rank`: a `grid`
space, so the combinations are known and identical in every variant), each variant's commands started fresh as a user
runs them:

- `sequential`: N `python -m lorafleet.cli submit JOB --json` calls, one after the other, each with its combination's
  values set (`--set training.learning_rate=... --set lora.r=...`) and its own name (its own folder in the storage).
  JOB is the sweep file's job with the bench's overrides applied (what every trial of the sweep starts from), written
  to the temporary storage folder: `submit` refuses a file with a `sweep:` section.
- `asha`: one `python -m lorafleet.cli sweep jobs/sweep.yaml --json` over the grid (`sweep.num_samples=1`, ASHA's
  `grace_period` the first evaluation step, the file's `reduction_factor`, unless `--set sweep.*` changes them; as many
  trials at once as the CPUs fit: 2 one-worker trials on a 2-core machine).
- `none` (skip with `--no-overhead`): the same sweep with `sweep.scheduler=none` and `sweep.max_concurrent_trials=1`,
  i.e. the sequential variant's trials, one at a time, on Ray Tune.

Reported: each variant's wall time (the whole command(s), measured here from start to exit), trial-steps (optimizer
steps trained over all trials: the `steps` of each submit's or trial's summary; ASHA's stopped trials count the last
step they reported), and its best trial by held-out loss (`best_eval_loss` of a submit, a sweep trial's `metric`); then
asha/sequential wall ratio, trial-steps ASHA saved, whether the sweep's best is the sequential best (same values, or
its loss within `--tolerance` relative), and Tune's per-trial overhead `(none wall - sequential wall) / N`. That last
figure is net of what the sweep saves by running in one process: each submit pays an interpreter start, imports and a
Ray start that the sweep pays once, so it is also given with the sequential runs' `command_start` + `ray_start`
phases added back (Tune's own cost per trial). A table per trial shows each variant's loss and steps: the sweep's
trials are ordinary runs with the same seed, so a trial that ran to the end should match its submit closely.

The job is shrunk to seconds per trial (the point is the ratio, measured in the same run; pass `--set` to change any
of it): `lora.dropout=0.1`, `kernels.enabled=false`, `model.config.num_hidden_layers=2`, float32 model, compute and
training, `data.max_length=64`, `training.micro_batch_size=4`, `training.grad_accum=2`, `training.warmup=1`,
`data.group_by_length=false`, `eval.max_samples=16`, `checkpoint.keep=1`, `training.steps=--steps` and
`checkpoint.every_n_steps=max(1, steps // 3)` (every checkpoint is evaluated: ASHA's decision points). The default
grid ends with an obviously bad learning rate (1e-6) so that ASHA has something to stop: listed last, with more trials
than run at once it starts late and reaches its first rung after better trials have recorded theirs (ASHA lets the
first trial at a rung through, so with as many trials as run at once it may stop nothing). With `--rounds N` (default
1) every variant runs N times, in the order above in even rounds and reversed in odd ones, so that load drift on the
machine hits all of them; wall times are reported as the median (and range) over the rounds, and the wall ratio as
the median of each round's own ratio. Trial-steps, the best trial and the per-trial table are the first round's
(every round's are in the JSON). Progress on stderr, the tables on stdout, with `--json` one JSON line last. Exit
code 1 if a run fails (its stderr's tail is printed).

Usage:

```bash
python bench/sweep.py [--steps 30] [--rates 3e-3,1e-3,3e-4,1e-6] [--rank 8] [--workers 1] [--no-overhead]
                      [--rounds 1] [--tolerance 0.02] [--set KEY=VALUE ...] [--keep] [--json]
python bench/sweep.py --steps 4 --rates 0.003,0.000001 --json     # a smoke run
```

The base model is built once from the job's config and cached under `$LORAFLEET_HOME` (the user's, as lorafleet
does; default `~/.lorafleet`) before anything is timed; run storage goes to a temporary folder removed at the end
(kept with `--keep`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "jobs/sweep.yaml"
RATES = (3e-3, 1e-3, 3e-4, 1e-6)
# The sweep's job shrunk to seconds per trial (tests/helpers/cli.py's SWEEP_TRIAL): steps and evaluations are added
# from --steps.
SMALL_TRIAL = [
    "lora.dropout=0.1",
    "kernels.enabled=false",
    "model.config.num_hidden_layers=2",
    "model.dtype=float32",
    "quantization.compute_dtype=float32",
    "training.dtype=float32",
    "data.max_length=64",
    "training.micro_batch_size=4",
    "training.grad_accum=2",
    "training.warmup=1",
    "data.group_by_length=false",
    "eval.max_samples=16",
    "checkpoint.keep=1",
]
VARIANTS = ("sequential", "asha", "none")
LABELS = {
    "sequential": "sequential submits",
    "asha": "sweep, ASHA",
    "none": "sweep, no scheduler, 1 at a time",
}
# `sweep.*` fields the bench sets itself (the grid, and what makes the `none` variant); other `sweep.*` overrides reach
# both sweeps.
OWN_SWEEP_FIELDS = ("sweep.params", "sweep.num_samples", "sweep.scheduler", "sweep.max_concurrent_trials",
                    "sweep.metric", "sweep.mode")
OWN_FIELDS = ("name", "checkpoint.storage")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


class StderrReader(threading.Thread):
    """Reads a child's stderr as it comes: every line kept, the ones `show(line)` accepts forwarded to our stderr with
    a prefix."""

    def __init__(self, stream, prefix: str, show):
        super().__init__(daemon=True)
        self.stream, self.prefix, self.show = stream, prefix, show
        self.lines: list[str] = []

    def run(self) -> None:
        for line in self.stream:
            line = line.rstrip("\n")
            self.lines.append(line)
            if self.show(line):
                log(f"  {self.prefix} {line}" if self.prefix else f"  {line}")

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.lines[-n:])


def run_child(cmd: list[str], prefix: str, show) -> tuple[float, str, StderrReader]:
    """Run `cmd`; returns its wall time (start to exit), its stdout and the stderr reader. Exits on failure."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reader = StderrReader(proc.stderr, prefix, show)
    reader.start()
    out = proc.stdout.read()
    proc.wait()
    wall = time.perf_counter() - started
    reader.join(timeout=10)
    if proc.returncode != 0:
        raise SystemExit(f"{prefix} failed (exit {proc.returncode}): {' '.join(cmd)}\n{reader.tail()}")
    return wall, out, reader


def _last_json(out: str) -> dict:
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"no JSON line in the output:\n{out[-2000:]}")


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def _key(params: dict) -> tuple:
    """A combination as a hashable key (floats rounded: Tune may hand them back through numpy)."""
    return tuple(sorted((k, float(f"{v:.10g}") if isinstance(v, float) else v) for k, v in params.items()))


def _short(params: dict) -> str:
    return " ".join(f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
                    for k, v in params.items())


# -------------------------------------------------------------------------------------------------------- variants


def run_sequential(job: Path, combos: list[dict], storage: Path, prefix: str = "seq") -> dict:
    """One `lorafleet submit` per combination, one after the other; the variant's totals and each run's summary."""
    trials, wall = [], 0.0
    for i, params in enumerate(combos):
        name = f"{prefix}-{i:03d}"
        sets = [*(f"{k}={json.dumps(v)}" for k, v in params.items()), f"name={name}", f"checkpoint.storage={storage}"]
        cmd = [sys.executable, "-m", "lorafleet.cli", "submit", str(job), "--json", *_sets(sets)]
        seconds, out, reader = run_child(cmd, f"[{name}]", lambda line: "error" in line.lower() or "Traceback" in line)
        summary = _last_json(out)
        if summary.get("status") != "succeeded" or summary.get("best_eval_loss") is None:
            raise SystemExit(f"submit {name} did not succeed with a held-out loss: {summary}\n{reader.tail()}")
        wall += seconds
        trials.append({"trial": name, "params": params, "status": summary["status"],
                       "metric": summary["best_eval_loss"], "steps": summary["steps"], "wall_s": seconds,
                       "phases": summary.get("phases", {}), "adapter_uri": summary.get("best_adapter_uri")})
        log(f"  [{name}] {_short(params)}: {seconds:.1f} s, {summary['steps']} steps, "
            f"best_eval_loss {summary['best_eval_loss']:.4f}")
    return _variant(wall, trials)


def run_sweep(name: str, grid: list[str], overrides: list[str], storage: Path) -> dict:
    """One `lorafleet sweep` over the grid; the variant's totals and its trials."""
    sets = [*overrides, *grid, f"name={name}", f"checkpoint.storage={storage}"]
    cmd = [sys.executable, "-m", "lorafleet.cli", "sweep", str(SWEEP), "--json", *_sets(sets)]

    def show(line: str) -> bool:
        return any(s in line for s in ("] started", "] succeeded", "stopped by ASHA", "] failed", "error", "Traceback"))

    wall, out, reader = run_child(cmd, f"[{name}]", show)
    summary = _last_json(out)
    bad = [t for t in summary["trials"] if t["status"] in ("failed", "unfinished")]
    if summary.get("status") != "succeeded" or bad:
        raise SystemExit(f"sweep {name} did not succeed: {json.dumps(summary)}\n{reader.tail()}")
    trials = [{k: t.get(k) for k in ("trial", "params", "status", "metric", "steps", "adapter_uri")}
              for t in summary["trials"]]
    log(f"  [{name}] {wall:.1f} s, " + ", ".join(f"{t['trial']} {t['status']} at {t['steps']}" for t in trials))
    return _variant(wall, trials)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _variant(wall: float, trials: list[dict]) -> dict:
    ranked = [t for t in trials if t["metric"] is not None and math.isfinite(t["metric"])]
    best = min(ranked, key=lambda t: t["metric"]) if ranked else None
    return {
        "wall_s": wall,
        "trial_steps": sum(t["steps"] for t in trials),
        "stopped": sum(t["status"] == "stopped" for t in trials),
        "best": {k: best[k] for k in ("trial", "params", "metric")} if best else None,
        "trials": trials,
    }


# ------------------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="Optimizer steps of every trial (default 30).")
    parser.add_argument("--rates", default=",".join(map(str, RATES)),
                        help=f"Comma-separated learning rates: the grid (default {','.join(map(str, RATES))}).")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of every trial (default 8).")
    parser.add_argument("--workers", type=int, default=1, help="scaling.num_workers of every trial (default 1).")
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="Relative difference of the best losses that still counts as agreeing (default 0.02).")
    parser.add_argument("--no-overhead", action="store_true",
                        help="Skip the sweep without a scheduler, one trial at a time (Tune's per-trial overhead).")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="Extra overrides for every run, e.g. --set lora.alpha=16 (`sweep.*` ones: the sweeps "
                        "only).")
    parser.add_argument("--rounds", type=int, default=1,
                        help="Runs of every variant, alternating their order; medians are reported (default 1).")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary storage folder (its path is printed).")
    parser.add_argument("--json", action="store_true", help="Print one JSON line last.")
    args = parser.parse_args(argv)

    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    if not rates or args.steps < 1 or args.workers < 1 or args.rounds < 1:
        parser.error("--rates needs at least one rate; --steps, --workers and --rounds at least 1")
    for item in args.overrides:
        key = item.partition("=")[0].strip()
        if key in OWN_FIELDS or key.startswith(OWN_SWEEP_FIELDS):
            parser.error(f"--set {item}: the bench sets {key} itself")
    job_sets = [o for o in args.overrides if not o.startswith("sweep.")]
    sweep_sets = [o for o in args.overrides if o.startswith("sweep.")]
    every = max(1, args.steps // 3)
    common = [*SMALL_TRIAL, f"training.steps={args.steps}", f"checkpoint.every_n_steps={every}",
              f"scaling.num_workers={args.workers}", *job_sets]
    combos = [{"training.learning_rate": rate, "lora.r": args.rank} for rate in rates]
    # ASHA's first rung at the first evaluation (the file's grace_period of 10 would exceed a shorter run's steps,
    # which Ray's ASHAScheduler refuses with an assertion).
    grid = [f"sweep.params.training.learning_rate={{grid: {json.dumps(rates)}}}",
            f"sweep.params.lora.r={{choice: [{args.rank}]}}", "sweep.num_samples=1", f"sweep.grace_period={every}",
            *sweep_sets]

    import yaml

    from lorafleet.model.build import resolve_base_model
    from lorafleet.spec import SpecError
    from lorafleet.sweep.space import load_sweep

    try:
        definition = load_sweep(SWEEP, [*common, *grid])
    except SpecError as exc:
        raise SystemExit("\n".join(f"error: {p}" for p in exc.problems)) from None
    if definition.section.metric != "eval_loss":
        raise SystemExit("error: the bench ranks by eval_loss (best_eval_loss of a submit)")
    if definition.grace_period > definition.job.training.steps:
        raise SystemExit(f"error: sweep.grace_period {definition.grace_period} exceeds training.steps "
                         f"{definition.job.training.steps} (Ray's ASHA refuses it)")
    evals = [s for s in range(1, args.steps + 1) if definition.job.evaluates_at(s)]
    base = resolve_base_model(definition.job)  # built once under $LORAFLEET_HOME if missing, before anything is timed
    n = len(combos)
    log(f"sweep bench: {n} trials x {args.steps} steps, {args.workers} worker(s) each, ASHA grace period "
        f"{definition.grace_period}, reduction factor {definition.section.reduction_factor:g}, base {base}")
    load_before = os.getloadavg()[0]
    storage = Path(tempfile.mkdtemp(prefix="lorafleet-bench-sweep-"))
    try:
        # What every trial of the sweep starts from (Sweep.trial_spec sets the values on this same dump).
        job = storage / "job.yaml"
        job.write_text(yaml.safe_dump(definition.job.model_dump(mode="json"), sort_keys=False))
        variants = [v for v in VARIANTS if not (v == "none" and args.no_overhead)]
        rounds: list[dict[str, dict]] = []
        for r in range(args.rounds):
            results: dict[str, dict] = {}
            for variant in variants if r % 2 == 0 else variants[::-1]:
                tag = f"-r{r}" if args.rounds > 1 else ""
                if variant == "sequential":
                    log(f"round {r}, sequential: {n} submits")
                    results[variant] = run_sequential(job, combos, storage, prefix=f"seq{tag}")
                elif variant == "asha":
                    log(f"round {r}, asha: one sweep")
                    results[variant] = run_sweep(f"sweep-asha{tag}", grid, common, storage)
                else:
                    log(f"round {r}, none: one sweep, no scheduler, one trial at a time")
                    results[variant] = run_sweep(f"sweep-none{tag}", [*grid, "sweep.scheduler=none",
                                                                      "sweep.max_concurrent_trials=1"], common, storage)
            rounds.append(results)
    finally:
        if args.keep:
            log(f"storage kept: {storage}")
        else:
            shutil.rmtree(storage, ignore_errors=True)

    load = (round(load_before, 2), round(os.getloadavg()[0], 2))
    walls = {v: sorted(r[v]["wall_s"] for r in rounds) for v in variants}
    ratios = sorted(r["asha"]["wall_s"] / r["sequential"]["wall_s"] for r in rounds)
    results = {v: {**rounds[0][v], "wall_s": _median(walls[v])} for v in variants}
    seq, asha, none = results["sequential"], results["asha"], results.get("none")
    ratio = _median(ratios)
    saved = seq["trial_steps"] - asha["trial_steps"]
    seq_best, asha_best = seq["best"], asha["best"]
    same = asha_best is not None and _key(asha_best["params"]) == _key(seq_best["params"])
    rel = abs(asha_best["metric"] - seq_best["metric"]) / abs(seq_best["metric"]) if asha_best else None
    agreement = {"same_params": same, "relative_difference": rel,
                 "within_tolerance": rel is not None and rel <= args.tolerance, "tolerance": args.tolerance}
    overhead = None
    if none is not None:
        startup = [t["phases"].get("command_start", 0.0) + t["phases"].get("ray_start", 0.0) for t in seq["trials"]]
        net = (none["wall_s"] - seq["wall_s"]) / n
        # The sweep pays one interpreter start and one Ray start, the submits n: add back n - 1 of them per trial.
        overhead = {"net_s": net, "tune_s": net + sum(startup) / n * (n - 1) / n,
                    "submit_startup_s": sum(startup) / n}

    print(f"lorafleet sweep (ASHA) vs sequential submits: {n} trials (LoRA rank {args.rank}, "
          f"learning rates {', '.join(f'{r:g}' for r in rates)}), {args.steps} steps, {args.workers} worker(s) "
          f"each, evaluated at steps {evals}; 1-min load average before/after {load[0]}/{load[1]}")
    spread = args.rounds > 1
    rows = [("variant", "wall s" + (f" (median of {args.rounds}, range)" if spread else ""), "trial-steps",
             "best params", "best eval_loss")]
    for variant in variants:
        r = results[variant]
        best = r["best"]
        steps = f"{r['trial_steps']}" + (f" ({r['stopped']} stopped)" if r["stopped"] else "")
        wall = f"{r['wall_s']:.1f}" + (f" ({walls[variant][0]:.1f}-{walls[variant][-1]:.1f})" if spread else "")
        rows.append((LABELS[variant], wall, steps, _short(best["params"]) if best else "-",
                     f"{best['metric']:.4f}" if best else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) if i in (0, 3) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print(f"wall ratio asha/sequential: {ratio:.2f}x ({asha['wall_s']:.1f} s vs {seq['wall_s']:.1f} s)"
          + (f"; per round: median {ratio:.2f}x, range {ratios[0]:.2f}-{ratios[-1]:.2f}x over {args.rounds} rounds"
             if spread else ""))
    print(f"trial-steps saved by ASHA: {saved} of {seq['trial_steps']} ({saved / seq['trial_steps']:.0%}), "
          f"{asha['stopped']} of {n} trials stopped")
    if asha_best is not None:
        within = "within" if agreement["within_tolerance"] else "NOT within"
        verdict = f"{'same trial' if same else 'another trial'}, loss {within} {args.tolerance:.0%}"
        print(f"best: asha {_short(asha_best['params'])} {asha_best['metric']:.4f} vs sequential "
              f"{_short(seq_best['params'])} {seq_best['metric']:.4f}: {verdict} (relative difference {rel:.2%})")
    if overhead is not None:
        print(f"Tune's per-trial overhead: {overhead['net_s']:+.1f} s net ((none {none['wall_s']:.1f} s - sequential "
              f"{seq['wall_s']:.1f} s) / {n}); {overhead['tune_s']:+.1f} s with the submits' interpreter and Ray "
              f"start ({overhead['submit_startup_s']:.1f} s each) the sweep pays once added back")
    # Per trial: each variant's loss and steps, by combination.
    print("per trial: eval_loss (steps, status)")
    per = {v: {_key(t["params"]): t for t in results[v]["trials"]} for v in VARIANTS if v in results}
    header = ["params", *(LABELS[v] for v in per)]
    lines = [header]
    for params in combos:
        cells = [_short(params)]
        for trials in per.values():
            t = trials.get(_key(params))
            cells.append("-" if t is None else
                         f"{t['metric']:.4f} ({t['steps']}, {t['status']})" if t["metric"] is not None else
                         f"- ({t['steps']}, {t['status']})")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))
    if args.json:
        print(json.dumps({
            "steps": args.steps, "rates": rates, "rank": args.rank, "workers": args.workers, "trials": n,
            "eval_steps": evals, "grace_period": definition.grace_period,
            "reduction_factor": definition.section.reduction_factor, "overrides": args.overrides,
            "load_average": load, "variants": results, "wall_ratio": ratio, "trial_steps_saved": saved,
            "rounds": args.rounds, "wall_ratio_rounds": ratios, "wall_s_rounds": walls,
            "trial_steps_rounds": [{v: r[v]["trial_steps"] for v in variants} for r in rounds],
            "best_agreement": agreement, "overhead_per_trial": overhead,
        }))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
