"""Benchmark: lorafleet's default job end to end against TRL's `SFTTrainer` + PEFT QLoRA (run by hand, not a test).

Both variants train the same thing, each in processes of its own started fresh for every run, as a user runs them:

- `lorafleet`: `python -m lorafleet.cli submit jobs/llama.yaml --json -v` (its own Ray instance, 2 DDP workers of
  micro-batch 8, fused kernels, a checkpoint every 40 steps and at the end: the job as shipped) into a fresh storage
  folder.
- `trl`: one Python process (`torch.set_num_threads(2)`) running `trl.SFTTrainer` with a `peft.LoraConfig` on the
  same base model lorafleet materialized under `$LORAFLEET_HOME` (loaded 4-bit: NF4, double quantization, compute in
  the dtype `dtype: auto` picks here), the same tokenizer, the same records rendered with lorafleet's instruction
  prompt as prompt/completion pairs (loss on the completion only), and the job's LoRA, learning rate, schedule,
  warm-up, steps, global batch (one batch of 16, no accumulation), max length, seed and gradient clipping; no packing,
  no evaluation, no checkpoints during training (`save_strategy="no"`), the adapter saved once at the end. Everything
  else is TRL's default (it keeps QLoRA adapters in bf16, computes loss in chunks, logs entropy and token accuracy).

Per run: `wall` (the whole command, measured here from start to exit), `first step` (from the process's start to
the end of the first optimizer step: for lorafleet the sum of its `phases` up to `first_step`, i.e. until the driver
has step 1's metrics; for TRL a `TrainerCallback`'s `on_step_end`), `median step` (steps 2..N: lorafleet's
`step_time_s` of rank 0 from `metrics.jsonl`, TRL's `on_step_begin` to `on_step_end`), `training` (end of step 1 to
end of the last step, as the driver or trainer sees it, so lorafleet's intermediate checkpoints count), first and
final loss, and the mean loss of the last 10 steps (single-batch losses are noisy; the two variants read the data in
different random orders). The variants alternate round by round (`--rounds`, the first variant swapping each round,
so that load from other processes hits both alike); the table gives each metric's median and range over rounds, and
lorafleet/TRL ratios computed per round, then their median (< 1: lorafleet is faster). Before the rounds a check
(untimed) builds TRL's tokenized dataset and compares it with lorafleet's samples token for token (`--no-data-check`
skips it). Progress on stderr, the table on stdout, with `--json` one JSON line last.

Usage (needs the `bench` extra: `pip install -e .[bench]`, i.e. TRL):

```bash
python bench/e2e.py [--rounds 2] [--steps 120] [--set KEY=VALUE ...] [--trl-fp32-adapters] [--json]
python bench/e2e.py --quick --json     # 20 steps, 1 round (a few minutes)
```

The base model is the one `jobs/llama.yaml` names (the shipped `tasks-llama`), materialized once under
`$LORAFLEET_HOME` (the user's, as lorafleet does; default `~/.lorafleet`); held-out evaluation is off on both
sides; run storage goes to a temporary folder removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs/llama.yaml"
# The default job evaluates held-out records (loss and generated answers); TRL's side does not, so neither does ours.
NO_EVAL = ["data.eval_fraction=null", "eval={}"]
QUICK_STEPS = 20
LAST_N = 10  # the final-loss average covers this many last steps
VARIANTS = ("lorafleet", "trl")
# The metrics of a run, in table order: (key, label, format)
METRICS = [
    ("wall_s", "wall (whole command), s", "{:.1f}"),
    ("first_step_s", "start to end of step 1, s", "{:.1f}"),
    ("median_step_s", "median step (2..N), s", "{:.3f}"),
    ("train_s", "training (step 1 to N), s", "{:.1f}"),
    ("first_loss", "first loss", "{:.4f}"),
    ("final_loss", "final loss", "{:.4f}"),
    ("last10_loss", f"mean loss, last {LAST_N} steps", "{:.4f}"),
]
RATIOS = ("wall_s", "first_step_s", "median_step_s", "train_s")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


class StderrReader(threading.Thread):
    """Reads a child's stderr as it comes: every line kept with its arrival time (`time.time()`), the ones
    `show(line)` accepts forwarded to our stderr with a prefix."""

    def __init__(self, stream, prefix: str, show):
        super().__init__(daemon=True)
        self.stream, self.prefix, self.show = stream, prefix, show
        self.lines: list[tuple[float, str]] = []

    def run(self) -> None:
        for line in self.stream:
            line = line.rstrip("\n")
            self.lines.append((time.time(), line))
            if self.show(line):
                log(f"  {self.prefix} {line}" if self.prefix else f"  {line}")

    def first(self, needle: str):
        return next((t for t, line in self.lines if needle in line), None)

    def tail(self, n: int = 30) -> str:
        return "\n".join(line for _, line in self.lines[-n:])


def run_child(cmd: list[str], prefix: str, show, env: dict | None = None) -> tuple[float, float, str, StderrReader]:
    """Run `cmd`; returns (start, exit time) as `time.time()`, its stdout and the stderr reader. Exits on failure."""
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    reader = StderrReader(proc.stderr, prefix, show)
    reader.start()
    out = proc.stdout.read()
    proc.wait()
    ended = time.time()
    reader.join(timeout=10)
    if proc.returncode != 0:
        raise SystemExit(f"{prefix or cmd[-1][:40]} failed (exit {proc.returncode}): {' '.join(cmd)}\n{reader.tail()}")
    return started, ended, out, reader


def _last_json(out: str) -> dict:
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"no JSON line in the output:\n{out[-2000:]}")


def _loss_stats(losses: list[float]) -> dict:
    return {"first_loss": losses[0], "final_loss": losses[-1], "last10_loss": statistics.fmean(losses[-LAST_N:])}


# ---------------------------------------------------------------------------------------------------------- lorafleet


def run_lorafleet(overrides: list[str], storage_root: Path, name: str) -> dict:
    """`lorafleet submit` as a subprocess into a fresh storage folder; the run's metrics."""
    storage = Path(tempfile.mkdtemp(prefix="lorafleet-", dir=storage_root))
    cmd = [sys.executable, "-m", "lorafleet.cli", "submit", str(JOB), "--json", "-v",
           *(arg for o in [*overrides, f"name={name}", f"checkpoint.storage={storage}"] for arg in ("--set", o))]

    def show(line: str) -> bool:
        return line.startswith(f"[{name}] step") or line.startswith("lorafleet: phase") or "error" in line.lower()

    started, ended, out, reader = run_child(cmd, "[lorafleet]", show)
    summary = _last_json(out)
    if summary.get("status") != "succeeded":
        raise SystemExit(f"lorafleet run {name} did not succeed: {summary}\n{reader.tail()}")
    records = [json.loads(line) for line in (storage / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
    records = [r for r in records if "loss" in r]
    steps = summary["steps"]
    phases = summary["phases"]
    names = list(phases)
    # Everything from the process's start until the driver has step 1's metrics (lorafleet.train.timings.PHASES).
    first_step = sum(phases[p] for p in names[: names.index("first_step") + 1])
    t_first, t_last = reader.first(f"] step 1/{steps} "), reader.first(f"] step {steps}/{steps} ")
    shutil.rmtree(storage, ignore_errors=True)
    return {
        "wall_s": ended - started,
        "first_step_s": first_step,
        "first_step_seen_s": t_first - started if t_first else None,  # cross-check: the progress line's arrival here
        "median_step_s": statistics.median(r["step_time_s"] for r in records[1:] or records),
        "train_s": (t_last - t_first) if t_first and t_last else None,
        **_loss_stats([r["loss"] for r in records]),
        "steps": steps,
        "phases": phases,
    }


# -------------------------------------------------------------------------------------------------------------- TRL


def trl_config(spec, base: str) -> dict:
    """What the TRL process needs, read from the job's spec (so that `--set` reaches both variants)."""
    from lorafleet.model.device import torch_dtype

    t, q = spec.training, spec.quantization
    return {
        "base": base,
        "data": spec.data.path,
        "max_length": spec.data.max_length,
        "packing": spec.data.packing,
        "model_dtype": str(torch_dtype(spec.model.dtype, "cpu")).removeprefix("torch."),
        "compute_dtype": str(torch_dtype(q.compute_dtype if q.compute_dtype != "auto" else spec.model.dtype, "cpu"))
        .removeprefix("torch."),
        "train_dtype": str(torch_dtype(t.dtype, "cpu")).removeprefix("torch."),
        "quant_type": q.type,
        "double_quant": q.double_quant,
        "lora": {"r": spec.lora.r, "alpha": spec.lora.alpha, "dropout": spec.lora.dropout,
                 "target_modules": spec.lora.target_modules, "bias": spec.lora.bias},
        "steps": t.steps,
        "learning_rate": t.learning_rate,
        "weight_decay": t.weight_decay,
        "warmup": t.warmup,
        "lr_scheduler": t.lr_scheduler if t.lr_scheduler != "constant" else "constant_with_warmup",
        "max_grad_norm": t.max_grad_norm,
        "seed": t.seed,
        "gradient_checkpointing": t.gradient_checkpointing,
        "global_batch": t.micro_batch_size * t.grad_accum * spec.scaling.num_workers,
    }


def trl_child(cfg: dict) -> None:
    """Subprocess entry: train with TRL as a user would; prints one JSON line of timings and losses last."""
    import psutil
    import torch

    torch.set_num_threads(2)
    process_start = psutil.Process().create_time()
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    from lorafleet.data.templates import format_instruction_prompt

    tokenizer = AutoTokenizer.from_pretrained(cfg["base"])  # what lorafleet's load_tokenizer_for does
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with open(cfg["data"]) as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    dataset = Dataset.from_list(
        [{"prompt": format_instruction_prompt(r["instruction"], r.get("input")), "completion": r["output"]}
         for r in records]
    )
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg["quant_type"],
                               bnb_4bit_use_double_quant=cfg["double_quant"],
                               bnb_4bit_compute_dtype=getattr(torch, cfg["compute_dtype"]))
    model = AutoModelForCausalLM.from_pretrained(cfg["base"], quantization_config=quant,
                                                 dtype=getattr(torch, cfg["model_dtype"]), device_map="cpu")
    lora = cfg["lora"]
    peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                             target_modules=lora["target_modules"], bias=lora["bias"], task_type="CAUSAL_LM")
    out_dir = cfg["output_dir"]
    args = SFTConfig(
        output_dir=out_dir,
        max_steps=cfg["steps"],
        per_device_train_batch_size=cfg["global_batch"],
        gradient_accumulation_steps=1,
        learning_rate=cfg["learning_rate"],
        weight_decay=cfg["weight_decay"],
        lr_scheduler_type=cfg["lr_scheduler"],
        warmup_steps=cfg["warmup"],
        max_grad_norm=cfg["max_grad_norm"] or 0.0,
        seed=cfg["seed"],
        bf16=cfg["train_dtype"] == "bfloat16",
        gradient_checkpointing=cfg["gradient_checkpointing"],  # TRL's default is True; the job's is False
        max_length=cfg["max_length"],
        packing=cfg["packing"],
        completion_only_loss=True,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
    )

    times: dict[str, list[float]] = {"begin": [], "end": []}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            times["begin"].append(time.time())

        def on_step_end(self, args, state, control, **kwargs):
            times["end"].append(time.time())

        def on_log(self, args, state, control, logs=None, **kwargs):
            step = state.global_step
            if "loss" in (logs or {}) and (step == 1 or step % max(1, cfg["steps"] // 20) == 0 or step == cfg["steps"]):
                log(f"[trl] step {step}/{cfg['steps']}  loss {logs['loss']:.4f}")

    set_seed(cfg["seed"])  # LoRA's initial weights: SFTTrainer adds the adapters before Trainer seeds anything
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Clock()])
    if cfg.get("dump_data"):
        ds = trainer.train_dataset
        Path(cfg["dump_data"]).write_text(json.dumps({"input_ids": list(ds["input_ids"]), "labels": list(ds["labels"])}))
        print(json.dumps({"dumped": len(ds)}))
        return
    if cfg.get("fp32_adapters"):  # undo TRL's cast of QLoRA adapters to bf16: keep them in fp32, as lorafleet does
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    adapter_dtypes = sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad})
    trainer.train()
    trainer.save_model(out_dir)  # the adapter, once (lorafleet's final checkpoint is its counterpart)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    steps = [e - b for b, e in zip(times["begin"], times["end"])]
    print(json.dumps({
        "first_step_s": times["end"][0] - process_start,
        "median_step_s": statistics.median(steps[1:] or steps),
        "train_s": times["end"][-1] - times["end"][0],
        **_loss_stats(losses),
        "steps": len(times["end"]),
        "adapter_dtypes": adapter_dtypes,
        "process_start": process_start,
    }))


