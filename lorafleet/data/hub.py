"""`data.hub` (and `data.eval_hub`): a dataset loaded with `datasets.load_dataset` by the driver, read through the
tokenized cache.

The driver loads the split once while preparing the job ([`load_hub`]); `datasets` downloads it (a hub id needs
internet on the driver) and writes it as Arrow stream files in its own cache (`HF_DATASETS_CACHE`). Those files are
the cache's sources, cut and read like a saved dataset's ([`~lorafleet.data.sources.plan_chunks`]), so the workers, on
any node, read only the tokenized cache in the run storage and never the hub.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from lorafleet.compat.datasets import dataset_fingerprint, reads_its_files_whole
from lorafleet.data.records import _first_line
from lorafleet.data.sources import SourceFile
from lorafleet.spec import HubSpec, SpecError


@dataclass(frozen=True)
class HubSource:
    """A loaded hub split: its Arrow files and the fingerprint checkpoints and the cache key use.

    Attributes:
        files (`list[SourceFile]`): The split's Arrow files in row order, labelled with the dataset
            ([`~lorafleet.spec.HubSpec.describe`]) so that a bad record is named by its row in the split.
        fingerprint (`dict`): `{"hub": {name, config, split, revision}, "fingerprint": the dataset's own
            `_fingerprint`, "files": {file name: {"size"}}}`.
        rows (`int`): Records in the split.
    """

    files: list[SourceFile]
    fingerprint: dict[str, Any] = field(repr=False)
    rows: int = 0


def _load_problem(hub: HubSpec, what: str, exc: BaseException) -> str:
    """The loading error as one line naming the field at fault (`data.hub.name`, `.split`, `.config`,
    `.revision`)."""
    reason = _first_line(exc)
    kinds = {type(t).__name__ for t in type(exc).__mro__} | {t.__name__ for t in type(exc).__mro__}
    if "OfflineModeIsEnabled" in reason or kinds & {"ConnectionError", "OfflineModeIsEnabled", "ConnectError",
                                                     "Timeout", "ReadTimeout", "ConnectTimeout"}:
        return (f"{what}.name: cannot reach '{hub.name}' on the Hugging Face Hub ({reason}); the driver needs internet "
                "for hub data (or name a local dataset folder)")
    if "RevisionNotFoundError" in kinds or "revision" in reason.lower():
        return f"{what}.revision: '{hub.revision}' of '{hub.name}': {reason}"
    if "split" in reason.lower() and isinstance(exc, (ValueError, KeyError)):
        return f"{what}.split: '{hub.split}' of '{hub.name}': {reason}"
    if "config" in reason.lower() and isinstance(exc, ValueError):
        return f"{what}.config: {hub.config!r} of '{hub.name}': {reason}"
    if isinstance(exc, FileNotFoundError) or "DatasetNotFoundError" in kinds:
        return f"{what}.name: no dataset '{hub.name}' ({reason})"
    return f"{what}: cannot load {hub.describe()} ({type(exc).__name__}: {reason})"


def _unreachable_hub(hub: HubSpec, what: str) -> Optional[str]:
    """Why a hub id cannot be loaded from here, found in milliseconds: the Hub's host name does not resolve (no network
    or DNS). Without this, `huggingface_hub` retries for ~30 s, printing a line per retry, before failing. Not checked
    for a local folder, in offline mode (the local cache answers), or behind a proxy (which resolves names itself)."""
    import datasets

    if Path(hub.name).exists() or datasets.config.HF_HUB_OFFLINE:
        return None
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        return (f"{what}.name: cannot reach '{hub.name}': {host} does not resolve ({exc.strerror or exc}); the driver "
                "needs internet for hub data (or name a local dataset folder)")
    return None


def _rows(path: str) -> int:
    import pyarrow as pa

    # Memory-mapped: counting a stream's rows reads its batch headers, not its data.
    return sum(batch.num_rows for batch in pa.ipc.open_stream(pa.memory_map(path, "r")))


def load_hub(hub: HubSpec, what: str = "data.hub") -> HubSource:
    """Load `hub`'s split with `datasets.load_dataset(name, config, split=split, revision=revision)` and list its
    Arrow files.

    A hub id is downloaded into the `datasets` cache (internet needed; `HF_HUB_OFFLINE=1` reads that cache only);
    a local folder of data files is read by `datasets`' packaged builders (json, parquet, csv, ...) without network.

    Args:
        hub ([`~lorafleet.spec.HubSpec`]): `data.hub` (or `data.eval_hub`).
        what (`str`, *optional*, defaults to `"data.hub"`): The field named in errors.

    Returns:
        [`HubSource`]

    Raises:
        [`~lorafleet.spec.SpecError`]: One line naming the field at fault: no such dataset, no internet, an unknown
        split, config or revision, a dataset `datasets` kept in memory (no Arrow file to read).

    Example:

    ```python
    >>> import shutil, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> _ = shutil.copy("jobs/data/tasks.jsonl", folder)
    >>> source = load_hub(HubSpec(name=folder))
    >>> source.rows, [f.path.endswith(".arrow") for f in source.files], source.files[0].label == f"{folder} (split train)"
    (3000, [True], True)
    ```
    """
    import datasets

    problem = _unreachable_hub(hub, what)
    if problem is not None:
        raise SpecError(problem)
    # Each of huggingface_hub's retries logs a warning line; the outcome is reported here, as one line.
    retries = logging.getLogger("huggingface_hub")
    level = retries.level
    retries.setLevel(logging.ERROR)
    try:
        ds = datasets.load_dataset(hub.name, hub.config, split=hub.split, revision=hub.revision)
    except Exception as exc:  # datasets, huggingface_hub, fsspec and the network raise many types
        raise SpecError(_load_problem(hub, what, exc)) from None
    finally:
        retries.setLevel(level)
    paths = [c["filename"] for c in ds.cache_files]
    if not paths:
        raise SpecError(f"{what}: {hub.describe()} was loaded in memory, with no Arrow file to read "
                        "(IN_MEMORY_MAX_SIZE is set in the environment?)")
    files, rows = [], 0
    for path in paths:
        info = os.stat(path)
        files.append(SourceFile("", path, Path(path).name, info.st_size, info.st_mtime, label=hub.describe(),
                                offset=rows))
        rows += _rows(path)
    if rows != ds.num_rows or not reads_its_files_whole(ds):
        # Not expected for a whole split; were it to happen, the files would hold other rows than the dataset.
        raise SpecError(f"{what}: {hub.describe()} has {ds.num_rows} rows but its Arrow files hold {rows}")
    fingerprint = {
        "hub": hub.model_dump(),
        # The dataset's own fingerprint: `datasets` derives it from the builder's config, data files and revision,
        # so it changes when the data does (and, for a local folder, when a file is modified).
        "fingerprint": dataset_fingerprint(ds),
        "files": {f.name: {"size": f.size} for f in files},
    }
    return HubSource(files, fingerprint, rows)
