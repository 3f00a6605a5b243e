"""The persistent queue: moves jobs `validating_files → queued → running → succeeded | failed | cancelled`.

Every state lives in the database, so the scheduler itself holds nothing that a restart could lose. Each
[`Scheduler.tick`]:

1. checks the training (and validation) files of `validating_files` jobs (a bad line fails the job with
   `invalid_training_file`, nothing is submitted), and queues the good ones;
2. stops on Ray the jobs a client cancelled while they ran;
3. polls every `running` job's Ray job (status and new log lines since the offset stored with the job): the step
   lines become `metrics` events, `trained_tokens` and `estimated_finish`; the summary line gives
   `fine_tuned_model`; Ray's end state gives ours;
4. admits queued jobs, highest priority first and first-come first-served within a priority, while the cluster
   has the resources their scaling asks for; a tenant at its `max_concurrent` is skipped (its jobs wait, others go),
   a job that does not fit stops the pass (no job overtakes a higher-priority one that waits for resources), unless
   it is larger than the whole cluster (it waits for the cluster to grow without holding back the others).

Start-up needs no special path: queued jobs are simply still queued, and running ones are matched against Ray's
job state by their Ray submission id, which is the job id (a job Ray does not know is submitted again, and Ray
refuses a second submission with the same id, so nothing runs twice).

It runs as a thread inside the Serve deployment's single replica rather than as a separate Ray actor: the
database is a local SQLite file that only one process should write, the loop is I/O-bound (a few Jobs API calls a
second), and a replica restart (a redeploy, a crash that Serve recovers) restarts the loop with it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Optional, Protocol

from lorafleet.remote.client import RemoteClient, RemoteError, parse_line
from lorafleet.service.db import Database, now
from lorafleet.service.files import FileStore, check_chat_file, new_id
from lorafleet.spec import spec_from_json

logger = logging.getLogger(__name__)


class Backend(Protocol):
    """Where jobs run: the Ray cluster (through [`RayBackend`]), or a fake in tests."""

    def total_resources(self) -> dict[str, float]: ...

    def submit(self, spec: Any, job_id: str) -> None: ...

    def info(self, job_id: str) -> Optional[dict[str, Any]]: ...

    def logs(self, job_id: str) -> str: ...

    def stop(self, job_id: str) -> None: ...


class RayBackend:
    """Jobs as Ray jobs, through the Jobs API of the cluster at `address` (its dashboard URL).

    Args:
        address (`str`):
            The dashboard URL, e.g. `http://127.0.0.1:8265`.
    """

    def __init__(self, address: str):
        self.client = RemoteClient(address)

    def total_resources(self) -> dict[str, float]:
        import ray

        return {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}

    def submit(self, spec: Any, job_id: str) -> None:
        try:
            self.client.submit(spec, submission_id=job_id)
        except RemoteError:
            # Ray refuses a second submission of an id (an earlier one reached Ray: a restart between submit and
            # record). Its error is a bare "status code 500" with a traceback, so ask Ray whether the job exists.
            if self.info(job_id) is None:
                raise

    def info(self, job_id: str) -> Optional[dict[str, Any]]:
        try:
            return self.client.info(job_id)
        except RemoteError as exc:
            if f"no job '{job_id}'" in str(exc):
                return None
            raise

    def logs(self, job_id: str) -> str:
        return self.client.logs(job_id)

    def stop(self, job_id: str) -> None:
        try:
            self.client.stop(job_id)
        except RemoteError as exc:
            if f"no job '{job_id}'" not in str(exc):
                raise


def add_event(db: Database, job_id: str, message: str, level: str = "info", kind: str = "message",
              data: Optional[dict[str, Any]] = None) -> None:
    """Record one `fine_tuning.job.event`."""
    db.insert("events", {"id": new_id("ftevent-"), "job_id": job_id, "created_at": now(), "level": level,
                         "message": message, "type": kind, "data": data})


def _fits(need: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in need.items())


class Scheduler:
    """The queue's loop over the database and a [`Backend`].

    Args:
        db ([`~lorafleet.service.db.Database`]):
            The service's database.
        files ([`~lorafleet.service.files.FileStore`]):
            Where uploaded files are.
        backend ([`Backend`]):
            Where jobs run.
        interval_s (`float`, *optional*, defaults to 1.0):
            Seconds between ticks of [`start`]'s thread.
    """

    def __init__(self, db: Database, files: FileStore, backend: Backend, interval_s: float = 1.0):
        self.db, self.files, self.backend, self.interval_s = db, files, backend, interval_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- the loop --------------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lorafleet-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(self.interval_s)

    def tick(self) -> None:
        """One pass: validate, stop cancelled, poll running, admit queued. A failing step is logged, the next runs."""
        for step in (self._validate, self._stop_cancelled, self._poll_running, self._admit):
            try:
                step()
            except Exception:  # noqa: BLE001 - the loop must outlive one bad pass (cluster briefly away, ...)
                logger.exception("scheduler: %s failed", step.__name__)

    # -- validating_files → queued | failed ------------------------------------------------------------------------

    def _validate(self) -> None:
        for job in self.db.rows("SELECT * FROM jobs WHERE status = 'validating_files' ORDER BY seq"):
            problem = None
            for param, file_id in (("training_file", job["training_file"]), ("validation_file", job["validation_file"])):
                if file_id is None:
                    continue
                row = self.db.row("SELECT uri FROM files WHERE id = ?", [file_id])
                if row is None:
                    problem = (param, f"{param} {file_id} was deleted before the job started")
                    break
                text, _ = check_chat_file(self.files.local_path(row["uri"]), file_id)
                if text is not None:
                    problem = (param, f"{param} {text}" if file_id in text else f"{param} {file_id}: {text}")
                    break
            if problem is not None:
                param, message = problem
                error = {"code": f"invalid_{param}", "message": message, "param": param}
                if self.db.update("jobs", job["id"], {"status": "failed", "error": error, "finished_at": now()},
                                  "status = 'validating_files'"):
                    add_event(self.db, job["id"], f"Validation failed: {message}", level="error")
                continue
            if self.db.update("jobs", job["id"], {"status": "queued"}, "status = 'validating_files'"):
                add_event(self.db, job["id"], "Files validated; the job is queued")

    # -- cancelled while running → stop the Ray job ----------------------------------------------------------------

    def _stop_cancelled(self) -> None:
        for job in self.db.rows("SELECT id FROM jobs WHERE cancel_requested = 1"):
            self.backend.stop(job["id"])
            self.db.update("jobs", job["id"], {"cancel_requested": 2})

    # -- running → succeeded | failed | cancelled ------------------------------------------------------------------

    def _poll_running(self) -> None:
        for job in self.db.rows("SELECT * FROM jobs WHERE status = 'running' ORDER BY seq"):
            info = self.backend.info(job["id"])
            if info is None:
                # Recorded as running but unknown to Ray: the service stopped between the two. Submit again (the
                # same submission id, so a submission that did reach Ray is refused, not duplicated).
                self.backend.submit(spec_from_json_dict(job["spec"]), job["id"])
                continue
            self._read_logs(job, info["status"])
            if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                self._finish(job["id"], info)

    def _read_logs(self, job: dict[str, Any], ray_status: str) -> None:
        text = self.backend.logs(job["id"])
        offset = job["log_offset"] if len(text) >= job["log_offset"] else 0
        chunk = text[offset:]
        # An unfinished last line waits for the next poll, unless the job has ended.
        end = len(chunk) if ray_status in ("SUCCEEDED", "FAILED", "STOPPED") else chunk.rfind("\n") + 1
        if end <= 0:
            return
        total = job["spec"]["training"]["steps"]
        tokens = job["trained_tokens"] or 0
        updates: dict[str, Any] = {"log_offset": offset + end}
        events = []
        for line in chunk[:end].splitlines():
            kind, payload = parse_line(line)
            if kind == "step":
                step = int(payload.get("step", 0))
                tokens += int(round(payload.get("tokens_per_s", 0.0) * payload.get("step_time_s", 0.0)))
                data = {"step": step, "total_steps": total, "train_loss": payload.get("loss"),
                        "learning_rate": payload.get("lr")}
                if payload.get("eval_loss") is not None:
                    data["valid_loss"] = payload["eval_loss"]
                events.append((f"Step {step}/{total}: training loss={payload.get('loss', float('nan')):.4f}",
                               "metrics", data))
                if payload.get("step_time_s"):
                    updates["estimated_finish"] = now() + int((total - step) * payload["step_time_s"])
            elif kind == "summary":
                updates["fine_tuned_model"] = payload.get("adapter_uri")
                if payload.get("error"):
                    updates["error"] = {"code": "training_failed", "message": str(payload["error"]), "param": None}
        updates["trained_tokens"] = tokens
        with self.db.transaction():
            for message, kind, data in events:
                add_event(self.db, job["id"], message, kind=kind, data=data)
            self.db.update("jobs", job["id"], updates, "status = 'running'")

    def _finish(self, job_id: str, info: dict[str, Any]) -> None:
        job = self.db.row("SELECT * FROM jobs WHERE id = ?", [job_id])
        ray_status = info["status"]
        if ray_status == "SUCCEEDED" and job["fine_tuned_model"]:
            values = {"status": "succeeded", "finished_at": now(), "estimated_finish": None, "error": None}
            message, level = f"The job has successfully completed: {job['fine_tuned_model']}", "info"
        elif ray_status == "STOPPED":
            values = {"status": "cancelled", "finished_at": now(), "estimated_finish": None}
            message, level = "The job was stopped on the cluster", "warn"
        else:
            error = job["error"] or {"code": "training_failed", "param": None,
                                     "message": info.get("message") or f"the Ray job ended {ray_status.lower()}"}
            values = {"status": "failed", "finished_at": now(), "estimated_finish": None, "error": error}
            message, level = f"The job failed: {error['message']}", "error"
        with self.db.transaction():
            if self.db.update("jobs", job_id, values, "status = 'running'"):
                add_event(self.db, job_id, message, level=level)

    # -- queued → running ------------------------------------------------------------------------------------------

    def _admit(self) -> None:
        queued = self.db.rows("SELECT * FROM jobs WHERE status = 'queued' ORDER BY priority DESC, seq ASC")
        if not queued:
            return
        running = self.db.rows("SELECT tenant, demand FROM jobs WHERE status = 'running'")
        total = dict(self.backend.total_resources())
        free = dict(total)
        per_tenant: dict[str, int] = {}
        for job in running:
            per_tenant[job["tenant"]] = per_tenant.get(job["tenant"], 0) + 1
            for key, amount in job["demand"].items():
                free[key] = free.get(key, 0.0) - amount
        quotas = {t["name"]: t["max_concurrent"] for t in self.db.rows("SELECT name, max_concurrent FROM tenants")}
        for job in queued:
            if per_tenant.get(job["tenant"], 0) >= quotas.get(job["tenant"], 1):
                continue
            if not _fits(job["demand"], total):
                continue  # larger than the whole cluster: it waits for the cluster to grow, without blocking others
            if not _fits(job["demand"], free):
                break
            if not self.db.update("jobs", job["id"], {"status": "running", "started_at": now()}, "status = 'queued'"):
                continue
            try:
                self.backend.submit(spec_from_json_dict(job["spec"]), job["id"])
            except Exception as exc:  # noqa: BLE001 - one refused job must not block the queue
                error = {"code": "submission_failed", "message": str(exc).splitlines()[0], "param": None}
                self.db.update("jobs", job["id"], {"status": "failed", "error": error, "finished_at": now()})
                add_event(self.db, job["id"], f"The cluster refused the job: {error['message']}", level="error")
                continue
            add_event(self.db, job["id"], "Fine-tuning job started on the cluster")
            per_tenant[job["tenant"]] = per_tenant.get(job["tenant"], 0) + 1
            for key, amount in job["demand"].items():
                free[key] = free.get(key, 0.0) - amount


def spec_from_json_dict(raw: dict[str, Any]) -> Any:
    """The [`~lorafleet.spec.JobSpec`] of a stored spec (stored as `JobSpec.model_dump(mode="json")`)."""
    return spec_from_json(json.dumps(raw))


def wait_for(predicate, timeout_s: float = 10.0, poll_s: float = 0.05) -> bool:
    """Poll `predicate` until it is true or `timeout_s` passes; return its last value (tests and the CLI use it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return bool(predicate())
