"""Remote jobs: submit a validated spec to a Ray cluster through the Jobs API, follow it, and fetch its adapter.

A remote job is the same run as a local `lorafleet submit`, started on the cluster's head by Ray's job supervisor:

- the client validates the spec, writes it as `spec.json` next to a copy of its data file, and submits that folder as
  the job's `working_dir` with the entrypoint `python -m lorafleet.remote.entrypoint spec.json`;
- on the cluster, the entrypoint calls [`~lorafleet.train.driver.run_job`] and prints one `LORAFLEET_STEP {...}` line per step
  and a final `LORAFLEET_SUMMARY {...}` line into the job's logs;
- the client reads those lines back: `--wait` drives the same progress view as a local run, `status` and `pull` find
  the adapter's URI in the summary line.

Every failure a user can cause (an unreachable address, a refused token, an unknown job id, a local model directory
that cannot be shipped) is a [`RemoteError`] with a one-line message; the CLI prints it and exits with code 2.

Authentication: Ray 2.60 clusters check a bearer token. The token is read from `RAY_AUTH_TOKEN`, the file named by
`RAY_AUTH_TOKEN_PATH`, or `~/.ray/auth_token` (where `ray start --head` writes it), and sent with every request.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from lorafleet.compat.ray import train_env
from lorafleet.data.sources import list_sources
from lorafleet.runstore.checkpoint import ADAPTER_FILES, INFO_FILE, check_adapter
from lorafleet.runstore.location import fetch_files

STEP_MARK = "LORAFLEET_STEP "


SUMMARY_MARK = "LORAFLEET_SUMMARY "


TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


# The interpreter that runs the entrypoint on the head; the cluster's own `python` unless told otherwise (e.g. a
# venv path when the cluster was started from one).
PYTHON_ENV = "LORAFLEET_REMOTE_PYTHON"


ProgressFn = Callable[[dict[str, Any]], None]


class RemoteError(RuntimeError):
    """A remote operation the user can fix (address, token, job id); the message is one line."""


def remote_address(address: Optional[str] = None) -> Optional[str]:
    """The Jobs API address to use, or `None` for a local run.

    `address` (the `--address` option) wins over `RAY_ADDRESS`; only `http://` and `https://` addresses mean the Jobs
    API (a `HOST:PORT` or `auto` address is a Ray cluster to join from this process, the local path).

    Example:

    ```python
    >>> remote_address("http://10.0.0.5:8265/")
    'http://10.0.0.5:8265'
    >>> remote_address("auto") is None
    True
    ```
    """
    value = address if address is not None else os.environ.get("RAY_ADDRESS")
    if value and value.strip().lower().startswith(("http://", "https://")):
        return value.strip().rstrip("/")
    return None


def auth_token() -> Optional[str]:
    """The Ray auth token this client sends: `RAY_AUTH_TOKEN`, else `RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token`."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0].strip() if text else type(exc).__name__


