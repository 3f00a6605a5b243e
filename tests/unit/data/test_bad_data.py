"""Malformed data is refused before anything starts: [`load_records`] raises one line naming the file (and, for text,
the line) for every reader (.jsonl, .json, .parquet, a saved dataset) and format, and `lorafleet submit` turns that into
exit code 2 with one `error:` line, no traceback and no run folder."""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers.cli import SMALL_RUN, run_cli
from lorafleet.data.records import load_records
from lorafleet.spec import DataSpec, SpecError

GOOD = {"instruction": "Count the words.", "input": "red fox", "output": "2"}
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def jsonl(*records) -> bytes:
    """One line per record; a `str` is written as is (a broken line, a blank line)."""
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()


def file(name: str, data: bytes) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        path = tmp / name
        path.write_bytes(data)
        return path

    return build


def parquet(records: list, damage: Callable[[bytes], bytes] = lambda b: b, name: str = "d.parquet"):
    """A parquet file of `records` named `name`, its bytes passed through `damage`."""

    def build(tmp: Path) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp / name
        pq.write_table(pa.Table.from_pylist(records), tmp / "written.parquet")
        path.write_bytes(damage((tmp / "written.parquet").read_bytes()))
        return path

    return build


def saved(records: list, damage: Callable[[Path], None] = lambda p: None, splits=("train",)) -> Callable[[Path], Path]:
    """A `save_to_disk` folder of `records` (a `DatasetDict` when `splits` is not `("train",)`), then `damage` done to
    it."""

    def build(tmp: Path) -> Path:
        import datasets

        path = tmp / "saved"
        ds = datasets.Dataset.from_list(records)
        (ds if splits == ("train",) else datasets.DatasetDict({s: ds for s in splits})).save_to_disk(str(path))
        damage(path)
        return path

    return build


def shard(path: Path) -> Path:
    [arrow] = path.glob("*.arrow")
    return arrow


def truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


LATIN1 = '{"instruction": "Say café.", "output": "ok"}'.encode("latin-1") + b"\n"

