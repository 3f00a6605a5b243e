"""The HTTP API: OpenAI's files, fine-tuning jobs and models endpoints, as a FastAPI app.

[`create_app`] builds the app around a [`Service`] (database, file store, model catalog). It needs no Ray: the
scheduler that runs jobs is started by the Serve deployment (`lorafleet.service.serve`), so the app is testable
with FastAPI's `TestClient`.

Errors are OpenAI's error objects, `{"error": {"message", "type", "param", "code"}}`, with its status codes: 400
`invalid_request_error` (bad JSON, wrong types, unknown fields, a bad spec field), 401 (no or wrong key), 404
(unknown id, another tenant's id, unknown model), 413 (upload too large). Nothing answers with a traceback.
"""

from __future__ import annotations

import codecs
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Optional

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorafleet.runstore.location import RunLocation
from lorafleet.runstore.monitoring import read_metrics
from lorafleet.service.auth import Principal, authenticate
from lorafleet.service.catalog import BaseModel
from lorafleet.service.db import Database, now
from lorafleet.service.files import FileStore, new_id
from lorafleet.service.jobs import (
    FINISHED,
    CreateJob,
    RequestError,
    build_spec,
    demand,
    event_object,
    file_object,
    job_object,
)
from lorafleet.service.scheduler import add_event
from lorafleet.spec import lorafleet_home

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD = 512 * 1024 * 1024


@dataclass
class Service:
    """What the routes work on: the database, the file store, the `models.yaml` catalog, the upload limit."""

    db: Database
    files: FileStore
    catalog: dict[str, BaseModel]
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD


class APIError(Exception):
    """An error the API answers with an OpenAI error object."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.kind)


def error_response(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    """An OpenAI error object with its status code.

    Example:

    ```python
    >>> error_response(404, "No such file: file-1", code="not_found").body
    b'{"error":{"message":"No such file: file-1","type":"invalid_request_error","param":null,"code":"not_found"}}'
    ```
    """
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def plain(content: Any) -> JSONResponse:
    """A response for content that is already plain JSON (dicts, lists, str, numbers, None), as the routes build it.

    FastAPI passes a returned dict through `jsonable_encoder`, which walks every value in Python again (half of a
    job list's CPU in the replica, bench/README.md); returning the response skips that walk, with the same bytes.

    Example:

    ```python
    >>> plain({"object": "list", "data": []}).body
    b'{"object":"list","data":[]}'
    ```
    """
    return JSONResponse(content)


def _not_found(kind: str, object_id: str) -> APIError:
    # The same answer for an id that does not exist and for another tenant's: no existence leak.
    return APIError(404, f"No such {kind}: {object_id}", code=f"{kind.replace(' ', '_')}_not_found")


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, Optional[str]]:
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "form")]
    # Pydantic tags union members (`int`, `literal['auto']`); they name a type, not a request field.
    loc = [p for p in loc if not (p.startswith(("literal[", "function-")) or p in ("int", "float", "str"))]
    param = ".".join(loc) or None
    kind, msg = first.get("type", ""), first.get("msg", "invalid value")
    if kind == "json_invalid":
        return f"We could not parse the JSON body of your request: {first.get('ctx', {}).get('error', msg)}", None
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if kind == "missing":
        return f"Missing required parameter: '{param}'.", param
    return f"Invalid value for '{param}': {msg}", param


class UploadLimit:
    """ASGI middleware: refuse an oversized upload by its declared length, before the multipart body is read and
    spooled to disk (a body without a length is still cut at the limit by the route).

    Plain ASGI rather than `@app.middleware("http")`: Starlette's `BaseHTTPMiddleware` runs every request, reads
    included, through an extra task and a pair of memory streams, for a check that concerns only `POST /v1/files`.

    Args:
        app (`ASGIApp`):
            The app it wraps.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/").endswith("/files"):
            service = getattr(scope["app"].state, "service", None) or _SERVICE.get("service")
            declared = Headers(scope=scope).get("content-length", "")
            # Multipart framing adds a few hundred bytes around the file.
            if service is not None and declared.isdigit() and int(declared) > service.max_upload_bytes + 16384:
                response = error_response(413, f"File too large: the limit is {service.max_upload_bytes} bytes",
                                          param="file", code="file_too_large")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(service: Optional[Service] = None) -> FastAPI:
    """The API's FastAPI app.

    Args:
        service ([`Service`], *optional*):
            What the routes work on. Without it, [`set_service`] provides it later (the Serve deployment builds the
            service in its replica, after the app was imported).

    Returns:
        `FastAPI`: the app.

    Example:

    ```python
    >>> import tempfile
    >>> from fastapi.testclient import TestClient
    >>> from lorafleet.service.catalog import load_catalog
    >>> home = tempfile.mkdtemp()
    >>> service = Service(Database(f"sqlite:///{home}/api.db"), FileStore(home), load_catalog())
    >>> TestClient(create_app(service)).get("/v1/models").status_code
    401
    ```
    """
    # Reads and the auth dependency are `async`: each is a few sub-millisecond SQLite queries, cheaper inline on the
    # event loop than a hop through the thread pool (measured: see bench/README.md, api_load.py). Writes that parse a
    # spec or touch storage stay sync, in the pool.
    app = FastAPI(title="lorafleet fine-tuning API", version="1")
    if service is not None:
        app.state.service = service

    app.add_middleware(UploadLimit)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(exc.errors()) or [{}])
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "The server had an error while processing your request.", kind="server_error")

    async def svc(request: Request) -> Service:
        found = getattr(request.app.state, "service", None) or _SERVICE.get("service")
        if found is None:
            raise APIError(503, "The service is starting; retry in a moment.", kind="server_error")
        return found

    async def principal(request: Request, service: Service = Depends(svc)) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        who = authenticate(service.db, key) if scheme.lower() == "bearer" else None
        if who is None:
            raise APIError(401, "Incorrect API key provided. Create one with `lorafleet api keys create --tenant NAME`.",
                           code="invalid_api_key")
        return who

    def owned(who: Principal) -> tuple[str, list[Any]]:
        return ("1 = 1", []) if who.admin else ("tenant = ?", [who.tenant])

    def get_job(service: Service, who: Principal, job_id: str) -> dict[str, Any]:
        where, params = owned(who)
        row = service.db.row(f"SELECT * FROM jobs WHERE id = ? AND {where}", [job_id, *params])
        if row is None:
            raise _not_found("fine-tuning job", job_id)
        return row

    def get_file(service: Service, who: Principal, file_id: str, param: Optional[str] = None) -> dict[str, Any]:
        where, params = owned(who)
        row = service.db.row(f"SELECT * FROM files WHERE id = ? AND deleted = 0 AND {where}", [file_id, *params])
        if row is None:
            if param is not None:
                raise APIError(400, f"invalid {param}: no such file {file_id}", param=param, code="invalid_file")
            raise _not_found("file", file_id)
        return row

    def page(service: Service, table: str, rows_sql: str, params: list[Any], after: Optional[str], limit: int,
             render) -> JSONResponse:
        """A list page, newest first: `after` is the last id of the previous page."""
        if after is not None:
            # Looked up within the same list (tenant, job): another tenant's id is as unknown here as a made-up one.
            anchor = service.db.row(f"SELECT seq FROM ({rows_sql}) WHERE id = ?", [*params, after])
            if anchor is None:
                raise APIError(400, f"invalid after: {after} is not in this list", param="after")
            rows_sql += " AND seq < ?"
            params = [*params, anchor["seq"]]
        found = service.db.rows(f"{rows_sql} ORDER BY seq DESC LIMIT ?", [*params, limit + 1])
        data = [render(row) for row in found[:limit]]
        return plain({"object": "list", "data": data, "has_more": len(found) > limit,
                      "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})

    def limit_param(limit: int) -> int:
        if limit < 1 or limit > 100:
            raise APIError(400, "limit must be between 1 and 100", param="limit")
        return limit

    # -- files -----------------------------------------------------------------------------------------------------

    @app.post("/v1/files")
    async def upload_file(request: Request, file: UploadFile = File(...), purpose: str = Form(...),
                          service: Service = Depends(svc), who: Principal = Depends(principal)):
        if purpose != "fine-tune":
            raise APIError(400, f"Invalid purpose '{purpose}': this service accepts 'fine-tune' files",
                           param="purpose", code="invalid_purpose")
        data = await file.read(service.max_upload_bytes + 1)
        if len(data) > service.max_upload_bytes:
            raise APIError(413, f"File too large: the limit is {service.max_upload_bytes} bytes", param="file",
                           code="file_too_large")
        if not data.strip():
            raise APIError(400, "The file is empty: upload a JSONL file of {\"messages\": [...]} records",
                           param="file", code="empty_file")
        _check_jsonl_head(data)
        file_id = new_id("file-")
        uri = service.files.put(file_id, data)
        name = (file.filename or "upload.jsonl").replace("/", "_").replace("\\", "_")[:255]
        row = {"id": file_id, "tenant": who.tenant, "filename": name, "purpose": purpose, "bytes": len(data),
               "uri": uri, "created_at": now()}
        service.db.insert("files", row)
        return file_object(row)

    @app.get("/v1/files")
    async def list_files(purpose: Optional[str] = None, after: Optional[str] = None, limit: int = Query(100),
                   service: Service = Depends(svc), who: Principal = Depends(principal)):
        where, params = owned(who)
        sql = f"SELECT * FROM files WHERE deleted = 0 AND {where}"
        if purpose is not None:
            sql, params = sql + " AND purpose = ?", [*params, purpose]
        return page(service, "files", sql, params, after, limit_param(limit), file_object)

    @app.get("/v1/files/{file_id}")
    async def retrieve_file(file_id: str, service: Service = Depends(svc), who: Principal = Depends(principal)):
        return plain(file_object(get_file(service, who, file_id)))

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str, service: Service = Depends(svc), who: Principal = Depends(principal)):
        row = get_file(service, who, file_id)
        return Response(service.files.get(row["uri"]), media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str, service: Service = Depends(svc), who: Principal = Depends(principal)):
        row = get_file(service, who, file_id)
        service.db.execute("UPDATE files SET deleted = 1 WHERE id = ?", [file_id])
        service.files.delete(row["uri"])
        return {"id": file_id, "object": "file", "deleted": True}

    # -- fine-tuning jobs ------------------------------------------------------------------------------------------

    @app.post("/v1/fine_tuning/jobs")
    def create_job(body: CreateJob, service: Service = Depends(svc), who: Principal = Depends(principal)):
        base = service.catalog.get(body.model)
        if base is None:
            raise APIError(404, f"The model '{body.model}' does not exist or you do not have access to it.",
                           param="model", code="model_not_found")
        if body.integrations:
            raise APIError(400, "integrations are not supported by this service", param="integrations")
        if body.metadata is not None and len(body.metadata) > 16:
            raise APIError(400, "metadata: at most 16 keys", param="metadata")
        training = get_file(service, who, body.training_file, param="training_file")
        validation = (get_file(service, who, body.validation_file, param="validation_file")
                      if body.validation_file else None)
        for param, row in (("training_file", training), ("validation_file", validation)):
            if row is not None and row["purpose"] != "fine-tune":
                raise APIError(400, f"{param} {row['id']} has purpose '{row['purpose']}', not 'fine-tune'",
                               param=param, code="invalid_file")
        priority = _priority(body.metadata, service, who)
        job_id = new_id("ftjob-")
        try:
            spec = build_spec(body, base, job_id, service.files.local_path(training["uri"]),
                              service.files.local_path(validation["uri"]) if validation else None)
        except RequestError as exc:
            raise APIError(400, exc.message, param=exc.param, code=exc.code) from None
        row = {"id": job_id, "tenant": who.tenant, "model": body.model, "status": "validating_files",
               "priority": priority, "training_file": body.training_file, "validation_file": body.validation_file,
               "request": body.model_dump(mode="json", exclude_none=True), "spec": spec.model_dump(mode="json"),
               "demand": demand(spec), "created_at": now(), "trained_tokens": 0}
        with service.db.transaction():
            service.db.insert("jobs", row)
            add_event(service.db, job_id, f"Created fine-tuning job: {job_id}")
        return job_object(service.db.row("SELECT * FROM jobs WHERE id = ?", [job_id]))

    @app.get("/v1/fine_tuning/jobs")
    async def list_jobs(after: Optional[str] = None, limit: int = Query(20), service: Service = Depends(svc),
                  who: Principal = Depends(principal)):
        where, params = owned(who)
        return page(service, "jobs", f"SELECT * FROM jobs WHERE {where}", params, after, limit_param(limit), job_object)

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    async def retrieve_job(job_id: str, service: Service = Depends(svc), who: Principal = Depends(principal)):
        return plain(job_object(get_job(service, who, job_id)))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(job_id: str, service: Service = Depends(svc), who: Principal = Depends(principal)):
        job = get_job(service, who, job_id)
        if job["status"] in FINISHED:
            raise APIError(400, f"Job {job_id} has already {job['status']} and cannot be cancelled",
                           code="job_not_cancellable")
        was = job["status"]
        # A job that reached Ray is stopped there by the scheduler (cancel_requested = 1), even after a restart.
        values = {"status": "cancelled", "finished_at": now(), "estimated_finish": None,
                  "cancel_requested": 1 if was == "running" else 0}
        with service.db.transaction():
            if service.db.update("jobs", job_id, values, "status = ?", [was]):
                add_event(service.db, job_id, "The job was cancelled", level="warn")
        return job_object(get_job(service, who, job_id))

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def list_events(job_id: str, after: Optional[str] = None, limit: int = Query(20),
                    service: Service = Depends(svc), who: Principal = Depends(principal)):
        get_job(service, who, job_id)
        return page(service, "events", "SELECT * FROM events WHERE job_id = ?", [job_id], after, limit_param(limit),
                    event_object)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def list_checkpoints(job_id: str, after: Optional[str] = None, limit: int = Query(10),
                         service: Service = Depends(svc), who: Principal = Depends(principal)):
        job = get_job(service, who, job_id)
        items = checkpoint_objects(job)
        if after is not None:
            ids = [c["id"] for c in items]
            if after not in ids:
                raise APIError(400, f"invalid after: {after} is not in this list", param="after")
            items = items[ids.index(after) + 1:]
        limit = limit_param(limit)
        data = items[:limit]
        return plain({"object": "list", "data": data, "has_more": len(items) > limit,
                      "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})

    # -- models ----------------------------------------------------------------------------------------------------

    def model_objects(service: Service, who: Principal) -> list[dict[str, Any]]:
        out = [{"id": m.name, "object": "model", "created": m.created, "owned_by": "lorafleet"}
               for m in service.catalog.values()]
        where, params = owned(who)
        for row in service.db.rows(f"SELECT fine_tuned_model, finished_at, tenant FROM jobs WHERE status = "
                                   f"'succeeded' AND fine_tuned_model IS NOT NULL AND {where} ORDER BY seq",
                                   params):
            out.append({"id": row["fine_tuned_model"], "object": "model", "created": row["finished_at"] or 0,
                        "owned_by": row["tenant"]})
        return out

    @app.get("/v1/models")
    async def list_models(service: Service = Depends(svc), who: Principal = Depends(principal)):
        return plain({"object": "list", "data": model_objects(service, who)})

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str, service: Service = Depends(svc), who: Principal = Depends(principal)):
        for model in model_objects(service, who):
            if model["id"] == model_id:
                return plain(model)
        raise APIError(404, f"The model '{model_id}' does not exist or you do not have access to it.",
                       param="model", code="model_not_found")

    return app


def _priority(metadata: Optional[dict[str, str]], service: Service, who: Principal) -> int:
    if metadata and "priority" in metadata:
        try:
            return int(metadata["priority"])
        except ValueError:
            raise APIError(400, "metadata.priority: an integer, higher runs first", param="metadata.priority") from None
    tenant = service.db.row("SELECT priority FROM tenants WHERE name = ?", [who.tenant])
    return tenant["priority"] if tenant else 0


def _check_jsonl_head(data: bytes) -> None:
    """Refuse at upload what cannot be a JSONL file at all (the full check runs when a job validates its files)."""
    try:
        # Incremental, not final: a multi-byte character cut at the 64 KiB boundary is fine, bad bytes are not.
        text = codecs.getincrementaldecoder("utf-8")().decode(data[:65536], final=len(data) <= 65536)
    except UnicodeDecodeError:
        raise APIError(400, "The file is not UTF-8 text: upload JSONL (one JSON object per line)",
                       param="file", code="invalid_file_format") from None
    if "\n" not in text.lstrip() and len(data) > 65536:
        return  # a first line longer than the head: judged whole when the job validates the file
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        record = json.loads(first)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise APIError(400, "The file is not JSONL: line 1 is not a JSON object (expected {\"messages\": [...]} "
                       "per line)", param="file", code="invalid_file_format")


def checkpoint_objects(job: dict[str, Any]) -> list[dict[str, Any]]:
    """A job's checkpoints, newest first, as OpenAI's `fine_tuning.job.checkpoint` objects.

    Steps come from each checkpoint's `lorafleet.json`; losses from the run's `metrics.jsonl` (`train_loss` at that
    step; `valid_loss` when the job has a validation file), or, while the run is still going (no `metrics.jsonl`
    yet), from `lorafleet.json`.
    """
    spec = job["spec"]
    location = RunLocation(spec["checkpoint"]["storage"] or _default_storage(), spec["name"],
                           spec["checkpoint"].get("endpoint"))
    records = {int(r["step"]): r for r in read_metrics(location) if "step" in r}
    out = []
    for path in location.checkpoint_dirs():
        try:
            with location.filesystem.open_input_stream(f"{path}/lorafleet.json") as src:
                info = json.loads(src.read())
        except (OSError, ValueError):
            continue  # a checkpoint still being written, or damaged: not listed
        step = int(info.get("step", 0))
        record = records.get(step, {})
        metrics: dict[str, Any] = {"step": float(step)}
        loss = record.get("loss", info.get("loss"))
        if loss is not None and math.isfinite(float(loss)):
            metrics["train_loss"] = float(loss)
        if job.get("validation_file") and record.get("eval_loss") is not None:
            metrics["valid_loss"] = float(record["eval_loss"])
            metrics["full_valid_loss"] = float(record["eval_loss"])
        uri = location.display_uri(path)
        try:
            created = int(location.filesystem.get_file_info(f"{path}/lorafleet.json").mtime.timestamp())
        except (OSError, AttributeError):
            created = int(time.time())
        out.append({"id": f"ftckpt-{job['id'].removeprefix('ftjob-')}-{step}", "object": "fine_tuning.job.checkpoint",
                    "created_at": created, "fine_tuned_model_checkpoint": uri, "fine_tuning_job_id": job["id"],
                    "metrics": metrics, "step_number": step})
    out.sort(key=lambda c: c["step_number"], reverse=True)
    return out


def _default_storage() -> str:
    return str(lorafleet_home() / "runs")


_SERVICE: dict[str, Service] = {}


def set_service(service: Service) -> None:
    """Provide the [`Service`] to apps created without one (the Serve replica does this in its constructor)."""
    _SERVICE["service"] = service


__all__ = ["APIError", "Service", "create_app", "error_response", "set_service"]
