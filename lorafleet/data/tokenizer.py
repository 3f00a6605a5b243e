"""The tokenizer lorafleet ships: byte-level BPE, 2048 ids, trained on the shipped demo corpus.

It is what `model.architecture` jobs (models built from a config, no download) use, so nothing is fetched from a hub.
Byte-level BPE encodes any text (every byte has an id), so `<unk>` exists for compatibility but never appears;
digits are always split one per token.

Ids 0-15 are special and fixed:

| id | token | use |
|----|-------|-----|
| 0 | `<pad>` | padding |
| 1 | `<s>` | bos, added in front of every sample |
| 2 | `</s>` | eos, ends the trained part of instruction and text samples |
| 3 | `<unk>` | never produced (byte-level) |
| 4-6 | `<|system|>`, `<|user|>`, `<|assistant|>` | chat role headers |
| 7 | `<|end|>` | ends every chat turn; the assistant's is trained, so generation stops on it |
| 8-15 | `<|reserved_0|>` ... `<|reserved_7|>` | kept for later features (e.g. framing an aLoRA invocation) |

The chat template renders `<s><|user|>Hi<|end|><|assistant|>Hello<|end|>`: no whitespace next to the special
tokens, so every turn tokenizes the same alone as in the whole conversation, and `{% generation %}` marks the
assistant content and its `<|end|>` (what `return_assistant_tokens_mask=True` reports and what is trained).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterable, Iterator

from lorafleet.data.templates import (
    ASSISTANT,
    BOS,
    CHAT_TEMPLATE,
    END,
    EOS,
    PAD,
    RESERVED,
    SPECIAL_TOKENS,
    SYSTEM,
    UNK,
    USER,
    format_instruction_prompt,
)

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"


TOKENIZER_FILE = ASSETS_DIR / "tokenizer.json"


VOCAB_SIZE = 2048


MODEL_MAX_LENGTH = 2048


def train_tokenizer(*record_lists: Iterable[dict], vocab_size: int = VOCAB_SIZE):
    """Train the byte-level BPE tokenizer on records rendered the way training sees them.

    Args:
        record_lists (`Iterable[dict]`):
            Instruction, chat or text records (the kind is read from each record's fields).
        vocab_size (`int`, *optional*, defaults to 2048):
            Total ids, special tokens and the 256 byte symbols included.

    Returns:
        `tokenizers.Tokenizer`: The raw tokenizer (save it with `.save(path)`); [`load_tokenizer`] wraps it.

    Example:

    ```python
    >>> from lorafleet.data.tokenizer import train_tokenizer
    >>> tok = train_tokenizer([{"text": "hello world"}] * 10, vocab_size=300)
    >>> tok.token_to_id("<|end|>"), tok.decode(tok.encode("héllo").ids)
    (7, 'héllo')
    ```
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    # Digits one by one (as Llama does): sums and counts then use a 10-token alphabet a small model can learn.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(record_lists), trainer=trainer)
    # Llama convention: plain `tokenizer(text)` starts with bos; lorafleet's data code adds bos itself and encodes
    # with add_special_tokens=False, so this only serves users calling the tokenizer directly (and generation).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, SPECIAL_TOKENS.index(BOS))]
    )
    return tok


def _corpus(record_lists: Iterable[Iterable[dict]]) -> Iterator[str]:

    for records in record_lists:
        for record in records:
            if "messages" in record:
                for message in record["messages"]:
                    yield message["content"]
            elif "text" in record:
                yield record["text"]
            else:
                yield format_instruction_prompt(record["instruction"], record.get("input")) + record["output"]


@functools.lru_cache(maxsize=1)
def _tokenizer_json(path: str) -> str:
    return Path(path).read_text(encoding="utf-8")


def load_tokenizer(path: str | Path | None = None):
    """Load lorafleet's tokenizer as a `transformers` fast tokenizer, with its special tokens and chat template.

    Args:
        path (`str` or `Path`, *optional*):
            A `tokenizer.json` to wrap instead of the shipped one (it must have the same special tokens).

    Returns:
        [`~transformers.PreTrainedTokenizerFast`]: pad `<pad>` (0), bos `<s>` (1), eos `</s>` (2), unk `<unk>` (3),
        the chat tokens and `<|reserved_0..7|>` as additional special tokens, and a chat template.
        `save_pretrained(dir)` writes a folder that `AutoTokenizer.from_pretrained(dir)` loads offline.

    Example:

    ```python
    >>> from lorafleet.data.tokenizer import load_tokenizer
    >>> tok = load_tokenizer()
    >>> len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    (2048, 0, 1, 2)
    >>> tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    '<s><|user|>Hi<|end|><|assistant|>'
    ```
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    file = Path(path) if path is not None else TOKENIZER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no tokenizer file (regenerate it with `python scripts/demo_data.py`)")
    backend = Tokenizer.from_str(_tokenizer_json(str(file.resolve())))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT, END, *RESERVED],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )

