"""The training step and the worker loop, in one process without Ray: the step's loss and gradient are plain PEFT's
on the same global batch, step hooks see the right steps and can stop or poison a run, and the data the driver
prepares is what the workers train on."""

from __future__ import annotations

import pytest
import torch
from helpers.cli import JOBS, TEST_JOB
from helpers.faults import NanLossAt, StopAfter

from lorafleet.constants import IGNORE_INDEX
from lorafleet.data.alora import resolve_invocation
from lorafleet.data.batching import collate
from lorafleet.data.encode import prepare_samples
from lorafleet.model.build import build_model, load_tokenizer_for, resolve_base_model
from lorafleet.spec import SpecError, load_spec
from lorafleet.train import worker
from lorafleet.train.driver import prepare
from lorafleet.train.strategies import make_strategy
from lorafleet.train.worker import (
    NonFiniteLossError,
    StepEvent,
    WorkerContext,
    WorkerInputs,
    train_loop_per_worker,
    train_step,
)

CPU = torch.device("cpu")
# One worker, 2 micro-batches of 2: the step must normalize over the 4-sample global batch, not per micro-batch.
# fp32 throughout (base compute included) and no dropout, so the plain-PEFT reference matches to rounding.
SMALL = [
    "model.config={num_hidden_layers: 2}",
    "model.dtype=float32",
    "quantization.compute_dtype=float32",
    "training.dtype=float32",
    "kernels.enabled=false",
    "lora.dropout=0.0",
    "data.max_length=64",
    "scaling.num_workers=1",
    "training.micro_batch_size=2",
    "training.grad_accum=2",
    "training.warmup=0",
]


def small_spec(*extra: str):
    return load_spec(TEST_JOB, SMALL + list(extra))


@pytest.fixture(scope="module")
def prepared():
    return prepare(small_spec())


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def test_train_step_is_plain_peft_on_the_global_batch(prepared):
    spec, data = prepared.spec, prepared.data
    plan = data.plan(spec)
    torch.manual_seed(0)
    model, kernels = build_model(spec, prepared.base)
    reference, _ = build_model(spec, prepared.base)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # lora_B starts at zero, which would leave lora_A without gradient: draw both
        for ours, theirs in zip(trainable(model), trainable(reference)):
            ours.copy_(torch.randn(ours.shape, generator=gen) * 0.05)
            theirs.copy_(ours)
    strategy = make_strategy(model, spec, CPU, kernels)
    grads: list[torch.Tensor] = []
    optimizer_step = strategy.step

    def step_keeping_gradients():  # the step zeroes them
        grads.extend(p.grad.clone() for p in trainable(model))
        return optimizer_step()

    strategy.step = step_keeping_gradients

    metrics = train_step(strategy, data, plan, 0, WorkerContext(0, 1, CPU), spec)

    # Plain PEFT on the whole global batch at once: Hugging Face's loss is the mean over its target tokens.
    batch = collate([data.samples[i] for i in plan.global_batch(0)], data.pad_token_id)
    loss = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    loss.backward()
    want = [p.grad for p in trainable(reference)]

    assert metrics["step"] == 1 and metrics["lr"] == spec.training.learning_rate
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-5)
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in want]))
    assert metrics["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)
    assert len(grads) == len(want) == 2 * 7 * 2  # lora_A and lora_B of 7 projections in 2 layers
    scale = max(float(g.abs().max()) for g in want)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale)


def test_train_step_refuses_a_non_finite_loss_before_the_optimizer_step(prepared):
    spec, data = prepared.spec, prepared.data
    model, kernels = build_model(spec, prepared.base)
    strategy = make_strategy(model, spec, CPU, kernels)
    NanLossAt(3)(StepEvent(3, 0, 1, strategy))
    with pytest.raises(NonFiniteLossError, match=r"^training loss became nan at step 3;"):
        train_step(strategy, data, data.plan(spec), 2, WorkerContext(0, 1, CPU), spec)
    assert strategy.scheduler.last_epoch == 0  # no optimizer (nor scheduler) step was taken


class Recorder:
    def __init__(self):
        self.seen: list[tuple[int, int, int]] = []

    def __call__(self, event: StepEvent) -> None:
        self.seen.append((event.step, event.rank, event.world_size))


@pytest.fixture
def loop_without_ray(monkeypatch):
    """Run [`train_loop_per_worker`] in this process: rank 0 of 1, resuming at step 1; returns the checkpoint steps."""
    checkpoints: list[int] = []
    monkeypatch.setattr(worker, "_context", lambda: WorkerContext(0, 1, CPU))
    monkeypatch.setattr(worker, "resume", lambda strategy, spec, ctx, channel=None, info=None: 1)
    monkeypatch.setattr(worker, "export_step", lambda metrics, name, rank: None)
    monkeypatch.setattr(worker, "save_and_report", lambda metrics, *_: checkpoints.append(metrics["step"]))
    return checkpoints


def test_step_hooks_see_each_step_and_stop_at_the_next_checkpoint(prepared, loop_without_ray):
    spec = small_spec("training.steps=7", "checkpoint.every_n_steps=2")
    recorder = Recorder()
    inputs = WorkerInputs(spec.model_dump_json(), prepared.base, prepared.data, step_hooks=(StopAfter(3), recorder))
    train_loop_per_worker(inputs.config())
    # Resumed at step 1, so the first step run is step 2; asked to stop before step 3, which is no checkpoint step:
    # the run ends after step 4's checkpoint. Every hook is called, even after one asked to stop.
    assert recorder.seen == [(2, 0, 1), (3, 0, 1), (4, 0, 1)]
    assert loop_without_ray == [2, 4]


def test_a_nan_hook_fails_the_run_at_its_step(prepared, loop_without_ray):
    spec = small_spec("training.steps=4", "checkpoint.every_n_steps=2")
    inputs = WorkerInputs(spec.model_dump_json(), prepared.base, prepared.data, step_hooks=(NanLossAt(3),))
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        train_loop_per_worker(inputs.config())
    assert loop_without_ray == [2]


def test_driver_prepares_the_samples_the_workers_train_on(prepared):
    spec = prepared.spec
    tokenizer = load_tokenizer_for(prepared.base)
    samples = prepare_samples(spec.data, tokenizer)
    data = prepared.data
    assert data.samples == samples and data.pad_token_id == tokenizer.pad_token_id and data.invocation_tokens is None
    assert data.targets == [sum(label != IGNORE_INDEX for label in s["labels"]) for s in samples]
    assert 0 < min(data.targets)


def test_driver_resolves_the_alora_invocation_once_and_refuses_data_without_it():
    spec = load_spec(JOBS / "alora.yaml", ["model.config={num_hidden_layers: 1}"])
    data = prepare(spec).data
    tokenizer = load_tokenizer_for(resolve_base_model(spec))
    assert data.invocation_tokens == resolve_invocation(spec.alora, tokenizer)
    assert all(s["alora_start"] is not None for s in data.samples)
    tasks = JOBS / "data" / "tasks.jsonl"
    without = load_spec(
        JOBS / "alora.yaml", ["model.config={num_hidden_layers: 1}", f"data.path={tasks}", "data.format=instruction"]
    )
    with pytest.raises(SpecError, match=r"^data.path: 3000 of 3000 records do not contain the alora invocation"):
        prepare(without)
