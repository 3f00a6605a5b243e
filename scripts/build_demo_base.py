"""Pretrain lorafleet's shipped demo base, `tasks-llama`: a 4M-parameter Llama that knows the demo tasks' skills.

`python scripts/build_demo_base.py` trains it from scratch on CPU (~50 minutes on 2 cores) and writes
`lorafleet/assets/bases/tasks-llama/` (`config.json`, `model.safetensors` in bfloat16, `manifest.json` with the
weights' sha256 and the recipe). The recipe, all fixed here:

- data: `plain_task_records` of `scripts/demo_data.py` (the shipped task generators with their own seeds, never the
  records of `jobs/data/tasks.jsonl`): bare answers (`"c b a"`, not the job's `"Reversed: c b a"`) in layouts that
  are not the job's instruction template, so the base knows the skills and the look of a prompt but not the format
  the default job's adapter teaches.
- model: `family_config("llama")` with hidden size 256 and 4 layers, lorafleet's tokenizer, seed 0.
- stage 1, the skills (7000 steps): the `plain` layout only, `"<instruction> | <input> = <answer>"`.
- stage 2, the layouts (4000 steps, from stage 1's weights rounded to bfloat16 as the file stores them): the three
  layouts of `PLAIN_STYLES` in turn, whose newlines, `###` headers and `Input:` lines an instruction template is
  made of. Without it the default job's template is foreign text to the base, and 360 LoRA steps reached 12% exact
  match; after 2000 stage-2 steps the default job reached 40%, after 4000 53% (the base's own held-out exact match
  over the three layouts: .60 and .75).
- each stage: AdamW (betas 0.9/0.98, weight decay 0.01) from a fresh state, learning rate 1e-3 with 100 warm-up
  steps and a cosine decay to 10%, batch 32, loss on the answer tokens only, gradient clipping at 1.0, 2 CPU threads.

The run is deterministic on one machine (fixed seeds and thread count); another CPU may differ in the last bits of
float arithmetic, hence the sha256 in the manifest, which lorafleet verifies before it uses the weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_data import PLAIN_STYLES, plain_task_records  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = REPO_ROOT / "lorafleet" / "assets" / "bases" / "tasks-llama"
CONFIG = {"hidden_size": 256, "num_hidden_layers": 4}
SEED = 777
RECORDS = 60000
BATCH = 32
LR = 1e-3
WARMUP = 100
STEPS = 7000
LAYOUT_STEPS = 4000


def _encode(tokenizer, record: dict) -> tuple[list[int], list[int]]:
    prompt = [tokenizer.bos_token_id] + tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
    answer = tokenizer(record["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt, answer


def _batch(samples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(p) + len(a) for p, a in samples)
    ids = torch.full((len(samples), length), pad_id)
    labels = torch.full((len(samples), length), -100)
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    for i, (prompt, answer) in enumerate(samples):
        ids[i, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        labels[i, len(prompt) : len(prompt) + len(answer)] = torch.tensor(answer)
        mask[i, : len(prompt) + len(answer)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def exact_match(model, tokenizer, records: list[dict]) -> dict[str, float]:
    """Greedy exact match of the plain-format answers, per task and overall."""
    model.eval()
    hits: dict[str, list[bool]] = {}
    for record in records:
        prompt, _ = _encode(tokenizer, record)
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        text = tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)
        hits.setdefault(record["task"], []).append(text.strip() == record["answer"].strip())
    model.train()
    scores = {task: sum(v) / len(v) for task, v in hits.items()}
    scores["all"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return scores


def _train(model, tokenizer, data, steps: int, seed: int, held_out: list[dict], eval_every: int, stage: str) -> dict:
    """AdamW from a fresh state with warm-up and cosine decay; returns the last held-out scores."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, betas=(0.9, 0.98))
    rng = random.Random(seed)
    start = time.time()
    scores: dict[str, float] = {}
    for step in range(steps):
        decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = LR * min(1.0, (step + 1) / WARMUP) * decay
        loss = model(**_batch([data[rng.randrange(len(data))] for _ in range(BATCH)], tokenizer.pad_token_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            scores = exact_match(model, tokenizer, held_out)
            per_task = " ".join(f"{k} {v:.2f}" for k, v in scores.items() if k != "all")
            print(f"{stage} step {step + 1} loss {loss.item():.3f} exact {scores['all']:.3f} ({per_task}) "
                  f"{time.time() - start:.0f}s", flush=True)
    return scores


def _round_to_bf16(model) -> None:
    """Round the weights as the shipped file stores them, so stage 2 starts from what a stage-1 base holds."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(tensor.to(torch.bfloat16).to(tensor.dtype))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python scripts/build_demo_base.py", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS, help="Stage 1 steps: the skills, plain layout.")
    parser.add_argument("--layout-steps", type=int, default=LAYOUT_STEPS, help="Stage 2 steps: all layouts.")
    parser.add_argument("--stage1", type=Path, help="A folder with stage 1's model.safetensors (written with "
                        "--layout-steps 0): skip stage 1 and start stage 2 from it; the result is the same.")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="Folder to write the base into.")
    parser.add_argument("--eval-every", type=int, default=1000, help="Report held-out exact match this often.")
    parser.add_argument("--held-out", type=int, help="Score this many held-out records (default: 200 in stage 1, "
                        "300 in stage 2); the weights do not depend on it.")
    args = parser.parse_args(argv)

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from lorafleet.data.tokenizer import load_tokenizer
    from lorafleet.model.families import family_config

    torch.set_num_threads(2)
    tokenizer = load_tokenizer()
    config = family_config(
        "llama",
        vocab_size=len(tokenizer),
        overrides=CONFIG,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    scores: dict[str, float] = {}
    if args.stage1 is not None:
        model.load_state_dict({k: v.float() for k, v in load_file(args.stage1 / "model.safetensors").items()},
                              strict=False)  # the tied lm_head is not in the file
        model.tie_weights()
    elif args.steps:
        data = [_encode(tokenizer, r) for r in plain_task_records(RECORDS, seed=SEED)]
        scores = _train(model, tokenizer, data, args.steps, 0, plain_task_records(args.held_out or 200, seed=SEED + 1),
                        args.eval_every, "skills")
    if args.layout_steps:
        _round_to_bf16(model)
        data = [_encode(tokenizer, r) for r in plain_task_records(RECORDS, seed=SEED + 2, styles=tuple(PLAIN_STYLES))]
        held_out = plain_task_records(args.held_out or 300, seed=SEED + 3, styles=tuple(PLAIN_STYLES))
        scores = _train(model, tokenizer, data, args.layout_steps, 1, held_out, args.eval_every, "layouts")

    args.out.mkdir(parents=True, exist_ok=True)
    weights = {name: t.detach().to(torch.bfloat16).contiguous() for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    save_file(weights, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    config.dtype = "bfloat16"
    config.to_json_file(str(args.out / "config.json"))
    digest = hashlib.sha256((args.out / "model.safetensors").read_bytes()).hexdigest()
    manifest = {
        "name": "tasks-llama",
        "description": "A 4M-parameter Llama (hidden 256, 4 layers) pretrained on the demo tasks' skills, without the "
                       "default job's instruction template.",
        "sha256": digest,
        "parameters": sum(p.numel() for p in model.parameters()),
        "recipe": {"script": "scripts/build_demo_base.py", "steps": args.steps, "layout_steps": args.layout_steps,
                   "records": RECORDS, "seed": SEED, "batch": BATCH, "learning_rate": LR, "torch": torch.__version__},
        "held_out_exact_match": round(scores["all"], 3) if scores else None,
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{args.out} ({(args.out / 'model.safetensors').stat().st_size / 2**20:.1f} MiB, sha256 {digest[:12]})")


if __name__ == "__main__":
    main()
