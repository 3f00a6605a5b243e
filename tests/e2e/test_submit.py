"""End to end through `lorafleet submit`: the default job on 2 Ray workers, its adapter, and data-parallel math."""

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers.cli import JOBS, run_cli, TEST_JOB
from lorafleet.train.timings import PHASES


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The shipped default job, exactly as the README runs it (only storage redirected)."""
    storage = tmp_path_factory.mktemp("runs")
    started = time.monotonic()
    result = run_cli("submit", str(JOBS / "llama.yaml"), "--json", "--set", f"checkpoint.storage={storage}", timeout=900)
    result.wall_s = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    return summary, storage, result


def test_default_job_learns(default_run):
    summary, _, result = default_run
    assert summary["status"] == "succeeded"
    assert summary["steps"] == 480 and summary["start_step"] == 0
    assert summary["final_loss"] < summary["first_loss"] - 3.0, summary
    # The shipped base knows the skills but not the instruction format: its greedy answers to the held-out prompts are
    # (nearly) never right; the adapter's are right far more often (53% measured in bf16; the floor leaves room for
    # fp32 CPUs and another machine's rounding).
    assert summary["base_exact_match"] <= 0.1, summary
    assert summary["eval_exact_match"] >= 0.4, summary
    assert summary["eval_loss"] < 2.0 and summary["best_eval_loss"] <= summary["eval_loss"], summary
    assert "held-out answers: exact match" in result.stderr
    assert summary["tokens_per_s"] > 0
    assert "step 480/480" in result.stderr
    assert "Traceback" not in result.stderr
    # Where the fixed cost went (lorafleet.train.timings): every phase timed, none longer than the command.
    phases = summary["phases"]
    assert set(phases) == set(PHASES) and all(seconds > 0 for seconds in phases.values()), phases
    assert sum(phases.values()) <= result.wall_s, (phases, result.wall_s)


def test_checkpoint_is_adapter_only(default_run):
    summary, storage, _ = default_run
    adapter = Path(summary["adapter_uri"])
    assert adapter.is_dir() and str(adapter).startswith(str(storage))
    names = {p.name for p in adapter.iterdir()}
    # Rank 0's files only (the other worker's RNG states are inside the training state): DDP uploads from one worker.
    assert names == {"adapter_config.json", "adapter_model.safetensors", "training_state.safetensors",
                     "training_state.json", "lorafleet.json"}
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert tensors and all("lora_A" in k or "lora_B" in k for k in tensors), sorted(tensors)[:5]
    # r=16 on 7 projections of 4 layers: A and B per projection, nothing of the frozen base.
    assert len(tensors) == 4 * 7 * 2
    assert all(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k), "some lora_B never trained"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 16 and Path(config["base_model_name_or_path"], "config.json").exists()
    # keep: 2 of the checkpoints at 120, 240, 360 and 480, ranked by held-out loss, plus the latest: the best survives.
    checkpoints = sorted(p for p in adapter.parent.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    steps = sorted(json.loads((p / "lorafleet.json").read_text())["step"] for p in checkpoints)
    assert 480 in steps and summary["best_step"] in steps and len(steps) in (2, 3), (steps, summary["best_step"])


def test_adapter_loads_with_plain_peft_in_a_fresh_process(default_run):
    summary, _, _ = default_run
    script = textwrap.dedent(
        f"""
        import json, torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer
        adapter = {summary["adapter_uri"]!r}
        base_path = json.load(open(adapter + "/adapter_config.json"))["base_model_name_or_path"]
        tok = AutoTokenizer.from_pretrained(base_path)
        ids = tok("### Instruction:\\nAdd these two numbers.\\n\\n### Input:\\n3 + 4\\n\\n### Response:\\n", return_tensors="pt").input_ids
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        with torch.no_grad():
            before = base(ids).logits
            model = PeftModel.from_pretrained(base, adapter)
            after = model(ids).logits
        print(json.dumps({{"max_diff": (after - before).abs().max().item(), "finite": bool(torch.isfinite(after).all())}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["finite"] and result["max_diff"] > 1e-3


def _curve(spec):
    from lorafleet.train.driver import run_job

    history = []
    summary = run_job(spec, on_progress=history.append)
    assert summary.status == "succeeded", summary.error
    return [h["loss"] for h in history]


def test_ddp_matches_single_worker_with_same_global_batch(tmp_path):
    """2 workers x 1 micro-batch of 4 and 1 worker x 2 accumulated micro-batches of 4 see the same global batches
    and normalize by the same token count, so their loss curves agree up to float summation order; with
    `data.group_by_length` too (the plan's split over workers is the same either way: tests/unit/data)."""
    import ray

    from lorafleet.spec import load_spec

    common = [
        "training.steps=6",
        "training.warmup=1",
        "training.micro_batch_size=4",
        "training.dtype=float32",
        "model.dtype=float32",
        "kernels.enabled=false",
        "checkpoint.every_n_steps=6",
        "data.group_by_length=true",
    ]
    try:
        two = _curve(load_spec(TEST_JOB, common + ["name=ddp2", "scaling.num_workers=2", "training.grad_accum=1", f"checkpoint.storage={tmp_path}"]))
        one = _curve(load_spec(TEST_JOB, common + ["name=ddp1", "scaling.num_workers=1", "training.grad_accum=2", f"checkpoint.storage={tmp_path}"]))
    finally:
        ray.shutdown()
    assert len(one) == len(two) == 6
    assert one[-1] < one[0]
    for a, b in zip(one, two):
        assert abs(a - b) < 2e-3 * max(1.0, abs(a)), (one, two)
