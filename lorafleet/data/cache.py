"""The tokenized cache: `data.path` (or `data.hub`) read, checked, templated, tokenized and masked once, as Arrow
shards in the run storage, read back by global sample index with memory that does not grow with the dataset.

[`build_cache`] runs [`~lorafleet.data.sources.read_chunk`] + [`~lorafleet.data.encode.encode_rows`] over the
chunks of the data files: as Ray Data tasks spread over the cluster's CPUs (streamed back in order, one chunk at a
time, so the driver never holds the dataset), or in the driver process for a small local dataset (no Ray needed,
so bad data still fails before Ray starts). The result is `<storage>/_cache/tokenized/<key>/`: Arrow IPC shards
(one row per valid record: `input_ids`, `labels`, `alora_start`, `status`, `length`, `targets`) and `index.json`,
written last. The key ([`cache_key`]) is a hash of the data files' fingerprint, the tokenizer and every field that
changes a sample, so any job on that storage with the same data and settings (another name, a sweep trial, a
re-submit) reuses it, and any change builds a new one. A job that builds or finds it records that use
([`record_use`]); nothing here removes a cache: [`~lorafleet.data.eviction`] lists and evicts them.

[`TokenCache`] memory-maps the shards (downloaded once per machine from an object store) and
[`CachedSamples`] is the sequence of samples the worker indexes, in exactly the order the in-memory path gives
([`~lorafleet.data.dataset.TrainingData.from_spec`]): same samples, same [`~lorafleet.data.plan.BatchPlan`], same
losses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch
from pyarrow import fs

from lorafleet.constants import IGNORE_INDEX
from lorafleet.data.alora import Invocation
from lorafleet.data.batching import pack_bins, packed_row
from lorafleet.data.encode import KEPT, NO_INVOCATION, encode_rows
from lorafleet.data.hub import load_hub
from lorafleet.data.records import format_fields
from lorafleet.data.sources import (
    Chunk,
    SourceFile,
    data_sources,
    is_saved_dataset,
    lines_before,
    plan_chunks,
    read_chunk,
    saved_dataset_sources,
)
from lorafleet.runstore.location import filesystem_for, split_uri
from lorafleet.spec import JobSpec, SpecError, spec_from_json
from lorafleet.spec.schema import lorafleet_home

logger = logging.getLogger(__name__)

# 2: rows carry their record's text (`record`), so `eval.generate` can prompt with cached held-out records.
CACHE_VERSION = 2
INDEX_FILE = "index.json"
CACHE_FOLDER = "_cache/tokenized"
# Rewritten when a job uses the cache: its modification time is the cache's last use (lorafleet.data.eviction), as
# object stores cannot touch an object's time. At most once per USE_RECORD_EVERY_S, so that many jobs or trials
# starting on one cache cost one small write, not one each; eviction is measured in hours and days.
LAST_USED_FILE = "last_used.json"
USE_RECORD_EVERY_S = 600
# Below this much local data the cache is built in the driver process: Ray Data's start (~5-10 s) would cost more
# than tokenizing, and bad data fails before Ray starts, as on the in-memory path.
INLINE_BYTES = int(os.environ.get("LORAFLEET_CACHE_INLINE_BYTES", 32 << 20))
# `data.cache: auto` turns the cache on for a single local file (or a saved `datasets` folder's Arrow files) from this
# size on (folders, globs, object-store prefixes and hub data always use it).
AUTO_BYTES = 256 << 20
# Rows per Arrow shard file.
SHARD_ROWS = 200_000
# Bad records listed by location in the summary and metrics.jsonl with `data.on_bad_record: skip`.
SHOW_SKIPPED = 5

_STATUS_BAD, _STATUS_FATAL = -1, -2
SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("alora_start", pa.int32()),
    ("status", pa.int8()),
    ("length", pa.int32()),
    ("targets", pa.int32()),
    ("record", pa.string()),
])


def uses_cache(spec: JobSpec) -> bool:
    """Whether a job reads its training data through the tokenized cache (`data.cache`; `auto`: for a folder of
    shards, a glob, an object-store prefix (as `data.path` or `data.eval_path`), a local file or a saved `datasets`
    folder of [`AUTO_BYTES`] or more; always for `data.hub` / `data.eval_hub`).

    Example:

    ```python
    >>> from lorafleet.spec import load_spec
    >>> uses_cache(load_spec("jobs/llama.yaml")), uses_cache(load_spec("jobs/llama.yaml", ["data.cache=true"]))
    (False, True)
    ```
    """
    choice = spec.data.cache
    if spec.data.hub is not None or spec.data.eval_hub is not None:
        return True  # the workers never load hub data themselves (the spec refuses `cache: false` with it)
    if choice != "auto":
        return bool(choice)
    path = spec.data.path
    if is_sharded(path) or (spec.data.eval_path is not None and is_sharded(spec.data.eval_path)):
        return True
    local = Path(split_uri(path)[1])
    if is_saved_dataset(str(local)):
        try:
            return sum(s.size for s in saved_dataset_sources(local)) >= AUTO_BYTES
        except SpecError:
            return False  # read in memory, which names the damage
    return local.is_file() and local.stat().st_size >= AUTO_BYTES


def is_sharded(path: str) -> bool:
    """Whether `path` is data only the cache reads: an object-store prefix, a glob, or a local folder of data files
    (not a saved `datasets` folder)."""
    if "://" in path and not path.startswith("file://"):
        return True
    if any(c in path for c in "*?["):
        return True
    local = Path(split_uri(path)[1])
    return local.is_dir() and not is_saved_dataset(str(local))


def cache_key(spec: JobSpec, tokenizer, source: dict[str, Any], invocation: Optional[Invocation]) -> str:
    """The cache folder's name: a hash of what the samples depend on: the data files' fingerprint
    ([`~lorafleet.data.sources.data_fingerprint`]), the tokenizer (vocabulary, special tokens, chat template),
    `data.format`, `max_length`, `train_on_inputs`, `on_bad_record` and the aLoRA invocation. Not the job's name, its
    seed or its held-out split (applied when reading), nor the data's path (a copy of the data reuses the cache)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    payload = {
        "version": CACHE_VERSION,
        "source": {k: v for k, v in source.items() if k not in ("eval_path", "eval_fraction", "eval_hub")},
        "tokenizer": hashlib.sha256(vocab.encode()).hexdigest(),
        "special": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "chat_template": getattr(tokenizer, "chat_template", None),
        "data": spec.data.model_dump(include={"format", "max_length", "train_on_inputs", "on_bad_record"}),
        "invocation": None if invocation is None else [list(invocation.tokens), invocation.drop_missing],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cache_root(spec: JobSpec) -> tuple[str, str]:
    """`(scheme, path)` of the storage's cache folder, shared by every job on that storage."""
    scheme, root = split_uri(spec.storage_uri)
    return scheme, f"{root.rstrip('/')}/{CACHE_FOLDER}"


