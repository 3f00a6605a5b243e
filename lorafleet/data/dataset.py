"""A job's training data as the workers receive it: tokenized once, on the driver ([`TrainingData`])."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorafleet.constants import IGNORE_INDEX
from lorafleet.data.alora import Invocation
from lorafleet.data.encode import prepare_samples
from lorafleet.data.plan import BatchPlan
from lorafleet.spec import JobSpec


@dataclass
class TrainingData:
    """A job's tokenized training samples and what batching them needs, prepared once (on the driver) for all workers.

    Args:
        samples (`list[dict]`):
            [`~lorafleet.data.encode.prepare_samples`]'s samples (rows, when packing).
        pad_token_id (`int`):
            The id [`~lorafleet.data.batching.collate`] pads micro-batches with.
        invocation_tokens (`list[int]`, *optional*):
            The aLoRA invocation ids the samples were masked with, for the model's `LoraConfig`; `None` for plain LoRA.
        source (`dict`, *optional*, defaults to `{}`):
            The fingerprint of the data files the samples were read from
            ([`~lorafleet.train.driver.data_fingerprint`], set by the driver); every checkpoint records it.

    Attributes:
        targets (`list[int]`): Per sample, the tokens the loss counts (labels after the causal shift that are not -100).

    Example:

    ```python
    >>> from lorafleet.data.tokenizer import load_tokenizer
    >>> from lorafleet.spec import load_spec
    >>> data = TrainingData.from_spec(load_spec("jobs/llama.yaml"), load_tokenizer())
    >>> len(data.samples) == len(data.targets), data.invocation_tokens
    (True, None)
    ```
    """

    samples: list[dict]
    pad_token_id: int
    invocation_tokens: list[int] | None = None
    source: dict[str, Any] = field(default_factory=dict, repr=False)
    targets: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.targets = [sum(1 for label in s["labels"][1:] if label != IGNORE_INDEX) for s in self.samples]

    @classmethod
    def from_spec(cls, spec: JobSpec, tokenizer, warn: bool = False) -> TrainingData:
        """Read, check and tokenize `spec.data` (with the aLoRA invocation, if any).

        Args:
            spec ([`~lorafleet.spec.JobSpec`]): The validated spec.
            tokenizer ([`~transformers.PreTrainedTokenizerBase`]): The base model's tokenizer.
            warn (`bool`, *optional*, defaults to `False`):
                Warn about an invocation not framed by special tokens ([`~lorafleet.data.alora.resolve_invocation`]).

        Raises:
            [`~lorafleet.spec.SpecError`]: For data that cannot be trained on (bad records, no sample left, samples
            without the invocation).
        """
        invocation = Invocation.from_spec(spec, tokenizer, warn=warn)
        samples = prepare_samples(spec.data, tokenizer, invocation=invocation)
        return cls(samples, tokenizer.pad_token_id, invocation.tokens if invocation is not None else None)

    def plan(self, spec: JobSpec) -> BatchPlan:
        """The job's [`~lorafleet.data.plan.BatchPlan`] over these samples (global batch size, seed, shuffle)."""
        return BatchPlan(len(self.samples), spec.global_batch_size, seed=spec.training.seed, shuffle=spec.data.shuffle)