@contextlib.contextmanager
def _errors(address: str, job_id: Optional[str] = None) -> Iterator[None]:
    """Turn the Jobs SDK's exceptions into one-line [`RemoteError`]s that say what to do."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except RemoteError:
        raise
    except AuthenticationError as exc:
        if "required" in str(exc).lower():
            raise RemoteError(
                f"the Ray cluster at {address} requires an auth token: set RAY_AUTH_TOKEN (or ~/.ray/auth_token) "
                "to the cluster's token"
            ) from None
        raise RemoteError(
            f"the Ray cluster at {address} refused the auth token: set RAY_AUTH_TOKEN (or ~/.ray/auth_token) to the "
            "token in the head node's ~/.ray/auth_token"
        ) from None
    except (requests.exceptions.ConnectionError, ConnectionError, requests.exceptions.Timeout):
        raise RemoteError(
            f"cannot reach the Ray Jobs API at {address} (is the head up and the dashboard port open/forwarded?)"
        ) from None
    except RuntimeError as exc:
        text = str(exc)
        if job_id is not None and ("404" in text or "does not exist" in text):
            raise RemoteError(f"no job '{job_id}' on the Ray cluster at {address} (see `lorafleet list`)") from None
        raise RemoteError(f"Ray Jobs API at {address}: {_first_line(exc)}") from None


class RemoteClient:
    """A Jobs API client for one cluster, with token auth and one-line errors.

    Args:
        address (`str`, *optional*):
            The dashboard URL (`http://HEAD:8265`); defaults to `RAY_ADDRESS` when that is an http(s) URL.
        token (`str`, *optional*):
            The cluster's auth token; defaults to [`auth_token`].

    Example:

    ```python
    >>> client = RemoteClient("http://127.0.0.1:8265")  # doctest: +SKIP
    >>> [job["job_id"] for job in client.list()]  # doctest: +SKIP
    ['lorafleet-llama-tasks-1a2b3c4d']
    ```
    """

    def __init__(self, address: Optional[str] = None, token: Optional[str] = None):
        from ray.job_submission import JobSubmissionClient

        resolved = remote_address(address)
        if resolved is None:
            given = address if address is not None else os.environ.get("RAY_ADDRESS")
            raise RemoteError(
                f"--address: '{given}' is not a Ray dashboard URL (use http://HEAD:8265, or set RAY_ADDRESS to one)"
                if given
                else "--address: no cluster given (pass --address http://HEAD:8265 or set RAY_ADDRESS)"
            )
        self.address = resolved
        token = token or auth_token()
        headers = {"Authorization": f"Bearer {token}"} if token else None
        # The SDK lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override the address it is given; ours was already
        # resolved (--address first), so hide them while the client is built.
        hidden = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
        try:
            with _errors(self.address):
                self.client = JobSubmissionClient(self.address, headers=headers)
        finally:
            os.environ.update(hidden)

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def submit(self, spec: Any, submission_id: Optional[str] = None) -> str:
        """Ship `spec` (a validated [`~lorafleet.spec.JobSpec`]) and its data; return the job id."""
        return self._submit(spec, lambda folder: stage_job(spec, folder), {}, submission_id)

    def submit_sweep(self, sweep: Any, submission_id: Optional[str] = None) -> str:
        """Ship a sweep (a checked [`~lorafleet.sweep.space.Sweep`]) and its job's data; return the job id. On the
        cluster the entrypoint runs it with [`~lorafleet.sweep.runner.run_sweep`]."""
        return self._submit(sweep.job, lambda folder: stage_sweep(sweep, folder), {"lorafleet_kind": "sweep"},
                            submission_id, name=sweep.name)

    def _submit(
        self, spec: Any, stage: Callable[[Path], Path], metadata: dict[str, str], submission_id: Optional[str],
        name: Optional[str] = None,
    ) -> str:
        import logging

        # The SDK logs each package upload at INFO on stderr; the CLI already says what it submits.
        for logger_name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
            logging.getLogger(logger_name).setLevel(logging.WARNING)
        name = name or spec.name
        staging = Path(tempfile.mkdtemp(prefix="lorafleet-submit-"))
        try:
            shipped = stage(staging)
            job_id = submission_id or f"lorafleet-{name}-{uuid.uuid4().hex[:8]}"
            python = os.environ.get(PYTHON_ENV, "python")
            with _errors(self.address):
                return self.client.submit_job(
                    entrypoint=f"{python} -m lorafleet.remote.entrypoint {shipped.name}",
                    submission_id=job_id,
                    runtime_env={
                        "working_dir": str(staging),
                        # The Train runs view in the dashboard needs state tracking in the job's processes.
                        "env_vars": {"RAY_TRAIN_ENABLE_STATE_TRACKING": "1", "LORAFLEET_JOB_ID": job_id, **train_env()},
                    },
                    metadata={"lorafleet_job": name, "lorafleet_steps": str(spec.training.steps), **metadata},
                )
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def info(self, job_id: str) -> dict[str, Any]:
        """Status and metadata of a job (raises [`RemoteError`] for an unknown id)."""
        with _errors(self.address, job_id):
            details = self.client.get_job_info(job_id)
        return _details_dict(details)

    def logs(self, job_id: str) -> str:
        """The job's whole log so far (driver stdout and stderr)."""
        with _errors(self.address, job_id):
            return self.client.get_job_logs(job_id)

    def list(self) -> list[dict[str, Any]]:
        """All jobs the cluster knows, newest first."""
        with _errors(self.address):
            jobs = self.client.list_jobs()
        rows = [_details_dict(j) for j in jobs]
        return sorted(rows, key=lambda r: r.get("start_time") or 0, reverse=True)

    def stop(self, job_id: str) -> bool:
        """Ask the cluster to stop a job; `False` if it had already finished."""
        with _errors(self.address, job_id):
            self.client.get_job_info(job_id)  # a clear "no job" error instead of the SDK's generic one
            return bool(self.client.stop_job(job_id))

    def follow(
        self,
        job_id: str,
        on_progress: Optional[ProgressFn] = None,
        on_line: Optional[Callable[[str], None]] = None,
        poll_s: float = 1.0,
        timeout_s: Optional[float] = None,
        raw: bool = False,
    ) -> dict[str, Any]:
        """Read a job's logs until it ends, calling `on_progress` for each step line and `on_line` for other lines.

        With `raw`, `on_line` gets every line (the step and summary lines too), as `lorafleet logs --follow` shows them.

        Returns:
            `dict`: the job's [`info`] plus the run summary (`summary`, `None` if the run printed none).
        """
        offset, pending, summary = 0, "", None
        started = time.monotonic()
        while True:
            status = self.info(job_id)
            text = self.logs(job_id)
            # Logs only grow; a shorter text means the log was rotated or truncated, so start over.
            chunk = text[offset:] if len(text) >= offset else text
            offset = len(text)
            lines = (pending + chunk).split("\n")
            pending = lines.pop()  # an incomplete last line waits for the next poll
            if status["status"] in TERMINAL and pending:
                lines.append(pending)
                pending = ""
            for line in lines:
                kind, payload = parse_line(line)
                if kind == "summary":
                    summary = payload
                if kind == "step" and on_progress is not None:
                    on_progress(payload)
                elif on_line is not None and (raw or kind is None):
                    on_line(line)
            if status["status"] in TERMINAL:
                return {**status, "summary": summary}
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                raise RemoteError(f"job '{job_id}' did not finish within {timeout_s:.0f}s (still {status['status']})")
            time.sleep(poll_s)

    def summary(self, job_id: str) -> Optional[dict[str, Any]]:
        """The run summary a job printed (`adapter_uri`, losses, ...), or `None` if it has not printed one."""
        return summary_from_logs(self.logs(job_id))


def _details_dict(details: Any) -> dict[str, Any]:
    status = getattr(details.status, "value", details.status)
    metadata = dict(details.metadata or {})
    return {
        "job_id": details.submission_id or details.job_id,
        "status": str(status),
        "job": metadata.get("lorafleet_job"),
        "message": (details.message or "").strip().splitlines()[0] if details.message else "",
        "start_time": details.start_time,
        "end_time": details.end_time,
        "entrypoint": details.entrypoint,
    }


def parse_line(line: str) -> tuple[Optional[str], Any]:
    """Classify one log line: `("step", metrics)`, `("summary", summary)` or `(None, line)`.

    Example:

    ```python
    >>> parse_line('LORAFLEET_STEP {"step": 1, "loss": 2.5}')
    ('step', {'step': 1, 'loss': 2.5})
    >>> parse_line("some other log line")
    (None, 'some other log line')
    ```
    """
    for mark, kind in ((STEP_MARK, "step"), (SUMMARY_MARK, "summary")):
        at = line.find(mark)
        if at >= 0:
            try:
                return kind, json.loads(line[at + len(mark) :])
            except json.JSONDecodeError:
                return None, line
    return None, line


def summary_from_logs(text: str) -> Optional[dict[str, Any]]:
    """The last `LORAFLEET_SUMMARY` line of a job's logs, parsed."""
    found = None
    for line in text.splitlines():
        kind, payload = parse_line(line)
        if kind == "summary":
            found = payload
    return found