@dataclass
class CacheReport:
    """What [`build_cache`] built or found (`lorafleet data prepare` prints it).

    Attributes:
        uri (`str`): The cache folder.
        key (`str`): Its key ([`cache_key`]).
        reused (`bool`): An existing cache was used; nothing was tokenized.
        records (`int`): Valid records (one row each).
        samples (`int`): Records that make a sample (not dropped).
        tokens (`int`): Tokens of those samples.
        target_tokens (`int`): Tokens that count in the loss.
        truncated (`int`): Samples cut to `max_length`.
        dropped (`int`): Records without a trained token (or without the aLoRA invocation).
        skipped (`int`): Bad records skipped (`data.on_bad_record: skip`).
        skipped_at (`list[str]`): The first few skipped records, `file: line N: problem`.
        fill (`float`): tokens / (samples x max_length): how full an unpadded row of `max_length` is on average.
        files (`int`): Data files read.
        shards (`int`): Arrow shard files.
        build_s (`float`): Seconds to build (0 when reused).
        engine (`str`): `ray-data` or `driver` (a small local dataset).
    """

    uri: str
    key: str
    reused: bool = False
    records: int = 0
    samples: int = 0
    tokens: int = 0
    target_tokens: int = 0
    truncated: int = 0
    dropped: int = 0
    skipped: int = 0
    skipped_at: list[str] = field(default_factory=list)
    fill: float = 0.0
    files: int = 0
    shards: int = 0
    build_s: float = 0.0
    engine: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def record_text(record: dict, fmt: str) -> str:
    """A checked record as the JSON text the cache keeps of it: only the fields `data.format` reads, so extra
    columns of the data (ids, metadata, values JSON cannot hold) cost nothing and change nothing.

    Example:

    ```python
    >>> record_text({"instruction": "Say hi.", "output": "hi", "id": 7}, "instruction")
    '{"instruction": "Say hi.", "output": "hi"}'
    ```
    """
    return json.dumps({k: record[k] for k in format_fields(fmt) if record.get(k) is not None}, ensure_ascii=False,
                      default=str)


