"""Early stopping's count ([`EvalProgress`]), the best kept checkpoint of a run ([`best_checkpoint`]) and the summary
fields they fill, without a cluster."""

import math
from types import SimpleNamespace

import pytest
import torch
from helpers.cli import TEST_JOB

from lorafleet.spec import load_spec
from lorafleet.train import worker
from lorafleet.train.driver import RunSummary, best_checkpoint, prepare
from lorafleet.train.worker import EvalProgress, WorkerContext, WorkerInputs, train_loop_per_worker

CPU = torch.device("cpu")
# A tiny one-worker job evaluated every step: the loop runs in this process, the held-out losses are scripted.
LOOP = ["model.config={num_hidden_layers: 1}", "model.dtype=float32", "quantization.compute_dtype=float32",
        "training.dtype=float32", "kernels.enabled=false", "data.max_length=32", "scaling.num_workers=1",
        "training.micro_batch_size=1", "training.warmup=0", "training.steps=8", "checkpoint.every_n_steps=4",
        "data.eval_fraction=0.1", "eval.every_n_steps=1"]


def first_stop(losses: list[float], patience: int, min_delta: float = 0.0):
    progress = EvalProgress()
    for step, loss in enumerate(losses, start=1):
        progress.update(loss, step, min_delta)
        if progress.exhausted(patience):
            return step, progress
    return None, progress


@pytest.mark.parametrize(
    "losses, patience, min_delta, stop",
    [
        ([3.0, 2.0, 1.0, 0.5], 1, 0.0, None),  # always improving: never
        ([3.0, 2.0, 2.5, 2.4, 2.6], 3, 0.0, 5),  # the third evaluation after the best (step 2)
        ([3.0, 2.0, 2.5, 2.4, 2.6], 4, 0.0, None),
        ([3.0, 2.0, 2.0, 1.0], 1, 0.0, 3),  # equal is no improvement
        ([3.0, 2.95, 2.9, 2.0], 2, 0.1, 3),  # 0.05 lower is not more than min_delta 0.1
        ([3.0, math.nan, math.nan, 1.0], 2, 0.0, 3),  # NaN never improves
        ([math.nan, 3.0, math.inf, math.inf], 2, 0.0, 4),  # the first finite loss is the first best
    ],
)
def test_patience_counts_evaluations_without_improvement_beyond_min_delta(losses, patience, min_delta, stop):
    assert first_stop(losses, patience, min_delta)[0] == stop


def test_min_delta_compares_with_the_last_real_improvement():
    # Keras' rule: a small gain does not become the new best, so slow drift still runs out the patience.
    step, progress = first_stop([3.0, 2.95, 2.92, 2.91], patience=3, min_delta=0.1)
    assert (step, progress.best, progress.best_step) == (4, 3.0, 1)


def test_the_count_survives_a_checkpoint():
    _, progress = first_stop([3.0, 2.0, 2.5], patience=5)
    info = {"eval_progress": progress.to_info()}
    restored = EvalProgress.from_info(info)
    assert restored == progress == EvalProgress(best=2.0, best_step=2, since_best=1)
    restored.update(2.6, 4)
    assert restored.exhausted(2)
    # A checkpoint without the record (evaluation off, or written before it existed): counting starts afresh.
    assert EvalProgress.from_info({"step": 4}) == EvalProgress()
    assert not EvalProgress().exhausted(None)


def ckpt(name: str) -> SimpleNamespace:
    return SimpleNamespace(path=f"/runs/job/{name}")


def test_best_checkpoint_is_the_lowest_finite_eval_loss_among_kept_and_latest():
    result = SimpleNamespace(
        best_checkpoints=[(ckpt("a"), {"step": 2, "eval_loss": 2.5}), (ckpt("b"), {"step": 4, "eval_loss": math.nan})],
        checkpoint=ckpt("c"),
        metrics={"step": 6, "eval_loss": 2.4},
    )
    assert best_checkpoint(result).path == "/runs/job/c"
    # Ties: the earliest step.
    result.metrics = {"step": 6, "eval_loss": 2.5}
    assert best_checkpoint(result).path == "/runs/job/a"
    # No checkpoint with a score (evaluation off, or never at a checkpoint step).
    empty = SimpleNamespace(best_checkpoints=[(ckpt("a"), {"step": 2})], checkpoint=ckpt("a"), metrics={"step": 2})
    assert best_checkpoint(empty) is None


