"""Reading training records: `data.path` as `.jsonl`, `.json`, `.parquet` or a `datasets.save_to_disk` folder.

[`load_records`] reads every record and refuses bad ones with a one-line [`~lorafleet.spec.SpecError`] naming the
record (and its JSON line), so bad data fails at submit time, before Ray starts. A file that cannot be read as its
type at all (empty, binary, not UTF-8, not parquet, a damaged saved dataset) is refused the same way, naming the file
and, for text, the line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from lorafleet.spec import DataSpec, SpecError

logger = logging.getLogger(__name__)


CHAT_ROLES = ("system", "user", "assistant")


_FORMAT_FIELDS = {"text": ("text",), "instruction": ("instruction", "output"), "chat": ("messages",)}
# Fields a format reads when they are there.
_OPTIONAL_FIELDS = {"text": (), "instruction": ("input",), "chat": ()}


def format_fields(fmt: str) -> tuple[str, ...]:
    """Every field a record of `data.format` `fmt` is read by: the required ones, then the optional ones.

    Example:

    ```python
    >>> format_fields("instruction")
    ('instruction', 'output', 'input')
    ```
    """
    return _FORMAT_FIELDS[fmt] + _OPTIONAL_FIELDS[fmt]

_UTF8_BOM = b"\xef\xbb\xbf"
# Files that land under a .jsonl/.json name by mistake; naming what they are says how to fix it.
_BINARY_MAGIC = (
    (b"PAR1", "a parquet file: name it .parquet"),
    (b"\x1f\x8b", "gzip-compressed: decompress it first"),
    (b"PK\x03\x04", "a zip archive: extract it first"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed: decompress it first"),
    (b"\xfd7zXZ\x00", "xz-compressed: decompress it first"),
)


def load_records(spec: DataSpec, skipped: Optional[list[str]] = None) -> list[dict]:
    """Read the records of `spec.path` and check they have the fields `spec.format` needs.

    Args:
        spec ([`~lorafleet.spec.DataSpec`]): The job's `data` section.
        skipped (`list[str]`, *optional*):
            With `data.on_bad_record: skip`, receives one `record N (line L): problem` line per bad record (invalid
            JSON lines of a .jsonl file included), which is then left out instead of refused.

    Returns:
        `list[dict]`: The records, in file order (extra fields are kept and ignored).

    Raises:
        [`~lorafleet.spec.SpecError`]: One line naming `data.path` and the record (or JSON line) at fault: unreadable,
        empty, binary or non-UTF-8 file, invalid JSON, not parquet, a damaged saved dataset, missing field, wrong
        type, empty text, empty dataset.

    Example:

    ```python
    >>> from lorafleet.spec import DataSpec
    >>> from lorafleet.data.records import load_records
    >>> records = load_records(DataSpec(path="jobs/data/tasks.jsonl"))
    >>> len(records), sorted(records[0])
    (3000, ['input', 'instruction', 'output'])
    ```
    """
    if spec.path is None:
        raise SpecError(f"{spec.source_field}: read through the tokenized cache only (lorafleet.data.cache)")
    path = Path(spec.path)
    if skipped is None:
        skipped = []
    if not path.exists():
        raise SpecError(f"data.path: no such file or directory: {path}")
    lines: Optional[list[int]] = None
    if path.is_dir():
        records = _read_saved_dataset(path)
    elif path.suffix not in (".jsonl", ".json", ".parquet"):
        raise SpecError(
            f"data.path: unsupported file type '{path.suffix}' (use .jsonl, .json, .parquet or a saved dataset dir)"
        )
    elif _size(path) == 0:
        raise SpecError(f"data.path: {path}: the file is empty (0 bytes)")
    elif path.suffix == ".jsonl":
        records, lines = _read_jsonl(path, skipped if spec.on_bad_record == "skip" else None)
    elif path.suffix == ".json":
        records = _read_json(path)
    else:
        records = _read_parquet(path)
    if not records:
        raise SpecError(f"data.path: {path} holds no records")
    kept = []
    for i, record in enumerate(records):
        problem = _record_problem(record, spec.format)
        if problem is None:
            kept.append(record)
            continue
        where = f"record {i + 1}" + (f" (line {lines[i]})" if lines is not None and lines[i] != i + 1 else "")
        if spec.on_bad_record != "skip":
            raise SpecError(f"data.path: {where}: {problem}")
        skipped.append(f"{path}: {where}: {problem}")
    if not kept:
        raise SpecError(f"data.path: {path} holds no valid record (every one was skipped)")
    return kept


def _unreadable(path: Path, exc: OSError) -> SpecError:
    return SpecError(f"data.path: {path}: cannot read ({exc.strerror or exc})")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise _unreadable(path, exc) from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _unreadable(path, exc) from None


def _check_head(path: Path, head: bytes) -> None:
    """Refuse a file whose first bytes show it is not UTF-8 text at all."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise SpecError(f"data.path: {path}: UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8")
    what = next((what for magic, what in _BINARY_MAGIC if head.startswith(magic)), None)
    if what is not None:
        raise SpecError(f"data.path: {path}: binary content, not JSON text (it is {what})")