def _encode_chunk(index: int, chunk: Chunk, sources: Sequence[SourceFile], spec: JobSpec, tokenizer,
                  invocation: Optional[Invocation], endpoint: Optional[str]) -> pa.Table:
    """One chunk as a table of rows in file order: encoded records, bad records (`status` -1, the problem in
    `problem`, the position in `position`) and a file-level failure (`status` -2)."""
    found = read_chunk(sources[chunk.source], chunk, spec.data.format, endpoint)
    if found.fatal is not None:
        problems = [(0, _STATUS_FATAL, found.fatal)]
        rows = []
    else:
        problems = [(position, _STATUS_BAD, problem) for position, problem in found.problems]
        rows = encode_rows(spec.data, tokenizer, found.records, invocation) if found.records else []
    n = len(rows) + len(problems)
    columns = {
        "chunk": pa.array([index] * n, pa.int32()),
        "position": pa.array(found.positions + [p[0] for p in problems], pa.int64()),
        "problem": pa.array([None] * len(rows) + [p[2] for p in problems], pa.string()),
        "input_ids": pa.array([r.input_ids for r in rows] + [None] * len(problems), pa.list_(pa.int32())),
        "labels": pa.array([r.labels for r in rows] + [None] * len(problems), pa.list_(pa.int32())),
        "alora_start": pa.array([r.alora_start for r in rows] + [None] * len(problems), pa.int32()),
        "status": pa.array([r.status for r in rows] + [p[1] for p in problems], pa.int8()),
        "truncated": pa.array([r.truncated for r in rows] + [False] * len(problems), pa.bool_()),
        "length": pa.array([len(r.input_ids) for r in rows] + [0] * len(problems), pa.int32()),
        # As TrainingData counts them: the labels after the causal shift that are not -100.
        "targets": pa.array([sum(1 for label in r.labels[1:] if label != IGNORE_INDEX) for r in rows]
                            + [0] * len(problems), pa.int32()),
        "record": pa.array([record_text(r, spec.data.format) for r in found.records] + [None] * len(problems),
                           pa.string()),
    }
    return pa.table(columns)


def _encode_batch(batch: dict[str, np.ndarray], sources, chunks, spec_json: str, tokenizer, invocation,
                  endpoint) -> pa.Table:
    """Ray Data `map_batches` function: the chunks named in `batch["chunk"]`, encoded."""
    spec = spec_from_json(spec_json)
    tables = [_encode_chunk(int(i), chunks[int(i)], sources, spec, tokenizer, invocation, endpoint)
              for i in batch["chunk"]]
    return pa.concat_tables(tables)


def _tables_in_driver(chunks, sources, spec, tokenizer, invocation, endpoint) -> Iterator[pa.Table]:
    for i, chunk in enumerate(chunks):
        yield _encode_chunk(i, chunk, sources, spec, tokenizer, invocation, endpoint)


def _tables_on_ray_data(chunks, sources, spec, tokenizer, invocation, endpoint) -> Iterator[pa.Table]:
    import ray.data

    remote_args = {}
    if any(not s.scheme for s in sources):
        # Local files (a path, a saved dataset, a hub dataset's Arrow files in the `datasets` cache) are known to
        # exist only on the driver's disk; other nodes may not see them: the tasks run on the driver's node. Data
        # on an object store is read by tasks anywhere in the cluster.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        remote_args["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                            soft=False)

    context = ray.data.DataContext.get_current()
    before = context.execution_options.preserve_order
    # Rows must come back in file order: sample i of the cache is sample i of the in-memory path.
    context.execution_options.preserve_order = True
    # Ray Data logs its plan and progress to stderr; lorafleet shows its own lines only unless --verbose.
    ray_data_logger = logging.getLogger("ray.data")
    level = ray_data_logger.level
    if not logger.isEnabledFor(logging.INFO):
        ray_data_logger.setLevel(logging.ERROR)
    try:
        ds = ray.data.from_items([{"chunk": i} for i in range(len(chunks))], override_num_blocks=len(chunks))
        ds = ds.map_batches(
            _encode_batch,
            batch_size=1,
            batch_format="numpy",
            num_cpus=1,
            **remote_args,
            fn_kwargs=dict(sources=sources, chunks=chunks, spec_json=spec.model_dump_json(), tokenizer=tokenizer,
                           invocation=invocation, endpoint=endpoint),
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
            yield batch
    finally:
        context.execution_options.preserve_order = before
        ray_data_logger.setLevel(level)


class _ShardWriter:
    """Appends encoded rows to Arrow IPC files `shard-NNNNN.arrow` in a local folder, SHARD_ROWS rows per file."""

    def __init__(self, folder: Path):
        self.folder, self.shards, self._writer = folder, [], None

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self._writer is None:
                name = f"shard-{len(self.shards):05d}.arrow"
                self.shards.append({"name": name, "rows": 0})
                self._writer = pa.ipc.new_file(str(self.folder / name), SCHEMA)
            take = table.slice(0, SHARD_ROWS - self.shards[-1]["rows"])
            self._writer.write_table(take)
            self.shards[-1]["rows"] += take.num_rows
            table = table.slice(take.num_rows)
            if self.shards[-1]["rows"] >= SHARD_ROWS:
                self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _read_index(filesystem: fs.FileSystem, folder: str) -> Optional[dict[str, Any]]:
    try:
        with filesystem.open_input_stream(f"{folder}/{INDEX_FILE}") as stream:
            index = json.loads(stream.read())
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) and index.get("version") == CACHE_VERSION else None


