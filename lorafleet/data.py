"""Training data: read and check records, tokenize and mask them, pack, collate, and plan the global batches.

What the driver and the training workers call, in order:

1. [`load_records`] reads `data.path` (.jsonl, .json, .parquet or a `datasets.save_to_disk` folder) and refuses bad
   records with one-line [`SpecError`]s naming the record.
2. [`prepare_samples`] turns records into `{"input_ids", "labels"}` samples (labels aligned with input_ids, prompt
   tokens -100; the model shifts), truncates, drops samples left with nothing to learn, and optionally packs.
3. [`BatchPlan`] says which sample indices make up global optimizer step k and which of them each worker's
   micro-batches take; it depends only on the step number, so a resumed run continues the same order.
4. [`collate`] pads a micro-batch into tensors.

The instruction format uses a plain-text prompt (works with any tokenizer, no special tokens needed):

```
<bos>### Instruction:
{instruction}

### Input:
{input}

### Response:
{output}<eos>
```

(the `### Input:` block is left out when a record has no `input`). Only `{output}<eos>` is trained on.
"""

from __future__ import annotations

import bisect
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from lorafleet.spec import DataSpec, SpecError

if TYPE_CHECKING:
    from lorafleet.alora import Invocation

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
CHAT_ROLES = ("system", "user", "assistant")

_FORMAT_FIELDS = {"text": ("text",), "instruction": ("instruction", "output"), "chat": ("messages",)}


def format_instruction_prompt(instruction: str, input: Optional[str] = None) -> str:
    """The prompt an instruction record is trained with; generate from it to query a trained adapter.

    Args:
        instruction (`str`): The record's `instruction`.
        input (`str`, *optional*): The record's `input`; empty or missing leaves the `### Input:` block out.

    Returns:
        `str`: The prompt text, ending with `### Response:` and a newline (bos not included).

    Example:

    ```python
    >>> from lorafleet.data import format_instruction_prompt
    >>> format_instruction_prompt("Count the words.", "red fox")
    '### Instruction:\\nCount the words.\\n\\n### Input:\\nred fox\\n\\n### Response:\\n'
    ```
    """
    if input:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


# ----------------------------------------------------------------------------------------------------------------------
# Reading records


def load_records(spec: DataSpec) -> list[dict]:
    """Read the records of `spec.path` and check they have the fields `spec.format` needs.

    Args:
        spec ([`~lorafleet.spec.DataSpec`]): The job's `data` section.

    Returns:
        `list[dict]`: The records, in file order (extra fields are kept and ignored).

    Raises:
        [`~lorafleet.spec.SpecError`]: One line naming `data.path` and the record (or JSON line) at fault: unreadable
        file, invalid JSON, missing field, wrong type, empty dataset.

    Example:

    ```python
    >>> from lorafleet.spec import DataSpec
    >>> from lorafleet.data import load_records
    >>> records = load_records(DataSpec(path="jobs/data/tasks.jsonl"))
    >>> len(records), sorted(records[0])
    (3000, ['input', 'instruction', 'output'])
    ```
    """
    path = Path(spec.path)
    if not path.exists():
        raise SpecError(f"data.path: no such file or directory: {path}")
    lines: Optional[list[int]] = None
    if path.is_dir():
        records = _read_saved_dataset(path)
    elif path.suffix == ".jsonl":
        records, lines = _read_jsonl(path)
    elif path.suffix == ".json":
        records = _read_json(path)
    elif path.suffix == ".parquet":
        records = _read_parquet(path)
    else:
        raise SpecError(f"data.path: unsupported file type '{path.suffix}' (use .jsonl, .json, .parquet or a saved dataset dir)")
    if not records:
        raise SpecError(f"data.path: {path} holds no records")
    for i, record in enumerate(records):
        where = f"record {i + 1}" + (f" (line {lines[i]})" if lines is not None and lines[i] != i + 1 else "")
        problem = _record_problem(record, spec.format)
        if problem is not None:
            raise SpecError(f"data.path: {where}: {problem}")
    return records


