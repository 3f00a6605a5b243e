"""Where a job's data lives, as a list of files: a local file, a local folder of shards, a glob, or an `s3://` /
`gs://` prefix ([`list_sources`]), or the Arrow files of a `datasets.save_to_disk` folder ([`saved_dataset_sources`])
or of a loaded hub dataset ([`~lorafleet.data.hub.load_hub`]); the fingerprint a checkpoint records of them
([`data_fingerprint`]); and the work units the tokenized cache is built from ([`plan_chunks`], [`read_chunk`]).

Each unit reads its records in file order and checks each one on its own, so a bad record is named by file and
JSON line (`.jsonl`) or record number (`.json`, `.parquet`, `.arrow`) wherever the unit runs, in the driver or in a Ray
Data task.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pyarrow import fs

from lorafleet.compat.datasets import saved_data_files, saved_splits
from lorafleet.data.records import _BINARY_MAGIC, _UTF8_BOM, _first_line, _json_error, _record_problem
from lorafleet.runstore.location import filesystem_for, split_uri, storage_endpoint
from lorafleet.spec import DataSpec, SpecError

logger = logging.getLogger(__name__)

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
# A .jsonl unit of work: big enough that a task's fixed cost is small against its tokenization, small enough that a
# task's memory (records + token lists of one chunk) stays a few hundred MB.
CHUNK_BYTES = int(os.environ.get("LORAFLEET_CACHE_CHUNK_BYTES", 8 << 20))


@dataclass(frozen=True)
class SourceFile:
    """One data file: `path` on its filesystem (no scheme), `name` relative to the source root, `size` and `mtime`.

    A hub dataset's Arrow file lies in the `datasets` cache, a path the user never wrote: it carries a `label` (the
    dataset, as messages name it) and its first row's number in the split (`offset`), so that a bad record is named
    by dataset and row of the split instead."""

    scheme: str
    path: str
    name: str
    size: int
    mtime: float
    label: str = ""
    offset: int = 0

    @property
    def uri(self) -> str:
        """The file as a user wrote it (a plain path locally)."""
        return f"{self.scheme}://{self.path}" if self.scheme else self.path

    @property
    def shown(self) -> str:
        """How messages name the file: its `label`, else its URI."""
        return self.label or self.uri


@dataclass(frozen=True)
class Chunk:
    """A unit of work: file `source` (an index into the source list), `start`/`end` bytes of a .jsonl file (a whole
    file for .json), one row group of a .parquet file (`start` = row group, `end` = its first row's number), or rows
    `start` to `end` (whole record batches) of an .arrow file."""

    source: int
    start: int
    end: int


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def list_sources(path: str, endpoint: Optional[str] = None, what: str = "data.path") -> list[SourceFile]:
    """The data files of `data.path`: the file itself; the `.jsonl`/`.json`/`.parquet` files under a folder or
    prefix (recursively, sorted by path, so shards `part-000`, `part-001`, ... read in order); or those a glob matches.

    Args:
        path (`str`): `data.path` (a local path, a glob, `file://`, `s3://bucket/prefix` or `gs://bucket/prefix`).
        endpoint (`str`, *optional*): `checkpoint.endpoint`, for an object store.
        what (`str`, *optional*, defaults to `"data.path"`): The field named in errors.

    Returns:
        `list[SourceFile]`: At least one file.

    Raises:
        [`~lorafleet.spec.SpecError`]: Nothing there, no data file, an unsupported file type, unreadable storage.

    Example:

    ```python
    >>> [(s.name, s.size > 0) for s in list_sources("jobs/data/tasks.jsonl")]
    [('tasks.jsonl', True)]
    ```
    """
    scheme, root = split_uri(path) if not (_is_glob(path) and "://" not in path) else ("", path)
    filesystem = filesystem_for(scheme, endpoint)
    pattern = None
    if _is_glob(root):
        if scheme == "":
            # pyarrow lists folders, not patterns: the glob's fixed part is listed and the rest matched by name.
            root = str(Path(root).expanduser())
            root = str(Path(root).resolve()) if not Path(root).is_absolute() else root
        fixed = root[: min(root.index(c) for c in "*?[" if c in root)]
        pattern, root = root, fixed.rsplit("/", 1)[0]
    try:
        info = filesystem.get_file_info(root)
        if info.type == fs.FileType.File and pattern is None:
            infos, base = [info], root.rsplit("/", 1)[0]
        elif info.type == fs.FileType.Directory:
            infos = [i for i in filesystem.get_file_info(fs.FileSelector(root, recursive=True))
                     if i.type == fs.FileType.File]
            base = root
        else:
            raise SpecError(f"{what}: no such file or directory: {path}")
    except OSError as exc:
        raise SpecError(f"{what}: cannot read {path} ({_first_line(exc)})") from None
    if pattern is not None:
        infos = [i for i in infos if fnmatch.fnmatchcase(i.path, pattern)]
    files = []
    for i in sorted(infos, key=lambda i: i.path):
        name = i.path[len(base):].lstrip("/") or i.base_name
        if any(part.startswith((".", "_")) for part in name.split("/")):
            continue  # hidden files and markers (_SUCCESS, .crc) that writers of shards leave next to them
        if pattern is None and info.type == fs.FileType.File and not i.path.endswith(DATA_SUFFIXES):
            suffix = Path(i.path).suffix
            raise SpecError(
                f"{what}: unsupported file type '{suffix}' (use .jsonl, .json, .parquet or a saved dataset dir)"
            )
        if not i.path.endswith(DATA_SUFFIXES):
            continue
        files.append(SourceFile(scheme, i.path, name, int(i.size or 0), i.mtime.timestamp() if i.mtime else 0.0))
    if not files:
        raise SpecError(f"{what}: no .jsonl, .json or .parquet file in {path}")
    return files


def is_saved_dataset(path: str) -> bool:
    """Whether `path` is a local folder written by `datasets.save_to_disk` (read in memory, or through the cache as
    its Arrow files: [`saved_dataset_sources`])."""
    folder = Path(path)
    return "://" not in path and folder.is_dir() and (
        (folder / "dataset_dict.json").exists() or (folder / "state.json").exists()
    )


def _read_meta(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        raise SpecError(f"{what}: {path}: damaged saved-dataset file ({_first_line(exc)})") from None


def saved_dataset_sources(path: str | Path, what: str = "data.path") -> list[SourceFile]:
    """The Arrow files of a `datasets.save_to_disk` folder, in row order (its `state.json`'s `_data_files`): of the
    Dataset, or of a DatasetDict's `train` split, or of its only split (the split the in-memory reader takes too).

    Args:
        path (`str` or `Path`): The saved folder.
        what (`str`, *optional*, defaults to `"data.path"`): The field named in errors.

    Returns:
        `list[SourceFile]`: The `.arrow` files, named relative to `path` (`train/data-00000-of-00002.arrow`).

    Raises:
        [`~lorafleet.spec.SpecError`]: A damaged or missing metadata file, a listed Arrow file missing, a DatasetDict
        with several splits and none named `train`.

    Example:

    ```python
    >>> import tempfile, datasets
    >>> folder = tempfile.mkdtemp()
    >>> datasets.Dataset.from_list([{"text": "hello"}] * 3).save_to_disk(folder)
    >>> [s.name for s in saved_dataset_sources(folder)]
    ['data-00000-of-00001.arrow']
    ```
    """
    root = Path(path)
    folder = root
    if (root / "dataset_dict.json").exists():
        splits = saved_splits(_read_meta(root / "dataset_dict.json", what))
        if "train" in splits:
            folder = root / "train"
        elif len(splits) == 1:
            folder = root / splits[0]
        else:
            raise SpecError(f"{what}: saved DatasetDict has splits {sorted(splits)} and no 'train' split")
    state = _read_meta(folder / "state.json", what)
    names = saved_data_files(state)
    if not names:
        raise SpecError(f"{what}: {folder / 'state.json'}: damaged saved-dataset file (no _data_files)")
    files = []
    for name in names:
        file = folder / name
        try:
            info = file.stat()
        except OSError as exc:
            raise SpecError(f"{what}: {root}: damaged saved dataset (cannot read {file}: "
                            f"{exc.strerror or exc})") from None
        files.append(SourceFile("", str(file), file.relative_to(root).as_posix(), info.st_size, info.st_mtime))
    return files


def data_sources(data: DataSpec, endpoint: Optional[str] = None) -> list[SourceFile]:
    """The data files of `data.path`: a saved `datasets` folder's Arrow files ([`saved_dataset_sources`]), else
    [`list_sources`]'s (a `data.hub` dataset's files come from [`~lorafleet.data.hub.load_hub`]).

    Example:

    ```python
    >>> [s.name for s in data_sources(DataSpec(path="jobs/data/tasks.jsonl"))]
    ['tasks.jsonl']
    ```
    """
    if is_saved_dataset(data.path):
        return saved_dataset_sources(data.path)
    return list_sources(data.path, endpoint)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_fingerprint(path: str | Path, endpoint: Optional[str] = None) -> dict[str, Any]:
    """What identifies the content of a job's data: the size and sha256 of the data file, or of each file of a data
    folder (a `datasets` save, a folder of shards), by path inside it. Names of the file and folder do not count, so
    a copy (what a remote job trains on) has the same fingerprint. Every checkpoint records it in `lorafleet.json`
    (`data`). A glob or an object-store prefix is fingerprinted without a download, by each data file's size and the
    store's content tag (S3 ETag, GCS MD5), or its modification time for a local glob
    ([`listed_fingerprint`]).

    Hashing reads the data once more: ~0.1 s for 100 MB.

    Args:
        path (`str` or `Path`):
            `data.path`.
        endpoint (`str`, *optional*):
            `checkpoint.endpoint`, for an object store.

    Returns:
        `dict`: `{"size": int, "sha256": str}` for a file; `{"files": {relative path: {"size", "sha256"}}}` for a
        folder (files whose name starts with `.` left out); `{"files": {relative path: {"size", "etag"}}}` for an
        object-store prefix (`{"size", "mtime"}` for a local glob, or without the store's client library).

    Example:

    ```python
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "train.jsonl").write_text('{"text": "hello"}')
    >>> data_fingerprint(folder / "train.jsonl")["size"]
    17
    >>> list(data_fingerprint(folder)["files"])
    ['train.jsonl']
    ```
    """
    text = str(path)
    if "://" in text and not text.startswith("file://") or _is_glob(text):
        return {"files": listed_fingerprint(list_sources(text, endpoint), endpoint)}
    path = Path(split_uri(text)[1]) if text.startswith("file://") else Path(path)
    if path.is_file():
        return {"size": path.stat().st_size, "sha256": _sha256(path)}
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    return {"files": {p.relative_to(path).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}}


def _open_arrow(source: SourceFile, endpoint: Optional[str]):
    """An Arrow stream reader over `source` (memory-mapped when local: skipping batches then reads nothing)."""
    import pyarrow as pa

    if source.scheme == "":
        return pa.ipc.open_stream(pa.memory_map(source.path, "r"))
    return pa.ipc.open_stream(filesystem_for(source.scheme, endpoint).open_input_file(source.path))


def _arrow_chunks(k: int, source: SourceFile, endpoint: Optional[str]) -> list[Chunk]:
    # `datasets` writes record batches of ~1000 rows (its writer_batch_size); one task per batch would make the tasks'
    # fixed cost dominate, so whole batches are grouped up to about CHUNK_BYTES, as .jsonl files are cut.
    chunks, start, rows, size = [], 0, 0, 0
    try:
        for batch in _open_arrow(source, endpoint):
            rows += batch.num_rows
            size += batch.nbytes
            if size >= CHUNK_BYTES:
                chunks.append(Chunk(k, start, rows))
                start, size = rows, 0
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise SpecError(f"data.path: {source.shown}: damaged Arrow file ({_first_line(exc)})") from None
    if rows > start or not chunks:
        chunks.append(Chunk(k, start, rows))
    return chunks


def listed_fingerprint(sources: list[SourceFile], endpoint: Optional[str] = None) -> dict[str, dict[str, Any]]:
    """The fingerprint of listed files (a glob, an object-store prefix), by name, without reading them: the one place
    that decides what identifies such a file.

    Object-store files are identified by size and the store's content tag ([`object_etags`]): the S3 ETag (the MD5
    of the content for a single-part upload; copies keep it), the GCS MD5 (`crc32c:...` for a composite object). So
    the same files copied to another prefix, or uploaded again unchanged, keep their fingerprint (and their
    tokenized cache), and any change of content changes it. Without a tag (a local glob; `boto3` not installed for
    S3, or `google-auth` + `requests` for GCS; a listing the client cannot make) the size and modification time stand
    in: a copy then counts as other data (its cache is rebuilt), never the reverse. [`same_file`] compares the two
    kinds.

    Args:
        sources (`list[SourceFile]`): From [`list_sources`].
        endpoint (`str`, *optional*): `checkpoint.endpoint`.

    Returns:
        `dict`: `{name: {"size": int, "etag": str}}`, or `{name: {"size": int, "mtime": float}}`.

    Example:

    ```python
    >>> listed_fingerprint([SourceFile("", "/data/a.jsonl", "a.jsonl", 17, 1700000000.0)])
    {'a.jsonl': {'size': 17, 'mtime': 1700000000.0}}
    ```
    """
    tags = None
    remote = [s for s in sources if s.scheme]
    if remote and len({s.scheme for s in sources}) == 1:
        tags = object_etags(remote[0].scheme, os.path.commonprefix([s.path for s in remote]), endpoint)
    if tags is not None and all(s.path in tags for s in sources):
        return {s.name: {"size": s.size, "etag": tags[s.path]} for s in sources}
    return {s.name: {"size": s.size, "mtime": s.mtime} for s in sources}


def object_etags(scheme: str, prefix: str, endpoint: Optional[str] = None) -> Optional[dict[str, str]]:
    """The content tag of every object whose path starts with `prefix` (`bucket/key-prefix`), from one listing: the
    S3 ETag (ListObjectsV2, through `boto3`), or the GCS `md5Hash` (`crc32c:<crc32c>` for a composite object, which
    has no MD5; the JSON API, through `requests` with `google-auth` credentials, none for an `http://` emulator).

    pyarrow's filesystems, which read the data, do not expose these tags, hence a client of each store here; neither
    is a dependency of lorafleet's core (`pip install lorafleet[s3]` adds `boto3`; `google-auth` and `requests` come
    with `ray[default]`).

    Args:
        scheme (`str`): `s3` or `gs`.
        prefix (`str`): `bucket/key-prefix`, as [`SourceFile`] paths start.
        endpoint (`str`, *optional*): `checkpoint.endpoint`.

    Returns:
        `dict[str, str]` or `None`: Path (`bucket/key`) to tag; `None` when the client library is missing or the
        listing failed (logged), so that the caller falls back to modification times.

    Example:

    ```python
    >>> object_etags("file", "/data") is None  # no tags outside object stores
    True
    ```
    """
    list_tags = {"s3": _s3_etags, "gs": _gcs_etags}.get(scheme)
    if list_tags is None:
        return None
    bucket, _, key_prefix = prefix.partition("/")
    try:
        return list_tags(bucket, key_prefix, storage_endpoint(scheme, endpoint))
    except ImportError as exc:
        logger.debug("data: no %s client (%s): fingerprinting by modification time", scheme, exc)
    except Exception as exc:  # botocore, google-auth and requests each raise their own types
        logger.warning("data: cannot list the content tags of %s://%s (%s): fingerprinting by modification time, "
                       "so a copy of this data is tokenized again", scheme, prefix, _first_line(exc))
    return None


def _s3_etags(bucket: str, key_prefix: str, endpoint: Optional[str]) -> dict[str, str]:
    import boto3

    # Credentials and region from the same environment pyarrow's S3 filesystem reads (filesystem_for).
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    client = boto3.client("s3", endpoint_url=endpoint, region_name=region)
    tags = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix):
        for item in page.get("Contents", []):
            tags[f"{bucket}/{item['Key']}"] = item["ETag"].strip('"')
    return tags


def _gcs_etags(bucket: str, key_prefix: str, endpoint: Optional[str]) -> dict[str, str]:
    from urllib.parse import quote

    import requests

    if endpoint and endpoint.startswith("http://"):
        # An emulator (Google serves GCS over https only), as in filesystem_for: no credentials, and never a proxy.
        session = requests.Session()
        session.trust_env = False
    else:
        import google.auth
        from google.auth.transport.requests import AuthorizedSession

        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/devstorage.read_only"])
        session = AuthorizedSession(credentials)
    url = f"{(endpoint or 'https://storage.googleapis.com').rstrip('/')}/storage/v1/b/{quote(bucket, safe='')}/o"
    tags, token = {}, None
    while True:
        params = {"prefix": key_prefix, "fields": "items(name,md5Hash,crc32c),nextPageToken"}
        if token:
            params["pageToken"] = token
        response = session.get(url, params=params, timeout=60)
        response.raise_for_status()
        page = response.json()
        for item in page.get("items", []):
            tag = item.get("md5Hash") or (f"crc32c:{item['crc32c']}" if item.get("crc32c") else None)
            if tag is not None:
                tags[f"{bucket}/{item['name']}"] = tag
        token = page.get("nextPageToken")
        if not token:
            return tags


def same_file(recorded: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether two fingerprints of one file (an entry of a `files` fingerprint) say the same content.

    Entries of one kind are compared whole. A tag and a modification time (a checkpoint recorded before object-store
    files were fingerprinted by tag, or on a machine without the store's client) cannot be compared: the size alone
    decides, so such a run still resumes.

    Example:

    ```python
    >>> same_file({"size": 5, "etag": "ab"}, {"size": 5, "etag": "cd"})
    False
    >>> same_file({"size": 5, "mtime": 1.0}, {"size": 5, "etag": "ab"})  # recorded before tags: the size decides
    True
    ```
    """
    if recorded.keys() == current.keys():
        return recorded == current
    common = recorded.keys() & current.keys()
    return bool(common) and all(recorded[k] == current[k] for k in common)