# (kind, build(tmp) -> data.path, data.format, the exact message with {path} for the path; a trailing "..." matches a
# prefix, for the words a library chooses).
CASES = [
    # .jsonl: the file itself
    ("jsonl: 0 bytes", file("d.jsonl", b""), "instruction", "data.path: {path}: the file is empty (0 bytes)"),
    ("jsonl: only blank lines", file("d.jsonl", b"\n \n\n"), "instruction", "data.path: {path} holds no records"),
    ("jsonl: binary", file("d.jsonl", jsonl(GOOD) + bytes(range(256))), "instruction",
     "data.path: {path}: line 2: binary content, not UTF-8 JSON text (a NUL byte)"),
    ("jsonl: not UTF-8", file("d.jsonl", jsonl(GOOD) + LATIN1), "instruction",
     "data.path: {path}: line 2: not UTF-8 text (byte 0xe9 at column 25); save the file as UTF-8"),
    ("jsonl: UTF-16", file("d.jsonl", jsonl(GOOD).decode().encode("utf-16")), "instruction",
     "data.path: {path}: UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8"),
    ("jsonl: gzip-compressed", file("d.jsonl", gzip.compress(jsonl(GOOD), mtime=0)), "instruction",
     "data.path: {path}: binary content, not JSON text (it is gzip-compressed: decompress it first)"),
    ("jsonl: parquet bytes", parquet([GOOD], name="d.jsonl"), "instruction",
     "data.path: {path}: binary content, not JSON text (it is a parquet file: name it .parquet)"),
    # .jsonl: a line that is not JSON
    ("jsonl: broken line", file("d.jsonl", jsonl(GOOD, '{"instruction": "x", "output": "y"')), "instruction",
     "data.path: {path}: line 2: invalid JSON (Expecting ',' delimiter at column 35)"),
    ("jsonl: a JSON array", file("d.jsonl", json.dumps([GOOD], indent=2).encode()), "instruction",
     ("data.path: {path}: line 1: invalid JSON (Expecting value at column 2): one record per line in .jsonl; a JSON "
      "array belongs in a .json file")),
    ("jsonl: nested too deeply", file("d.jsonl", b'{"a": ' * 100_000), "instruction",
     "data.path: {path}: line 1: invalid JSON (nested too deeply)"),
    ("jsonl: a 5000-digit number", file("d.jsonl", b'{"n": ' + b"1" * 5000 + b"}\n"), "instruction",
     "data.path: {path}: line 1: invalid JSON (Exceeds the limit..."),
    # records: wrong fields for the format
    ("instruction: other fields", file("d.jsonl", jsonl({"prompt": "a", "completion": "b"})), "instruction",
     "data.path: record 1: missing 'instruction' (its fields: completion, prompt)"),
    ("instruction: an empty object", file("d.jsonl", jsonl(GOOD, {})), "instruction",
     "data.path: record 2: missing 'instruction' (it has no fields)"),
    ("instruction: chat records", file("d.jsonl", jsonl(CHAT)), "instruction",
     "data.path: record 1: missing 'instruction' (it looks like the chat format: set data.format: chat)"),
    ("chat: instruction records", file("d.jsonl", jsonl(GOOD)), "chat",
     "data.path: record 1: missing 'messages' (it looks like the instruction format: set data.format: instruction)"),
    # records: wrong types, empty or unencodable text
    ("text: a list", file("d.jsonl", jsonl({"text": ["a", "b"]})), "text",
     "data.path: record 1: 'text' must be a string (got list)"),
    ("text: empty after a blank line", file("d.jsonl", jsonl({"text": "a"}, "", {"text": " \t"})), "text",
     "data.path: record 2 (line 3): 'text' is empty"),
    ("instruction: empty output", file("d.jsonl", jsonl({"instruction": "x", "output": ""})), "instruction",
     "data.path: record 1: 'output' is empty"),
    ("instruction: lone surrogate", file("d.jsonl", b'{"instruction": "x", "output": "y\\ud800"}\n'), "instruction",
     "data.path: record 1: 'output' holds a lone surrogate ('\\ud800' at character 2), not valid Unicode"),
    ("chat: messages a string", file("d.jsonl", jsonl({"messages": "hi"})), "chat",
     "data.path: record 1: 'messages' must be a non-empty list (got str)"),
    ("chat: a message not an object", file("d.jsonl", jsonl({"messages": ["hi"]})), "chat",
     "data.path: record 1: messages[0] must be an object with 'role' and 'content' (got str)"),
    ("chat: unknown role", file("d.jsonl", jsonl({"messages": [{"role": "user", "content": "a"},
                                                               {"role": "model", "content": "b"}]})), "chat",
     "data.path: record 1: messages[1].role must be one of system, user, assistant (got 'model')"),
    ("chat: every answer empty", file("d.jsonl", jsonl(CHAT, {"messages": [{"role": "user", "content": "a"},
                                                                            {"role": "assistant", "content": " "}]})),
     "chat", "data.path: record 2: every assistant message is empty (nothing to train on)"),
    ("chat: lone surrogate", file("d.jsonl", b'{"messages": [{"role": "user", "content": "\\udc80"}]}\n'), "chat",
     "data.path: record 1: messages[0].content holds a lone surrogate ('\\udc80' at character 1), not valid Unicode"),
    # .json
    ("json: 0 bytes", file("d.json", b""), "instruction", "data.path: {path}: the file is empty (0 bytes)"),
    ("json: broken", file("d.json", b'[{"instruction": "x"'), "instruction",
     "data.path: invalid JSON at line 1 column 21 of {path}: Expecting ',' delimiter"),
    ("json: not UTF-8", file("d.json", b"[\n" + LATIN1 + b"]"), "instruction",
     "data.path: {path}: line 2: not UTF-8 text (byte 0xe9 at column 25); save the file as UTF-8"),
    ("json: binary", file("d.json", bytes(range(256))), "instruction",
     "data.path: {path}: line 1: binary content, not UTF-8 JSON text (a NUL byte)"),
    ("json: a number", file("d.json", b"5"), "instruction",
     "data.path: {path}: a .json file must hold a list of records (or an object with one list of them), got int"),
    ("json: one record", file("d.json", json.dumps(GOOD).encode()), "instruction",
     ("data.path: {path}: a .json file must hold a list of records (or an object with one list of them), got an "
      "object with no list")),
    ("json: two lists", file("d.json", json.dumps({"train": [GOOD], "test": [GOOD]}).encode()), "instruction",
     ("data.path: {path}: a .json file must hold a list of records (or an object with one list of them), got an "
      "object with 2 lists: train, test")),
    ("json: a list of strings", file("d.json", b'["a", "b"]'), "text",
     "data.path: record 1: expected an object, got str"),
    # .parquet
    ("parquet: 0 bytes", file("d.parquet", b""), "instruction", "data.path: {path}: the file is empty (0 bytes)"),
    ("parquet: JSON text", file("d.parquet", jsonl(GOOD)), "instruction",
     "data.path: {path}: not a parquet file (it looks like JSON text: name it .jsonl or .json)"),
    ("parquet: truncated", parquet([GOOD] * 20, lambda b: b[: len(b) // 2]), "instruction",
     "data.path: {path}: a truncated parquet file (no PAR1 footer)"),
    ("parquet: damaged footer", parquet([GOOD] * 20, lambda b: b[:-40] + b"\xff" * 32 + b[-8:]), "instruction",
     "data.path: {path}: damaged parquet file (..."),
    ("parquet: wrong type", parquet([{"instruction": "x", "output": 3}]), "instruction",
     "data.path: record 1: 'output' must be a string (got int)"),
    ("parquet: wrong fields", parquet([GOOD]), "text",
     "data.path: record 1: missing 'text' (it looks like the instruction format: set data.format: instruction)"),
    # a save_to_disk folder
    ("saved: state.json gone", saved([GOOD], lambda p: (p / "state.json").unlink()), "instruction",
     ("data.path: {path}: damaged saved dataset (Directory {path} is neither a `Dataset` directory nor a "
      "`DatasetDict` directory.)")),
    ("saved: state.json broken", saved([GOOD], lambda p: (p / "state.json").write_text('{"_data_files": [')),
     "instruction",
     "data.path: {path}/state.json: damaged saved-dataset file (Expecting value: line 1 column 18 (char 17))"),
    ("saved: shard gone", saved([GOOD], lambda p: shard(p).unlink()), "instruction",
     ("data.path: {path}: damaged saved dataset ([Errno 2] No such file or directory: "
      "'{path}/data-00000-of-00001.arrow')")),
    ("saved: shard truncated", saved([GOOD] * 200, lambda p: truncate(shard(p))), "instruction",
     "data.path: {path}: damaged saved dataset (..."),
    ("saved: split folder gone", saved([GOOD], lambda p: shutil.rmtree(p / "b"), splits=("a", "b")), "instruction",
     ("data.path: {path}: damaged saved dataset (No such files: '{path}/b/dataset_info.json', nor "
      "'{path}/b/state.json' found. Expected to load a `Dataset` object but provided path is not a `Dataset`.)")),
    ("saved: no train split", saved([GOOD], splits=("a", "b")), "instruction",
     "data.path: saved DatasetDict has splits ['a', 'b'] and no 'train' split"),
    ("saved: wrong fields", saved([CHAT]), "text",
     "data.path: record 1: missing 'text' (it looks like the chat format: set data.format: chat)"),
]


@pytest.mark.parametrize("kind,build,fmt,message", CASES, ids=[c[0] for c in CASES])
def test_bad_data_is_refused_with_one_line(tmp_path, kind, build, fmt, message):
    path = build(tmp_path)
    with pytest.raises(SpecError) as err:
        load_records(DataSpec(path=str(path), format=fmt))
    [problem] = err.value.problems
    expected = message.replace("{path}", str(path))
    if expected.endswith("..."):
        assert problem.startswith(expected[:-3]), problem
    else:
        assert problem == expected
    assert "\n" not in problem


def test_accepted_variants_still_load(tmp_path):
    # A UTF-8 byte-order mark (what some Windows editors write) and CRLF line ends are UTF-8 JSON lines all the same.
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + jsonl(GOOD, GOOD).replace(b"\n", b"\r\n"))
    assert load_records(DataSpec(path=str(path))) == [GOOD, GOOD]
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([GOOD]).encode())
    assert load_records(DataSpec(path=str(tmp_path / "bom.json"))) == [GOOD]


