"""Records to training samples: tokenize, mask the prompt from the loss, truncate, drop the empty, optionally pack.

[`prepare_samples`] turns records into `{"input_ids", "labels"}` samples (labels aligned with input_ids, prompt tokens
`IGNORE_INDEX`; the model shifts). Chat data is encoded with lorafleet's tokenizer in one batched call, or through any
tokenizer's chat template.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

from lorafleet.constants import IGNORE_INDEX
from lorafleet.data.alora import Invocation
from lorafleet.data.batching import pack_samples
from lorafleet.data.records import CHAT_ROLES, load_records
from lorafleet.data.templates import ASSISTANT, CHAT_TEMPLATE, END, format_instruction_prompt
from lorafleet.spec import DataSpec, SpecError

logger = logging.getLogger(__name__)


@dataclass
class DataStats:
    """What [`prepare_samples`] did, for the driver to log and report.

    Attributes:
        records (`int`): Records read.
        truncated (`int`): Samples cut to `max_length`.
        dropped (`int`): Samples dropped because no trained token was left after truncation.
        samples (`int`): Samples kept.
        rows (`int`): Rows returned (packed rows when packing, else equal to `samples`).
        tokens (`int`): Tokens in all rows (padding excluded).
        target_tokens (`int`): Tokens that count in the loss.
    """

    records: int = 0
    truncated: int = 0
    dropped: int = 0
    samples: int = 0
    rows: int = 0
    tokens: int = 0
    target_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def prepare_samples(
    spec: DataSpec,
    tokenizer,
    records: Optional[Sequence[dict]] = None,
    return_stats: bool = False,
    invocation: Optional["Invocation"] = None,
) -> list[dict] | tuple[list[dict], DataStats]:
    """Tokenize records into training samples with prompt tokens masked from the loss.

    Each sample starts with bos (when the tokenizer has one). Trained tokens (labels != -100) are: instruction: the
    output and eos; chat: each assistant turn's content and its end-of-turn token(s); text: everything after bos.
    `train_on_inputs` trains on every token but the first. Labels are aligned with `input_ids` (the model shifts
    them) and the first token's label is always -100, so [`count_target_tokens`] is exactly the number of targets.

    Args:
        spec ([`~lorafleet.spec.DataSpec`]): The job's `data` section (format, max_length, packing, train_on_inputs).
        tokenizer ([`~transformers.PreTrainedTokenizerFast`]):
            lorafleet's ([`~lorafleet.data.tokenizer.load_tokenizer`]) or a model's own. For chat data a foreign
            tokenizer needs a chat template that renders each conversation as a prefix of the next.
        records (`Sequence[dict]`, *optional*): Already loaded records; defaults to `load_records(spec)`.
        return_stats (`bool`, *optional*, defaults to `False`): Also return a [`DataStats`].
        invocation ([`~lorafleet.data.alora.Invocation`], *optional*):
            For aLoRA jobs: each sample (after truncation) must contain the invocation; its last occurrence start is
            kept as `"alora_start"` and only labels after the invocation are trained. Samples without it are refused
            with a [`SpecError`] naming them, or dropped when `invocation.drop_missing`.

    Returns:
        `list[dict]`: Samples `{"input_ids": list[int], "labels": list[int]}`; with `packing`, rows of at most
        `max_length` tokens holding several samples, plus `"position_ids"` restarting at 0 at each sample (and each
        sample's first label -100, so no token is trained to predict the next sample). With `return_stats`, a tuple
        `(samples, stats)`.

    Example:

    ```python
    >>> from lorafleet.spec import DataSpec
    >>> from lorafleet.data.tokenizer import load_tokenizer
    >>> from lorafleet.data.encode import prepare_samples
    >>> tok = load_tokenizer()
    >>> spec = DataSpec(path="unused.jsonl", max_length=64)
    >>> [s] = prepare_samples(spec, tok, [{"instruction": "Say hi 2 times.", "output": "hi hi"}])
    >>> tok.decode([t for t, l in zip(s["input_ids"], s["labels"]) if l != -100])
    'hi hi</s>'
    ```
    """
    if records is None:
        records = load_records(spec)
    stats = DataStats(records=len(records))
    samples = []
    missing_invocation: list[int] = []
    for record_no, row in enumerate(encode_rows(spec, tokenizer, records, invocation), start=1):
        stats.truncated += row.truncated
        if row.status == NO_INVOCATION:
            missing_invocation.append(record_no)
            continue
        if row.status == NO_TARGET:
            stats.dropped += 1
            continue
        sample = {"input_ids": row.input_ids, "labels": row.labels}
        if row.alora_start is not None:
            sample["alora_start"] = row.alora_start
        samples.append(sample)
    if invocation is not None:
        invocation.check_missing(missing_invocation, len(records), spec.max_length)
        stats.dropped += len(missing_invocation)
    stats.samples = len(samples)
    if stats.dropped:
        logger.warning(
            "data: dropped %d of %d samples with no trained token left after truncation to max_length=%d",
            stats.dropped, stats.records, spec.max_length,
        )
    if stats.truncated:
        logger.info("data: truncated %d samples to max_length=%d", stats.truncated, spec.max_length)
    if spec.packing:
        samples = pack_samples(samples, spec.max_length)
    stats.rows = len(samples)
    stats.tokens = sum(len(s["input_ids"]) for s in samples)
    stats.target_tokens = count_target_tokens(samples)
    if not samples:
        raise SpecError(f"data.max_length: every sample was dropped (no trained token within {spec.max_length} tokens)")
    return (samples, stats) if return_stats else samples


# Why an encoded record is not a sample (`EncodedRow.status`).
KEPT, NO_TARGET, NO_INVOCATION = 0, 1, 2


@dataclass
class EncodedRow:
    """One record tokenized, masked and truncated ([`encode_rows`]): a sample when `status` is `KEPT`; `NO_TARGET`
    when no trained token is left after truncation, `NO_INVOCATION` when an aLoRA sample lacks its invocation."""

    input_ids: list[int]
    labels: list[int]
    alora_start: Optional[int]
    status: int
    truncated: bool


def encode_rows(spec: DataSpec, tokenizer, records: Sequence[dict],
                invocation: Optional["Invocation"] = None) -> list[EncodedRow]:
    """Tokenize, mask and truncate each record on its own (the per-record part of [`prepare_samples`], which the
    tokenized cache runs chunk by chunk, so both give the same samples).

    Args:
        spec ([`~lorafleet.spec.DataSpec`]): The job's `data` section.
        tokenizer ([`~transformers.PreTrainedTokenizerFast`]): As for [`prepare_samples`].
        records (`Sequence[dict]`): Checked records.
        invocation ([`~lorafleet.data.alora.Invocation`], *optional*): For aLoRA jobs.

    Returns:
        `list[EncodedRow]`: One per record, in order.

    Example:

    ```python
    >>> from lorafleet.spec import DataSpec
    >>> from lorafleet.data.tokenizer import load_tokenizer
    >>> [row] = encode_rows(DataSpec(path="unused.jsonl", max_length=8), load_tokenizer(),
    ...                     [{"instruction": "Say hi 2 times.", "output": "hi hi"}])
    >>> row.status, row.truncated, len(row.input_ids)
    (1, True, 8)
    ```
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token: samples could never learn to stop")
    if spec.format == "instruction":
        encoded = _encode_instruction(records, tokenizer)
    elif spec.format == "text":
        encoded = _encode_text(records, tokenizer)
    else:
        encoded = _encode_chat(records, tokenizer)
    rows = []
    for ids, labels in encoded:
        if spec.train_on_inputs:
            labels = list(ids)
        labels[0] = IGNORE_INDEX
        truncated = len(ids) > spec.max_length
        if truncated:
            ids, labels = ids[: spec.max_length], labels[: spec.max_length]
        start = None
        if invocation is not None:
            # After truncation: an invocation cut off by max_length is as missing as one never written.
            start, labels = invocation.locate(ids, labels)
            if start is None:
                rows.append(EncodedRow(ids, labels, None, NO_INVOCATION, truncated))
                continue
        status = NO_TARGET if all(label == IGNORE_INDEX for label in labels) else KEPT
        rows.append(EncodedRow(ids, labels, start, status, truncated))
    return rows


def _batch_encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    # One call into the Rust tokenizer for the whole list: ~50x faster than encoding record by record.
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _encode_instruction(records: Sequence[dict], tokenizer) -> list[tuple[list[int], list[int]]]:
    # Prompt and output are encoded apart so the boundary is exact; the prompt ends in "\n", which byte-level and
    # sentencepiece pre-tokenizers split off anyway, so this matches how the prompt alone is encoded at generation.
    prompts = _batch_encode(tokenizer, [format_instruction_prompt(r["instruction"], r.get("input")) for r in records])
    outputs = _batch_encode(tokenizer, [r["output"] for r in records])
    bos, eos = _bos(tokenizer), [tokenizer.eos_token_id]
    return [
        (bos + p + o + eos, [IGNORE_INDEX] * (len(bos) + len(p)) + o + eos) for p, o in zip(prompts, outputs)
    ]


def _encode_text(records: Sequence[dict], tokenizer) -> list[tuple[list[int], list[int]]]:
    bos, eos = _bos(tokenizer), [tokenizer.eos_token_id]
    out = []
    for t in _batch_encode(tokenizer, [r["text"] for r in records]):
        ids = bos + t + eos
        out.append((ids, list(ids)))
    return out


def _is_lorafleet_tokenizer(tokenizer) -> bool:

    return (
        getattr(tokenizer, "chat_template", None) == CHAT_TEMPLATE
        and tokenizer.convert_tokens_to_ids(END) != tokenizer.unk_token_id
        and tokenizer.convert_tokens_to_ids(ASSISTANT) != tokenizer.unk_token_id
    )


def _encode_chat(records: Sequence[dict], tokenizer) -> list[tuple[list[int], list[int]]]:
    if _is_lorafleet_tokenizer(tokenizer):
        return _encode_chat_lorafleet(records, tokenizer)
    return [_encode_chat_template(r["messages"], tokenizer) for r in records]


def _encode_chat_lorafleet(records: Sequence[dict], tokenizer) -> list[tuple[list[int], list[int]]]:
    # Same ids as tokenizer.apply_chat_template (tests check it), but one batched encode instead of a jinja render
    # and an encode per record. Exact because the template puts special tokens, never whitespace, around contents.

    headers = {role: tokenizer.convert_tokens_to_ids(f"<|{role}|>") for role in CHAT_ROLES}
    end = tokenizer.convert_tokens_to_ids(END)
    contents = _batch_encode(tokenizer, [m["content"] for r in records for m in r["messages"]])
    out, k = [], 0
    for record in records:
        ids, labels = _bos(tokenizer), [IGNORE_INDEX] * len(_bos(tokenizer))
        for message in record["messages"]:
            body = contents[k] + [end]
            k += 1
            ids += [headers[message["role"]]] + body
            labels += [IGNORE_INDEX] + (body if message["role"] == "assistant" else [IGNORE_INDEX] * len(body))
        out.append((ids, labels))
    return out


def _encode_chat_template(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    # A foreign chat template: the trained span of assistant turn i is the text the full rendering adds after the
    # rendering of turns < i with the generation prompt. Tokens whose characters fall inside such a span are trained.
    if not getattr(tokenizer, "chat_template", None):
        raise SpecError("data.format: chat data needs a tokenizer with a chat template (this one has none)")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start_text = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        end_text = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (full.startswith(start_text) and full.startswith(end_text)):
            raise SpecError(
                "data.format: this tokenizer's chat template does not render a conversation as a prefix of the "
                "next one, so assistant turns cannot be located; use the instruction format or lorafleet's tokenizer"
            )
        spans.append((len(start_text), len(end_text)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [
        tok if any(s <= a and b <= e and b > a for s, e in spans) else IGNORE_INDEX
        for tok, (a, b) in zip(ids, enc["offset_mapping"])
    ]
    return ids, labels


def count_target_tokens(samples: Sequence[dict]) -> int:
    """Number of tokens that count in the loss (labels != -100) over some samples or rows.

    Normalizing the summed loss of a global step by this count over the *global* batch (not per micro-batch or
    per worker) is what makes runs with different world sizes and micro-batch splits give the same loss.

    Args:
        samples (`Sequence[dict]`): Samples or packed rows with `labels`.

    Returns:
        `int`: The count.

    Example:

    ```python
    >>> from lorafleet.data.encode import count_target_tokens
    >>> count_target_tokens([{"labels": [-100, 5, 6]}, {"labels": [-100, -100, 7]}])
    3
    ```
    """
    return sum(sum(1 for label in s["labels"] if label != IGNORE_INDEX) for s in samples)