def plan_chunks(sources: list[SourceFile], endpoint: Optional[str] = None) -> list[Chunk]:
    """Cut the sources into units of work, in record order: `.jsonl` files at line ends about every
    [`CHUNK_BYTES`], `.arrow` files at record batch ends about every [`CHUNK_BYTES`], `.parquet` files by row
    group, `.json` files whole.

    Example:

    ```python
    >>> [source] = list_sources("jobs/data/tasks.jsonl")
    >>> plan_chunks([source]) == [Chunk(0, 0, source.size)]  # one chunk: under CHUNK_BYTES
    True
    ```
    """
    chunks = []
    for k, source in enumerate(sources):
        filesystem = filesystem_for(source.scheme, endpoint)
        if source.path.endswith(".arrow"):
            chunks.extend(_arrow_chunks(k, source, endpoint))
            continue
        if source.path.endswith(".parquet"):
            import pyarrow.parquet as pq

            try:
                with filesystem.open_input_file(source.path) as f:
                    meta = pq.ParquetFile(f).metadata
            except Exception as exc:  # pyarrow raises several types for a damaged file
                raise SpecError(f"data.path: {source.uri}: damaged parquet file ({_first_line(exc)})") from None
            first = 0
            for group in range(meta.num_row_groups):
                chunks.append(Chunk(k, group, first))
                first += meta.row_group(group).num_rows
            continue
        if source.path.endswith(".json") or source.size <= CHUNK_BYTES:
            chunks.append(Chunk(k, 0, source.size))
            continue
        with filesystem.open_input_file(source.path) as f:
            start = 0
            while start < source.size:
                end = min(start + CHUNK_BYTES, source.size)
                if end < source.size:
                    f.seek(end)
                    while True:
                        block = f.read(1 << 16)
                        if not block:
                            end = source.size
                            break
                        newline = block.find(b"\n")
                        if newline >= 0:
                            end += newline + 1
                            break
                        end += len(block)
                chunks.append(Chunk(k, start, end))
                start = end
    return chunks


