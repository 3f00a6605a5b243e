"""Held-out loss: the token-mean cross-entropy of a LoRA model over a set of samples ([`evaluate_loss`]).

One function for every caller: the training loop (each worker evaluates its shard and the sums are all-reduced, so
the number does not depend on the worker count) and a single process outside Ray (`world_size=1`, nothing to
reduce). It runs the same loss module as training ([`~lorafleet.train.loss.LossModule`], fused or not, aLoRA
activation included), without gradients, in eval mode, and leaves the caller's RNG streams and train/eval mode as
it found them, so evaluating during a run does not change what the run trains.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ContextManager, Optional

import torch

from lorafleet.data.batching import collate
from lorafleet.infer.scoring import score_records
from lorafleet.spec import JobSpec


@dataclass
class EvalResult:
    """A held-out loss and what it was measured on (over all workers when reduced).

    Args:
        loss_sum (`float`): Sum of the per-token cross-entropies.
        tokens (`int`): Target tokens summed over (labels after the causal shift that are not -100).
        samples (`int`): Samples evaluated.

    Example:

    ```python
    >>> EvalResult(loss_sum=6.0, tokens=3, samples=1).loss
    2.0
    ```
    """

    loss_sum: float
    tokens: int
    samples: int

    @property
    def loss(self) -> float:
        """The token mean, `loss_sum / tokens` (NaN when there was no target token)."""
        return self.loss_sum / self.tokens if self.tokens else math.nan


def _rng_kept(device: torch.device):
    """Restore the CPU (and this CUDA device's) RNG state on exit: in eval mode dropout draws nothing, but whatever
    else might (a custom layer) must not shift the training run's random stream."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    return torch.random.fork_rng(devices=devices)


def evaluate_loss(
    module: torch.nn.Module,
    samples: Sequence[dict],
    pad_token_id: int,
    *,
    device: torch.device,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    max_samples: Optional[int] = None,
    autocast: Optional[Callable[[], ContextManager]] = None,
    all_reduce: Optional[Callable[[list[float]], list[float]]] = None,
) -> EvalResult:
    """Token-mean loss of `module` over `samples` (this rank's share, summed over all ranks by `all_reduce`).

    The evaluated set is `samples[:max_samples]`; rank r takes every `world_size`-th sample from r on and runs them
    `micro_batch_size` at a time. Every rank makes the same number of forward calls (a rank with fewer batches runs
    its missing ones on a dummy batch whose result is discarded): under DeepSpeed ZeRO-3 a forward gathers the
    partitioned parameters from all ranks together, and under DDP a forward may broadcast buffers.

    The loss sum and token count are summed over ranks before dividing, so 2 workers give the number 1 worker gives
    (up to float summation order). `module` is switched to eval mode (no dropout) under `torch.no_grad()` and put back
    in the mode it was in; the CPU and CUDA RNG states are restored afterwards.

    Args:
        module (`torch.nn.Module`):
            A [`~lorafleet.train.loss.LossModule`], or the DDP / DeepSpeed wrapper of one: called with a collated
            batch, it returns (summed token loss, target token count).
        samples (`Sequence[dict]`):
            Tokenized samples ([`~lorafleet.data.dataset.TrainingData`]`.eval_samples`), the same on every rank.
        pad_token_id (`int`):
            Padding id for [`~lorafleet.data.batching.collate`].
        device (`torch.device`):
            Where the batches go.
        micro_batch_size (`int`):
            Samples per forward call.
        rank (`int`, *optional*, defaults to `0`):
            This process's rank.
        world_size (`int`, *optional*, defaults to `1`):
            Number of processes sharing the set.
        max_samples (`int`, *optional*):
            Evaluate only the first this many samples (`eval.max_samples`).
        autocast (`Callable[[], ContextManager]`, *optional*):
            Makes the autocast context of each forward, as in training; defaults to none.
        all_reduce (`Callable[[list[float]], list[float]]`, *optional*):
            Sums a list of numbers over all ranks (a collective); needed when `world_size > 1`.

    Returns:
        [`EvalResult`]: Loss sum, target tokens and samples over the whole evaluated set.

    Example:

    ```python
    >>> import torch
    >>> from peft import LoraConfig, get_peft_model
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from lorafleet.train.loss import LossModule
    >>> config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                      num_attention_heads=2, num_key_value_heads=1)
    >>> model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    >>> samples = [{"input_ids": [1, 5, 6, 7], "labels": [-100, -100, 6, 7]},
    ...            {"input_ids": [1, 8], "labels": [-100, 8]}]
    >>> result = evaluate_loss(LossModule(model, fused_loss=False), samples, 0, device=torch.device("cpu"),
    ...                        micro_batch_size=1)
    >>> result.tokens, result.samples, result.loss > 0
    (3, 2, True)
    ```
    """
    if world_size > 1 and all_reduce is None:
        raise ValueError("evaluate_loss: world_size > 1 needs `all_reduce` to sum the ranks' losses")
    chosen = list(samples[:max_samples] if max_samples is not None else samples)
    mine = chosen[rank::world_size]
    batches = [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    # Rank 0 holds the most samples (ceil(len / world_size)), so its batch count is every rank's.
    calls = math.ceil(math.ceil(len(chosen) / world_size) / micro_batch_size) if chosen else 0
    padding = [None] * (calls - len(batches))
    make_autocast = autocast or contextlib.nullcontext
    loss_sum, tokens = 0.0, 0
    was_training = module.training
    module.eval()
    try:
        with _rng_kept(device), torch.no_grad():
            for group in batches + padding:
                batch = collate(group if group is not None else chosen[:1], pad_token_id)
                batch = {k: v.to(device) for k, v in batch.items() if v is not None}
                with make_autocast():
                    token_loss, count = module(**batch)
                if group is not None:
                    loss_sum += float(token_loss)
                    tokens += int(count)
    finally:
        module.train(was_training)
    totals = [loss_sum, float(tokens), float(len(mine))]
    if all_reduce is not None:
        totals = all_reduce(totals)
    return EvalResult(loss_sum=totals[0], tokens=int(round(totals[1])), samples=int(round(totals[2])))


def eval_metrics(result: EvalResult) -> dict[str, Any]:
    """The metrics-record fields of an evaluation (what `metrics.jsonl` and the summary read): `eval_loss`.

    Example:

    ```python
    >>> eval_metrics(EvalResult(loss_sum=6.0, tokens=3, samples=1))
    {'eval_loss': 2.0}
    ```
    """
    return {"eval_loss": result.loss}


def generation_metrics(model, tokenizer, records: Sequence[dict], spec: JobSpec, prefix: str = "eval_") -> dict[str, float]:
    """Greedy answers to held-out records with the job's template, scored against their targets (`eval.generate`).

    Runs [`~lorafleet.infer.scoring.score_records`] on one process: the rank-0 worker calls it with its own (not the
    DDP or DeepSpeed wrapper's) model, which holds every weight under DDP and ZeRO-2, so no other rank takes part. The
    model's train/eval mode and the RNG streams are left as they were.

    Args:
        model (`peft.PeftModel`): The adapter being trained, on its base model.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): The base model's tokenizer.
        records (`Sequence[dict]`): Held-out records ([`~lorafleet.data.dataset.TrainingData`]`.eval_records`).
        spec ([`~lorafleet.spec.JobSpec`]): The job: `data.format`, `eval.generate` (`max_new_tokens`, `metrics`),
            `training.micro_batch_size` (prompts per `generate` call).
        prefix (`str`, *optional*, defaults to `"eval_"`): Prepended to each metric's name (`"base_"` for the score
            before the first step).

    Returns:
        `dict[str, float]`: `{prefix + metric: mean over the scored records}`; empty when no record could be scored.

    Example:

    ```python
    >>> from peft import LoraConfig, get_peft_model
    >>> from lorafleet.data.tokenizer import load_tokenizer
    >>> from lorafleet.model.families import family_config
    >>> from lorafleet.spec import load_spec
    >>> from transformers import AutoModelForCausalLM
    >>> tokenizer = load_tokenizer()
    >>> config = family_config("llama", len(tokenizer), {"hidden_size": 32, "intermediate_size": 64,
    ...                        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1})
    >>> model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=2, target_modules=["q_proj"]))
    >>> spec = load_spec("jobs/llama.yaml", ["eval.generate.max_new_tokens=4"])  # metrics: [exact_match]
    >>> generation_metrics(model, tokenizer, [{"instruction": "Say sun 2 times.", "output": "sun sun"}], spec)
    {'eval_exact_match': 0.0}
    ```
    """
    generate = spec.eval.generate
    if generate is None or not records:
        return {}
    scores = score_records(
        model, tokenizer, records, spec.data.format, max_new_tokens=generate.max_new_tokens,
        metrics=generate.metrics, batch_size=spec.training.micro_batch_size,
    )
    return {f"{prefix}{name}": value for name, value in scores.metrics.items()}
