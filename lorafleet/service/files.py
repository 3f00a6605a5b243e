"""Uploaded files: stored by id in the service's storage (a local folder, `s3://` or `gs://`, through the same
storage code as checkpoints), never in the database, and never under the name the client sent.

Training needs a local file (the job ships it to the cluster with its spec), so [`FileStore.local_path`] returns the
stored file itself on local storage and a cached download otherwise. [`check_chat_file`] is the `validating_files`
step: OpenAI's chat format, one `{"messages": [...]}` record per line.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Optional

from pyarrow import fs

from lorafleet.data.records import load_records
from lorafleet.runstore.location import filesystem_for, split_uri
from lorafleet.spec import DataSpec, SpecError, lorafleet_home


def new_id(prefix: str) -> str:
    """A random object id in OpenAI's style (`file-...`, `ftjob-...`).

    Example:

    ```python
    >>> new_id("file-").startswith("file-"), len(new_id("file-"))
    (True, 29)
    ```
    """
    return prefix + secrets.token_hex(12)


class FileStore:
    """Files by id under a storage root (`<root>/files/<id>.jsonl`).

    Args:
        root (`str`, *optional*):
            A local folder, `s3://bucket/prefix` or `gs://bucket/prefix`; defaults to `$LORAFLEET_HOME/api`.

    Example:

    ```python
    >>> import tempfile
    >>> store = FileStore(tempfile.mkdtemp())
    >>> uri = store.put("file-abc", b'{"messages": []}\\n')
    >>> store.get(uri)
    b'{"messages": []}\\n'
    ```
    """

    def __init__(self, root: Optional[str] = None):
        self.root = root or str(lorafleet_home() / "api")
        self.scheme, self.path = split_uri(self.root)
        self.filesystem = filesystem_for(self.scheme)

    def _path(self, file_id: str) -> str:
        # Ids are generated here (`new_id`), never taken from a client, so they are safe as path components.
        return f"{self.path.rstrip('/')}/files/{file_id}.jsonl"

    def put(self, file_id: str, data: bytes) -> str:
        """Store `data` as `file_id`; return its URI."""
        path = self._path(file_id)
        if self.scheme == "":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        with self.filesystem.open_output_stream(path) as out:
            out.write(data)
        return f"{self.scheme}://{path}" if self.scheme else path

    def get(self, uri: str) -> bytes:
        _, path = split_uri(uri)
        with self.filesystem.open_input_stream(path) as src:
            return src.read()

    def delete(self, uri: str) -> None:
        _, path = split_uri(uri)
        try:
            self.filesystem.delete_file(path)
        except FileNotFoundError:
            pass

    def local_path(self, uri: str) -> Path:
        """A local file with the content of `uri`: the file itself on local storage, else a cached download."""
        scheme, path = split_uri(uri)
        if scheme == "":
            return Path(path)
        cached = lorafleet_home() / "api" / "cache" / Path(path).name
        if not cached.exists():
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_suffix(".partial")
            partial.write_bytes(self.get(uri))
            partial.replace(cached)
        return cached

    def exists(self, uri: str) -> bool:
        _, path = split_uri(uri)
        return self.filesystem.get_file_info(path).type == fs.FileType.File


def check_chat_file(path: Path, file_id: str) -> tuple[Optional[str], int]:
    """Check a training file in OpenAI's chat format; return `(problem, records)`.

    Args:
        path (`Path`):
            The local file.
        file_id (`str`):
            The file's id, named in the message instead of the server's path.

    Returns:
        `tuple`: one line naming the file and the line at fault (`None` when the file is good), and the number of
        records.

    Example:

    ```python
    >>> import tempfile
    >>> from pathlib import Path
    >>> bad = Path(tempfile.mkdtemp()) / "f.jsonl"
    >>> _ = bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\\nnot json\\n')
    >>> problem, _ = check_chat_file(bad, "file-1")
    >>> "file-1" in problem and "line 2" in problem
    True
    ```
    """
    try:
        records = load_records(DataSpec(path=str(path), format="chat"))
    except SpecError as exc:
        text = str(exc).splitlines()[0].replace(str(path), file_id)
        if text.startswith("data.path: "):
            text = text[len("data.path: "):]
        return _record_to_line(text, path), 0
    return None, len(records)


def _record_to_line(text: str, path: Path) -> str:
    """`record N` → `line L` (the N-th non-empty line): clients fix files by line number."""
    match = re.search(r"\brecord (\d+)\b", text)
    if match is None:
        return text
    wanted, seen = int(match.group(1)), 0
    with open(path, "rb") as src:
        for number, line in enumerate(src, start=1):
            if line.strip():
                seen += 1
                if seen == wanted:
                    return text[: match.start()] + f"line {number}" + text[match.end():]
    return text