def stage_job(spec: Any, folder: Path) -> Path:
    """Write what a remote job needs into `folder`: `spec.json` and the data under `data/`.

    The spec's data path is rewritten relative to the folder, since the client's absolute paths mean nothing on the
    cluster. A local model directory is refused: models are not shipped with jobs (use a hub id, or `architecture`).

    Args:
        spec ([`~lorafleet.spec.JobSpec`]):
            The validated spec.
        folder (`Path`):
            An empty directory (the job's `working_dir`).

    Returns:
        `Path`: the written `spec.json`.

    Example:

    ```python
    >>> import tempfile
    >>> from pathlib import Path
    >>> from lorafleet.spec import load_spec
    >>> stage_job(load_spec("jobs/llama.yaml"), Path(tempfile.mkdtemp())).name
    'spec.json'
    ```
    """
    name = spec.model.name_or_path
    if name is not None and Path(name).is_absolute():
        raise RemoteError(
            f"model.name_or_path: the local directory {name} is not shipped to remote clusters; use a hub id or "
            "`model.architecture`, or run `lorafleet submit` on the cluster"
        )
    raw = json.loads(spec.model_dump_json())
    # The held-out file (`data.eval_path`) goes in a folder of its own: it may share the training file's name.
    for key, under in (("path", "data"), ("eval_path", "eval")):
        if raw["data"].get(key) is None or "://" in raw["data"][key]:
            continue  # an object-store prefix: the cluster reads it where it is
        data = Path(raw["data"][key])
        target = folder / under / data.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if any(c in str(data) for c in "*?["):
            # A glob's files go as a folder of shards, in the order the glob reads them.
            target = folder / under / "shards"
            for source in list_sources(str(data)):
                (target / source.name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source.path, target / source.name)
            raw["data"][key] = f"{under}/shards"
            continue
        if data.is_dir():
            shutil.copytree(data, target)
        else:
            shutil.copy2(data, target)
        raw["data"][key] = f"{under}/{data.name}"
    path = folder / "spec.json"
    path.write_text(json.dumps(raw, indent=2))
    return path


def stage_sweep(sweep: Any, folder: Path) -> Path:
    """Write what a remote sweep needs into `folder`: `sweep.json` (its section and job) and the job's data.

    Args:
        sweep ([`~lorafleet.sweep.space.Sweep`]):
            The checked sweep.
        folder (`Path`):
            An empty directory (the job's `working_dir`).

    Returns:
        `Path`: the written `sweep.json`.

    Example:

    ```python
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> from lorafleet.sweep.space import load_sweep
    >>> shipped = stage_sweep(load_sweep("jobs/sweep.yaml"), Path(tempfile.mkdtemp()))
    >>> shipped.name, json.loads(shipped.read_text())["job"]["data"]["path"]
    ('sweep.json', 'data/tasks.jsonl')
    ```
    """
    spec_json = stage_job(sweep.job, folder)
    shipped = {**sweep.to_json(), "job": json.loads(spec_json.read_text())}
    spec_json.unlink()
    path = folder / "sweep.json"
    path.write_text(json.dumps(shipped, indent=2))
    return path


