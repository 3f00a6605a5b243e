"""Held-out evaluation end to end through `lorafleet submit`: `eval_loss` at the right steps in metrics.jsonl, the
progress line, the summary and `lorafleet report`; training losses bitwise those of the same run without evaluation;
and the 2-worker held-out loss equal to a single-process one on the same adapter, and to plain PEFT's logits.

Three runs of the small default job (2 workers, fp32, LoRA dropout on so any RNG draw by the evaluation would show in
the training losses): one evaluating a held-out file every 3 steps (and generating answers to 6 of its records, scored
before the first step and at each evaluation), the same without evaluation, and the first under
DeepSpeed ZeRO-3 (whose forward gathers parameters from all ranks together, so both ranks must make as many forward
calls: 25 held-out samples make rank 1 pad one). The 2-worker held-out loss is compared with a single-process
evaluation of the very adapter the run saved, rather than with a 1-worker run: with dropout on, a 1-worker run draws
other dropout masks and trains another adapter.

Keep-best and early stopping share one run, submitted twice: its LoRA weights are turned to noise before step 3
(`--garble-at 3`), so the held-out loss, falling until step 2, rises and stays up; evaluated every step with
`eval.early_stopping_patience=3` and `checkpoint.keep=1`, the first submit is stopped after step 4's checkpoint (as a
preempted job) two evaluations into its patience, and the re-submit continues counting from the checkpoint and stops
early at step 5, pruning step 4's checkpoint but not step 2's, the best.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers.cli import JOBS, run_cli, SMALL_RUN, submit_small, TEST_JOB

from lorafleet.constants import IGNORE_INDEX
from lorafleet.model.build import build_model
from lorafleet.runstore.checkpoint import load_training_state, read_info
from lorafleet.spec import load_spec
from lorafleet.train.driver import prepare
from lorafleet.train.evaluate import evaluate_loss
from lorafleet.train.strategies import make_strategy
from lorafleet.train.worker import EvalProgress

# Runs join the session's Ray cluster rather than each starting one (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("joined_ray")

CPU = torch.device("cpu")
ZERO3 = ["scaling.strategy=deepspeed", "scaling.zero_stage=3"]
# 25 held-out samples over 2 workers in micro-batches of 4: 13 and 12, so rank 1 pads its 4th call (ZeRO-3's rule).
EVAL = ["eval.every_n_steps=3", "eval.max_samples=25"]
# Greedy answers to 6 held-out records at each evaluation, on rank 0 (not under ZeRO-3, which refuses it).
GENERATE = ["eval.generate.num_samples=6", "eval.generate.max_new_tokens=6"]


def records(storage: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (storage / name / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    held_out = storage.parent / "held_out.jsonl"
    held_out.write_text("".join((JOBS / "data" / "tasks.jsonl").read_text().splitlines(keepends=True)[-40:]))
    evaluated = submit_small("with-eval", storage, f"data.eval_path={held_out}", *EVAL, *GENERATE)
    plain = submit_small("without-eval", storage)
    zero3 = submit_small("zero3-eval", storage, f"data.eval_path={held_out}", *EVAL, *ZERO3)
    for proc, summary in (evaluated, plain, zero3):
        assert proc.returncode == 0 and summary["status"] == "succeeded", proc.stderr[-3000:]
    return storage, held_out, evaluated, plain, zero3


def test_eval_loss_at_eval_steps_in_metrics_progress_summary_and_report(runs):
    storage, _, (proc, summary), _, _ = runs
    rows = records(storage, "with-eval")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    evaluated = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    # Every 3 steps, the last, and (keep_best_by: eval_loss, the default with evaluation on) every checkpoint step.
    assert sorted(evaluated) == [2, 3, 4, 6]
    assert all(5.0 < loss < 9.0 for loss in evaluated.values()), evaluated  # ~ln(2048) for a barely trained model
    for step, loss in evaluated.items():
        assert f"[with-eval] step {step}/6  loss " in proc.stderr
        assert f"  eval {loss:.2f}  " in proc.stderr, proc.stderr[-2000:]
    best_step = min(evaluated, key=evaluated.get)
    assert summary["eval_loss"] == evaluated[6]
    assert (summary["best_eval_loss"], summary["best_step"]) == (evaluated[best_step], best_step)
    report = run_cli("report", "with-eval", "--storage", str(storage), "--json")
    assert report.returncode == 0, report.stderr
    shown = json.loads(report.stdout)
    assert (shown["eval_loss"], shown["best_eval_loss"], shown["best_step"]) == (
        evaluated[6], evaluated[best_step], best_step)
    assert shown["best_adapter_uri"] == summary["best_adapter_uri"] and "stopped_early" not in shown
    assert (storage / "with-eval" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # No patience set: it never stops early. The best adapter is the kept checkpoint with the lowest held-out loss.
    assert "stopped_early" not in summary and not any("stopped_early" in r for r in rows)
    best_checkpoint_step = min((2, 4, 6), key=evaluated.get)
    assert read_info(summary["best_adapter_uri"])["step"] == best_checkpoint_step
    assert read_info(summary["adapter_uri"])["step"] == 6


def test_generation_scores_at_eval_steps_and_the_base_models_before_the_first_step(runs):
    storage, _, (proc, summary), _, _ = runs
    rows = records(storage, "with-eval")
    scored = {r["step"]: (r["eval_exact_match"], r["eval_contains"]) for r in rows if "eval_exact_match" in r}
    assert sorted(scored) == [2, 3, 4, 6]  # with every held-out loss
    assert all(0.0 <= v <= 1.0 for pair in scored.values() for v in pair)
    assert [r["step"] for r in rows if "base_exact_match" in r] == [1]
    assert (summary["eval_exact_match"], summary["eval_contains"]) == scored[6]
    assert summary["base_exact_match"] == rows[0]["base_exact_match"]
    assert "exact match " in proc.stderr.split("done, loss")[-1], proc.stderr[-1500:]  # before -> after, at the end


def test_evaluation_leaves_training_bitwise_unchanged(runs):
    storage, _, _, (_, plain_summary), _ = runs
    with_eval, without = records(storage, "with-eval"), records(storage, "without-eval")
    assert [(r["loss"], r["grad_norm"]) for r in with_eval] == [(r["loss"], r["grad_norm"]) for r in without]
    # Without evaluation the summary carries no evaluation fields at all.
    assert not {"eval_loss", "best_eval_loss", "best_step", "best_adapter_uri", "stopped_early", "eval_exact_match",
                "base_exact_match"} & set(plain_summary)
    assert all("eval_loss" not in r for r in without)


def test_lorafleet_eval_scores_the_adapter_on_the_base_as_trained(runs):
    # The run's held-out loss, recomputed by `lorafleet eval` on the 4-bit base the run trained on.
    _, held_out, (_, summary), _, _ = runs
    args = ["eval", summary["adapter_uri"], "--data", str(held_out), "--max-samples", "25", "--max-new-tokens", "1",
            "--json"]
    as_trained = run_cli(*args, timeout=300)
    assert as_trained.returncode == 0, as_trained.stderr[-2000:]
    out = json.loads(as_trained.stdout.strip().splitlines()[-1])
    assert out["loss_samples"] == 25 and out["loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)
    # Full precision is another model: its loss differs beyond the tolerance above.
    unquantized = json.loads(run_cli(*args, "--unquantized", timeout=300).stdout.strip().splitlines()[-1])
    assert unquantized["loss"] != pytest.approx(summary["eval_loss"], rel=1e-4)


@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_two_worker_eval_loss_is_the_single_process_one_and_plain_peft(runs, strategy):
    storage, held_out, ddp, _, zero3 = runs
    _, summary = ddp if strategy == "ddp" else zero3
    assert sorted(r["step"] for r in records(storage, summary["job"]) if "eval_loss" in r) == [2, 3, 4, 6]
    # The spec the run had, but evaluated here in one process with the plain (DDP-less) strategy.
    spec = load_spec(TEST_JOB, ["name=with-eval", f"checkpoint.storage={storage}", *SMALL_RUN,
                                           f"data.eval_path={held_out}", *EVAL])
    prepared = prepare(spec)
    data = prepared.data
    model, kernels = build_model(spec, prepared.base, CPU, invocation_tokens=data.invocation_tokens)
    strategy = make_strategy(model, spec, CPU, kernels)  # no process group: one process
    state = load_training_state(summary["adapter_uri"], 0)
    assert state["step"] == 6
    strategy.load_adapter_state(state["adapter"])

    single = evaluate_loss(strategy.module, data.eval_samples, data.pad_token_id, device=CPU,
                           micro_batch_size=spec.training.micro_batch_size, max_samples=spec.eval.max_samples)
    assert single.samples == 25
    assert single.loss == pytest.approx(summary["eval_loss"], rel=1e-5)

    # Plain PEFT: sum of per-token cross-entropies over all held-out targets / their number, from the logits.
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for sample in data.eval_samples[:25]:
            logits = model(input_ids=torch.tensor([sample["input_ids"]])).logits[0, :-1].double()
            targets = torch.tensor(sample["labels"][1:])
            keep = targets != IGNORE_INDEX
            total += float(torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum"))
            count += int(keep.sum())
    assert count == single.tokens
    assert total / count == pytest.approx(summary["eval_loss"], rel=1e-5)


PATIENCE = 3
EARLY = ["training.steps=8", "data.eval_fraction=0.1", "eval.every_n_steps=1", "eval.max_samples=25",
         f"eval.early_stopping_patience={PATIENCE}", "checkpoint.keep=1"]


@pytest.fixture(scope="module")
def early(tmp_path_factory):
    storage = tmp_path_factory.mktemp("early")
    first = submit_small("early", storage, *EARLY, faults=["--garble-at", "3", "--stop-after", "3"])
    second = submit_small("early", storage, *EARLY)
    for proc, summary in (first, second):
        assert proc.returncode == 0 and summary["status"] == "succeeded", proc.stderr[-3000:]
    return storage, first, second


def checkpoint_steps(storage: Path, name: str) -> dict[int, Path]:
    return {read_info(path)["step"]: path for path in (storage / name).glob("checkpoint_*") if path.is_dir()}


def test_early_stopping_fires_after_patience_evaluations_without_improvement_across_a_resume(early):
    storage, (_, first), (proc, second) = early
    rows = records(storage, "early")
    evaluated = [(r["step"], r["eval_loss"]) for r in rows]  # every step is evaluated
    assert [step for step, _ in evaluated] == list(range(1, second["steps"] + 1))
    # The noise made things worse: the loss before it is lower than every one after.
    assert evaluated[1][1] < min(loss for step, loss in evaluated if step >= 3), evaluated
    # Where the rule says the run must stop: the first evaluation that ends `PATIENCE` without an improvement.
    progress, expected = EvalProgress(), None
    for step, loss in evaluated:
        progress.update(loss, step)
        if progress.exhausted(PATIENCE):
            expected = step
            break
    assert expected is not None and expected < 8, evaluated
    # The first submit stopped (a stop request) at its step-4 checkpoint, two evaluations into its patience, so the
    # re-submit stopping at `expected` continued the count: from scratch it would have waited 3 more evaluations.
    assert (first["steps"], first.get("stopped_early")) == (4, None)
    assert expected == 5, evaluated
    assert second["start_step"] == 4 and second["steps"] == expected and second["stopped_early"] is True
    assert [r["step"] for r in rows if r.get("stopped_early")] == [expected]
    done = f"lorafleet: early: done, loss {second['first_loss']:.4f} -> {second['final_loss']:.4f}"
    assert f"{done}, stopped early at step {expected}" in proc.stderr, proc.stderr[-2000:]
    # The stopping step has its own checkpoint (not a `checkpoint.every_n_steps` step), which records the count.
    info = read_info(second["adapter_uri"])
    assert info["step"] == expected and info["stopped_early"] is True
    assert info["eval_progress"] == {"best": evaluated[1][1], "best_step": 2, "since_best": PATIENCE}


def test_keep_best_keeps_the_best_checkpoint_and_the_latest_when_later_ones_are_worse(early):
    storage, _, (_, summary) = early
    losses = {r["step"]: r["eval_loss"] for r in records(storage, "early")}
    # Checkpoints were taken at 2, 4 (every 2 steps) and 5 (the early stop); keep=1 keeps the best (2) and the
    # latest (5): step 4's, worse than step 2's and no longer the latest, was deleted.
    assert min((2, 4, 5), key=losses.get) == 2
    kept = checkpoint_steps(storage, "early")
    assert sorted(kept) == [2, 5], kept
    assert Path(summary["best_adapter_uri"]) == kept[2] and Path(summary["adapter_uri"]) == kept[5]
    assert (summary["best_eval_loss"], summary["best_step"]) == (losses[2], 2)
    report = run_cli("report", "early", "--storage", str(storage), "--json")
    assert report.returncode == 0, report.stderr
    shown = json.loads(report.stdout)
    assert (shown["best_adapter_uri"], shown["stopped_early"], shown["steps"]) == (summary["best_adapter_uri"], True, 5)
    # The best checkpoint holds step 2's adapter: its held-out loss is the one measured at step 2.
    spec = load_spec(TEST_JOB, ["name=early", f"checkpoint.storage={storage}", *SMALL_RUN, *EARLY])
    prepared = prepare(spec)
    model, kernels = build_model(spec, prepared.base, CPU, invocation_tokens=prepared.data.invocation_tokens)
    strategy = make_strategy(model, spec, CPU, kernels)
    strategy.load_adapter_state(load_training_state(kept[2], 0)["adapter"])
    single = evaluate_loss(strategy.module, prepared.data.eval_samples, prepared.data.pad_token_id, device=CPU,
                           micro_batch_size=spec.training.micro_batch_size, max_samples=spec.eval.max_samples)
    assert single.loss == pytest.approx(losses[2], rel=1e-5)
