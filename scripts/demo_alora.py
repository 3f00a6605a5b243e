"""The aLoRA demo data: a yes/no judge invoked on a short conversation, regenerated deterministically.

`python scripts/demo_alora.py` rewrites, byte for byte the same every time:

- `jobs/data/judge.jsonl`: `text` records `<|user|>{items}<|end|>{INVOCATION}{yes|no}<|end|>`, where the answer says
  whether the item list contains a number. Half of the records contain one.
- `jobs/data/judge_heldout.jsonl`: more records of the same kind, never trained on, to check the judgment.

The base model only ever sees the conversation; the adapter is invoked by `INVOCATION` and must look back at the
conversation to answer. Kept apart from `scripts/demo_data.py` on purpose: the shipped tokenizer is trained from
that module's files, and these records must not change it.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from demo_data import WORDS

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "jobs" / "data"
INVOCATION = "<|reserved_0|>judge<|reserved_1|>"
NUM_TRAIN = 2000
NUM_HELDOUT = 200
SEED = 4321


def judge_record(rng: random.Random) -> dict:
    """One record: 3-6 items, one of them replaced by a 1-2 digit number half of the time."""
    items = [rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
    has_number = rng.random() < 0.5
    if has_number:
        items[rng.randrange(len(items))] = str(rng.randint(0, 99))
    answer = "yes" if has_number else "no"
    return {"text": f"<|user|>{' '.join(items)}<|end|>{INVOCATION}{answer}<|end|>", "answer": answer}


def judge_records(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [judge_record(rng) for _ in range(count)]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    args = parser.parse_args(argv)
    write_jsonl(args.data_dir / "judge.jsonl", judge_records(NUM_TRAIN, SEED))
    # A different seed: held-out records are drawn independently (duplicates of short lists are possible but rare).
    write_jsonl(args.data_dir / "judge_heldout.jsonl", judge_records(NUM_HELDOUT, SEED + 1))


if __name__ == "__main__":
    main()