def build_cache(
    spec: JobSpec,
    tokenizer,
    source: dict[str, Any],
    invocation: Optional[Invocation] = None,
    use_ray: Optional[bool] = None,
    start_ray: Optional[Callable[[], Any]] = None,
    files: Optional[Sequence[SourceFile]] = None,
) -> tuple[TokenCache, CacheReport]:
    """Build the job's tokenized cache, or find it already built (same key: [`cache_key`]).

    Args:
        spec ([`~lorafleet.spec.JobSpec`]): The validated spec (`data`, `checkpoint.storage`).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): The base model's tokenizer.
        source (`dict`): The data files' fingerprint ([`~lorafleet.data.sources.data_fingerprint`], or
            [`~lorafleet.data.hub.HubSource`]'s `fingerprint` for `data.hub`).
        invocation ([`~lorafleet.data.alora.Invocation`], *optional*): For aLoRA jobs.
        use_ray (`bool`, *optional*):
            Tokenize in Ray Data tasks; default: unless the data is local and under [`INLINE_BYTES`].
        start_ray (`Callable`, *optional*): Called before the first Ray Data use (starts or joins Ray).
        files (`list[SourceFile]`, *optional*):
            The data files, when already listed (a loaded hub dataset's: [`~lorafleet.data.hub.load_hub`]); default:
            those of `data.path` ([`~lorafleet.data.sources.data_sources`]), or `data.hub` loaded here.

    Returns:
        `tuple[TokenCache, CacheReport]`

    Raises:
        [`~lorafleet.spec.SpecError`]: The first bad record (file and line, or record number; for `data.hub`, the
        dataset and row of the split), unless `data.on_bad_record: skip`; a file that cannot be read; no sample left.

    Example:

    ```python
    >>> import tempfile
    >>> from lorafleet.data.sources import data_fingerprint
    >>> from lorafleet.data.tokenizer import load_tokenizer
    >>> from lorafleet.spec import load_spec
    >>> spec = load_spec("jobs/llama.yaml", [f"checkpoint.storage={tempfile.mkdtemp()}"])
    >>> cache, report = build_cache(spec, load_tokenizer(), data_fingerprint(spec.data.path))
    >>> report.records, report.engine, report.reused
    (3000, 'driver', False)
    >>> samples = CachedSamples(cache)
    >>> len(samples), samples[0]["labels"][0]
    (3000, -100)
    ```
    """
    endpoint = spec.checkpoint.endpoint
    scheme, root = cache_root(spec)
    filesystem = filesystem_for(scheme, endpoint)
    key = cache_key(spec, tokenizer, source, invocation)
    folder = f"{root}/{key}"
    uri = f"{scheme}://{folder}" if scheme else folder
    index = _read_index(filesystem, folder)
    if index is not None:
        report = CacheReport(**{**index["report"], "reused": True, "build_s": 0.0, "uri": uri})
        record_use(filesystem, folder)
        return TokenCache(uri, endpoint, index), report
    try:
        return _build(spec, tokenizer, invocation, use_ray, start_ray, files, key, scheme, folder)
    except SpecError as exc:
        if spec.data.hub is None:
            raise
        # The readers word their problems for `data.path`; here the records came from `data.hub`.
        raise SpecError(*(p.replace("data.path:", "data.hub:", 1) for p in exc.problems)) from None


