"""Run storage: turn `checkpoint.storage` into what Ray Train's `RunConfig` takes, and back into a URI for people.

Object stores go through pyarrow filesystems (what Ray Train itself uses). Endpoint and credentials come from the
standard environment variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...) or `checkpoint.endpoint`; they are
never part of a path, so they never reach logs, summaries or checkpoints.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

logger = logging.getLogger(__name__)


# How long a worker keeps retrying one checkpoint upload before the run fails (and Ray Train's
# `scaling.max_failures` takes over). Long enough to ride out an object-store blip or a restart.
UPLOAD_RETRY_S = float(os.environ.get("LORAFLEET_UPLOAD_RETRY_S", "300"))


def split_uri(uri: str) -> tuple[str, str]:
    """Split a storage URI into (scheme, path): `("s3", "bucket/prefix")`, `("", "/abs/path")` for local paths."""
    if "://" not in uri:
        return "", str(Path(uri).expanduser().resolve())
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        return "", str(Path(parsed.path).resolve())
    return scheme, f"{parsed.netloc}{parsed.path}".rstrip("/")


def resolve_storage(uri: str, endpoint: Optional[str] = None) -> tuple[str, Any]:
    """The `(storage_path, storage_filesystem)` pair for Ray Train's `RunConfig`.

    Args:
        uri (`str`):
            A local path, `file://`, `s3://bucket/prefix` or `gs://bucket/prefix`.
        endpoint (`str`, *optional*):
            Endpoint override for S3-compatible servers (defaults to `AWS_ENDPOINT_URL` if set) or a GCS emulator
            (defaults to `STORAGE_EMULATOR_HOST` if set; an `http://` endpoint is used without credentials).

    Returns:
        `tuple`: A path and a pyarrow filesystem (`None` for local storage, which Ray handles itself).

    Example:

    ```python
    >>> path, fs = resolve_storage("/tmp/runs")
    >>> path, fs
    ('/tmp/runs', None)
    ```
    """
    scheme, path = split_uri(uri)
    if scheme == "":
        Path(path).mkdir(parents=True, exist_ok=True)
        return path, None
    return path, filesystem_for(scheme, endpoint)


def filesystem_for(scheme: str, endpoint: Optional[str] = None):
    """A pyarrow filesystem for `s3` or `gs`, configured from the environment (and `endpoint`)."""
    from pyarrow import fs

    if scheme == "s3":
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict[str, Any] = {}
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs["endpoint_override"] = parsed.netloc
            kwargs["scheme"] = parsed.scheme or "https"
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        # Delayed open lets a file smaller than a multipart part go up in one PUT instead of three requests
        # (create, part, complete); an error then shows when the file is closed, which every writer here waits for.
        return fs.S3FileSystem(allow_delayed_open=True, **kwargs)
    if scheme == "gs":
        kwargs = {}
        # `STORAGE_EMULATOR_HOST` is how the Google clients (google-cloud-storage, gcsfs) are pointed at an emulator;
        # pyarrow's GCS client ignores it, so it is read here, with gcsfs's default of http when it has no scheme.
        emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
        if not endpoint and emulator:
            endpoint = emulator if "://" in emulator else f"http://{emulator}"
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs["endpoint_override"] = parsed.netloc
            kwargs["scheme"] = parsed.scheme or "https"
            # Google only serves GCS over https, so plain http is an emulator. It takes no credentials, and pyarrow's
            # default ones would first look for a token on Google's metadata server (minutes of retries off GCP).
            kwargs["anonymous"] = kwargs["scheme"] == "http"
        return fs.GcsFileSystem(**kwargs)
    raise ValueError(f"unsupported storage scheme {scheme!r}")


def run_location(uri: str, name: str, endpoint: Optional[str] = None) -> tuple[str, Any]:
    """The `(path, filesystem)` of one run's folder (`<storage>/<name>`); the filesystem is local for local storage."""
    from pyarrow import fs

    path, filesystem = resolve_storage(uri, endpoint)
    return f"{path.rstrip('/')}/{name}", filesystem or fs.LocalFileSystem()


def delete_run(uri: str, name: str, endpoint: Optional[str] = None) -> bool:
    """Delete everything stored for run `name` (checkpoints and Ray Train's run snapshot), to start it over.

    Args:
        uri (`str`):
            `checkpoint.storage` (local path, `file://`, `s3://` or `gs://`).
        name (`str`):
            The job name (the run's folder).
        endpoint (`str`, *optional*):
            `checkpoint.endpoint`.

    Returns:
        `bool`: Whether there was anything to delete.

    Example:

    ```python
    >>> delete_run("/tmp/lorafleet-doc-runs", "never-ran")
    False
    ```
    """
    from pyarrow import fs

    path, filesystem = run_location(uri, name, endpoint)
    if filesystem.get_file_info(path).type == fs.FileType.NotFound:
        return False
    filesystem.delete_dir(path)
    return True