def submit_remote(
    spec: Any,
    address: Optional[str] = None,
    wait: bool = False,
    on_progress: Optional[ProgressFn] = None,
    on_line: Optional[Callable[[str], None]] = None,
    on_submitted: Optional[Callable[[str], None]] = None,
) -> dict[str, Any]:
    """Submit a job to a Ray cluster through the Jobs API, and optionally follow it to the end.

    Args:
        spec ([`~lorafleet.spec.JobSpec`]):
            The validated spec; its data file is shipped with the job.
        address (`str`, *optional*):
            The dashboard URL (`http://HEAD:8265`); defaults to `RAY_ADDRESS`.
        wait (`bool`, *optional*, defaults to `False`):
            Follow the job's logs until it ends.
        on_progress (`Callable[[dict], None]`, *optional*):
            With `wait`: called with each step's metrics, as [`~lorafleet.train.driver.run_job`] does locally.
        on_line (`Callable[[str], None]`, *optional*):
            With `wait`: called with the job's other log lines.
        on_submitted (`Callable[[str], None]`, *optional*):
            Called with the job id once the cluster accepted the job (before following it).

    Returns:
        `dict`: `job_id`, `address`, `job`, `status`; with `wait`, also the run summary's fields (`first_loss`,
        `final_loss`, `steps`, `adapter_uri`, ...) and `error` when the run failed.

    Raises:
        [`RemoteError`]: unreachable address, refused token, a spec that cannot be shipped.

    Example:

    ```python
    >>> from lorafleet.spec import load_spec
    >>> spec = load_spec("jobs/llama.yaml", ["training.steps=50"])
    >>> out = submit_remote(spec, "http://127.0.0.1:8265", wait=True)  # doctest: +SKIP
    >>> out["status"], out["adapter_uri"]  # doctest: +SKIP
    ('SUCCEEDED', '/home/ray/.lorafleet/runs/llama-tasks/checkpoint_...')
    ```
    """
    client = RemoteClient(address)
    job_id = client.submit(spec)
    return _submitted(client, job_id, spec.name, wait, on_progress, on_line, on_submitted)


def submit_remote_sweep(
    sweep: Any,
    address: Optional[str] = None,
    wait: bool = False,
    on_line: Optional[Callable[[str], None]] = None,
    on_submitted: Optional[Callable[[str], None]] = None,
) -> dict[str, Any]:
    """Submit a sweep to a Ray cluster through the Jobs API (its trials run there on Ray Tune), optionally following it.

    Args:
        sweep ([`~lorafleet.sweep.space.Sweep`]):
            The checked sweep; its job's data file is shipped with it.
        address (`str`, *optional*):
            The dashboard URL (`http://HEAD:8265`); defaults to `RAY_ADDRESS`.
        wait (`bool`, *optional*, defaults to `False`):
            Follow the sweep's logs until it ends.
        on_line (`Callable[[str], None]`, *optional*):
            With `wait`: called with each log line (the trials' progress lines among them).
        on_submitted (`Callable[[str], None]`, *optional*):
            Called with the job id once the cluster accepted the sweep.

    Returns:
        `dict`: `job_id`, `address`, `job`, `status`; with `wait`, also the sweep summary's fields (`best`, `trials`,
        `metric`, ...; the sweep's own status as `sweep_status`).

    Example:

    ```python
    >>> from lorafleet.sweep.space import load_sweep
    >>> out = submit_remote_sweep(load_sweep("jobs/sweep.yaml"), "http://127.0.0.1:8265", wait=True)  # doctest: +SKIP
    >>> out["status"], out["best"]["trial"]  # doctest: +SKIP
    ('SUCCEEDED', 'trial-003')
    ```
    """
    client = RemoteClient(address)
    job_id = client.submit_sweep(sweep)
    return _submitted(client, job_id, sweep.name, wait, None, on_line, on_submitted)


