"""The service on Ray Serve: one deployment whose replica holds the database, runs the scheduler thread and serves
the FastAPI app (built in the replica by `__serve_build_asgi_app__`, after the constructor made the service).

[`run_service`] is `lorafleet api`: it starts Ray (an embedded local instance, or joins `--address`), deploys the
app on Serve's HTTP proxy at `host:port`, and blocks until Ctrl-C or SIGTERM, then deletes the app. The app shows
in the Ray dashboard's Serve view; a later inference deployment can join it.

Jobs run as Ray jobs through the cluster's Jobs API (its dashboard URL, found from the Ray context), so they keep
running while the service restarts, and `lorafleet list/status/logs` show them. With the embedded Ray instance the
jobs end with the process; start the cluster with `ray start --head` and pass `--address` to keep them.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Optional

from ray import serve

from lorafleet.service.app import DEFAULT_MAX_UPLOAD, Service, create_app
from lorafleet.service.catalog import load_catalog
from lorafleet.service.db import Database, default_db_url
from lorafleet.service.files import FileStore
from lorafleet.service.scheduler import RayBackend, Scheduler
from lorafleet.spec import lorafleet_home

APP_NAME = "lorafleet-api"


class ServiceError(RuntimeError):
    """The service cannot start (Ray unreachable, refused token); the message is one line."""


@serve.deployment(
    name="FineTuningAPI",
    num_replicas=1,
    # One replica: it is the only writer of the SQLite file and runs the only scheduler. It takes no CPU from the
    # training jobs that the scheduler admits by counting the cluster's CPUs.
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=256,
)
@serve.ingress()
class FineTuningAPI:
    """The Serve deployment: builds the [`~lorafleet.service.app.Service`] and starts the scheduler.

    Args:
        config (`dict`):
            `db`, `storage`, `models`, `max_upload_bytes`, `dashboard` (the Jobs API URL) and `interval_s`.
    """

    def __init__(self, config: dict[str, Any]):
        db = Database(config["db"])
        files = FileStore(config["storage"])
        self.service = Service(db, files, load_catalog(config["models"]), config["max_upload_bytes"])
        self.scheduler = Scheduler(db, files, RayBackend(config["dashboard"]), interval_s=config["interval_s"])
        self.scheduler.start()

    def __serve_build_asgi_app__(self):
        return create_app(self.service)

    def __del__(self):
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.stop()


def service_config(
    db: Optional[str] = None, models: Optional[str] = None, storage: Optional[str] = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD, dashboard: str = "", interval_s: float = 1.0,
) -> dict[str, Any]:
    """The deployment's config, with defaults filled in and checked here (a bad `models.yaml` or database is one
    error line before Ray starts).

    Example:

    ```python
    >>> import tempfile
    >>> config = service_config(db=f"sqlite:///{tempfile.mkdtemp()}/api.db")
    >>> sorted(config)
    ['dashboard', 'db', 'interval_s', 'max_upload_bytes', 'models', 'storage']
    ```
    """
    config = {
        "db": db or default_db_url(),
        "models": os.path.abspath(models) if models else None,
        "storage": storage or str(lorafleet_home() / "api"),
        "max_upload_bytes": int(max_upload_bytes),
        "dashboard": dashboard,
        "interval_s": float(interval_s),
    }
    load_catalog(config["models"])
    Database(config["db"]).close()
    return config


def run_service(
    host: str = "127.0.0.1", port: int = 8000, address: Optional[str] = None, config: Optional[dict[str, Any]] = None,
    on_ready=None,
) -> int:
    """Start Ray and the API on Serve, and block until Ctrl-C or SIGTERM; return the exit code.

    Args:
        host (`str`, *optional*, defaults to `"127.0.0.1"`):
            Where Serve's HTTP proxy listens.
        port (`int`, *optional*, defaults to 8000):
            Its port.
        address (`str`, *optional*):
            A Ray cluster to join (`auto`, `HOST:PORT`); default: an embedded local Ray instance.
        config (`dict`, *optional*):
            From [`service_config`].
        on_ready (`Callable[[str], None]`, *optional*):
            Called with the API's base URL once it answers.
    """
    import ray

    config = dict(config or service_config())
    stop = threading.Event()
    previous: dict[int, Any] = {}
    # The replica reads the same home (default storage, base models) as this process.
    env = {"LORAFLEET_HOME": str(lorafleet_home())}
    if os.environ.get("LORAFLEET_REMOTE_PYTHON"):
        env["LORAFLEET_REMOTE_PYTHON"] = os.environ["LORAFLEET_REMOTE_PYTHON"]
    try:
        # "local": a new embedded instance even where `ray start` runs one on this machine (plain `ray.init()` would
        # join it), as `lorafleet submit` does.
        context = ray.init(address=address or "local", include_dashboard=True, dashboard_host="127.0.0.1",
                           log_to_driver=False)
    except Exception as exc:  # noqa: BLE001 - any start/join failure is one line for the user
        raise ServiceError(f"--address {address or '(embedded)'}: cannot start or join Ray: "
                           f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
    try:
        dashboard = context.dashboard_url
        config["dashboard"] = dashboard if "://" in dashboard else f"http://{dashboard}"
        serve.start(http_options={"host": host, "port": port})
        app = FineTuningAPI.options(ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": env}}).bind(config)
        serve.run(app, name=APP_NAME, route_prefix="/")
        # After Ray's start-up, which installs its own SIGTERM handler (the process would die without clean-up).
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        url = f"http://{host}:{port}/v1"
        if on_ready is not None:
            on_ready(url)
        while not stop.wait(0.5):
            pass
        fate = "keep running on the cluster" if address else "stop with the embedded Ray instance"
        print(f"lorafleet: stopping the API ({APP_NAME}); running jobs {fate}", file=sys.stderr)
        serve.delete(APP_NAME)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        ray.shutdown()