def run_trl(cfg: dict, storage_root: Path) -> dict:
    out_dir = tempfile.mkdtemp(prefix="trl-", dir=storage_root)
    cmd = [sys.executable, __file__, "--_trl-child", json.dumps({**cfg, "output_dir": out_dir})]
    started, ended, out, _ = run_child(cmd, "", lambda line: line.startswith("[trl] step") or "Error" in line)
    result = _last_json(out)
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"wall_s": ended - started, **result}


def check_data(cfg: dict, spec, storage_root: Path) -> str:
    """TRL's tokenized training set against lorafleet's samples (same order): token ids and trained positions."""
    from lorafleet.data.encode import prepare_samples
    from lorafleet.model.build import load_tokenizer_for

    dump = storage_root / "trl-data.json"
    out_dir = tempfile.mkdtemp(prefix="trl-check-", dir=storage_root)
    cmd = [sys.executable, __file__, "--_trl-child", json.dumps({**cfg, "output_dir": out_dir, "dump_data": str(dump)})]
    run_child(cmd, "[trl data]", lambda line: "Mismatch" in line or "Error" in line)
    trl = json.loads(dump.read_text())
    samples = prepare_samples(spec.data, load_tokenizer_for(cfg["base"]))
    if len(samples) != len(trl["input_ids"]):
        return f"different sample counts: lorafleet {len(samples)}, TRL {len(trl['input_ids'])}"
    ids = sum(s["input_ids"] != t for s, t in zip(samples, trl["input_ids"]))
    # Both align labels with input_ids (the model shifts them), -100 where a token is not trained on.
    masks = sum(s["labels"] != t for s, t in zip(samples, trl["labels"]))
    tokens = sum(len(s["input_ids"]) for s in samples)
    return (f"{len(samples)} samples, {tokens} tokens: {'identical' if ids == masks == 0 else 'DIFFERENT'} "
            f"(input_ids differ in {ids}, labels in {masks})")


