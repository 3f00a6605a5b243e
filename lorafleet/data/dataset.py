"""A job's training data as the workers receive it: tokenized once, on the driver ([`TrainingData`]).

With evaluation on, the held-out samples travel in the same object (`TrainingData.eval_samples`): from
`data.eval_path`, or from the records of `data.path` that [`held_out_split`] sets aside (`data.eval_fraction`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence


from lorafleet.constants import IGNORE_INDEX
from lorafleet.data.alora import Invocation
from lorafleet.data.cache import SHOW_SKIPPED, CachedRecords, CachedSamples, CacheReport, TokenCache, held_out_mask
from lorafleet.data.encode import prepare_samples
from lorafleet.data.plan import BatchPlan
from lorafleet.data.records import load_records
from lorafleet.spec import DataSpec, JobSpec, SpecError


def held_out_split(num_records: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split record indices into (training, held-out) for `data.eval_fraction`, deterministically by `seed`.

    The held-out records are the first `floor(fraction * num_records)` indices of `torch.randperm(num_records)` drawn
    from a generator seeded with `seed` (`training.seed`); both lists are returned in file order, so the training
    records are batched exactly as a file without them would be. The same seed and file give the same split on every
    machine and every re-submit.

    Args:
        num_records (`int`): Records in `data.path`.
        fraction (`float`): `data.eval_fraction`, in (0, 1).
        seed (`int`): `training.seed`.

    Returns:
        `tuple[list[int], list[int]]`: Training and held-out record indices, disjoint, together all of them.

    Raises:
        [`~lorafleet.spec.SpecError`]: One line naming `data.eval_fraction` when either side would be empty.

    Example:

    ```python
    >>> train, held_out = held_out_split(10, 0.2, seed=42)
    >>> len(train), len(held_out), sorted(train + held_out) == list(range(10))
    (8, 2, True)
    ```
    """
    mask = held_out_mask(num_records, fraction, seed)
    return (~mask).nonzero()[0].tolist(), mask.nonzero()[0].tolist()


def _eval_records(spec: DataSpec) -> list[dict]:
    """The records of `data.eval_path`; the readers word their errors for `data.path`, so they are renamed."""
    try:
        return load_records(spec.model_copy(update={"path": spec.eval_path}))
    except SpecError as exc:
        raise SpecError(*(p.replace("data.path:", "data.eval_path:", 1) for p in exc.problems)) from None


