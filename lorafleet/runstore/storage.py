"""Checkpoint uploads: a worker's checkpoint files copied to the run's storage, retried until they are all there.

Where the run's folder is and which filesystem it is on is decided by [`~lorafleet.runstore.location.RunLocation`]
(Ray Train's `RunConfig` gets it from there); [`upload_checkpoint`] runs in the workers, on the storage context Ray
Train built from that. Errors are logged by type and first line: object-store errors name the bucket and key, never
the credentials.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from lorafleet.compat.ray import checkpoint_fs_path, current_storage, persist_checkpoint, storage_filesystem

logger = logging.getLogger(__name__)


# How long a worker keeps retrying one checkpoint upload before the run fails (and Ray Train's
# `scaling.max_failures` takes over). Long enough to ride out an object-store blip or a restart.
UPLOAD_RETRY_S = float(os.environ.get("LORAFLEET_UPLOAD_RETRY_S", "300"))


def _persist(checkpoint, checkpoint_dir_name: str, storage):
    """Copy this worker's files into the run's checkpoint folder and return the stored checkpoint.

    On object stores this skips what `persist_current_checkpoint` adds for storage paths that only exist on one node
    (a validation-marker lookup) and for filesystems with real folders (empty `folder/` marker objects): three requests
    per worker and checkpoint that the store does not need. GCS still gets the folder marker, which pyarrow's GCS
    filesystem needs. Local storage keeps Ray Train's own copy.
    """
    import ray.train
    from pyarrow import fs

    filesystem = storage_filesystem(storage)
    if filesystem.type_name not in ("s3", "gcs"):
        return persist_checkpoint(storage, checkpoint, checkpoint_dir_name)
    destination = checkpoint_fs_path(storage, checkpoint_dir_name)
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
    storage = current_storage()
    started, delay, attempt = time.monotonic(), 1.0, 0
    while True:
        attempt += 1
        try:
            persisted = _persist(checkpoint, checkpoint_dir_name, storage)
            _verify_upload(checkpoint.path, storage_filesystem(storage), persisted.path)
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