def test_summary_carries_stopped_early_and_best_adapter_only_when_set():
    plain = RunSummary(job="j", status="succeeded").to_dict()
    assert "stopped_early" not in plain and "best_adapter_uri" not in plain
    stopped = RunSummary(job="j", status="succeeded", stopped_early=True, best_adapter_uri="/runs/j/a").to_dict()
    assert (stopped["stopped_early"], stopped["best_adapter_uri"]) == (True, "/runs/j/a")


@pytest.fixture(scope="module")
def prepared():
    return prepare(load_spec(TEST_JOB, LOOP))


def run_loop(monkeypatch, prepared, losses: dict[int, float], *overrides: str, start: int = 0, recorded=None):
    """Run the loop resuming at `start` from a checkpoint whose `lorafleet.json` is `recorded`; the held-out loss of
    step k is `losses[k]`. Returns (step, extra `lorafleet.json` info) of each checkpoint taken, and the metrics."""
    taken, published, current = [], [], [0]

    def resume(strategy, spec, ctx, channel=None, info=None):
        if info is not None:
            info.update(recorded or {})
        return start

    def train_step(strategy, data, plan, index, ctx, spec):
        current[0] = index + 1
        return {"step": index + 1, "loss": 1.0, "lr": 0.0, "grad_norm": None, "tokens_per_s": 1.0, "step_time_s": 0.0}

    monkeypatch.setattr(worker, "_context", lambda: WorkerContext(0, 1, CPU))
    monkeypatch.setattr(worker, "resume", resume)
    monkeypatch.setattr(worker, "train_step", train_step)
    monkeypatch.setattr(worker, "export_step", lambda metrics, name, rank: published.append(dict(metrics)))
    monkeypatch.setattr(worker, "held_out_metrics", lambda *_: {"eval_loss": losses[current[0]]})
    monkeypatch.setattr(worker, "save_and_report", lambda metrics, strategy, spec, ctx, source=None, extra=None:
                        taken.append((metrics["step"], dict(extra or {}))))
    spec = load_spec(TEST_JOB, [*LOOP, *overrides])
    train_loop_per_worker(WorkerInputs(spec.model_dump_json(), prepared.base, prepared.data).config())
    return taken, published


LOSSES = {1: 3.0, 2: 2.0, 3: 2.5, 4: 2.4, 5: 2.6, 6: 2.7, 7: 1.0, 8: 0.9}


def test_the_loop_stops_after_patience_with_a_checkpoint_at_that_step(monkeypatch, prepared):
    taken, published = run_loop(monkeypatch, prepared, LOSSES, "eval.early_stopping_patience=3")
    # Best at 2; 3, 4, 5 do not improve: stop after step 5, checkpointed though 5 is no checkpoint step.
    assert [step for step, _ in taken] == [4, 5]
    assert taken[0][1] == {"eval_progress": {"best": 2.0, "best_step": 2, "since_best": 2}, "eval_loss": 2.4}
    assert taken[1][1] == {"eval_progress": {"best": 2.0, "best_step": 2, "since_best": 3}, "eval_loss": 2.6,
                           "stopped_early": True}
    assert [m["step"] for m in published] == [1, 2, 3, 4, 5]
    assert [m.get("stopped_early") for m in published] == [None] * 4 + [True]


def test_without_patience_or_with_more_the_loop_runs_to_the_end(monkeypatch, prepared):
    for overrides in ((), ("eval.early_stopping_patience=5",)):
        taken, published = run_loop(monkeypatch, prepared, LOSSES, *overrides)
        assert [step for step, _ in taken] == [4, 8] and not any("stopped_early" in m for m in published)


def test_a_resumed_loop_continues_counting_from_its_checkpoint(monkeypatch, prepared):
    at_4 = {"eval_progress": {"best": 2.0, "best_step": 2, "since_best": 2}}
    taken, _ = run_loop(monkeypatch, prepared, LOSSES, "eval.early_stopping_patience=3", start=4, recorded=at_4)
    assert [step for step, _ in taken] == [5]
    # From a checkpoint without the count, step 5 would be the first best, and 7 and 8 improve: no stop.
    taken, _ = run_loop(monkeypatch, prepared, LOSSES, "eval.early_stopping_patience=3", start=4, recorded={})
    assert [step for step, _ in taken] == [8]


def test_a_run_that_stopped_early_trains_no_further_when_resubmitted(monkeypatch, prepared):
    done = {"stopped_early": True, "eval_progress": {"best": 2.0, "best_step": 2, "since_best": 3}}
    taken, published = run_loop(monkeypatch, prepared, LOSSES, "eval.early_stopping_patience=3", start=5,
                                recorded=done)
    assert taken == [] and published == []