def _targets(samples: Sequence[dict]) -> list[int]:
    return [sum(1 for label in s["labels"][1:] if label != IGNORE_INDEX) for s in samples]


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
        eval_samples (`list[dict]`, *optional*, defaults to `[]`):
            The held-out samples, in file order, never packed (so `eval.max_samples` counts records) and masked like
            the training ones (prompt, aLoRA invocation); empty when evaluation is off.
        eval_records (`Sequence[dict]`, *optional*, defaults to `[]`):
            The held-out records `eval.generate` prompts with and scores against, as read (checked for `data.format`):
            the first `eval.generate.num_samples` (at most `eval.max_samples`), in file order; empty without it. A
            list, or read from the tokenized cache ([`~lorafleet.data.cache.CachedRecords`]).

    Attributes:
        targets (`list[int]`): Per sample, the tokens the loss counts (labels after the causal shift that are not -100).
        eval_targets (`list[int]`): The same for `eval_samples`.

    Example:

    ```python
    >>> from lorafleet.data.tokenizer import load_tokenizer
    >>> from lorafleet.spec import load_spec
    >>> data = TrainingData.from_spec(load_spec("jobs/llama.yaml", ["data.eval_fraction=null", "eval={}"]),
    ...                               load_tokenizer())
    >>> len(data.samples) == len(data.targets), data.invocation_tokens, data.eval_samples
    (True, None, [])
    >>> held_out = TrainingData.from_spec(load_spec("jobs/llama.yaml"), load_tokenizer())  # data.eval_fraction: 0.05
    >>> len(held_out.samples), len(held_out.eval_samples)
    (2850, 150)
    ```
    """

    samples: Sequence[dict]
    pad_token_id: int
    invocation_tokens: list[int] | None = None
    source: dict[str, Any] = field(default_factory=dict, repr=False)
    eval_samples: Sequence[dict] = field(default_factory=list, repr=False)
    eval_records: Sequence[dict] = field(default_factory=list, repr=False)
    report: dict[str, Any] = field(default_factory=dict, repr=False)
    targets: Sequence[int] = field(init=False, repr=False)
    eval_targets: Sequence[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Cached samples carry their counts in the cache; counting would read every sample.
        self.targets = self.samples.targets if isinstance(self.samples, CachedSamples) else _targets(self.samples)
        self.eval_targets = (self.eval_samples.targets if isinstance(self.eval_samples, CachedSamples)
                             else _targets(self.eval_samples))

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
            without the invocation), a bad `data.eval_path`, or an `eval_fraction` that leaves a side empty.
        """
        invocation = Invocation.from_spec(spec, tokenizer, warn=warn)
        data = spec.data
        every = eval_records = None
        skipped: list[str] = []
        records = load_records(data, skipped)
        if data.eval_fraction is not None:
            every = records
            train, held_out = held_out_split(len(every), data.eval_fraction, spec.training.seed)
            records, eval_records = [every[i] for i in train], [every[i] for i in held_out]
        elif data.eval_path is not None:
            eval_records = _eval_records(data)
        # Unpacked: the held-out loss is then per record whatever `packing` says, and `eval.max_samples` counts records.
        unpacked = data.model_copy(update={"packing": False})
        if every is not None:
            try:
                samples = prepare_samples(data, tokenizer, records, invocation=invocation)
                eval_samples = prepare_samples(unpacked, tokenizer, eval_records, invocation=invocation)
            except SpecError:
                # Record numbers in the error count within one side of the split; the whole file's error (if it has
                # one) numbers them as in the file.
                prepare_samples(unpacked, tokenizer, every, invocation=invocation)
                raise
        else:
            samples = prepare_samples(data, tokenizer, records, invocation=invocation)
            eval_samples = []
            if eval_records is not None:
                try:
                    eval_samples = prepare_samples(unpacked, tokenizer, eval_records, invocation=invocation)
                except SpecError as exc:
                    raise SpecError(*(p.replace("data.path:", "data.eval_path:", 1) for p in exc.problems)) from None
        tokens = invocation.tokens if invocation is not None else None
        generate = spec.eval.generate
        scored = []
        if generate is not None and eval_records:
            scored = eval_records[: min(generate.num_samples, spec.eval.max_samples or generate.num_samples)]
        report = {"skipped": len(skipped), "skipped_at": skipped[:SHOW_SKIPPED]} if skipped else {}
        return cls(samples, tokenizer.pad_token_id, tokens, eval_samples=eval_samples, eval_records=scored,
                   report=report)

    @classmethod
    def from_cache(cls, spec: JobSpec, tokenizer, cache: TokenCache, report: CacheReport,
                   invocation: Invocation | None = None, eval_cache: TokenCache | None = None) -> TrainingData:
        """The samples of a tokenized cache ([`~lorafleet.data.cache.build_cache`]): the same samples, in the same
        order, as [`from_spec`] gives for the same data and spec, read by index from the cache instead of held in
        memory. The held-out split of `data.eval_fraction` is applied here (it depends on the seed, not the cache);
        `data.eval_path` is read in memory as by [`from_spec`], or from its own cache (`eval_cache`).

        Args:
            spec ([`~lorafleet.spec.JobSpec`]): The validated spec.
            tokenizer ([`~transformers.PreTrainedTokenizerBase`]): The base model's tokenizer (for `data.eval_path`).
            cache ([`~lorafleet.data.cache.TokenCache`]): The built cache.
            report ([`~lorafleet.data.cache.CacheReport`]): What building it found (`report` of the result).
            invocation ([`~lorafleet.data.alora.Invocation`], *optional*): For aLoRA jobs.
            eval_cache ([`~lorafleet.data.cache.TokenCache`], *optional*):
                The cache of `data.eval_path` when it is shards, a glob or a prefix (else it is read in memory).

        Raises:
            [`~lorafleet.spec.SpecError`]: Samples without the aLoRA invocation, no sample left, or an
            `eval_fraction` that leaves a side empty.
        """
        data = spec.data
        fraction, seed = data.eval_fraction, spec.training.seed
        # Packed like the in-memory path: the training side only; held-out samples stay one per row.
        pack = data.max_length if data.packing else None
        if fraction is not None:
            samples = CachedSamples(cache, "train", fraction, seed, pack_length=pack)
            eval_samples: Sequence[dict] = CachedSamples(cache, "held_out", fraction, seed)
        else:
            samples, eval_samples = CachedSamples(cache, pack_length=pack), []
        missing = CachedSamples(cache).missing_invocation()
        if invocation is not None:
            invocation.check_missing(missing, len(cache), data.max_length)
        if len(samples.rows) == 0:
            raise SpecError(
                f"data.max_length: every sample was dropped (no trained token within {data.max_length} tokens)"
            )
        eval_records = None
        if eval_cache is not None:
            eval_samples = CachedSamples(eval_cache)
            if invocation is not None:
                try:
                    invocation.check_missing(eval_samples.missing_invocation(), len(eval_cache), data.max_length)
                except SpecError as exc:
                    raise SpecError(*(p.replace("data.path:", "data.eval_path:", 1) for p in exc.problems)) from None
        elif data.eval_path is not None:
            eval_records = _eval_records(data)
            unpacked = data.model_copy(update={"packing": False})
            try:
                eval_samples = prepare_samples(unpacked, tokenizer, eval_records, invocation=invocation)
            except SpecError as exc:
                raise SpecError(*(p.replace("data.path:", "data.eval_path:", 1) for p in exc.problems)) from None
        generate = spec.eval.generate
        scored: Sequence[dict] = []
        if generate is not None:
            limit = min(generate.num_samples, spec.eval.max_samples or generate.num_samples)
            if eval_records is not None:
                scored = eval_records[:limit]
            elif eval_cache is not None:
                scored = CachedRecords(eval_cache, limit=limit)
            elif fraction is not None:
                scored = CachedRecords(cache, "held_out", fraction, seed, limit=limit)
        tokens = invocation.tokens if invocation is not None else None
        return cls(samples, tokenizer.pad_token_id, tokens, eval_samples=eval_samples, eval_records=scored,
                   report=report.as_dict())

    def plan(self, spec: JobSpec) -> BatchPlan:
        """The job's [`~lorafleet.data.plan.BatchPlan`] over these samples (global batch size, seed, shuffle, and
        the samples' lengths with `data.group_by_length`)."""
        lengths = None
        if spec.data.group_by_length:
            lengths = (self.samples.lengths() if isinstance(self.samples, CachedSamples)
                       else [len(s["input_ids"]) for s in self.samples])
        return BatchPlan(len(self.samples), spec.global_batch_size, seed=spec.training.seed, shuffle=spec.data.shuffle,
                         lengths=lengths)
