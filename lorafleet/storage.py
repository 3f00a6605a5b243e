"""Run storage: turn `checkpoint.storage` into what Ray Train's `RunConfig` takes, and back into a URI for people.

Object stores go through pyarrow filesystems (what Ray Train itself uses). Endpoint and credentials come from the
standard environment variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...) or `checkpoint.endpoint`; they are
never part of a path, so they never reach logs, summaries or checkpoints.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse


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
            Endpoint override for S3-compatible servers; defaults to `AWS_ENDPOINT_URL` if set.

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
        return fs.S3FileSystem(**kwargs)
    if scheme == "gs":
        kwargs = {}
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs["endpoint_override"] = parsed.netloc
            kwargs["scheme"] = parsed.scheme or "https"
        return fs.GcsFileSystem(**kwargs)
    raise ValueError(f"unsupported storage scheme {scheme!r}")


def display_uri(storage_uri: str, path: str) -> str:
    """Turn a path Ray Train reports (no scheme when a filesystem object is used) back into a URI."""
    scheme, _ = split_uri(storage_uri)
    return f"{scheme}://{path}" if scheme else path
