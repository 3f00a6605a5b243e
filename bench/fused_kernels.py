"""Benchmark: one QLoRA training step, lorafleet's fused kernels vs plain PEFT + bitsandbytes (run by hand).

Setup (full size): Llama architecture, hidden 512, 8 layers, vocab 32000, seq 512, batch 4, `--dtype` model
(default `auto`, what a job picks: bf16 where the device computes it natively, fp32 on AVX2-only CPUs, where bf16
is emulated and a bf16 PEFT baseline would be ~20x slower than it needs to be),
NF4 base, LoRA r=16 on all 7 projections, AdamW. `--prompt-fraction F` makes the first F of every sequence a prompt
(labels -100, as in instruction data; default 0: every token is trained). The `peft` variant is what a PEFT user
runs: the model's own forward with `labels` (full logits, transformers' loss); `fused` is lorafleet's step (fused
LoRA layers, LM head + loss on the labelled positions only). Throughput of the two variants is measured in this process,
alternating rounds of a few steps each (so load drift on the machine hits both); peak resident memory is
measured for each variant in its own subprocess (ru_maxrss of a process that builds the model and runs steps).

    python bench/fused_kernels.py            # full size
    python bench/fused_kernels.py --quick    # small model, a few seconds
    python bench/fused_kernels.py --json     # ... and a last line of JSON
    python bench/fused_kernels.py --profile  # ... and a torch.profiler table of each variant (2 steps)
    python bench/fused_kernels.py --quick --prompt-fraction 0.5   # half of each sequence is prompt
    python bench/fused_kernels.py --device cuda --size 1b --dtype bfloat16   # on a GPU, a 1B-class model

`--size`: `quick`, `full` (above) or `1b` (a TinyLlama-1.1B-shaped model: hidden 2048, 22 layers, 32 heads, 4 KV
heads, seq 1024; meant for a GPU). `--device cuda` runs both variants on the GPU (Triton activations, CUDA
bitsandbytes); peak memory is then `torch.cuda.max_memory_allocated` of the training steps instead of resident memory.

`mfu` is model FLOPs per second over this machine's matmul peak in the benchmark dtype, measured in the same run; model FLOPs per
token count 4 x the frozen linear parameters (forward 2, input-gradient 2; no base weight gradients) plus
6 x the LoRA parameters, the LM head counted for labelled positions only (the logits a loss needs; both variants get
the same count, so the PEFT variant's full logits on prompt tokens are work the MFU does not credit). `tokens/s`
counts every input token. Output: the table on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

FULL = dict(hidden=512, layers=8, vocab=32000, seq=512, batch=4, inter=1376, heads=8, kv_heads=4, r=16)
QUICK = dict(hidden=256, layers=2, vocab=8000, seq=256, batch=2, inter=704, heads=4, kv_heads=2, r=8)
ONE_B = dict(hidden=2048, layers=22, vocab=32000, seq=1024, batch=4, inter=5632, heads=32, kv_heads=4, r=16)
SIZES = {"quick": QUICK, "full": FULL, "1b": ONE_B}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(*args):
    print(*args, file=sys.stderr, flush=True)


DTYPE = torch.bfloat16  # set by main() from --dtype before anything is built
PROMPT_FRACTION = 0.0  # set by main() from --prompt-fraction
DEVICE = torch.device("cpu")  # set by main() from --device


def sync() -> None:
    """Wait for queued GPU work, so that a timer stops after the step really ended."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def model_dir(size: dict) -> Path:
    from transformers import AutoModelForCausalLM

    from lorafleet.model.families import family_config

    key = "-".join(f"{k}{v}" for k, v in sorted(size.items()) if k not in ("seq", "batch", "r"))
    path = Path(tempfile.gettempdir()) / f"lorafleet-bench-{key}"
    if not (path / "config.json").exists():
        cfg = family_config(
            "llama",
            size["vocab"],
            dict(hidden_size=size["hidden"], intermediate_size=size["inter"], num_hidden_layers=size["layers"],
                 num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"],
                 head_dim=size["hidden"] // size["heads"]),
        )
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def build(size: dict):
    """The QLoRA model: NF4 base computing in `DTYPE`, LoRA on all 7 projections (adapters in fp32), AdamW."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lorafleet.compat.bitsandbytes import disable_cpu_repack

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=DTYPE)
    model = AutoModelForCausalLM.from_pretrained(model_dir(size), dtype=DTYPE, device_map=DEVICE.type,
                                                 quantization_config=quant)
    disable_cpu_repack(model)
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=size["r"], lora_alpha=2 * size["r"], target_modules=TARGETS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    model.train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), generator=gen)
    return model, optim, (ids.to(DEVICE), prompt_labels(ids, PROMPT_FRACTION).to(DEVICE))


def prompt_labels(ids: torch.Tensor, fraction: float) -> torch.Tensor:
    """`ids` as labels, with the first `fraction` of every row a prompt (-100)."""
    labels = ids.clone()
    labels[:, : int(round(fraction * ids.shape[1]))] = -100
    return labels


def set_variant(model, variant: str) -> str:
    from lorafleet.kernels import apply_kernels, remove_kernels
    from lorafleet.spec import KernelsSpec

    remove_kernels(model)
    if variant == "peft":
        return variant
    plan = apply_kernels(model, KernelsSpec())
    assert plan.applied["mlp"] == plan.applied["qkv"] == plan.applied["o"] > 0 and plan.fused_loss, plan.reasons()
    return variant


def step(model, optim, batch, variant: str) -> float:
    from lorafleet.kernels import lm_loss

    ids, labels = batch
    if variant == "peft":
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss  # mean over the labelled tokens
    else:
        total, n = lm_loss(model, ids, labels=labels, fused=True)
        loss = total / n
    loss.backward()
    optim.step()
    optim.zero_grad(set_to_none=True)
    return float(loss.detach())


def model_flops(model, tokens: int, targets: int) -> float:
    """Model FLOPs of one step: every linear layer for each token, the LM head for each labelled position only."""
    frozen = lora = head = 0
    head_module = model.get_base_model().get_output_embeddings()
    for name, module in model.named_modules():
        if type(module).__name__ in ("Linear", "Linear4bit") and not hasattr(module, "lora_A"):
            params = module.in_features * module.out_features
            if module is head_module:
                head += params
            elif "lora_" in name:
                lora += params
            else:
                frozen += params
    return (4.0 * frozen + 6.0 * lora) * tokens + 4.0 * head * targets


def matmul_peak(dtype=torch.bfloat16, n: int = 1024, reps: int = 5) -> float:
    n = n if DEVICE.type == "cpu" else 8192  # a GPU needs a bigger product to reach its peak
    a = torch.randn(n, n, dtype=dtype, device=DEVICE)
    b = torch.randn(n, n, dtype=dtype, device=DEVICE)
    a @ b
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def child_memory(size_name: str, variant: str, steps: int) -> None:
    """Subprocess entry: build, run `steps` steps of one variant, print peak RSS (bytes) as JSON."""
    size = SIZES[size_name]
    model, optim, batch = build(size)
    variant = set_variant(model, variant)
    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if DEVICE.type == "cuda":
        step(model, optim, batch, variant)  # the optimizer's state exists from the first step on: count it
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            step(model, optim, batch, variant)
        peak = torch.cuda.max_memory_allocated()
        print(json.dumps({"variant": variant, "peak_rss": peak, "lifetime_peak_rss": peak, "setup_peak_rss": rss_setup}))
        return
    # Loading (quantization pass) can set the lifetime peak; reset the high-water mark so that the number is the
    # training steps' peak (Linux: writing 5 to clear_refs resets VmHWM to the current RSS).
    reset = _reset_hwm()
    for _ in range(steps):
        step(model, optim, batch, variant)
    peak = _hwm() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"variant": variant, "peak_rss": peak, "lifetime_peak_rss": lifetime, "setup_peak_rss": rss_setup}))


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _hwm() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure_memory(size_name: str, variant: str, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--_memory-child", variant, "--_size", size_name, "--_steps", str(steps),
           "--dtype", str(DTYPE).removeprefix("torch."), "--prompt-fraction", str(PROMPT_FRACTION),
           "--device", DEVICE.type]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ})
    return json.loads(out.stdout.strip().splitlines()[-1])


def profile(model, optim, batch, variant: str) -> str:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    variant = set_variant(model, variant)
    step(model, optim, batch, variant)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step(model, optim, batch, variant)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model (seconds instead of minutes): --size quick")
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="model size (default full)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both variants run")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds per variant")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables (stderr)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps per peak-memory subprocess")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                        help="model/compute dtype of both variants (auto: as a job on this machine)")
    parser.add_argument("--prompt-fraction", type=float, default=0.0,
                        help="fraction of each sequence that is prompt (labels -100) in both variants; default 0")
    parser.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_size", dest="child_size", default="full", help=argparse.SUPPRESS)
    parser.add_argument("--_steps", dest="child_steps", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 0.0 <= args.prompt_fraction < 1.0:
        parser.exit(2, f"--prompt-fraction: must be in [0, 1), got {args.prompt_fraction}\n")
    global DTYPE, PROMPT_FRACTION, DEVICE
    from lorafleet.model.device import torch_dtype

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "--device cuda: torch sees no CUDA device\n")
    DEVICE = torch.device(args.device)
    DTYPE = torch_dtype(args.dtype, DEVICE)
    PROMPT_FRACTION = args.prompt_fraction
    if args.memory_child:
        child_memory(args.child_size, args.memory_child, args.child_steps)
        return 0

    size_name = args.size or ("quick" if args.quick else "full")
    size = SIZES[size_name]
    rounds = args.rounds or (2 if size_name == "quick" else 3)
    steps = args.steps or 2
    tokens = size["batch"] * size["seq"]
    log(f"building {size_name} model {size}, {DTYPE} on {DEVICE} (torch threads: {torch.get_num_threads()})")
    model, optim, batch = build(size)
    targets = int((batch[1][:, 1:] != -100).sum())
    flops_tok = model_flops(model, tokens, targets) / tokens

    times = {"peft": [], "fused": []}
    round_times = {"peft": [], "fused": []}
    losses = {"peft": [], "fused": []}
    for variant in ("peft", "fused"):  # warm-up (first-call allocations, oneDNN kernel selection)
        for _ in range(args.warmup):
            step(model, optim, batch, set_variant(model, variant))
    for r in range(rounds):
        for variant in ("peft", "fused") if r % 2 == 0 else ("fused", "peft"):
            set_variant(model, variant)
            for _ in range(steps):
                sync()
                t0 = time.perf_counter()
                losses[variant].append(step(model, optim, batch, variant))
                sync()
                times[variant].append(time.perf_counter() - t0)
            round_times[variant].append(sum(times[variant][-steps:]) / steps)
            log(f"round {r} {variant}: {round_times[variant][-1]:.3f} s/step")
    peak_bf16 = matmul_peak(torch.bfloat16)
    peak_fp32 = matmul_peak(torch.float32)
    # MFU against the peak of the dtype the step runs in (bf16 natively, else fp32), and against the best of both.
    peak = peak_bf16 if DTYPE == torch.bfloat16 else peak_fp32
    peak_best = max(peak_bf16, peak_fp32)

    if args.profile:
        for variant in ("peft", "fused"):
            log(f"\n=== torch.profiler, {variant}, 2 steps ===")
            log(profile(model, optim, batch, variant))

    mem = {}
    if not args.no_memory:
        del model, optim
        for variant in ("peft", "fused"):
            log(f"peak memory subprocess: {variant}")
            mem[variant] = measure_memory(size_name, variant, args.memory_steps)

    rows = []
    result = {}
    for variant in ("peft", "fused"):
        sec = sorted(times[variant])[len(times[variant]) // 2]  # median step
        tps = tokens / sec
        mfu = tps * flops_tok / peak
        rows.append((variant, sec, tps, mfu, mem.get(variant, {}).get("peak_rss")))
        result[variant] = {"s_per_step": sec, "tokens_per_s": tps, "mfu": mfu, "mfu_best_peak": tps * flops_tok / peak_best,
                           "peak_rss": mem.get(variant, {}).get("peak_rss")}
    print(f"QLoRA step, {size_name}, {DTYPE}: {size} | prompt fraction {PROMPT_FRACTION:g} "
          f"({targets}/{tokens} tokens labelled) | matmul peak bf16 {peak_bf16 / 1e9:.1f} / fp32 {peak_fp32 / 1e9:.1f} GFLOP/s | "
          f"{flops_tok / 1e6:.1f} MFLOP/token")
    print(f"{'variant':8} {'s/step':>8} {'tokens/s':>10} {'MFU':>7} {'peak RSS':>10}")
    for variant, sec, tps, mfu, rss in rows:
        rss_s = f"{rss / 2**30:.2f} GiB" if rss else "-"
        print(f"{variant:8} {sec:8.3f} {tps:10.0f} {mfu:7.1%} {rss_s:>10}")
    ratio = result["fused"]["tokens_per_s"] / result["peft"]["tokens_per_s"]
    # Each round runs both variants back to back, so a round's ratio sees (nearly) the same machine load.
    round_ratios = sorted(p / f for p, f in zip(round_times["peft"], round_times["fused"]))
    round_median = round_ratios[len(round_ratios) // 2]
    mem_ratio = mem["fused"]["peak_rss"] / mem["peft"]["peak_rss"] if mem else None
    print(f"tokens/s fused/PEFT: {ratio:.2f}x | per round: median {round_median:.2f}x, "
          f"range {round_ratios[0]:.2f}-{round_ratios[-1]:.2f}x over {len(round_ratios)} rounds"
          + (f" | peak RSS fused/PEFT: {mem_ratio:.2f}" if mem_ratio else ""))
    print(f"last losses: peft {losses['peft'][-1]:.4f} fused {losses['fused'][-1]:.4f}")
    if args.json:
        print(json.dumps({"size": size_name, "device": DEVICE.type, "dtype": str(DTYPE), "prompt_fraction": PROMPT_FRACTION,
                          "labelled_tokens": targets, "tokens": tokens, "tokens_per_s_ratio": ratio,
                          "round_ratios": round_ratios, "peak_mem_ratio": mem_ratio,
                          "mfu": result["fused"]["mfu"], "mfu_peft": result["peft"]["mfu"],
                          "mfu_best_peak": result["fused"]["mfu_best_peak"],
                          "bf16_peak_flops": peak_bf16, "fp32_peak_flops": peak_fp32, "variants": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
