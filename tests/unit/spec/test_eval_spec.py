"""The spec rules of keep-best and early stopping: `checkpoint.keep_best_by` defaults by whether evaluation is on,
is refused without held-out data, survives the JSON trip to the workers, and decides which steps are evaluated;
`eval.early_stopping_patience` / `eval.min_delta` are refused where they cannot count."""

import pytest

from lorafleet.spec import SpecError, load_spec
from lorafleet.spec.schema import spec_from_json

JOB = "tests/jobs/llama.yaml"
HELD_OUT = "data.eval_fraction=0.1"


def problems(*overrides: str) -> list[str]:
    with pytest.raises(SpecError) as caught:
        load_spec(JOB, list(overrides))
    return caught.value.problems


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ([], None),  # evaluation off: newest kept
        ([HELD_OUT], "eval_loss"),  # evaluation on: best kept
        ([HELD_OUT, "checkpoint.keep_best_by=null"], None),  # explicitly off
        ([HELD_OUT, "checkpoint.keep_best_by=eval_loss"], "eval_loss"),
    ],
)
def test_keep_best_by_default_follows_evaluation_and_survives_the_trip_to_the_workers(overrides, expected):
    spec = load_spec(JOB, overrides)
    assert spec.checkpoint.keep_best_by == expected
    assert spec_from_json(spec.model_dump_json()).checkpoint.keep_best_by == expected


def test_keep_best_by_without_held_out_data_is_one_line():
    assert problems("checkpoint.keep_best_by=eval_loss") == [
        "checkpoint.keep_best_by: ranking checkpoints by eval_loss needs held-out data: set `data.eval_path` or "
        "`data.eval_fraction`"
    ]
    assert problems(HELD_OUT, "checkpoint.keep_best_by=loss") == [
        "checkpoint.keep_best_by: Input should be 'eval_loss' (got 'loss')"
    ]


def test_early_stopping_fields_are_checked():
    needs_data = "eval: evaluation needs held-out data: set `data.eval_path` or `data.eval_fraction`"
    assert problems("eval.early_stopping_patience=2") == [needs_data]
    assert problems("eval.early_stopping_patience=2", "eval.min_delta=0.01") == [needs_data]
    assert problems(HELD_OUT, "eval.early_stopping_patience=0") == [
        "eval.early_stopping_patience: Input should be greater than or equal to 1 (got 0)"
    ]
    assert problems(HELD_OUT, "eval.early_stopping_patience=2", "eval.min_delta=-0.1") == [
        "eval.min_delta: Input should be greater than or equal to 0 (got -0.1)"
    ]
    assert problems(HELD_OUT, "eval.min_delta=0.1") == [
        "eval.min_delta: only counts with `eval.early_stopping_patience`; set that too"
    ]
    spec = load_spec(JOB, [HELD_OUT, "eval.early_stopping_patience=3", "eval.min_delta=0.05"])
    assert (spec.eval.early_stopping_patience, spec.eval.min_delta) == (3, 0.05)
    assert load_spec(JOB, [HELD_OUT]).eval.early_stopping_patience is None


@pytest.mark.parametrize(
    "overrides, evaluated",
    [
        # eval every 3, checkpoints every 2 and at 7: keep_best_by adds the checkpoint steps.
        (["eval.every_n_steps=3"], [2, 3, 4, 6, 7]),
        (["eval.every_n_steps=3", "checkpoint.keep_best_by=null"], [3, 6, 7]),
        ([], [2, 4, 6, 7]),  # eval defaults to the checkpoint schedule
    ],
)
def test_evaluated_steps_include_every_checkpoint_with_keep_best(overrides, evaluated):
    spec = load_spec(JOB, [HELD_OUT, "checkpoint.every_n_steps=2", "training.steps=7", "training.warmup=1",
                           *overrides])
    assert [step for step in range(1, 8) if spec.evaluates_at(step)] == evaluated
    assert [step for step in range(1, 8) if spec.checkpoints_at(step)] == [2, 4, 6, 7]


def test_nothing_is_evaluated_without_held_out_data():
    spec = load_spec(JOB, ["training.steps=4", "training.warmup=1", "checkpoint.every_n_steps=2"])
    assert not any(spec.evaluates_at(step) for step in range(1, 5))


def test_generation_fields_are_checked_and_reach_the_workers():
    assert problems("eval.generate.max_new_tokens=8") == [
        "eval: evaluation needs held-out data: set `data.eval_path` or `data.eval_fraction`"
    ]
    assert problems(HELD_OUT, "eval.generate.metrics=[bleu]") == [
        "eval.generate.metrics.0: Input should be 'exact_match' or 'contains' (got 'bleu')"
    ]
    assert problems(HELD_OUT, "eval.generate.num_samples=0") == [
        "eval.generate.num_samples: Input should be greater than 0 (got 0)"
    ]
    assert problems(HELD_OUT, "eval.generate={}", "scaling.strategy=deepspeed", "scaling.zero_stage=3") == [
        "eval.generate: not available with ZeRO-3 (rank 0 holds only a shard of the model); use zero_stage 2, or "
        "`lorafleet eval` on a checkpoint"
    ]
    assert problems(HELD_OUT, "eval.generate={}", "data.format=text") == [
        "eval.generate: `text` records have no prompt and target to generate from (use instruction or chat data, or "
        "an aLoRA invocation)"
    ]
    assert load_spec(JOB, [HELD_OUT]).eval.generate is None  # off by default
    spec = load_spec(JOB, [HELD_OUT, "eval.generate.metrics=[contains]"])
    generate = spec_from_json(spec.model_dump_json()).eval.generate
    assert (generate.metrics, generate.max_new_tokens, generate.num_samples) == (["contains"], 32, 32)