def lines_before(source: SourceFile, offset: int, endpoint: Optional[str] = None) -> int:
    """Lines of `source` before byte `offset` (only read to name the line of a bad record in a later chunk)."""
    if offset == 0:
        return 0
    with filesystem_for(source.scheme, endpoint).open_input_file(source.path) as f:
        count, left = 0, offset
        while left > 0:
            block = f.read(min(left, 1 << 20))
            if not block:
                break
            count += block.count(b"\n")
            left -= len(block)
    return count


@dataclass
class ChunkRecords:
    """What [`read_chunk`] found: valid records with their position, bad ones with their problem, or a `fatal`
    problem of the whole file (not a record: it fails whatever `data.on_bad_record` says)."""

    records: list[dict]
    # per record: its 1-based line in the chunk (.jsonl) or record number in the file (in the split: a hub dataset)
    positions: list[int]
    problems: list[tuple[int, str]]  # (position, problem)
    fatal: Optional[str] = None


def read_chunk(source: SourceFile, chunk: Chunk, fmt: str, endpoint: Optional[str] = None) -> ChunkRecords:
    """Read and check the records of one chunk (every record on its own; the first bad one does not stop it).

    Args:
        source ([`SourceFile`]): The chunk's file.
        chunk ([`Chunk`]): The chunk.
        fmt (`str`): `data.format`.
        endpoint (`str`, *optional*): `checkpoint.endpoint`.

    Returns:
        [`ChunkRecords`]

    Example:

    ```python
    >>> [source] = list_sources("jobs/data/tasks.jsonl")
    >>> found = read_chunk(source, plan_chunks([source])[0], "instruction")
    >>> len(found.records), found.positions[:2], found.problems
    (3000, [1, 2], [])
    ```
    """
    out = ChunkRecords([], [], [])
    filesystem = filesystem_for(source.scheme, endpoint)
    if source.path.endswith(".arrow"):
        return _read_arrow_chunk(out, source, chunk, fmt, endpoint)
    if source.path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            with filesystem.open_input_file(source.path) as f:
                rows = pq.ParquetFile(f).read_row_group(chunk.start).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a damaged file
            out.fatal = f"data.path: {source.uri}: damaged parquet file ({_first_line(exc)})"
            return out
        _check(out, rows, range(chunk.end + 1, chunk.end + 1 + len(rows)), fmt)
        return out
    try:
        with filesystem.open_input_file(source.path) as f:
            f.seek(chunk.start)
            raw = f.read(chunk.end - chunk.start)
    except OSError as exc:
        out.fatal = f"data.path: {source.uri}: cannot read ({_first_line(exc)})"
        return out
    if chunk.start == 0:
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            out.fatal = (f"data.path: {source.uri}: UTF-16 text (it starts with a UTF-16 byte-order mark); "
                         "save it as UTF-8")
            return out
        what = next((what for magic, what in _BINARY_MAGIC if raw.startswith(magic)), None)
        if what is not None:
            out.fatal = f"data.path: {source.uri}: binary content, not JSON text (it is {what})"
            return out
        raw = raw.removeprefix(_UTF8_BOM)
    if source.path.endswith(".json"):
        return _read_json_chunk(out, source, raw, fmt)
    records, positions = [], []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if b"\x00" in line:
            out.problems.append((number, "binary content, not UTF-8 JSON text (a NUL byte)"))
            continue
        try:
            text = line.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as exc:
            out.problems.append((number, f"not UTF-8 text (byte 0x{line[exc.start]:02x} at column {exc.start + 1})"))
            continue
        if not text.strip():
            continue
        try:
            records.append(json.loads(text))
        except (ValueError, RecursionError) as exc:
            out.problems.append((number, f"invalid JSON ({_json_error(exc)})"))
            continue
        positions.append(number)
    _check(out, records, positions, fmt)
    return out


