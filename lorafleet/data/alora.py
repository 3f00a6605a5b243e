"""Activated LoRA (aLoRA) in the data: the invocation's token ids, and where it activates the adapter in each sample.

An aLoRA adapter changes the model only on the tokens from the *last* occurrence of its invocation sequence onward;
every token before it sees the frozen base model, so the base model's KV cache for a conversation stays valid when
the adapter is invoked on it (see [`~lorafleet.infer.generate.continue_with_adapter`]). PEFT implements the layers
(`LoraConfig(alora_invocation_tokens=...)`); this module adds what a training tool needs around them:

- [`resolve_invocation`]: the spec's `alora.invocation_string` / `invocation_tokens` as token ids, checked at submit
  time (non-empty, in the vocabulary, framed by special tokens or a warning).
- [`find_invocation`] and [`Invocation`]: where a sample's invocation starts, and its labels masked so that the loss
  only counts the tokens after the invocation (the tokens before it cannot be changed by the adapter).
- [`row_offsets`]: invocation starts as PEFT's per-row `alora_offsets` (the forward side is `lorafleet.model.alora`).

PEFT's convention: `alora_offsets[i]` is the number of tokens from the start of row i's invocation
to the end of the row, so the adapter is active on the last `alora_offsets[i]` positions. Counted from the end, it
does not depend on left padding; with right padding the padded tail is counted too (padding is never attended to
nor trained, so activating it changes nothing).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from lorafleet.constants import IGNORE_INDEX
from lorafleet.spec import AloraSpec, JobSpec, SpecError

logger = logging.getLogger(__name__)


# How many record numbers a "samples without the invocation" error lists before "...".
_SHOW_RECORDS = 5


class InvocationBoundaryWarning(UserWarning):
    """The invocation does not start and end on special tokens, so it may tokenize differently inside a text."""


def resolve_invocation(alora: AloraSpec, tokenizer, warn: bool = True) -> list[int]:
    """The invocation token ids of an `alora` spec section, checked against `tokenizer`.

    The string is tokenized *without* bos/eos: the ids are searched for inside samples, where no bos precedes them.

    Args:
        alora ([`~lorafleet.spec.AloraSpec`]):
            The spec's `alora` section.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The base model's tokenizer.
        warn (`bool`, *optional*, defaults to `True`):
            Emit an [`InvocationBoundaryWarning`] (shown on stderr) when the invocation does not start and end on a
            special token: a byte-level or sentencepiece tokenizer may then merge its first or last characters with
            the neighbouring text, and samples would not contain the exact ids.

    Returns:
        `list[int]`: The invocation token ids (non-empty).

    Raises:
        [`~lorafleet.spec.SpecError`]: One line naming `alora.invocation_string` or `alora.invocation_tokens`.

    Example:

    ```python
    >>> from lorafleet.spec import AloraSpec
    >>> from lorafleet.data.tokenizer import load_tokenizer
    >>> resolve_invocation(AloraSpec(invocation_string="<|reserved_0|><|reserved_1|>"), load_tokenizer())
    [8, 9]
    ```
    """
    if alora.invocation_tokens is not None:
        field, tokens = "alora.invocation_tokens", list(alora.invocation_tokens)
        vocab = len(tokenizer)
        bad = [t for t in tokens if t >= vocab]
        if bad:
            raise SpecError(f"{field}: ids {bad} are outside the tokenizer's vocabulary of {vocab}")
    else:
        field = "alora.invocation_string"
        tokens = tokenizer(alora.invocation_string, add_special_tokens=False)["input_ids"]
    if not tokens:
        raise SpecError(f"{field}: tokenizes to no tokens")
    if warn:
        special = set(tokenizer.all_special_ids) | {
            i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)
        }
        if tokens[0] not in special or tokens[-1] not in special:
            warnings.warn(
                f"{field}: {tokenizer.convert_ids_to_tokens(tokens)} does not start and end on special tokens; "
                "inside a sample its first or last characters may merge with the neighbouring text and the invocation "
                "would not be found (frame it with special tokens, e.g. <|reserved_0|>...<|reserved_1|>)",
                InvocationBoundaryWarning,
                stacklevel=2,
            )
    return tokens


def spec_invocation(spec: JobSpec, tokenizer, warn: bool = False) -> Optional[list[int]]:
    """The invocation ids of `spec` ([`resolve_invocation`]), or `None` for a plain LoRA job."""
    if spec.alora is None:
        return None
    return resolve_invocation(spec.alora, tokenizer, warn=warn)


def find_invocation(ids: Union[Sequence[int], torch.Tensor], invocation: Sequence[int]) -> Optional[int]:
    """Index where the *last* occurrence of `invocation` starts in `ids`, or `None` if it does not occur.

    The last occurrence wins (as in PEFT): an invocation quoted earlier in a conversation does not activate the
    adapter there.

    Args:
        ids (`Sequence[int]` or 1-D `torch.Tensor`): Token ids of one sequence.
        invocation (`Sequence[int]`): The invocation ids.

    Returns:
        `int` or `None`: The start index.

    Example:

    ```python
    >>> find_invocation([1, 8, 9, 5, 8, 9, 6], [8, 9]), find_invocation([1, 8, 5], [8, 9])
    (4, None)
    ```
    """
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    n, k = len(ids), len(invocation)
    first, rest = invocation[0], list(invocation[1:])
    for start in range(n - k, -1, -1):
        if ids[start] == first and list(ids[start + 1 : start + k]) == rest:
            return start
    return None


@dataclass
class Invocation:
    """What [`~lorafleet.data.encode.prepare_samples`] needs to turn samples into aLoRA training samples.

    Args:
        tokens (`list[int]`): The invocation ids ([`resolve_invocation`]).
        drop_missing (`bool`, *optional*, defaults to `False`):
            Drop samples without the invocation (logged) instead of refusing the data.
    """

    tokens: list[int]
    drop_missing: bool = False

    @classmethod
    def from_spec(cls, spec: JobSpec, tokenizer, warn: bool = False) -> Optional["Invocation"]:
        """The job's invocation, or `None` for a plain LoRA job."""
        tokens = spec_invocation(spec, tokenizer, warn=warn)
        if tokens is None:
            return None
        return cls(tokens, spec.alora.drop_samples_without_invocation)

    def locate(self, ids: Sequence[int], labels: Sequence[int]) -> tuple[Optional[int], list[int]]:
        """Find the invocation in a tokenized sample and keep only the labels after it.

        Labels before the end of the invocation are set to -100: the adapter is off before the invocation, so those
        tokens cannot be learned, and the invocation itself is given, not predicted. Tokens after it keep the labels
        the data format chose (e.g. only assistant turns for chat data).

        Returns:
            `tuple[Optional[int], list[int]]`: The invocation start (`None` when missing) and the new labels.

        Example:

        ```python
        >>> Invocation([8, 9]).locate([1, 5, 8, 9, 6, 2], [-100, 5, 8, 9, 6, 2])
        (2, [-100, -100, -100, -100, 6, 2])
        ```
        """
        start = find_invocation(ids, self.tokens)
        if start is None:
            return None, list(labels)
        end = start + len(self.tokens)
        return start, [IGNORE_INDEX] * end + list(labels[end:])

    def check_missing(self, missing: Sequence[int], total: int, max_length: int) -> None:
        """Refuse (or report dropping) samples without the invocation.

        Args:
            missing (`Sequence[int]`): 1-based record numbers of the samples without the invocation.
            total (`int`): Records read.
            max_length (`int`): `data.max_length` (a truncated sample may have lost its invocation).

        Raises:
            [`~lorafleet.spec.SpecError`]: When samples are missing it and `drop_missing` is off.
        """
        if not missing:
            return
        shown = ", ".join(str(r) for r in missing[:_SHOW_RECORDS]) + (", ..." if len(missing) > _SHOW_RECORDS else "")
        what = f"{len(missing)} of {total} records do not contain the alora invocation {self.tokens} within max_length={max_length}"
        if not self.drop_missing:
            raise SpecError(
                f"data.path: {what} (records {shown}); add it to every sample, or set "
                "alora.drop_samples_without_invocation: true to drop them"
            )
        logger.warning("data: dropped %s (records %s)", what, shown)


def row_offsets(starts: Sequence[int], width: int) -> list[int]:
    """PEFT `alora_offsets` for invocation starts given as indices into rows of `width` tokens.

    Example:

    ```python
    >>> row_offsets([4, 1], width=6)  # adapter on positions 4-5 of row 0 and 1-5 of row 1
    [2, 5]
    ```
    """
    return [width - s for s in starts]