def list_checkpoint_dirs(filesystem, run_path: str) -> list[str]:
    """Paths of the `checkpoint_*` folders directly under a run folder, in name (= creation time) order."""
    from pyarrow import fs

    try:
        infos = filesystem.get_file_info(fs.FileSelector(run_path, allow_not_found=True))
    except OSError:
        return []
    return sorted(
        info.path for info in infos if info.type == fs.FileType.Directory and info.base_name.startswith("checkpoint_")
    )


def _persist(checkpoint, checkpoint_dir_name: str, storage):
    """Copy this worker's files into the run's checkpoint folder and return the stored checkpoint.

    On object stores this skips what `persist_current_checkpoint` adds for storage paths that only exist on one node
    (a validation-marker lookup) and for filesystems with real folders (empty `folder/` marker objects): three requests
    per worker and checkpoint that the store does not need. GCS still gets the folder marker, which pyarrow's GCS
    filesystem needs. Local storage keeps Ray Train's own copy.
    """
    import ray.train
    from pyarrow import fs

    filesystem = storage.storage_filesystem
    if filesystem.type_name not in ("s3", "gcs"):
        return storage.persist_current_checkpoint(checkpoint, checkpoint_dir_name)
    destination = storage.build_checkpoint_path_from_name(checkpoint_dir_name)
    if filesystem.type_name == "gcs":
        # pyarrow's GCS filesystem sees a folder only through its `folder/` marker object: without one the folder
        # is missing from non-recursive listings (`list_checkpoint_dirs`) and `delete_dir` fails with NOT_FOUND
        # after deleting the files (Ray's `keep` pruning). Safe when several workers create the same marker.
        filesystem.create_dir(destination)
    # One file at a time and large chunks, as Ray Train copies: pyarrow's threaded copy to S3 is unsafe for uploads.
    fs.copy_files(
        checkpoint.path,
        destination,
        source_filesystem=checkpoint.filesystem,
        destination_filesystem=filesystem,
        chunk_size=64 * 1024 * 1024,
        use_threads=False,
    )
    return ray.train.Checkpoint(path=destination, filesystem=filesystem)


def _verify_upload(local_dir: str, filesystem, remote_dir: str) -> None:
    """Every local file is in storage with the same size (catches a copy that stopped half-way without an error).

    One listing of the folder rather than a lookup per file; it also lists the other workers' files, which are
    theirs to check.
    """
    from pyarrow import fs

    stored = {info.base_name: info.size for info in filesystem.get_file_info(fs.FileSelector(remote_dir))}
    for path in Path(local_dir).iterdir():
        if path.is_file() and stored.get(path.name) != path.stat().st_size:
            raise OSError(f"checkpoint file {path.name} is missing or short in storage after upload")


def upload_checkpoint(checkpoint, checkpoint_dir_name: str):
    """Ray Train `checkpoint_upload_fn`: copy this worker's checkpoint files to storage, retrying until they are all there.

    Ray Train calls this in a background thread (`checkpoint_upload_mode=ASYNC`), so the training loop keeps stepping
    while it runs. A failed or cut-off copy is retried with exponential backoff (1 s up to 15 s) for up to
    `UPLOAD_RETRY_S` seconds, and verified file by file; only then does Ray Train hear about the checkpoint, and it
    registers a checkpoint as the run's latest only after *every* worker's upload has been reported. So a checkpoint
    that resume can pick is always whole. Errors are logged by type and first line only: object-store errors name
    the bucket and key, never the credentials.

    Args:
        checkpoint (`ray.train.Checkpoint`):
            This worker's local checkpoint directory.
        checkpoint_dir_name (`str`):
            The checkpoint folder's name inside the run folder (the same on every worker).

    Returns:
        `ray.train.Checkpoint`: The checkpoint in storage.

    Example:

    ```python
    >>> ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_fn=upload_checkpoint,  # doctest: +SKIP
    ...                  checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
    ```
    """
    import ray.train

    storage = ray.train.get_context().get_storage()
    started, delay, attempt = time.monotonic(), 1.0, 0
    while True:
        attempt += 1
        try:
            persisted = _persist(checkpoint, checkpoint_dir_name, storage)
            _verify_upload(checkpoint.path, storage.storage_filesystem, persisted.path)
            if attempt > 1:
                logger.warning("lorafleet: checkpoint %s uploaded after %d attempts", checkpoint_dir_name, attempt)
            return persisted
        except Exception as exc:  # noqa: BLE001 - any storage error is worth a retry until the deadline
            if time.monotonic() - started + delay > UPLOAD_RETRY_S:
                raise
            first_line = (str(exc).strip().splitlines() or [""])[0][:200]
            logger.warning(
                "lorafleet: checkpoint %s upload failed (attempt %d, %s: %s); retrying in %.0f s",
                checkpoint_dir_name, attempt, type(exc).__name__, first_line, delay,
            )
            time.sleep(delay)
            delay = min(delay * 2, 15.0)


def display_uri(storage_uri: str, path: str) -> str:
    """Turn a path Ray Train reports (no scheme when a filesystem object is used) back into a URI."""
    scheme, _ = split_uri(storage_uri)
    return f"{scheme}://{path}" if scheme else path

