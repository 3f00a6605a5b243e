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

import logging
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)


def format_instruction_prompt(instruction: str, input: Optional[str] = None) -> str:
    """The prompt an instruction record is trained with; generate from it to query a trained adapter.

    Args:
        instruction (`str`): The record's `instruction`.
        input (`str`, *optional*): The record's `input`; empty or missing leaves the `### Input:` block out.

    Returns:
        `str`: The prompt text, ending with `### Response:` and a newline (bos not included).

    Example:

    ```python
    >>> from lorafleet.data.templates import format_instruction_prompt
    >>> format_instruction_prompt("Count the words.", "red fox")
    '### Instruction:\\nCount the words.\\n\\n### Input:\\nred fox\\n\\n### Response:\\n'
    ```
    """
    if input:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"


SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"


RESERVED = [f"<|reserved_{i}|>" for i in range(8)]


SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, SYSTEM, USER, ASSISTANT, END, *RESERVED]


CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