def _read_arrow_chunk(out: ChunkRecords, source: SourceFile, chunk: Chunk, fmt: str,
                      endpoint: Optional[str]) -> ChunkRecords:
    rows, first = [], 0
    try:
        for batch in _open_arrow(source, endpoint):
            if first >= chunk.end:
                break
            if first + batch.num_rows > chunk.start:
                rows.extend(batch.to_pylist())
            first += batch.num_rows
    except Exception as exc:  # pyarrow raises several types for a damaged file
        out.fatal = f"data.path: {source.shown}: damaged Arrow file ({_first_line(exc)})"
        return out
    # Chunks hold whole batches (plan_chunks); a record's number counts from the file's (or the split's) first row.
    first_number = source.offset + chunk.start + 1
    _check(out, rows, range(first_number, first_number + len(rows)), fmt)
    return out


def _read_json_chunk(out: ChunkRecords, source: SourceFile, raw: bytes, fmt: str) -> ChunkRecords:
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        out.fatal = f"data.path: {source.uri}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as UTF-8"
        return out
    except (ValueError, RecursionError) as exc:
        out.fatal = f"data.path: invalid JSON in {source.uri}: {_json_error(exc)}"
        return out
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        data = data[lists[0]] if len(lists) == 1 else data
    if not isinstance(data, list):
        out.fatal = (f"data.path: {source.uri}: a .json file must hold a list of records (or an object with one "
                     "list of them)")
        return out
    _check(out, data, range(1, len(data) + 1), fmt)
    return out


def _check(out: ChunkRecords, records, positions, fmt: str) -> None:
    for record, position in zip(records, positions):
        problem = _record_problem(record, fmt)
        if problem is None:
            out.records.append(record)
            out.positions.append(position)
        else:
            out.problems.append((position, problem))
    out.problems.sort()
