"""The text formats samples are rendered in: the instruction prompt and the chat template with its special tokens.

The instruction format uses a plain-text prompt (works with any tokenizer, no special tokens needed):

```
<bos>### Instruction:
{instruction}

### Input:
{input}

### Response:
{output}<eos>
```

(the `### Input:` block is left out when a record has no `input`). Only `{output}<eos>` is trained on. The chat
template is the one lorafleet's shipped tokenizer carries (see `lorafleet.data.tokenizer`).
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