def _read_jsonl(path: Path) -> tuple[list[dict], list[int]]:
    records, lines = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SpecError(f"data.path: line {number}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            lines.append(number)
    return records, lines


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SpecError(f"data.path: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise SpecError("data.path: a .json file must hold a list of records (or an object with one list of them)")
        data = lists[0]
    if not isinstance(data, list):
        raise SpecError("data.path: a .json file must hold a list of records")
    return data


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a corrupt or foreign file
        raise SpecError(f"data.path: cannot read parquet: {str(exc).splitlines()[0]}") from None


def _read_saved_dataset(path: Path) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise SpecError(f"data.path: cannot load saved dataset: {str(exc).splitlines()[0]}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise SpecError(f"data.path: saved DatasetDict has splits {sorted(ds)} and no 'train' split")
    return ds.to_list()


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _record_problem(record: Any, fmt: str) -> Optional[str]:
    if not isinstance(record, dict):
        return f"expected an object, got {_type_name(record)}"
    for name in _FORMAT_FIELDS[fmt]:
        if name not in record or record[name] is None:
            hint = next(
                (f" (it looks like the {other} format: set data.format: {other})"
                 for other, fields in _FORMAT_FIELDS.items()
                 if other != fmt and all(record.get(f) is not None for f in fields)),
                "",
            )
            return f"missing '{name}'{hint}"
    if fmt == "text":
        return _string_problem(record, "text")
    if fmt == "instruction":
        for name in ("instruction", "output"):
            problem = _string_problem(record, name)
            if problem:
                return problem
        if record.get("input") is not None and not isinstance(record["input"], str):
            return f"'input' must be a string (got {_type_name(record['input'])})"
        return None
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        return f"'messages' must be a non-empty list (got {_type_name(messages) if not isinstance(messages, list) else 'an empty list'})"
    for j, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{j}] must be an object with 'role' and 'content' (got {_type_name(message)})"
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            return f"messages[{j}].role must be one of {', '.join(CHAT_ROLES)} (got {role!r})"
        if not isinstance(content, str):
            return f"messages[{j}].content must be a string (got {_type_name(content)})"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message (nothing to train on)"
    return None


def _string_problem(record: dict, name: str) -> Optional[str]:
    value = record[name]
    if not isinstance(value, str):
        return f"'{name}' must be a string (got {_type_name(value)})"
    if not value.strip():
        return f"'{name}' is empty"
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizing, masking, packing


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
            lorafleet's ([`~lorafleet.tokenizer.load_tokenizer`]) or a model's own. For chat data a foreign
            tokenizer needs a chat template that renders each conversation as a prefix of the next.
        records (`Sequence[dict]`, *optional*): Already loaded records; defaults to `load_records(spec)`.
        return_stats (`bool`, *optional*, defaults to `False`): Also return a [`DataStats`].
        invocation ([`~lorafleet.alora.Invocation`], *optional*):
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
    >>> from lorafleet.tokenizer import load_tokenizer
    >>> from lorafleet.data import prepare_samples
    >>> tok = load_tokenizer()
    >>> spec = DataSpec(path="unused.jsonl", max_length=64)
    >>> [s] = prepare_samples(spec, tok, [{"instruction": "Say hi 2 times.", "output": "hi hi"}])
    >>> tok.decode([t for t, l in zip(s["input_ids"], s["labels"]) if l != -100])
    'hi hi</s>'
    ```
    """
    if records is None:
        records = load_records(spec)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token: samples could never learn to stop")
    if spec.format == "instruction":
        encoded = _encode_instruction(records, tokenizer)
    elif spec.format == "text":
        encoded = _encode_text(records, tokenizer)
    else:
        encoded = _encode_chat(records, tokenizer)

    stats = DataStats(records=len(records))
    samples = []
    missing_invocation: list[int] = []
    for record_no, (ids, labels) in enumerate(encoded, start=1):
        if spec.train_on_inputs:
            labels = list(ids)
        labels[0] = IGNORE_INDEX
        if len(ids) > spec.max_length:
            stats.truncated += 1
            ids, labels = ids[: spec.max_length], labels[: spec.max_length]
        start = None
        if invocation is not None:
            # After truncation: an invocation cut off by max_length is as missing as one never written.
            start, labels = invocation.locate(ids, labels)
            if start is None:
                missing_invocation.append(record_no)
                continue
        if all(label == IGNORE_INDEX for label in labels):
            stats.dropped += 1
            continue
        sample = {"input_ids": ids, "labels": labels}
        if start is not None:
            sample["alora_start"] = start
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
    from lorafleet.tokenizer import ASSISTANT, CHAT_TEMPLATE, END

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
    from lorafleet.tokenizer import END

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


def pack_samples(samples: Sequence[dict], max_length: int) -> list[dict]:
    """Pack samples into rows of at most `max_length` tokens (first-fit decreasing, deterministic).

    Args:
        samples (`Sequence[dict]`): Samples with `input_ids` and `labels`, each at most `max_length` long.
        max_length (`int`): Tokens per row.

    Returns:
        `list[dict]`: Rows with `input_ids`, `labels` and `position_ids` (restarting at 0 at each sample). Each
        sample's first label is -100, so the last token of one sample is never trained to predict the next.

    Example:

    ```python
    >>> from lorafleet.data import pack_samples
    >>> rows = pack_samples([{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]},
    ...                      {"input_ids": [1, 7], "labels": [-100, 7]}], max_length=8)
    >>> rows[0]["position_ids"], rows[0]["labels"]
    ([0, 1, 2, 0, 1], [-100, 5, 6, -100, 7])
    ```
    """
    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i]["input_ids"]), i))
    bins: list[list[int]] = []
    # (free space, bin index) kept sorted: first fit == the fullest bin that still has room, found by bisect.
    free: list[tuple[int, int]] = []
    for i in order:
        n = len(samples[i]["input_ids"])
        if n > max_length:
            raise ValueError(f"sample {i} has {n} tokens, more than max_length={max_length}")
        j = bisect.bisect_left(free, (n, -1))
        if j == len(free):
            bins.append([i])
            bisect.insort(free, (max_length - n, len(bins) - 1))
        else:
            space, b = free.pop(j)
            bins[b].append(i)
            bisect.insort(free, (space - n, b))
    rows = []
    alora = any("alora_start" in s for s in samples)
    for members in bins:
        row: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
        if alora:
            # [activation start, sample end) per packed sample, in row coordinates: one offset per row cannot
            # express several invocations, so collate turns these into a per-token activation mask.
            row["alora_spans"] = []
        for i in members:
            ids, labels = samples[i]["input_ids"], samples[i]["labels"]
            if alora:
                at = len(row["input_ids"])
                row["alora_spans"].append([at + samples[i]["alora_start"], at + len(ids)])
            row["input_ids"] += ids
            row["labels"] += [IGNORE_INDEX] + list(labels[1:])
            row["position_ids"] += list(range(len(ids)))
        rows.append(row)
    return rows


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
    >>> from lorafleet.data import count_target_tokens
    >>> count_target_tokens([{"labels": [-100, 5, 6]}, {"labels": [-100, -100, 7]}])
    3
    ```
    """
    return sum(sum(1 for label in s["labels"] if label != IGNORE_INDEX) for s in samples)


# ----------------------------------------------------------------------------------------------------------------------
# Collation


def collate(samples: Sequence[dict], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad samples into a batch of tensors.

    Args:
        samples (`Sequence[dict]`): Samples from [`prepare_samples`] (all packed rows, or all plain samples).
        pad_id (`int`): Id written in padded `input_ids` positions (labels get -100).
        padding_side (`str`, *optional*, defaults to `"right"`): `"right"` or `"left"`.

    Returns:
        `dict[str, torch.Tensor]`: `input_ids`, `labels` and `position_ids` (int64, `[batch, longest]`), plus
        `attention_mask` for plain samples. aLoRA samples (with `alora_start`) add `alora_offsets` (int64 `[batch]`,
        PEFT's convention: tokens from the invocation start to the end of the padded row, so left and right padding
        give the same activated tokens); packed aLoRA rows add `alora_mask` (bool `[batch, longest]`, True from each
        packed sample's invocation to that sample's end). Packed rows get no `attention_mask`: transformers then reads the
        sample boundaries from `position_ids` and builds a block-diagonal causal mask (padding becomes one more
        sequence of its own, with -100 labels). That detection only runs without a KV cache, so call the model with
        `use_cache=False` (its config default is True). Plain samples' `position_ids` start at 0 at their first real
        token, so left padding does not shift positions.

    Example:

    ```python
    >>> from lorafleet.data import collate
    >>> batch = collate([{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [-100, 7]}],
    ...                 pad_id=0, padding_side="left")
    >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist(), batch["position_ids"].tolist()
    ([[1, 5, 6], [0, 1, 7]], [[1, 1, 1], [0, 1, 1]], [[0, 1, 2], [0, 0, 1]])
    ```
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left' (got {padding_side!r})")
    if not samples:
        raise ValueError("cannot collate an empty batch")
    packed = ["position_ids" in s for s in samples]
    if any(packed) and not all(packed):
        raise ValueError("cannot collate packed rows with plain samples")
    packed = packed[0]
    width = max(len(s["input_ids"]) for s in samples)
    batch = {name: torch.empty(len(samples), width, dtype=torch.long) for name in ("input_ids", "labels", "position_ids")}
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    alora_offsets = torch.zeros(len(samples), dtype=torch.long) if "alora_start" in samples[0] else None
    alora_mask = torch.zeros(len(samples), width, dtype=torch.bool) if "alora_spans" in samples[0] else None
    for row, s in enumerate(samples):
        n, pad = len(s["input_ids"]), width - len(s["input_ids"])
        real = slice(pad, width) if padding_side == "left" else slice(0, n)
        fill = slice(0, pad) if padding_side == "left" else slice(n, width)
        batch["input_ids"][row, real] = torch.tensor(s["input_ids"])
        batch["input_ids"][row, fill] = pad_id
        batch["labels"][row, real] = torch.tensor(s["labels"])
        batch["labels"][row, fill] = IGNORE_INDEX
        if packed:
            batch["position_ids"][row, real] = torch.tensor(s["position_ids"])
            # Padding as its own 0..k-1 run: a separate "sequence" that nothing real attends to.
            batch["position_ids"][row, fill] = torch.arange(pad)
        else:
            batch["position_ids"][row, real] = torch.arange(n)
            batch["position_ids"][row, fill] = 0
            mask[row, real] = 1
        if alora_offsets is not None:
            alora_offsets[row] = width - (real.start + s["alora_start"])
        if alora_mask is not None:
            for start, end in s["alora_spans"]:
                alora_mask[row, real.start + start : real.start + end] = True
    if not packed:
        batch["attention_mask"] = mask
    if alora_offsets is not None:
        batch["alora_offsets"] = alora_offsets
    if alora_mask is not None:
        batch["alora_mask"] = alora_mask
    return batch


# ----------------------------------------------------------------------------------------------------------------------
# Batch plan


@lru_cache(maxsize=8)
def _epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool) -> tuple[int, ...]:
    if not shuffle:
        return tuple(range(num_samples))
    gen = torch.Generator().manual_seed(seed + epoch)
    return tuple(torch.randperm(num_samples, generator=gen).tolist())


@dataclass(frozen=True)
class BatchPlan:
    """Which samples make up each global optimizer step, as a pure function of the step number.

    The samples are read epoch after epoch, each epoch in its own order (a permutation seeded by `seed + epoch`,
    or file order without `shuffle`); global step k takes positions `[k * global_batch_size, (k + 1) *
    global_batch_size)` of that endless stream, wrapping into the next epoch when needed. Since the global batch
    does not depend on how it is split over workers, a 1-worker and a 2-worker run with the same global batch see
    the same samples at every step, and a run resumed at step k needs nothing but k.

    Args:
        num_samples (`int`): Samples (or packed rows) available.
        global_batch_size (`int`): Samples per optimizer step over all workers
            (`micro_batch_size * grad_accum * world_size`).
        seed (`int`): Seeds the per-epoch order.
        shuffle (`bool`, *optional*, defaults to `True`): Reorder every epoch.

    Example:

    ```python
    >>> from lorafleet.data import BatchPlan
    >>> plan = BatchPlan(num_samples=10, global_batch_size=4, seed=0, shuffle=False)
    >>> plan.global_batch(2)  # positions 8..11: wraps into epoch 1
    [8, 9, 0, 1]
    >>> plan.micro_batches(2, rank=1, world_size=2, micro_batch_size=1, grad_accum=2)
    [[0], [1]]
    ```
    """

    num_samples: int
    global_batch_size: int
    seed: int
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.num_samples <= 0:
            raise ValueError("BatchPlan needs at least one sample")
        if self.global_batch_size <= 0:
            raise ValueError("global_batch_size must be positive")

    def epoch_order(self, epoch: int) -> tuple[int, ...]:
        """Sample indices in the order epoch `epoch` (0-based) reads them."""
        return _epoch_order(self.num_samples, self.seed, epoch, self.shuffle)

    def epoch(self, step: int) -> float:
        """Epochs completed at the start of global step `step` (fractional)."""
        return step * self.global_batch_size / self.num_samples

    def global_batch(self, step: int) -> list[int]:
        """Sample indices of global optimizer step `step` (0-based), in the order they are split over workers.

        Args:
            step (`int`): The global step.

        Returns:
            `list[int]`: `global_batch_size` sample indices (repeats only when a batch spans epochs or is larger
            than the dataset).
        """
        if step < 0:
            raise ValueError(f"step must be >= 0 (got {step})")
        start = step * self.global_batch_size
        out = []
        for pos in range(start, start + self.global_batch_size):
            epoch, offset = divmod(pos, self.num_samples)
            out.append(self.epoch_order(epoch)[offset])
        return out

    def micro_batches(
        self, step: int, rank: int, world_size: int, micro_batch_size: int, grad_accum: int
    ) -> list[list[int]]:
        """The `grad_accum` micro-batches worker `rank` runs for global step `step`.

        Worker r takes the r-th contiguous slice of [`global_batch`] and cuts it into micro-batches in order, so the
        union over ranks and micro-batches is exactly the global batch.

        Args:
            step (`int`): The global step (0-based).
            rank (`int`): This worker's rank, in `[0, world_size)`.
            world_size (`int`): Number of workers.
            micro_batch_size (`int`): Samples per forward/backward.
            grad_accum (`int`): Micro-batches per optimizer step.

        Returns:
            `list[list[int]]`: `grad_accum` lists of `micro_batch_size` sample indices.

        Raises:
            `ValueError`: If `micro_batch_size * grad_accum * world_size != global_batch_size` or `rank` is out of range.
        """
        if micro_batch_size * grad_accum * world_size != self.global_batch_size:
            raise ValueError(
                f"micro_batch_size * grad_accum * world_size = {micro_batch_size} * {grad_accum} * {world_size} "
                f"!= global_batch_size {self.global_batch_size}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        batch = self.global_batch(step)
        per_rank = micro_batch_size * grad_accum
        mine = batch[rank * per_rank : (rank + 1) * per_rank]
        return [mine[i * micro_batch_size : (i + 1) * micro_batch_size] for i in range(grad_accum)]