def _build(spec: JobSpec, tokenizer, invocation, use_ray, start_ray, files, key: str, scheme: str,
           folder: str) -> tuple[TokenCache, CacheReport]:
    """[`build_cache`]'s work when no cache has the key: list, read, encode and publish."""
    endpoint = spec.checkpoint.endpoint
    uri = f"{scheme}://{folder}" if scheme else folder
    filesystem = filesystem_for(scheme, endpoint)
    started = time.perf_counter()
    if files is not None:
        sources = list(files)
    elif spec.data.hub is not None:
        sources = load_hub(spec.data.hub).files
    else:
        sources = data_sources(spec.data, endpoint)
    chunks = plan_chunks(sources, endpoint)
    if use_ray is None:
        use_ray = any(s.scheme for s in sources) or sum(s.size for s in sources) > INLINE_BYTES
    if use_ray and start_ray is not None:
        start_ray()
    report = CacheReport(uri=uri, key=key, files=len(sources), engine="ray-data" if use_ray else "driver")
    produce = _tables_on_ray_data if use_ray else _tables_in_driver
    local = Path(folder) if scheme == "" else None
    if local is not None:
        local.parent.mkdir(parents=True, exist_ok=True)
    # Next to the cache folder locally, so that publishing it is one rename.
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=str(local.parent) if local else None))
    writer = _ShardWriter(staging)
    max_length = spec.data.max_length
    try:
        for table in produce(chunks, sources, spec, tokenizer, invocation, endpoint):
            status = table.column("status").to_numpy()
            if (status < 0).any():
                _handle_problems(table, status, chunks, sources, spec, report, endpoint)
                table = table.filter(pa.array(status >= 0))
                status = table.column("status").to_numpy()
            if not table.num_rows:
                continue
            lengths, per_row = table.column("length").to_numpy(), table.column("targets").to_numpy()
            kept = status == KEPT
            report.records += table.num_rows
            report.samples += int(kept.sum())
            report.tokens += int(lengths[kept].sum())
            report.target_tokens += int(per_row[kept].sum())
            report.truncated += int(table.column("truncated").to_numpy(zero_copy_only=False).sum())
            report.dropped += int((~kept).sum())
            writer.write(table.select(SCHEMA.names).cast(SCHEMA))
        writer.close()
        if report.records == 0:
            raise SpecError(f"data.path: {spec.data.source_name} holds no records")
        report.shards = len(writer.shards)
        report.fill = round(report.tokens / (report.samples * max_length), 4) if report.samples else 0.0
        report.build_s = round(time.perf_counter() - started, 3)
        index = {"version": CACHE_VERSION, "key": key, "shards": writer.shards, "report": report.as_dict(),
                 "path": spec.data.source_name}
        (staging / INDEX_FILE).write_text(json.dumps(index, indent=1))
        _publish(staging, writer.shards, filesystem, folder, local)
        record_use(filesystem, folder)
    finally:
        writer.close()
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("data: tokenized cache %s built in %.1f s (%d records, %d samples)", uri, report.build_s,
                report.records, report.samples)
    return TokenCache(uri, endpoint, index), report


def _handle_problems(table, status, chunks, sources, spec, report: CacheReport, endpoint) -> None:
    """Fail on the first bad record (or a file-level failure), or count and note it with `on_bad_record: skip`."""
    problems = table.column("problem").to_pylist()
    positions = table.column("position").to_numpy()
    chunk_ids = table.column("chunk").to_numpy()
    for row in np.flatnonzero(status < 0):
        if status[row] == _STATUS_FATAL:
            raise SpecError(problems[row])
        chunk = chunks[int(chunk_ids[row])]
        source = sources[chunk.source]
        if source.path.endswith(".jsonl"):
            where = f"{source.shown}: line {lines_before(source, chunk.start, endpoint) + int(positions[row])}"
        else:
            where = f"{source.shown}: record {int(positions[row])}"
        if spec.data.on_bad_record == "fail":
            raise SpecError(f"data.path: {where}: {problems[row]} (data.on_bad_record: skip skips such records)")
        report.skipped += 1
        if len(report.skipped_at) < SHOW_SKIPPED:
            report.skipped_at.append(f"{where}: {problems[row]}")


def _publish(staging: Path, shards: list[dict], filesystem: fs.FileSystem, folder: str, local: Optional[Path]) -> None:
    """Move the built cache into place; `index.json` last, so a cache with an index is complete."""
    if local is not None:
        try:
            os.rename(staging, local)
        except OSError:
            if not (local / INDEX_FILE).exists():  # not a concurrent build of the same key that finished first
                raise
        return
    filesystem.create_dir(folder, recursive=True)
    for name in [s["name"] for s in shards] + [INDEX_FILE]:
        fs.copy_files(str(staging / name), f"{folder}/{name}", source_filesystem=fs.LocalFileSystem(),
                      destination_filesystem=filesystem)