def _submitted(
    client: RemoteClient,
    job_id: str,
    name: str,
    wait: bool,
    on_progress: Optional[ProgressFn],
    on_line: Optional[Callable[[str], None]],
    on_submitted: Optional[Callable[[str], None]],
) -> dict[str, Any]:
    """After a submission: say so, and with `wait` follow the job and merge its summary line into the result."""
    if on_submitted is not None:
        on_submitted(job_id)
    out: dict[str, Any] = {"job_id": job_id, "address": client.address, "job": name, "status": "PENDING"}
    if not wait:
        return out
    final = client.follow(job_id, on_progress=on_progress, on_line=on_line)
    summary = final.get("summary") or {}
    out.update({k: v for k, v in summary.items() if k != "status"})
    out["status"] = final["status"]
    if final["status"] != "SUCCEEDED" and not out.get("error"):
        out["error"] = final.get("message") or f"job {final['status'].lower()}"
    return out


def pull_adapter(job_id: str, dest: str | Path, address: Optional[str] = None) -> dict[str, Any]:
    """Download a finished job's adapter into `dest` and check that it loads.

    The adapter's location comes from the job's summary line. Object-store URIs (`s3://`, `gs://`) are read with
    pyarrow (credentials and endpoint from the environment, as for training); a local path works when it is
    reachable from here (same machine or a shared filesystem).

    Args:
        job_id (`str`):
            The job id `submit` printed.
        dest (`str` or `Path`):
            Directory to create (or an empty one) for the PEFT adapter.
        address (`str`, *optional*):
            The dashboard URL; defaults to `RAY_ADDRESS`.

    Returns:
        `dict`: `job_id`, `adapter_uri`, `dest`, `files` and `tensors` (number of adapter tensors).

    Example:

    ```python
    >>> pull_adapter("lorafleet-llama-tasks-1a2b3c4d", "./adapter", "http://127.0.0.1:8265")  # doctest: +SKIP
    ```
    """
    client = RemoteClient(address)
    info = client.info(job_id)
    summary = client.summary(job_id)
    uri = (summary or {}).get("adapter_uri")
    if not uri:
        raise RemoteError(f"job '{job_id}' has no adapter (status {info['status']}); see `lorafleet logs {job_id}`")
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise RemoteError(f"{dest}: destination exists and is not empty")
    files = copy_adapter(uri, dest, endpoint=(summary or {}).get("storage_endpoint"))
    tensors = verify_adapter(dest)
    return {"job_id": job_id, "adapter_uri": uri, "dest": str(dest), "files": files, "tensors": tensors}


def copy_adapter(uri: str, dest: Path, endpoint: Optional[str] = None) -> list[str]:
    """Copy the adapter files (and `lorafleet.json`, informational, if there) of a checkpoint at `uri` into `dest`;
    return their names."""
    try:
        return fetch_files(uri, (*ADAPTER_FILES, INFO_FILE), dest, endpoint=endpoint, optional=(INFO_FILE,))
    except FileNotFoundError as exc:
        if exc.filename == uri:
            raise RemoteError(
                f"adapter {uri} is not reachable from this machine (local disk of the cluster); "
                "store runs on s3:// or gs:// (checkpoint.storage) to pull them from elsewhere"
            ) from None
        raise RemoteError(f"adapter {uri} has no {exc.filename.rsplit('/', 1)[-1]}") from None
    except OSError as exc:
        raise RemoteError(f"cannot read {uri}: {_first_line(exc)}") from None


def verify_adapter(directory: str | Path) -> int:
    """Check that `directory` is a loadable PEFT LoRA adapter, its files as they were written (against the sizes and
    checksums in `lorafleet.json`, when the directory has it); return its tensor count.

    Example:

    ```python
    >>> verify_adapter("./adapter")  # doctest: +SKIP
    56
    ```
    """
    from peft import PeftConfig
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        check_adapter(directory)
        config = PeftConfig.from_pretrained(str(directory))
        tensors = load_file(str(directory / "adapter_model.safetensors"))
    except Exception as exc:  # noqa: BLE001 - any parse failure means a broken download
        raise RemoteError(f"{directory}: not a loadable PEFT adapter ({_first_line(exc)})") from None
    if not tensors or str(getattr(config, "peft_type", "")).upper().find("LORA") < 0:
        raise RemoteError(f"{directory}: adapter has no LoRA tensors")
    return len(tensors)

