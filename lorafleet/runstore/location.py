"""Where a run lives: [`RunLocation`], the one object derived from `checkpoint.storage`, the job name and the endpoint.

Everything that needs the run's folder asks it: Ray Train's `RunConfig` (storage path and filesystem), the driver
(URIs for people, orphan cleanup, `--fresh`, the write probe before a run starts, the latest checkpoint's
`lorafleet.json`, the reachability probe between retries), monitoring (`metrics.jsonl`,
`loss.png`) and `lorafleet report`. [`fetch_files`] reads a checkpoint's files by URI, for `lorafleet pull` and
`load_adapter`.

Object stores go through pyarrow filesystems (what Ray Train itself uses). Endpoint and credentials come from the
standard environment variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...) or `checkpoint.endpoint`; they are
never part of a path, so they never reach logs, summaries or checkpoints. [`storage_env`] names the variables a
joined cluster's workers are given.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Optional, Sequence
from urllib.parse import urlparse

from pyarrow import fs

from lorafleet.spec import JobSpec

METRICS_FILE = "metrics.jsonl"


PLOT_FILE = "loss.png"


# Files are copied in chunks of this size, as Ray Train copies checkpoints: an adapter never has to fit in memory.
_CHUNK = 64 * 1024 * 1024


# What [`RunLocation.write_problem`] writes (and deletes again) in a run folder: a name no run file has.
PROBE_PREFIX = ".lorafleet-write-probe-"


# The environment variables the storage clients read besides every `AWS_*` one: the GCS emulator (read by
# [`filesystem_for`]) and the Google credentials file (read by pyarrow's GCS client).
_STORAGE_ENV = ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS")


def storage_env() -> dict[str, str]:
    """The storage settings of this process's environment that a run's Ray processes need as well: every `AWS_*`
    variable (credentials, region, `AWS_ENDPOINT_URL`, profile), `STORAGE_EMULATOR_HOST` and
    `GOOGLE_APPLICATION_CREDENTIALS`.

    The driver hands them to a joined cluster's workers in the job's runtime environment; they hold credentials, so
    they go nowhere else (no spec, summary, log line or checkpoint). `checkpoint.endpoint` needs no variable: it
    travels with the spec and the run's filesystem object.

    Returns:
        `dict[str, str]`: The variables that are set, by name.

    Example:

    ```python
    >>> all(name.startswith("AWS_") or name in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS")
    ...     for name in storage_env())
    True
    >>> "PATH" in storage_env()
    False
    ```
    """
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_") or k in _STORAGE_ENV}


def storage_error_cause(exc: BaseException) -> str:
    """The cause of a storage error in a few words, for a one-line message: the OS's words for a local error
    (`Not a directory`), the error code and message of an object store's (`NO_SUCH_BUCKET: The specified bucket
    does not exist`), never the request ids and client details around them.

    Example:

    ```python
    >>> storage_error_cause(NotADirectoryError(20, "Cannot create directory '/x/f/runs'. Detail: [errno 20] ..."))
    'Not a directory'
    >>> storage_error_cause(OSError("When uploading object with key 'r/m' in bucket 'b': AWS Error NO_SUCH_BUCKET "
    ...                             "during PutObject operation: The specified bucket does not exist (Request ID: X)"))
    'NO_SUCH_BUCKET: The specified bucket does not exist'
    ```
    """
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    aws = re.search(r"AWS Error (\w+) during \w+ operation: (.*)", text)
    if aws:
        # The message ends with the request id, and a network error's with the client's own details.
        message = re.split(r" \(Request ID|; Details:", aws.group(2))[0].strip()
        return f"{aws.group(1)}: {message}" if message else aws.group(1)
    return text if len(text) <= 200 else text[:197] + "..."


def split_uri(uri: str) -> tuple[str, str]:
    """Split a storage URI into (scheme, path): `("s3", "bucket/prefix")`, `("", "/abs/path")` for local paths.

    Example:

    ```python
    >>> split_uri("s3://bucket/runs/"), split_uri("file:///tmp/runs")
    (('s3', 'bucket/runs'), ('', '/tmp/runs'))
    ```
    """
    if "://" not in uri:
        return "", str(Path(uri).expanduser().resolve())
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        return "", str(Path(parsed.path).resolve())
    return scheme, f"{parsed.netloc}{parsed.path}".rstrip("/")


def storage_endpoint(scheme: str, endpoint: Optional[str] = None) -> Optional[str]:
    """The object-store endpoint lorafleet's clients use for `scheme`: `endpoint` (`checkpoint.endpoint`) if given,
    else for `s3` `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`, for `gs` `STORAGE_EMULATOR_HOST`; `None`: the
    provider's own.

    Example:

    ```python
    >>> storage_endpoint("s3", "http://127.0.0.1:9000")
    'http://127.0.0.1:9000'
    >>> storage_endpoint("", "http://127.0.0.1:9000") is None
    True
    ```
    """
    if scheme == "":
        return None
    if endpoint:
        return endpoint
    if scheme == "s3":
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    # `STORAGE_EMULATOR_HOST` is how the Google clients (google-cloud-storage, gcsfs) are pointed at an emulator;
    # pyarrow's GCS client ignores it, so it is read here, with gcsfs's default of http when it has no scheme.
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "") if scheme == "gs" else ""
    if emulator:
        return emulator if "://" in emulator else f"http://{emulator}"
    return None


def filesystem_for(scheme: str, endpoint: Optional[str] = None) -> fs.FileSystem:
    """A pyarrow filesystem for a scheme of [`split_uri`]: local (`""`), `s3` or `gs`, configured from the
    environment (and `endpoint`)."""
    if scheme == "":
        return fs.LocalFileSystem()
    endpoint = storage_endpoint(scheme, endpoint)
    if scheme == "s3":
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
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs["endpoint_override"] = parsed.netloc
            kwargs["scheme"] = parsed.scheme or "https"
            # Google only serves GCS over https, so plain http is an emulator. It takes no credentials, and pyarrow's
            # default ones would first look for a token on Google's metadata server (minutes of retries off GCP).
            kwargs["anonymous"] = kwargs["scheme"] == "http"
        return fs.GcsFileSystem(**kwargs)
    raise ValueError(f"unsupported storage scheme {scheme!r}")


def folder_name(path: str) -> str:
    """The last component of a storage path (a checkpoint folder's name), however its filesystem spells the rest.

    Example:

    ```python
    >>> folder_name("bucket/runs/demo/checkpoint_000002/")
    'checkpoint_000002'
    ```
    """
    return path.rstrip("/").rsplit("/", 1)[-1]


def list_checkpoint_dirs(filesystem: fs.FileSystem, run_path: str) -> list[str]:
    """Paths of the `checkpoint_*` folders directly under a run folder, in name (= creation time) order.

    A folder that cannot be listed (storage away, no run yet) has none.
    """
    try:
        infos = filesystem.get_file_info(fs.FileSelector(run_path, allow_not_found=True))
    except OSError:
        return []
    return sorted(
        info.path for info in infos if info.type == fs.FileType.Directory and info.base_name.startswith("checkpoint_")
    )


@dataclass(frozen=True)
class RunLocation:
    """One run's folder in storage (`<storage>/<name>`) and everything derived from it.

    Build it once, from the spec ([`RunLocation.of`]) or, where there is no spec (`lorafleet report JOB`), from the
    storage URI and the job name. The pyarrow filesystem is created on first use; local storage gets a
    `LocalFileSystem`, so every method works the same on local disk and on object stores.

    Args:
        storage (`str`):
            The storage root: a local path, `file://`, `s3://bucket/prefix` or `gs://bucket/prefix`
            (`spec.storage_uri`, the default already filled in).
        name (`str`):
            The job name (the run's folder).
        endpoint (`str`, *optional*):
            `checkpoint.endpoint`: an S3-compatible server (defaults to `AWS_ENDPOINT_URL` if set) or a GCS emulator
            (defaults to `STORAGE_EMULATOR_HOST` if set; an `http://` endpoint is used without credentials).

    Example:

    ```python
    >>> from lorafleet.spec import load_spec
    >>> RunLocation.of(load_spec("jobs/llama.yaml", ["checkpoint.storage=s3://bucket/runs"])).uri
    's3://bucket/runs/llama-tasks'
    >>> location = RunLocation("s3://bucket/runs", "demo")
    >>> location.path, location.uri
    ('bucket/runs/demo', 's3://bucket/runs/demo')
    >>> location.display_uri("bucket/runs/demo/checkpoint_000002")
    's3://bucket/runs/demo/checkpoint_000002'
    >>> RunLocation("/tmp/lorafleet-doc-runs", "demo").artifacts()["plot"]
    '/tmp/lorafleet-doc-runs/demo/loss.png'
    ```
    """

    storage: str
    name: str
    endpoint: Optional[str] = None

    @classmethod
    def of(cls, spec: JobSpec) -> RunLocation:
        """The location of a spec's run: `spec.storage_uri` (`checkpoint.storage` or its default), `name` and
        `checkpoint.endpoint` (example in [`RunLocation`])."""
        return cls(spec.storage_uri, spec.name, spec.checkpoint.endpoint)

    @cached_property
    def _root(self) -> tuple[str, str]:
        return split_uri(self.storage)

    @property
    def scheme(self) -> str:
        """`s3`, `gs`, or `""` for local storage."""
        return self._root[0]

    @property
    def path(self) -> str:
        """The run folder's path on [`filesystem`] (no scheme: `bucket/prefix/name`, `/abs/path/name`)."""
        return f"{self._root[1].rstrip('/')}/{self.name}"

    @cached_property
    def filesystem(self) -> fs.FileSystem:
        """The pyarrow filesystem the run folder is on (`LocalFileSystem` for local storage)."""
        return filesystem_for(self.scheme, self.endpoint)

    @property
    def uri(self) -> str:
        """The run folder as a URI for people (a plain path for local storage)."""
        return self.display_uri(self.path)

    def ray_storage(self) -> tuple[str, Optional[fs.FileSystem]]:
        """The `(storage_path, storage_filesystem)` pair for Ray Train's `RunConfig`, which adds the run's name.

        Local storage is created here and passed without a filesystem (`None`): Ray Train handles local paths
        itself.

        Example:

        ```python
        >>> RunLocation("/tmp/lorafleet-doc-runs", "demo").ray_storage()
        ('/tmp/lorafleet-doc-runs', None)
        ```
        """
        root = self._root[1]
        if self.scheme == "":
            Path(root).mkdir(parents=True, exist_ok=True)
            return root, None
        return root, self.filesystem

    def display_uri(self, path: str) -> str:
        """Turn a path in this storage (what Ray Train reports: no scheme when a filesystem object is used) back into
        a URI."""
        return f"{self.scheme}://{path}" if self.scheme else path

    def artifacts(self) -> dict[str, str]:
        """Where the run's `metrics.jsonl` and `loss.png` are, as URIs (what `lorafleet report` prints).

        Returns:
            `dict`: `run_dir`, `metrics` and `plot` URIs.

        Example:

        ```python
        >>> RunLocation("s3://bucket/runs", "demo").artifacts()["metrics"]
        's3://bucket/runs/demo/metrics.jsonl'
        ```
        """
        run_dir = self.uri
        return {"run_dir": run_dir, "metrics": f"{run_dir}/{METRICS_FILE}", "plot": f"{run_dir}/{PLOT_FILE}"}

    def checkpoint_dirs(self) -> list[str]:
        """Paths of the run's `checkpoint_*` folders, oldest first ([`list_checkpoint_dirs`])."""
        return list_checkpoint_dirs(self.filesystem, self.path)

    def delete(self) -> bool:
        """Delete everything stored for the run (checkpoints, metrics and Ray Train's run snapshot), to start over.

        Returns:
            `bool`: Whether there was anything to delete.

        Example:

        ```python
        >>> RunLocation("/tmp/lorafleet-doc-runs", "never-ran").delete()
        False
        ```
        """
        if self.filesystem.get_file_info(self.path).type == fs.FileType.NotFound:
            return False
        self.filesystem.delete_dir(self.path)
        return True

    def reachable(self) -> bool:
        """Whether the storage answers (a lookup of the run folder does not fail); a missing folder is reachable."""
        try:
            self.filesystem.get_file_info(self.path)
            return True
        except OSError:
            return False

    def read(self, name: str) -> Optional[bytes]:
        """The bytes of the file `name` in the run folder, or `None` if it is missing or cannot be read.

        Raises:
            `OSError`: The storage's filesystem cannot be set up (e.g. bad credentials configuration).
        """
        filesystem = self.filesystem
        try:
            with filesystem.open_input_stream(f"{self.path}/{name}") as stream:
                return stream.read()
        except OSError:
            return None

    def write(self, name: str, data: bytes) -> None:
        """Write the file `name` in the run folder (replacing it)."""
        if self.scheme == "":
            # Object stores have no folders to create (pyarrow would add an empty marker object); local disk does.
            self.filesystem.create_dir(self.path, recursive=True)
        with self.filesystem.open_output_stream(f"{self.path}/{name}") as out:
            out.write(data)

    def write_problem(self) -> Optional[str]:
        """Why the run folder cannot be written, or `None` when it can: writes a small marker file there and deletes
        it again, as the run will write and prune checkpoints.

        A missing bucket, refused credentials, a local path under a file or without permission, an endpoint that does
        not answer: each is found here, before a job starts, instead of by its workers. (A local run folder is created
        on the way, as Ray Train would create it.)

        Returns:
            `str` or `None`: The cause in a few words ([`storage_error_cause`]), `None` if writing works.

        Example:

        ```python
        >>> RunLocation("/tmp/lorafleet-doc-runs", "demo").write_problem() is None
        True
        >>> open("/tmp/lorafleet-doc-file", "w").close()
        >>> RunLocation("/tmp/lorafleet-doc-file/runs", "demo").write_problem()
        'Not a directory'
        ```
        """
        marker = f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}"
        try:
            self.write(marker, b"lorafleet checks that it can write here; this file is deleted again\n")
        except (OSError, ValueError) as exc:  # ValueError: pyarrow's refusal of a malformed bucket name
            return storage_error_cause(exc)
        try:
            self.filesystem.delete_file(f"{self.path}/{marker}")
        except (OSError, ValueError) as exc:
            return f"a file can be written but not deleted ({storage_error_cause(exc)})"
        return None

    def latest_checkpoint_json(self, name: str) -> Optional[tuple[str, dict[str, Any]]]:
        """The newest checkpoint folder holding a readable JSON file `name`, and that file's content.

        With `lorafleet.json` (`lorafleet.runstore.checkpoint.INFO_FILE`): what a re-submitted job would resume from,
        its step and the fingerprint of the data it was trained on. (The name is passed in: this module stays free of
        the checkpoint module's torch import.)

        Args:
            name (`str`):
                A JSON file of a checkpoint folder.

        Returns:
            `tuple[str, dict]` or `None`: The folder's path on [`filesystem`] and the file's object; `None` when no
            checkpoint of the run has it.

        Example:

        ```python
        >>> RunLocation("/tmp/lorafleet-doc-runs", "never-ran").latest_checkpoint_json("lorafleet.json") is None
        True
        ```
        """
        for path in reversed(self.checkpoint_dirs()):
            try:
                with self.filesystem.open_input_stream(f"{path}/{name}") as stream:
                    content = json.loads(stream.read())
            except (OSError, ValueError):
                continue  # a checkpoint cut off before the file arrived: resume skips it too
            if isinstance(content, dict):
                return path, content
        return None