def record_use(filesystem: fs.FileSystem, folder: str, every_s: float = USE_RECORD_EVERY_S) -> bool:
    """Record that a job uses the cache in `folder`: rewrite its [`LAST_USED_FILE`], unless that was done less than
    `every_s` seconds ago (one lookup then, no write). Never fails a job: a storage error is logged and ignored.

    Args:
        filesystem (`pyarrow.fs.FileSystem`): The storage's filesystem.
        folder (`str`): The cache folder on it.
        every_s (`float`, *optional*, defaults to [`USE_RECORD_EVERY_S`]): The least time between two writes.

    Returns:
        `bool`: Whether the marker was written.

    Example:

    ```python
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> record_use(fs.LocalFileSystem(), folder), record_use(fs.LocalFileSystem(), folder)
    (True, False)
    ```
    """
    marker = f"{folder}/{LAST_USED_FILE}"
    try:
        info = filesystem.get_file_info(marker)
        # The stored time is the storage's clock (an object's upload time): only compared with this machine's here.
        if info.type == fs.FileType.File and info.mtime is not None and time.time() - info.mtime.timestamp() < every_s:
            return False
        with filesystem.open_output_stream(marker) as out:
            out.write(json.dumps({"last_used": time.time()}).encode())
        return True
    except (OSError, ValueError) as exc:
        logger.debug("data: cannot record the use of the cache %s (%s)", folder, exc)
        return False


def mirror_root() -> Path:
    """This machine's folder of object-store caches copied for reading: `$LORAFLEET_HOME/cache/tokenized/`, one
    `<key>/` per cache (shards, `index.json`, [`LAST_USED_FILE`]), listed and pruned like a storage's caches by
    `lorafleet data cache list|prune --local`."""
    return lorafleet_home() / "cache" / "tokenized"


def _complete_mirror(mirror: Path, index: dict[str, Any]) -> None:
    """Mark a mirror complete and used, as a storage's cache is: its `index.json` once every shard is there (written
    whole or not at all), and its use (a local write costs nothing, so every open records it)."""
    if not (mirror / INDEX_FILE).exists():
        partial = mirror / f".{INDEX_FILE}.part-{os.getpid()}"
        partial.write_text(json.dumps(index, indent=1))
        os.replace(partial, mirror / INDEX_FILE)
    (mirror / LAST_USED_FILE).write_text(json.dumps({"last_used": time.time()}))


class TokenCache:
    """A built tokenized cache, read by global row (one row per valid record, in file order).

    The shards are memory-mapped: reading a row touches only its pages, and the OS can drop them again, so a
    worker's memory for data does not grow with the dataset. On an object store the shards are first copied to
    `$LORAFLEET_HOME/cache/tokenized/<key>/` on the reading machine (once; checked by size), with the cache's
    `index.json` and a [`LAST_USED_FILE`] rewritten at every open, so `lorafleet data cache list|prune --local` sees
    these copies as caches ([`mirror_root`]).

    Args:
        uri (`str`): The cache folder (a local path, `s3://...`, `gs://...`).
        endpoint (`str`, *optional*): `checkpoint.endpoint`.
        index (`dict`, *optional*): Its `index.json`, when already read.
    """

    def __init__(self, uri: str, endpoint: Optional[str] = None, index: Optional[dict[str, Any]] = None):
        self.uri, self.endpoint = uri, endpoint
        if index is None:
            scheme, folder = split_uri(uri)
            index = _read_index(filesystem_for(scheme, endpoint), folder)
            if index is None:
                raise FileNotFoundError(f"no tokenized cache at {uri}")
        self.index = index
        self._batches: Optional[list[pa.RecordBatch]] = None
        self._starts: Optional[np.ndarray] = None

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "endpoint": self.endpoint, "index": self.index}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["uri"], state["endpoint"], state["index"])

    def __len__(self) -> int:
        return int(self.index["report"]["records"])

    def _local_folder(self) -> Path:
        scheme, folder = split_uri(self.uri)
        if scheme == "":
            return Path(folder)
        mirror = mirror_root() / self.index["key"]
        mirror.mkdir(parents=True, exist_ok=True)
        filesystem = filesystem_for(scheme, self.endpoint)
        for shard in self.index["shards"]:
            target = mirror / shard["name"]
            remote = f"{folder}/{shard['name']}"
            size = filesystem.get_file_info(remote).size
            if target.exists() and target.stat().st_size == size:
                continue
            partial = target.with_suffix(f".part-{os.getpid()}")
            fs.copy_files(remote, str(partial), source_filesystem=filesystem,
                          destination_filesystem=fs.LocalFileSystem())
            os.replace(partial, target)  # atomic: a concurrent reader sees the whole file or none
        _complete_mirror(mirror, self.index)
        return mirror

    def _open(self) -> None:
        folder = self._local_folder()
        batches = []
        for shard in self.index["shards"]:
            reader = pa.ipc.open_file(pa.memory_map(str(folder / shard["name"]), "r"))
            batches.extend(reader.get_batch(i) for i in range(reader.num_record_batches))
        self._batches = [b for b in batches if b.num_rows]
        self._starts = np.cumsum([0] + [b.num_rows for b in self._batches])

    def column(self, name: str) -> np.ndarray:
        """One fixed-width column (`status`, `length`, `targets`) over every row, as a numpy array."""
        if self._batches is None:
            self._open()
        if not self._batches:
            return np.zeros(0, np.int32)
        return np.concatenate([b.column(name).to_numpy(zero_copy_only=False) for b in self._batches])

    def _locate(self, i: int) -> tuple[pa.RecordBatch, int]:
        """The record batch that holds row `i`, and the row's offset in it."""
        if self._batches is None:
            self._open()
        b = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._batches[b], i - int(self._starts[b])

    def record(self, i: int) -> dict[str, Any]:
        """Row `i`'s record as read from the data (the fields its format uses; [`record_text`])."""
        batch, offset = self._locate(i)
        return json.loads(batch.column("record")[offset].as_py())

    def row(self, i: int) -> dict[str, Any]:
        """Row `i` as a sample: `input_ids`, `labels` (lists of int) and, for aLoRA, `alora_start`."""
        batch, offset = self._locate(i)
        sample = {"input_ids": batch.column(0)[offset].as_py(), "labels": batch.column(1)[offset].as_py()}
        start = batch.column(2)[offset].as_py()
        if start is not None:
            sample["alora_start"] = start
        return sample