# ------------------------------------------------------------------------------------------------------------- main


def _summary(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "values": []}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def _cell(stats: dict, fmt: str, rounds: int) -> str:
    if stats["median"] is None:
        return "-"
    text = fmt.format(stats["median"])
    return text if rounds == 1 else f"{text} [{fmt.format(stats['min'])}-{fmt.format(stats['max'])}]"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help="Rounds (each runs both variants); default 2.")
    parser.add_argument("--steps", type=int, default=None, help="Optimizer steps of both variants (default: the job's).")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps, 1 round.")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="Extra spec overrides for both variants, e.g. --set lora.r=8 (default: the job as shipped).")
    parser.add_argument("--trl-fp32-adapters", action="store_true",
                        help="Keep TRL's LoRA weights in fp32 as lorafleet does (TRL casts QLoRA adapters to bf16).")
    parser.add_argument("--no-data-check", action="store_true", help="Skip the token-for-token check of the data.")
    parser.add_argument("--json", action="store_true", help="Print one JSON line last.")
    parser.add_argument("--_trl-child", dest="trl_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trl_child:
        trl_child(json.loads(args.trl_child))
        return 0

    rounds = args.rounds or (1 if args.quick else 2)
    steps = args.steps or (QUICK_STEPS if args.quick else None)
    overrides = [*NO_EVAL, *args.overrides, *([f"training.steps={steps}"] if steps else [])]
    from lorafleet.model.build import resolve_base_model
    from lorafleet.spec import load_spec

    spec = load_spec(JOB, [*overrides, "name=e2e"])
    base = resolve_base_model(spec)  # built once under $LORAFLEET_HOME if missing, before anything is timed
    cfg = {**trl_config(spec, base), "fp32_adapters": args.trl_fp32_adapters}
    log(f"e2e: {spec.training.steps} steps, {rounds} round(s), base {base}, dtype {cfg['train_dtype']}, "
        f"global batch {cfg['global_batch']}")
    load_before = os.getloadavg()[0]
    storage_root = Path(tempfile.mkdtemp(prefix="lorafleet-bench-e2e-"))
    try:
        data_check = None
        if not args.no_data_check:
            log("data check: TRL's tokenized dataset vs lorafleet's samples")
            data_check = check_data(cfg, spec, storage_root)
            log(f"data check: {data_check}")
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for r in range(rounds):
            for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                log(f"round {r + 1}/{rounds}: {variant}")
                if variant == "lorafleet":
                    result = run_lorafleet(overrides, storage_root, f"e2e-r{r}")
                else:
                    result = run_trl(cfg, storage_root)
                runs[variant].append(result)
                log(f"round {r + 1}/{rounds}: {variant}: wall {result['wall_s']:.1f} s, first step "
                    f"{result['first_step_s']:.1f} s, median step {result['median_step_s']:.3f} s, "
                    f"loss {result['first_loss']:.4f} -> {result['final_loss']:.4f}")
    finally:
        shutil.rmtree(storage_root, ignore_errors=True)

    load = (round(load_before, 2), round(os.getloadavg()[0], 2))
    stats = {v: {key: _summary([run[key] for run in runs[v]]) for key, _, _ in METRICS} for v in VARIANTS}
    ratios = {}
    for key in RATIOS:
        per_round = [a[key] / b[key] for a, b in zip(runs["lorafleet"], runs["trl"]) if a[key] and b[key]]
        ratios[key] = _summary(per_round)

    print(f"lorafleet (`submit jobs/llama.yaml`, 2 Ray workers) vs TRL SFTTrainer (1 process, 2 threads): "
          f"{spec.training.steps} steps, global batch {cfg['global_batch']}, {cfg['train_dtype']}, "
          f"{rounds} round(s){' (median [range])' if rounds > 1 else ''}; TRL adapters {runs['trl'][0]['adapter_dtypes']}; "
          f"1-min load average before/after {load[0]}/{load[1]}")
    if data_check:
        print(f"data: {data_check}")
    width = max(len(label) for _, label, _ in METRICS)
    print(f"{'metric':{width}}  {'lorafleet':>24}  {'TRL':>24}  {'lorafleet/TRL':>18}")
    for key, label, fmt in METRICS:
        ratio = _cell(ratios[key], "{:.2f}x", rounds) if key in ratios else ""
        print(f"{label:{width}}  {_cell(stats['lorafleet'][key], fmt, rounds):>24}  "
              f"{_cell(stats['trl'][key], fmt, rounds):>24}  {ratio:>18}")
    phases = runs["lorafleet"][-1]["phases"]
    print("lorafleet phases (last run), s: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    if args.json:
        print(json.dumps({
            "steps": spec.training.steps, "rounds": rounds, "dtype": cfg["train_dtype"],
            "global_batch": cfg["global_batch"], "trl_fp32_adapters": args.trl_fp32_adapters, "load_average": load,
            "data_check": data_check, "lorafleet": stats["lorafleet"], "trl": stats["trl"], "ratios": ratios,
            "runs": runs,
        }))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
