"""Generation metrics: greedy answers to records' prompts, built with the job's template, scored against their targets.

A record's *prompt* is what the model saw before the text it was trained to produce, rendered exactly as training
renders it ([`~lorafleet.data.encode.prepare_samples`]); its *reference* is that target text:

- instruction: bos + the instruction prompt of `instruction` and `input`; the reference is `output`;
- chat: the messages before the last assistant turn, rendered by the tokenizer's chat template with the generation
  prompt; the reference is the last assistant turn's content;
- text (aLoRA jobs only): the text up to the end of its last invocation; the reference is the rest, special tokens
  left out. A text record of a plain LoRA job has no prompt/answer split and is not scored.

For an aLoRA adapter the invocation is appended to a prompt that does not contain it (as `lorafleet generate` does),
and each prompt is decoded with the adapter activated from its invocation on
([`~lorafleet.infer.generate.continue_with_adapter`]); plain LoRA prompts are decoded in left-padded batches.

[`score_records`] is the one entry point: `lorafleet eval` calls it, and it can run on the training worker that holds
rank 0 (it restores the model's train/eval mode and the RNG streams it found, like
[`~lorafleet.train.evaluate.evaluate_loss`]); it must not run on one rank alone under DeepSpeed ZeRO-3, whose forwards
are collectives.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from lorafleet.constants import GENERATION_METRICS
from lorafleet.data.alora import find_invocation
from lorafleet.data.templates import format_instruction_prompt
from lorafleet.infer.generate import continue_with_adapter, invocation_of, stop_ids

METRICS = GENERATION_METRICS


def exact_match(prediction: str, reference: str) -> bool:
    """Whether the prediction is the reference, leading and trailing whitespace aside.

    Example:

    ```python
    >>> exact_match(" Reversed: b a\\n", "Reversed: b a"), exact_match("Reversed: b a c", "Reversed: b a")
    (True, False)
    ```
    """
    return prediction.strip() == reference.strip()


def contains(prediction: str, reference: str) -> bool:
    """Whether the reference (stripped) occurs in the prediction.

    Example:

    ```python
    >>> contains("The answer is 42.", " 42 "), contains("4 2", "42")
    (True, False)
    ```
    """
    return reference.strip() in prediction


_METRIC_FUNCTIONS = {"exact_match": exact_match, "contains": contains}


def score(predictions: Sequence[str], references: Sequence[str], metrics: Sequence[str] = METRICS) -> dict[str, float]:
    """The mean of each metric over prediction/reference pairs (NaN for no pair).

    Args:
        predictions (`Sequence[str]`): Generated texts.
        references (`Sequence[str]`): Target texts, one per prediction.
        metrics (`Sequence[str]`, *optional*, defaults to `METRICS`): Names from [`METRICS`].

    Returns:
        `dict[str, float]`: Metric name -> fraction of pairs it holds for.

    Example:

    ```python
    >>> score(["yes", "no ", "not sure"], ["yes", "no", "sure"])
    {'exact_match': 0.6666666666666666, 'contains': 1.0}
    ```
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    unknown = [m for m in metrics if m not in _METRIC_FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {list(METRICS)}")
    n = len(predictions)
    return {
        m: (sum(_METRIC_FUNCTIONS[m](p, r) for p, r in zip(predictions, references)) / n if n else float("nan"))
        for m in metrics
    }


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def instruction_prompt_ids(tokenizer, instruction: str, input: Optional[str] = None) -> list[int]:
    """The token ids an instruction record's output follows in training: bos + the instruction prompt.

    Example:

    ```python
    >>> from lorafleet.data.tokenizer import load_tokenizer
    >>> tok = load_tokenizer()
    >>> tok.decode(instruction_prompt_ids(tok, "Count the words.", "red fox"))
    '<s>### Instruction:\\nCount the words.\\n\\n### Input:\\nred fox\\n\\n### Response:\\n'
    ```
    """
    return _bos(tokenizer) + tokenizer(format_instruction_prompt(instruction, input), add_special_tokens=False)["input_ids"]


def chat_prompt_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """The token ids of a conversation followed by the assistant's turn header (the chat template's generation prompt).

    Example:

    ```python
    >>> from lorafleet.data.tokenizer import load_tokenizer
    >>> tok = load_tokenizer()
    >>> tok.decode(chat_prompt_ids(tok, [{"role": "user", "content": "hi"}]))
    '<s><|user|>hi<|end|><|assistant|>'
    ```
    """
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def with_invocation(ids: Sequence[int], invocation: Optional[Sequence[int]]) -> tuple[list[int], bool]:
    """`ids` with the aLoRA invocation appended when it is not in them (an adapter never switched on answers as the
    base model); returns the ids and whether it was appended.

    Example:

    ```python
    >>> with_invocation([1, 5], [8, 9]), with_invocation([1, 8, 9, 5], [8, 9]), with_invocation([1, 5], None)
    (([1, 5, 8, 9], True), ([1, 8, 9, 5], False), ([1, 5], False))
    ```
    """
    if invocation is not None and find_invocation(list(ids), invocation) is None:
        return list(ids) + list(invocation), True
    return list(ids), False


def record_query(
    record: dict, fmt: str, tokenizer, invocation: Optional[Sequence[int]] = None
) -> Optional[tuple[list[int], str]]:
    """A checked record's generation prompt (token ids) and reference text, or `None` when it has no such split.

    Args:
        record (`dict`): A record that [`~lorafleet.data.records.load_records`] accepted for `fmt`.
        fmt (`str`): `instruction`, `chat` or `text` (`data.format`).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): The base model's tokenizer.
        invocation (`Sequence[int]`, *optional*): The aLoRA invocation ids; appended to a prompt lacking them.

    Returns:
        `tuple[list[int], str]` or `None`: (prompt ids, reference). `None` for a text record without the invocation
        (or of a plain LoRA job), and for a chat record whose last assistant turn is empty.

    Example:

    ```python
    >>> from lorafleet.data.tokenizer import load_tokenizer
    >>> tok = load_tokenizer()
    >>> ids, reference = record_query({"text": "<|user|>a 7<|end|><|reserved_0|>judge<|reserved_1|>yes<|end|>"},
    ...                               "text", tok, invocation=[8, 89, 100, 83, 339, 9])
    >>> tok.decode(ids), reference
    ('<s><|user|>a 7<|end|><|reserved_0|>judge<|reserved_1|>', 'yes')
    ```
    """
    if fmt == "instruction":
        ids, reference = instruction_prompt_ids(tokenizer, record["instruction"], record.get("input")), record["output"]
    elif fmt == "chat":
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        ids, reference = chat_prompt_ids(tokenizer, messages[:last]), messages[last]["content"]
        if not reference.strip():
            return None
    elif fmt == "text":
        if invocation is None:
            return None
        full = _bos(tokenizer) + tokenizer(record["text"], add_special_tokens=False)["input_ids"]
        start = find_invocation(full, invocation)
        if start is None:
            return None
        end = start + len(invocation)
        return full[:end], tokenizer.decode(full[end:], skip_special_tokens=True)
    else:
        raise ValueError(f"unknown data format {fmt!r}")
    return with_invocation(ids, invocation)[0], reference


@torch.no_grad()
def greedy_generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop: Sequence[int],
    pad_token_id: int,
    batch_size: int = 8,
    activate: bool = True,
) -> list[list[int]]:
    """Greedy continuations of token-id prompts, each cut after its first stop token.

    With an aLoRA adapter active (`activate`), each prompt is decoded alone with the adapter on from its invocation
    ([`~lorafleet.infer.generate.continue_with_adapter`]); otherwise prompts go `batch_size` at a time, left-padded,
    through `model.generate`.

    Args:
        model (`peft.PeftModel` or `transformers.PreTrainedModel`): In eval mode.
        prompts (`Sequence[Sequence[int]]`): Token ids; an aLoRA prompt must contain the invocation.
        max_new_tokens (`int`): Tokens to generate at most per prompt.
        stop (`Sequence[int]`): Token ids that end a generation (kept in the output).
        pad_token_id (`int`): Left padding for batches.
        batch_size (`int`, *optional*, defaults to 8): Prompts per `generate` call.
        activate (`bool`, *optional*, defaults to `True`): `False` when the adapter is disabled (base model alone).

    Returns:
        `list[list[int]]`: Generated ids per prompt, in order.
    """
    if invocation_of(model) is not None and activate:
        return [continue_with_adapter(model, list(p), max_new_tokens=max_new_tokens, eos_token_id=list(stop)).tokens
                for p in prompts]
    device = next(model.parameters()).device
    stop_set = set(stop)
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        group = [list(p) for p in prompts[i : i + batch_size]]
        width = max(len(p) for p in group)
        ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in group], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)
        generated = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=list(stop) or None, pad_token_id=pad_token_id,
        )
        for row in generated[:, width:].tolist():
            cut = next((j + 1 for j, t in enumerate(row) if t in stop_set), len(row))
            out.append(row[:cut])
    return out