def held_out_mask(num_records: int, fraction: float, seed: int) -> np.ndarray:
    """Which records `data.eval_fraction` holds out (True), deterministically by `seed`: the first
    `floor(fraction * num_records)` of `torch.randperm(num_records)` seeded with `seed`
    ([`~lorafleet.data.dataset.held_out_split`] gives the same split as lists).

    Example:

    ```python
    >>> int(held_out_mask(10, 0.2, seed=42).sum())
    2
    ```
    """
    count = math.floor(fraction * num_records)
    if count == 0 or count == num_records:
        side = "the held-out set" if count == 0 else "training"
        raise SpecError(
            f"data.eval_fraction: {fraction} of {num_records} records leaves {side} empty "
            f"(held out: floor({fraction} x {num_records}) = {count}); change it or use data.eval_path"
        )
    order = torch.randperm(num_records, generator=torch.Generator().manual_seed(seed)).numpy()
    mask = np.zeros(num_records, dtype=bool)
    mask[order[:count]] = True
    return mask


def _side_mask(cache: TokenCache, side: str, fraction: Optional[float], seed: int) -> np.ndarray:
    """Which rows of `cache` are on `side` (`all`, or `train` / `held_out` of `data.eval_fraction`)."""
    n = len(cache)
    if side == "all":
        return np.ones(n, dtype=bool)
    held_out = held_out_mask(n, fraction, seed)
    return held_out if side == "held_out" else ~held_out


class CachedRecords:
    """The first `limit` records of one side of a [`TokenCache`], as read from the data, in file order: what
    `eval.generate` prompts with and scores against, the same records as the in-memory path's
    [`~lorafleet.data.dataset.TrainingData`]`.eval_records`. Like [`CachedSamples`], it pickles as the cache's index
    and reads the rows where it is used (the rank-0 worker), so the driver never downloads the shards for it.

    Args:
        cache ([`TokenCache`]): The cache.
        side (`str`, *optional*, defaults to `"all"`): `"all"`, or with a held-out fraction `"held_out"` / `"train"`.
        fraction (`float`, *optional*): `data.eval_fraction`.
        seed (`int`, *optional*, defaults to `0`): `training.seed`.
        limit (`int`, *optional*): At most this many records (`eval.generate.num_samples`).

    Example:

    ```python
    >>> import tempfile
    >>> from lorafleet.data.sources import data_fingerprint
    >>> from lorafleet.data.tokenizer import load_tokenizer
    >>> from lorafleet.spec import load_spec
    >>> spec = load_spec("jobs/llama.yaml", [f"checkpoint.storage={tempfile.mkdtemp()}"])
    >>> cache, _ = build_cache(spec, load_tokenizer(), data_fingerprint(spec.data.path))
    >>> records = CachedRecords(cache, "held_out", 0.05, seed=0, limit=2)
    >>> len(records), sorted(records[0])
    (2, ['instruction', 'output'])
    ```
    """

    def __init__(self, cache: TokenCache, side: str = "all", fraction: Optional[float] = None, seed: int = 0,
                 limit: Optional[int] = None):
        self.cache, self.side, self.fraction, self.seed, self.limit = cache, side, fraction, seed, limit
        self._rows: Optional[np.ndarray] = None

    def __getstate__(self) -> dict[str, Any]:
        return {"cache": self.cache, "side": self.side, "fraction": self.fraction, "seed": self.seed,
                "limit": self.limit}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    @property
    def rows(self) -> np.ndarray:
        """The cache rows of these records, in order."""
        if self._rows is None:
            rows = np.flatnonzero(_side_mask(self.cache, self.side, self.fraction, self.seed))
            self._rows = rows[: self.limit] if self.limit is not None else rows
        return self._rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.cache.record(int(self.rows[i]))

    def __iter__(self):
        return (self[j] for j in range(len(self)))


