"""`lorafleet submit jobs/alora.yaml` end to end: loss drops, the adapter judges held-out conversations, and the
checkpoint is a PEFT aLoRA adapter that `lorafleet generate` uses and `lorafleet merge` refuses."""

import json

import pytest
import torch

from helpers.cli import JOBS

# Runs join the session's Ray cluster rather than each starting one (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("joined_ray")

STEPS = 80  # the shipped job runs 150 (held-out accuracy 1.0 measured); 80 keeps this test near 2.5 min


def test_submit_alora_job_learns_the_judgment(cli, tmp_path):
    res = cli("submit", str(JOBS / "alora.yaml"), "--json", "--set", f"training.steps={STEPS}",
              "--set", f"checkpoint.every_n_steps={STEPS}", "--set", f"checkpoint.storage={tmp_path / 'runs'}")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["status"] == "succeeded"
    assert summary["final_loss"] < 0.5 * summary["first_loss"], summary
    assert summary["kernels"] == {"mlp": 4, "qkv": 4, "o": 4, "loss": 1}  # aLoRA layers run fused
    adapter = summary["adapter_uri"]
    config = json.loads(open(f"{adapter}/adapter_config.json").read())
    assert config["alora_invocation_tokens"][0] == 8 and config["alora_invocation_tokens"][-1] == 9

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorafleet.infer.generate import prompt_ids
    from lorafleet.model.build import load_tokenizer_for

    # Plain PEFT loading, as any user would.
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    tok = load_tokenizer_for(config["base_model_name_or_path"])
    inv = config["alora_invocation_tokens"]
    yes, no = tok("yes", add_special_tokens=False).input_ids[0], tok("no", add_special_tokens=False).input_ids[0]
    records = [json.loads(l) for l in open(JOBS / "data" / "judge_heldout.jsonl")][:100]
    correct = 0
    with torch.no_grad():
        for r in records:
            ids, _ = prompt_ids(tok, r["text"].split("<|reserved_0|>")[0], inv)
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            correct += ("yes" if logits[yes] > logits[no] else "no") == r["answer"]
            # Activation behaviour: before the invocation the adapter model is the base model.
        with model.disable_adapter():
            base_logits = model(input_ids=torch.tensor([ids])).logits[0]
        adapted = model(input_ids=torch.tensor([ids])).logits[0]
    assert torch.equal(adapted[: len(ids) - len(inv)], base_logits[: len(ids) - len(inv)])
    assert correct / len(records) >= 0.75, f"held-out accuracy {correct / len(records):.2f}"

    gen = cli("generate", "--adapter", adapter, "--prompt", "<|user|>cat 42 dog<|end|>", "--max-new-tokens", "4", "--json")
    assert gen.returncode == 0, gen.stderr[-2000:]
    out = json.loads(gen.stdout.strip().splitlines()[-1])
    assert out["invocation_appended"] and out["alora"] and out["text"] in ("yes", "no")
    from lorafleet.infer.merge import MergeRefused, merge_adapter

    with pytest.raises(MergeRefused, match="aLoRA adapter"):
        merge_adapter(adapter, str(tmp_path / "merged"))