def fetch_files(
    uri: str,
    names: Sequence[str],
    dest: str | Path,
    endpoint: Optional[str] = None,
    optional: Sequence[str] = (),
) -> list[str]:
    """Download the files `names` of a storage folder (a checkpoint, by the URI a run printed) into a local folder.

    Args:
        uri (`str`):
            The folder: a local path, `file://`, `s3://...` or `gs://...` (e.g. a summary's `adapter_uri`).
        names (`Sequence[str]`):
            File names in the folder, copied in this order.
        dest (`str` or `Path`):
            The local folder to copy into (created if missing).
        endpoint (`str`, *optional*):
            Object-store endpoint, as for [`RunLocation`].
        optional (`Sequence[str]`, *optional*, defaults to `()`):
            Names that may be missing: skipped instead of an error.

    Returns:
        `list[str]`: The names copied.

    Raises:
        `FileNotFoundError`: A local folder that does not exist (`filename` is `uri`), or a missing file that is not
        optional (`filename` is `uri/name`).
        `OSError`: The storage could not be read.

    Example:

    ```python
    >>> import tempfile
    >>> source = Path(tempfile.mkdtemp())
    >>> _ = (source / "adapter_config.json").write_text("{}")
    >>> names = ["adapter_config.json", "lorafleet.json"]
    >>> fetch_files(str(source), names, tempfile.mkdtemp(), optional=["lorafleet.json"])
    ['adapter_config.json']
    ```
    """
    scheme, path = split_uri(uri)
    if scheme == "" and not Path(path).is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such folder", uri)
    filesystem = filesystem_for(scheme, endpoint)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in names:
        try:
            stream = filesystem.open_input_stream(f"{path}/{name}")
        except FileNotFoundError:
            if name in optional:
                continue
            raise FileNotFoundError(errno.ENOENT, "no such file", f"{uri.rstrip('/')}/{name}") from None
        with stream, open(dest / name, "wb") as out:
            shutil.copyfileobj(stream, out, _CHUNK)
        copied.append(name)
    return copied