class _IntColumn:
    """A read-only sequence of ints: one cache column over some samples' rows (what `TrainingData.targets` is for
    cached samples), read on first use where it is used, so pickling it sends no per-sample data."""

    def __init__(self, samples: "CachedSamples", name: str):
        self._samples, self._name, self._values = samples, name, None

    def __getstate__(self) -> dict[str, Any]:
        return {"samples": self._samples, "name": self._name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["samples"], state["name"])

    @property
    def values(self) -> np.ndarray:
        if self._values is None:
            self._values = self._samples.per_sample(self._name)
        return self._values

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i: int) -> int:
        return int(self.values[i])

    def __iter__(self):
        return (int(v) for v in self.values)


class CachedSamples:
    """The training (or held-out) samples of a [`TokenCache`], as a sequence: `samples[i]` is the i-th sample of
    the in-memory path, read from the memory-mapped shards.

    Which rows belong is decided where it is read (on each worker, from the shards' `status` column and the seed),
    so pickling it sends only the cache's index, not per-sample data.

    Args:
        cache ([`TokenCache`]): The cache.
        side (`str`, *optional*, defaults to `"all"`): `"all"`, or with a held-out fraction `"train"` / `"held_out"`.
        fraction (`float`, *optional*): `data.eval_fraction`.
        seed (`int`, *optional*, defaults to `0`): `training.seed` (the split's permutation).
    """

    def __init__(self, cache: TokenCache, side: str = "all", fraction: Optional[float] = None, seed: int = 0,
                 pack_length: Optional[int] = None):
        self.cache, self.side, self.fraction, self.seed = cache, side, fraction, seed
        self.pack_length = pack_length
        self._rows: Optional[np.ndarray] = None
        self._bins: Optional[tuple[np.ndarray, np.ndarray]] = None

    def __getstate__(self) -> dict[str, Any]:
        return {"cache": self.cache, "side": self.side, "fraction": self.fraction, "seed": self.seed,
                "pack_length": self.pack_length}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def _side_mask(self) -> np.ndarray:
        return _side_mask(self.cache, self.side, self.fraction, self.seed)

    @property
    def rows(self) -> np.ndarray:
        """The cache rows of these samples, in order."""
        if self._rows is None:
            kept = (self.cache.column("status") == KEPT) & self._side_mask()
            self._rows = np.flatnonzero(kept).astype(np.int64)
        return self._rows

    def missing_invocation(self) -> list[int]:
        """1-based record numbers (in the data, over valid records) on this side without the aLoRA invocation."""
        mask = (self.cache.column("status") == NO_INVOCATION) & self._side_mask()
        return (np.flatnonzero(mask) + 1).tolist()

    @property
    def bins(self) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """With `pack_length`: the packed rows as (members, offsets): row r holds the samples
        `members[offsets[r]:offsets[r + 1]]` (indices into [`rows`]), as [`~lorafleet.data.batching.pack_bins`]
        packs them in memory."""
        if self.pack_length is not None and self._bins is None:
            bins = pack_bins(self.cache.column("length")[self.rows].tolist(), self.pack_length)
            offsets = np.cumsum([0] + [len(b) for b in bins]).astype(np.int64)
            self._bins = np.fromiter((i for b in bins for i in b), np.int64, int(offsets[-1])), offsets
        return self._bins

    def __len__(self) -> int:
        return len(self.rows) if self.pack_length is None else len(self.bins[1]) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if self.pack_length is None:
            return self.cache.row(int(self.rows[i]))
        members, offsets = self.bins
        samples = [self.cache.row(int(self.rows[m])) for m in members[offsets[i] : offsets[i + 1]]]
        return packed_row(samples, alora="alora_start" in samples[0])

    def __iter__(self):
        return (self[j] for j in range(len(self)))

    def per_sample(self, name: str) -> np.ndarray:
        """A column (`targets`, `length`) per sample, or per packed row (summed over its samples)."""
        values = self.cache.column(name)[self.rows].astype(np.int64)
        if self.pack_length is None:
            return values
        members, offsets = self.bins
        return np.add.reduceat(values[members], offsets[:-1]) if len(members) else values[:0]

    @property
    def targets(self) -> _IntColumn:
        """Per sample, the tokens the loss counts."""
        return _IntColumn(self, "targets")

    def lengths(self) -> list[int]:
        """Per sample, its length in tokens (for `data.group_by_length`)."""
        return self.per_sample("length").tolist()
