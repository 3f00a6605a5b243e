"""Reading training records: `data.path` as `.jsonl`, `.json`, `.parquet` or a `datasets.save_to_disk` folder.

[`load_records`] reads every record and refuses bad ones with a one-line [`~lorafleet.spec.SpecError`] naming the
record (and its JSON line), so bad data fails at submit time, before Ray starts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from lorafleet.spec import DataSpec, SpecError

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)


CHAT_ROLES = ("system", "user", "assistant")


_FORMAT_FIELDS = {"text": ("text",), "instruction": ("instruction", "output"), "chat": ("messages",)}


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
    >>> from lorafleet.data.records import load_records
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

