"""The demo datasets and the tokenizer that lorafleet ships, regenerated deterministically.

`python scripts/demo_data.py` rewrites, byte for byte the same every time:

- `jobs/data/tasks.jsonl`: instruction records (`instruction`, optional `input`, `output`) of small deterministic
  string and number tasks (reverse a word list, uppercase, sort letters, add numbers, repeat a word, ...). Each
  output follows from its instruction by a fixed rule, so a LoRA adapter on a *randomly initialized* tiny model
  visibly lowers the loss within ~100 steps.
- `jobs/data/chat_sample.jsonl`: multi-turn `messages` records built from the same tasks (some with a system turn).
- `jobs/data/text_sample.jsonl`: `text` records stating the same facts as plain sentences.
- `lorafleet/assets/tokenizer.json`: a byte-level BPE tokenizer (2048 ids) trained on those three files rendered
  with lorafleet's prompt and chat templates.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Callable, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "jobs" / "data"
ASSETS_DIR = REPO_ROOT / "lorafleet" / "assets"

NUM_TASKS = 3000
NUM_CHAT = 200
NUM_TEXT = 200
SEED = 1234

# Short, common, lowercase words: each becomes one or two BPE tokens, which keeps samples short (~30-60 tokens)
# and the copy/reorder tasks learnable by a 4-layer model.
WORDS = """
apple river stone cloud green house light table chair water music paper plant horse bread dream glass night
smile train ocean tiger lemon candy storm field happy quiet brave sugar money heart earth metal radio pilot
robot sheep snake spoon tower truck voice watch whale wheel world zebra amber beach berry bird blue book box
cake camp card cat coat corn cup dog door duck egg fish flag fox frog gift goat gold hat hill ice ink jam
key kite lamp leaf lion map milk moon nest nut owl pen pig pie rain red ring road rope salt sand ship shoe
sky snow star sun tea toy tree van wind wolf wood yarn bell bike boat bone cave clay coin cow dust farm fern
fire gate gem harp iron jar king lake mint moss nail oak path pear pine pond rock rose seed silk soap sock
song tent tide vine wave yard zinc
""".split()

# Two phrasings per task: enough variety that the model must read the instruction, few enough that the mapping
# from instruction to rule is learnable in tens of steps.
_TaskFn = Callable[[random.Random], tuple[str, Optional[str], str, str]]


def _words(rng: random.Random, lo: int = 3, hi: int = 6) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]


def _reverse(rng: random.Random) -> tuple[str, Optional[str], str, str]:
    words = _words(rng)
    instr = rng.choice(["Reverse the order of these words.", "Write these words in reverse order."])
    answer = " ".join(reversed(words))
    return instr, " ".join(words), "Reversed: " + answer, answer


def _upper(rng: random.Random) -> tuple[str, Optional[str], str, str]:
    words = _words(rng, 2, 5)
    instr = rng.choice(["Convert this text to uppercase.", "Write this in capital letters."])
    answer = " ".join(words).upper()
    return instr, " ".join(words), "In capitals: " + answer, answer


def _sort_letters(rng: random.Random) -> tuple[str, Optional[str], str, str]:
    word = rng.choice(WORDS)
    instr = rng.choice(["Sort the letters of this word alphabetically.", "Put the letters of this word in order."])
    answer = "".join(sorted(word))
    return instr, word, "Sorted letters: " + answer, answer


def _add(rng: random.Random) -> tuple[str, Optional[str], str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    instr = rng.choice(["Add these two numbers.", "What is the sum?"])
    return instr, f"{a} + {b}", f"{a} + {b} = {a + b}", str(a + b)


def _repeat(rng: random.Random) -> tuple[str, Optional[str], str, str]:
    word, n = rng.choice(WORDS), rng.randint(2, 5)
    instr = rng.choice([f"Repeat the word {word} {n} times.", f"Say {word} {n} times."])
    answer = " ".join([word] * n)
    return instr, None, answer, answer


def _count(rng: random.Random) -> tuple[str, Optional[str], str, str]:
    words = _words(rng, 1, 9)
    instr = rng.choice(["How many words are in this list?", "Count the words."])
    return instr, " ".join(words), f"There are {len(words)} words.", str(len(words))


def _initials(rng: random.Random) -> tuple[str, Optional[str], str, str]:
    words = _words(rng)
    instr = rng.choice(["Write the first letter of each word.", "Give the initials of these words."])
    answer = " ".join(w[0] for w in words)
    return instr, " ".join(words), "Initials: " + answer, answer


def _sort_words(rng: random.Random) -> tuple[str, Optional[str], str, str]:
    words = _words(rng)
    instr = rng.choice(["Sort these words alphabetically.", "Put these words in alphabetical order."])
    answer = " ".join(sorted(words))
    return instr, " ".join(words), "Sorted: " + answer, answer


def _spell(rng: random.Random) -> tuple[str, Optional[str], str, str]:
    word = rng.choice(WORDS)
    instr = rng.choice([f"Spell the word {word} with dashes.", f"Spell out {word} letter by letter."])
    answer = "-".join(word)
    return instr, None, answer, answer


def _largest(rng: random.Random) -> tuple[str, Optional[str], str, str]:
    nums = [rng.randint(0, 999) for _ in range(rng.randint(3, 6))]
    instr = rng.choice(["Which number is the largest?", "Find the biggest number."])
    return instr, " ".join(map(str, nums)), f"The largest is {max(nums)}.", str(max(nums))


TASKS: dict[str, _TaskFn] = {
    "reverse": _reverse,
    "upper": _upper,
    "sort_letters": _sort_letters,
    "add": _add,
    "repeat": _repeat,
    "count": _count,
    "initials": _initials,
    "sort_words": _sort_words,
    "spell": _spell,
    "largest": _largest,
}


def _task_cycle(n: int, seed: int):
    """`(index, task name, (instruction, input, output, bare answer))` for n records, cycling through every task."""
    rng = random.Random(seed)
    names = list(TASKS)
    for i in range(n):
        name = names[i % len(names)]
        yield i, name, TASKS[name](rng)


def task_records(n: int = NUM_TASKS, seed: int = SEED) -> list[dict]:
    """Instruction records, cycling through every task so each is equally represented.

    Args:
        n (`int`, *optional*, defaults to 3000): How many records.
        seed (`int`, *optional*, defaults to 1234): Seed of the record generator.

    Returns:
        `list[dict]`: Records with `instruction`, `output` and (for tasks that take one) `input`.

    Example:

    ```python
    >>> from demo_data import task_records
    >>> task_records(2)[1]["instruction"]
    'Write this in capital letters.'
    ```
    """
    records = []
    for _, _, (instruction, inp, output, _) in _task_cycle(n, seed):
        record = {"instruction": instruction}
        if inp is not None:
            record["input"] = inp
        record["output"] = output
        records.append(record)
    return records


# How `plain_task_records` lays a record out: (prompt with an input, prompt without one, text before the answer).
# None of them is the default job's instruction template, and none puts the job's prefixes ("Reversed: ") before an
# answer; the last two carry the newlines, "###" headers and "Input:" lines that such templates are made of.
PLAIN_STYLES = {
    "plain": ("{instruction} | {input} =", "{instruction} =", " "),
    "task": ("Task: {instruction}\nInput: {input}\nAnswer:", "Task: {instruction}\nAnswer:", " "),
    "markdown": ("### {instruction}\n\n{input}\n\n### Answer\n", "### {instruction}\n\n### Answer\n", ""),
}


def plain_task_records(n: int, seed: int, styles: tuple[str, ...] = ("plain",)) -> list[dict]:
    """The same tasks without the default job's template and answer prefixes, for pretraining the demo base.

    The answer is the bare result (`"c b a"`, not `"Reversed: c b a"`), so a model pretrained on these knows the
    skills but not the instruction format the default job's adapter teaches.

    Args:
        n (`int`): How many records.
        seed (`int`): Seed of the record generator.
        styles (`tuple[str, ...]`, *optional*, defaults to `("plain",)`): Layouts from `PLAIN_STYLES`, taken in turn
            (record i gets `styles[i % len(styles)]`); `plain` is `"<instruction> | <input> = <answer>"`.

    Returns:
        `list[dict]`: Records with `task`, `style`, `prompt` and `answer` (the text that follows the prompt).

    Example:

    ```python
    >>> from demo_data import plain_task_records
    >>> plain_task_records(1, seed=0)[0]["prompt"].endswith(" =")
    True
    >>> plain_task_records(2, seed=0, styles=("plain", "markdown"))[1]["prompt"].startswith("### ")
    True
    ```
    """
    records = []
    for i, name, (instruction, inp, _, answer) in _task_cycle(n, seed):
        style = styles[i % len(styles)]
        with_input, without_input, lead = PLAIN_STYLES[style]
        prompt = (without_input if inp is None else with_input).format(instruction=instruction, input=inp)
        records.append({"task": name, "style": style, "prompt": prompt, "answer": lead + answer})
    return records


_SYSTEMS = ["You are a precise text tool. Answer with the result only.", "Answer tersely."]
_FOLLOW_UPS = [
    ("Now uppercase that.", lambda prev: prev.upper()),
    ("Now reverse the words of that.", lambda prev: " ".join(reversed(prev.split()))),
    ("How many words was that?", lambda prev: str(len(prev.split()))),
]


def chat_records(n: int = NUM_CHAT, seed: int = SEED + 1) -> list[dict]:
    """Chat records: a task as the user turn, the answer, and half the time a follow-up turn on that answer.

    Args:
        n (`int`, *optional*, defaults to 200): How many conversations.
        seed (`int`, *optional*, defaults to 1235): Seed of the generator.

    Returns:
        `list[dict]`: Records with `messages`, a list of `{"role", "content"}` (system, user, assistant).

    Example:

    ```python
    >>> from demo_data import chat_records
    >>> [m["role"] for m in chat_records(1)[0]["messages"]][-2:]
    ['user', 'assistant']
    ```
    """
    rng = random.Random(seed)
    names = list(TASKS)
    records = []
    for i in range(n):
        instruction, inp, output, _ = TASKS[names[i % len(names)]](rng)
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": rng.choice(_SYSTEMS)})
        messages.append({"role": "user", "content": instruction if inp is None else f"{instruction}\n{inp}"})
        messages.append({"role": "assistant", "content": output})
        if rng.random() < 0.5:
            question, rule = rng.choice(_FOLLOW_UPS)
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": rule(output)})
        records.append({"messages": messages})
    return records


def text_records(n: int = NUM_TEXT, seed: int = SEED + 2) -> list[dict]:
    """Plain-text records stating word facts as sentences.

    Args:
        n (`int`, *optional*, defaults to 200): How many records.
        seed (`int`, *optional*, defaults to 1236): Seed of the generator.

    Returns:
        `list[dict]`: Records with one `text` field.

    Example:

    ```python
    >>> from demo_data import text_records
    >>> text_records(1)[0]["text"].startswith("The word ")
    True
    ```
    """
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        word = rng.choice(WORDS)
        words = _words(rng)
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        text = (
            f"The word {word} has {len(word)} letters. Backwards it is {word[::-1]}, and sorted it is "
            f"{''.join(sorted(word))}. The list {' '.join(words)} reversed is {' '.join(reversed(words))}. "
            f"{a} plus {b} is {a + b}."
        )
        records.append({"text": text})
    return records


def tokenizer_corpus_extras() -> list[dict]:
    """Every demo word capitalized, uppercased, reversed and letter-sorted, added to the tokenizer's corpus only:
    the datasets alone run out of BPE merges before 2048 ids (digits are split one by one)."""
    forms = (str.title, str.upper, lambda w: w[::-1], lambda w: "".join(sorted(w)))
    return [{"text": " ".join(form(w) for w in WORDS)} for form in forms]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python scripts/demo_data.py", description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="Where the .jsonl files go.")
    parser.add_argument("--assets-dir", type=Path, default=ASSETS_DIR, help="Where tokenizer.json goes.")
    parser.add_argument("--no-tokenizer", action="store_true", help="Only write the datasets.")
    args = parser.parse_args(argv)

    tasks, chats, texts = task_records(), chat_records(), text_records()
    _write_jsonl(args.data_dir / "tasks.jsonl", tasks)
    _write_jsonl(args.data_dir / "chat_sample.jsonl", chats)
    _write_jsonl(args.data_dir / "text_sample.jsonl", texts)
    written = [args.data_dir / n for n in ("tasks.jsonl", "chat_sample.jsonl", "text_sample.jsonl")]
    if not args.no_tokenizer:
        from lorafleet.data.tokenizer import train_tokenizer

        path = args.assets_dir / "tokenizer.json"
        train_tokenizer(tasks, chats, texts, tokenizer_corpus_extras()).save(str(path), pretty=False)
        written.append(path)
    for path in written:
        print(f"{path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
