"""Time to an adapter's first token on a conversation the base model has already prefilled: aLoRA vs LoRA.

Same base model, same run. The base model prefills a conversation of N tokens (not timed: a serving stack already
holds that cache). Then the adapter is invoked:

- aLoRA ([`~lorafleet.infer.generate.continue_with_adapter`] with the base cache): only the invocation tokens are computed;
- LoRA (same rank and targets, no invocation): the adapter changes every token, so the whole context plus the
  invocation is prefilled again.

Both produce one token (greedy). `outputs_equal` checks the aLoRA first token and logits against a full adapter
forward over the whole sequence. Run by hand:

    python bench/alora_kv.py --json                      # 500/1000/2000 context tokens
    python bench/alora_kv.py --contexts 2000 --repeats 5 --json

The last stdout line with `--json` is the 2000-token (largest) result: `speedup`, `context_tokens`, `outputs_equal`,
plus the per-context table under `by_context`. The model's `max_position_embeddings` (2048 in lorafleet's small
configs) is raised to fit the largest context.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def build(hidden: int, layers: int, max_positions: int, invocation, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorafleet.model.families import family_config

    cfg = family_config(
        "llama", 2048,
        {"hidden_size": hidden, "intermediate_size": hidden * 3, "num_hidden_layers": layers,
         "num_attention_heads": max(hidden // 64, 1), "num_key_value_heads": max(hidden // 128, 1),
         "max_position_embeddings": max_positions},
    )
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM",
                        alora_invocation_tokens=invocation)
    return get_peft_model(base, config).eval()


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[500, 1000, 2000])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from lorafleet.infer.generate import base_prefill, continue_with_adapter

    invocation = [8, 300, 9]
    max_positions = max(2048, max(args.contexts) + 64)
    alora = build(args.hidden, args.layers, max_positions, invocation)
    lora = build(args.hidden, args.layers, max_positions, None)
    # Same base weights in both (same seed); only the adapter kind differs.
    assert torch.equal(alora.get_base_model().model.embed_tokens.weight, lora.get_base_model().model.embed_tokens.weight)
    rows = []
    for n in args.contexts:
        g = torch.Generator().manual_seed(n)
        context = [1] + torch.randint(16, 2048, (n - 1,), generator=g).tolist()
        full = context + invocation
        cache = base_prefill(alora, torch.tensor([context]))  # what the base model already computed; not timed
        t_alora, out = timed(lambda: continue_with_adapter(alora, full, base_cache=cache, max_new_tokens=1), args.repeats)
        t_lora, _ = timed(lambda: continue_with_adapter(lora, full, base_cache=cache, max_new_tokens=1), args.repeats)
        with torch.no_grad():
            ref = alora(input_ids=torch.tensor([full]), use_cache=False).logits[0, -1].float()
        equal = out.tokens == [int(ref.argmax())] and torch.allclose(out.logits[0], ref, rtol=1e-4, atol=1e-4)
        row = {"context_tokens": n, "alora_ttft_ms": round(t_alora * 1e3, 2), "lora_ttft_ms": round(t_lora * 1e3, 2),
               "speedup": round(t_lora / t_alora, 2), "reused_tokens": out.reused_tokens, "outputs_equal": bool(equal)}
        rows.append(row)
        print(f"context {n:5d}: aLoRA (cache reuse) {row['alora_ttft_ms']:8.2f} ms | LoRA (re-prefill) "
              f"{row['lora_ttft_ms']:8.2f} ms | {row['speedup']:6.2f}x | equal={equal}", file=sys.stderr)
    last = dict(rows[-1])
    last.update(model=f"llama hidden={args.hidden} layers={args.layers} fp32 r=16 all projections",
                max_position_embeddings=max_positions, threads=args.threads, by_context=rows)
    if args.json:
        print(json.dumps(last))
    return 0 if all(r["outputs_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