def _decode(path: Path, raw: bytes, first_line: int) -> str:
    """`raw` (text starting at line `first_line` of `path`) as a string, or a refusal naming the offending line."""
    nul = raw.find(b"\x00")
    if nul >= 0:
        # NUL is never valid in JSON text; it is the mark of a binary file (or of UTF-16 without a byte-order mark).
        line = first_line + raw.count(b"\n", 0, nul)
        raise SpecError(f"data.path: {path}: line {line}: binary content, not UTF-8 JSON text (a NUL byte)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + raw.count(b"\n", 0, exc.start)
        column = exc.start - raw.rfind(b"\n", 0, exc.start)
        raise SpecError(
            f"data.path: {path}: line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {column}); "
            "save the file as UTF-8"
        ) from None


def _json_error(exc: Exception) -> str:
    # Besides JSONDecodeError, json.loads raises ValueError for a number past Python's digit limit and RecursionError
    # for nesting past the interpreter's depth: both are data problems, not lorafleet's.
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at column {exc.colno}"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).split(";")[0].splitlines()[0]


def _read_jsonl(path: Path, skipped: Optional[list[str]] = None) -> tuple[list[dict], list[int]]:
    records, lines = [], []
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if number == 1:
                    _check_head(path, raw)
                    raw = raw.removeprefix(_UTF8_BOM)
                # Without its line end, so that an error at the end of the line reports this line's last column.
                line = _decode(path, raw, number).rstrip("\r\n")
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except (ValueError, RecursionError) as exc:
                    if skipped is not None:
                        skipped.append(f"{path}: line {number}: invalid JSON ({_json_error(exc)})")
                        continue
                    array = number == 1 and line.lstrip().startswith("[")
                    hint = ": one record per line in .jsonl; a JSON array belongs in a .json file" if array else ""
                    raise SpecError(
                        f"data.path: {path}: line {number}: invalid JSON ({_json_error(exc)}){hint}"
                    ) from None
                lines.append(number)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    return records, lines


def _read_json(path: Path) -> list[dict]:
    raw = _read_bytes(path)
    _check_head(path, raw)
    text = _decode(path, raw.removeprefix(_UTF8_BOM), 1)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(
            f"data.path: invalid JSON at line {exc.lineno} column {exc.colno} of {path}: {exc.msg}"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise SpecError(f"data.path: invalid JSON in {path}: {_json_error(exc)}") from None
    expected = "a .json file must hold a list of records (or an object with one list of them)"
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            got = "an object with no list" if not lists else f"an object with {len(lists)} lists: {', '.join(lists)}"
            raise SpecError(f"data.path: {path}: {expected}, got {got}")
        data = data[lists[0]]
    if not isinstance(data, list):
        raise SpecError(f"data.path: {path}: {expected}, got {_type_name(data)}")
    return data


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        with open(path, "rb") as f:
            head = f.read(64)
            f.seek(max(f.seek(0, 2) - 4, 0))
            tail = f.read(4)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    # A parquet file starts and ends with PAR1; checked here so that a foreign file gets a plain answer.
    if not (head.startswith(b"PAR1") and tail == b"PAR1"):
        hint = " (it looks like JSON text: name it .jsonl or .json)" if head.lstrip()[:1] in (b"{", b"[") else ""
        what = "a truncated parquet file (no PAR1 footer)" if head.startswith(b"PAR1") else "not a parquet file"
        raise SpecError(f"data.path: {path}: {what}{hint}")
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a damaged file
        # pyarrow repeats the path the message already names.
        reason = _first_line(exc).replace(f"Could not open Parquet input source '{path}': ", "")
        raise SpecError(f"data.path: {path}: damaged parquet file ({reason})") from None


def _read_saved_dataset(path: Path) -> list[dict]:
    import datasets

    # datasets reports a damaged metadata file as a bare JSONDecodeError; reading them first names the file.
    for meta in sorted([*path.glob("*.json"), *path.glob("*/*.json")]):
        try:
            json.loads(meta.read_bytes())
        except (OSError, ValueError, RecursionError) as exc:
            raise SpecError(f"data.path: {meta}: damaged saved-dataset file ({_first_line(exc)})") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # missing or truncated shards, foreign folders: datasets and pyarrow raise many types
        raise SpecError(f"data.path: {path}: damaged saved dataset ({_first_line(exc)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise SpecError(f"data.path: saved DatasetDict has splits {sorted(ds)} and no 'train' split")
    try:
        return ds.to_list()
    except Exception as exc:  # shards are memory-mapped: damage past the header shows only when rows are read
        raise SpecError(f"data.path: {path}: damaged saved dataset ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


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
            if not hint and not any(f in record for f in _FORMAT_FIELDS[fmt]):
                # None of this format's fields: the data follows some other schema; show which.
                names = sorted(map(str, record))
                more = ", ..." if len(names) > 8 else ""
                hint = f" (its fields: {', '.join(names[:8])}{more})" if names else " (it has no fields)"
            return f"missing '{name}'{hint}"
    if fmt == "text":
        return _string_problem(record, "text")
    if fmt == "instruction":
        for name in ("instruction", "output"):
            problem = _string_problem(record, name)
            if problem:
                return problem
        if record.get("input") is not None:
            if not isinstance(record["input"], str):
                return f"'input' must be a string (got {_type_name(record['input'])})"
            return _unicode_problem(record["input"], "'input'")
        return None
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        got = _type_name(messages) if not isinstance(messages, list) else "an empty list"
        return f"'messages' must be a non-empty list (got {got})"
    for j, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{j}] must be an object with 'role' and 'content' (got {_type_name(message)})"
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            return f"messages[{j}].role must be one of {', '.join(CHAT_ROLES)} (got {role!r})"
        if not isinstance(content, str):
            return f"messages[{j}].content must be a string (got {_type_name(content)})"
        problem = _unicode_problem(content, f"messages[{j}].content")
        if problem:
            return problem
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if not answers:
        return "no assistant message (nothing to train on)"
    if not any(a.strip() for a in answers):
        return "every assistant message is empty (nothing to train on)"
    return None


def _string_problem(record: dict, name: str) -> Optional[str]:
    value = record[name]
    if not isinstance(value, str):
        return f"'{name}' must be a string (got {_type_name(value)})"
    if not value.strip():
        return f"'{name}' is empty"
    return _unicode_problem(value, f"'{name}'")


def _unicode_problem(value: str, what: str) -> Optional[str]:
    # A JSON "\ud800" escape decodes to a lone surrogate: a str Python holds but no tokenizer can encode.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"{what} holds a lone surrogate ({value[exc.start]!r} at character {exc.start + 1}), not valid Unicode"
    return None