CLI_KINDS = ["jsonl: binary", "jsonl: not UTF-8", "jsonl: 0 bytes"]


def ray_servers() -> set[int]:
    """The pids of the GCS servers running on this machine (one per Ray instance)."""
    import psutil

    servers = set()
    for process in psutil.process_iter(["name", "status"]):
        if process.info["name"] == "gcs_server" and process.info["status"] != psutil.STATUS_ZOMBIE:
            servers.add(process.pid)
    return servers


@pytest.mark.parametrize("kind", CLI_KINDS)
def test_submit_refuses_bad_data_and_leaves_nothing_running(tmp_path, kind):
    _, build, _, message = next(c for c in CASES if c[0] == kind)
    path = build(tmp_path)
    storage = tmp_path / "runs"
    sets = [*SMALL_RUN, "name=bad-data", f"checkpoint.storage={storage}", f"data.path={path}"]
    before = ray_servers()
    result = run_cli("submit", "tests/jobs/llama.yaml", *[a for s in sets for a in ("--set", s)], timeout=300)
    # The run's Ray instance started in the background while the data was checked; the refusal stopped it.
    assert ray_servers() - before == set()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: " + message.replace("{path}", str(path))], result.stderr
    # Ray would have created the run's folder before training; refusing during the data check leaves none.
    assert not storage.exists() and result.stdout == ""