@dataclass
class GenerationScores:
    """What [`score_records`] measured.

    Attributes:
        predictions (`list[Optional[str]]`): Per record, in order, the generated text (`None` where not scored).
        references (`list[Optional[str]]`): Per record, the reference text (`None` where not scored).
        metrics (`dict[str, float]`): Metric name -> mean over the scored records (empty when none was scored).
        samples (`int`): Records scored.
    """

    predictions: list[Optional[str]] = field(default_factory=list)
    references: list[Optional[str]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    samples: int = 0


def score_records(
    model,
    tokenizer,
    records: Sequence[dict],
    fmt: str,
    *,
    max_new_tokens: int = 32,
    metrics: Sequence[str] = METRICS,
    batch_size: int = 8,
    adapter: bool = True,
) -> GenerationScores:
    """Generate greedily for each record's prompt (the job's template) and score the answers against its target.

    Runs without gradients with the model in eval mode, then puts back the mode it was in and the CPU/CUDA RNG states,
    so a training run may call it between steps (on the rank-0 worker, unwrapped model) without changing what it
    trains.

    Args:
        model (`peft.PeftModel`): The adapter on its base model ([`~lorafleet.infer.generate.load_adapter`]).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): The base model's tokenizer.
        records (`Sequence[dict]`): Records checked for `fmt` ([`~lorafleet.data.records.load_records`]).
        fmt (`str`): `instruction`, `chat` or `text`.
        max_new_tokens (`int`, *optional*, defaults to 32): Tokens generated at most per record.
        metrics (`Sequence[str]`, *optional*, defaults to `METRICS`): Which of [`METRICS`] to compute.
        batch_size (`int`, *optional*, defaults to 8): Prompts per batched `generate` call (plain LoRA).
        adapter (`bool`, *optional*, defaults to `True`): `False` scores the base model alone (adapter disabled; the
            prompts, aLoRA invocation included, stay the same).

    Returns:
        [`GenerationScores`]: Predictions and references per record, and the metrics over the scored ones.

    Example:

    ```python
    >>> from lorafleet.infer.generate import load_adapter
    >>> model, tokenizer = load_adapter("/path/to/run/checkpoint_000002")  # doctest: +SKIP
    >>> scores = score_records(model, tokenizer, [{"instruction": "Say hi.", "output": "hi"}], "instruction")  # doctest: +SKIP
    >>> scores.metrics, scores.predictions  # doctest: +SKIP
    ({'exact_match': 1.0, 'contains': 1.0}, ['hi'])
    ```
    """
    invocation = invocation_of(model)
    queries = [record_query(r, fmt, tokenizer, invocation) for r in records]
    scored = [i for i, q in enumerate(queries) if q is not None]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    adapter_off = contextlib.nullcontext() if adapter else model.disable_adapter()
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices), adapter_off:
            generated = greedy_generate(
                model, [queries[i][0] for i in scored], max_new_tokens=max_new_tokens, stop=stop_ids(tokenizer),
                pad_token_id=pad, batch_size=batch_size, activate=adapter,
            )
    finally:
        model.train(was_training)
    predictions: list[Optional[str]] = [None] * len(records)
    references: list[Optional[str]] = [None] * len(records)
    for i, tokens in zip(scored, generated):
        predictions[i] = tokenizer.decode(tokens, skip_special_tokens=True)
        references[i] = queries[i][1]
    values = score([predictions[i] for i in scored], [references[i] for i in scored], metrics) if scored else {}
    return GenerationScores(predictions, references, values, len(scored))
