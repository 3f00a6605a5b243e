"""The service on Ray Serve: one deployment whose replica holds the database, runs the scheduler thread and serves
the FastAPI app (built in the replica by `__serve_build_asgi_app__`, after the constructor made the service).

[`run_service`] is `lorafleet api`: it starts Ray (an embedded local instance, or joins `--address`), deploys the
app, and blocks until Ctrl-C or SIGTERM, then deletes the app. The app shows in the Ray dashboard's Serve view; a
later inference deployment can join it.

Where the API answers: with the embedded instance, the replica itself serves HTTP on `host:port` (Serve's direct
ingress, `lorafleet.compat.ray` item 9) and Serve's proxy listens on a free port beside it; the proxy's hop cost
about half the throughput on 2 cores (bench/README.md). On a cluster (`--address`), the cluster's `ray start`
decides: with direct ingress on a one-port range equal to `--port`, likewise; otherwise Serve's proxy at `host:port`.

Jobs run as Ray jobs through the cluster's Jobs API (its dashboard URL, found from the Ray context), so they keep
running while the service restarts, and `lorafleet list/status/logs` show them. With the embedded Ray instance the
jobs end with the process; start the cluster with `ray start --head` and pass `--address` to keep them.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import urllib.error
import urllib.request
from typing import Any, Optional

from ray import serve

from lorafleet.compat.ray import cluster_direct_ingress, direct_ingress_env
from lorafleet.service.app import DEFAULT_MAX_UPLOAD, Service, create_app
from lorafleet.service.catalog import load_catalog
from lorafleet.service.db import Database, default_db_url
from lorafleet.service.files import FileStore
from lorafleet.service.scheduler import RayBackend, Scheduler, wait_for
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


def port_in_use(host: str, port: int) -> bool:
    """Whether `host:port` cannot be bound now (a process listens there, or a stopped server's connections linger).

    Example:

    ```python
    >>> with socket.socket() as taken:
    ...     taken.bind(("127.0.0.1", 0)); taken.listen()
    ...     port_in_use("127.0.0.1", taken.getsockname()[1])
    True
    ```
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # As uvicorn binds: connections in TIME_WAIT of a server that set SO_REUSEADDR too do not block the port.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def claim_port(host: str, port: int, timeout: float = 65.0) -> None:
    """Return once `host:port` can be bound: at once when it is free, after waiting when only connections of a
    previous server linger there in TIME_WAIT. Serve's direct-ingress listener does not set SO_REUSEADDR, so for ~60 s
    after a `lorafleet api` that served requests stops, no new server can bind its port.

    Args:
        host (`str`): The address to bind.
        port (`int`): The port.
        timeout (`float`, *optional*, defaults to 65.0): Seconds to wait for lingering connections.

    Raises:
        [`ServiceError`]: Another process listens on the port, or it stayed taken for `timeout` seconds.

    Example:

    ```python
    >>> with socket.socket() as taken:
    ...     taken.bind(("127.0.0.1", 0)); taken.listen()
    ...     claim_port("127.0.0.1", taken.getsockname()[1])
    Traceback (most recent call last):
    ...
    lorafleet.service.serve.ServiceError: --port ...: 127.0.0.1:... is already in use
    ```
    """
    if not port_in_use(host, port):
        return
    if port_listened(port):
        raise ServiceError(f"--port {port}: {host}:{port} is already in use")
    print(f"lorafleet: --port {port}: waiting for a previous server's connections to close (up to {timeout:.0f} s)",
          file=sys.stderr)
    if not wait_for(lambda: not port_in_use(host, port), timeout_s=timeout, poll_s=0.5):
        raise ServiceError(f"--port {port}: {host}:{port} stayed taken for {timeout:.0f} s")


def port_listened(port: int) -> bool:
    """Whether a process listens on TCP `port` (on any address); lingering connections of a stopped one do not count.

    Example:

    ```python
    >>> with socket.socket() as taken:
    ...     taken.bind(("127.0.0.1", 0)); taken.listen()
    ...     port_listened(taken.getsockname()[1])
    True
    ```
    """
    import psutil

    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
               for c in psutil.net_connections("tcp"))


def free_port(host: str) -> int:
    """A port on `host` that nothing listens on now (the kernel's pick), for Serve's proxy beside the API."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def answers(url: str) -> bool:
    """Whether `url` answers HTTP now (any status: `/v1/models` says 401 without a key)."""
    try:
        urllib.request.urlopen(f"{url}/models", timeout=5).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def run_service(
    host: str = "127.0.0.1", port: int = 8000, address: Optional[str] = None, config: Optional[dict[str, Any]] = None,
    on_ready=None, direct_ingress: bool = True,
) -> int:
    """Start Ray and the API on Serve, and block until Ctrl-C or SIGTERM; return the exit code.

    Args:
        host (`str`, *optional*, defaults to `"127.0.0.1"`):
            Where the API listens.
        port (`int`, *optional*, defaults to 8000):
            Its port: the Serve replica's own (direct ingress) with the embedded Ray instance, or on a cluster whose
            direct-ingress port it is; Serve's proxy's otherwise.
        address (`str`, *optional*):
            A Ray cluster to join (`auto`, `HOST:PORT`); default: an embedded local Ray instance.
        config (`dict`, *optional*):
            From [`service_config`].
        on_ready (`Callable[[str], None]`, *optional*):
            Called with the API's base URL once it answers.
        direct_ingress (`bool`, *optional*, defaults to `True`):
            With the embedded Ray instance: serve from the replica at `host:port` and put Serve's proxy on a free
            port (`False`: the proxy at `host:port`, as on a cluster without direct ingress).
    """
    import ray

    config = dict(config or service_config())
    stop = threading.Event()
    previous: dict[int, Any] = {}
    # The replica reads the same home (default storage, base models) as this process.
    env = {"LORAFLEET_HOME": str(lorafleet_home())}
    if os.environ.get("LORAFLEET_REMOTE_PYTHON"):
        env["LORAFLEET_REMOTE_PYTHON"] = os.environ["LORAFLEET_REMOTE_PYTHON"]
    direct = address is None and direct_ingress
    saved: dict[str, Optional[str]] = {}
    if direct:
        # The replica binds the port only once Ray and Serve are up; a taken port would fail there after retries.
        claim_port(host, port)
        # Read by Serve's controller and replica when they import Serve: they must be in the embedded instance's
        # environment, which its processes take from this one at ray.init.
        ingress_env = direct_ingress_env(port)
        saved = {name: os.environ.get(name) for name in ingress_env}
        os.environ.update(ingress_env)
    try:
        # "local": a new embedded instance even where `ray start` runs one on this machine (plain `ray.init()` would
        # join it), as `lorafleet submit` does.
        context = ray.init(address=address or "local", include_dashboard=True, dashboard_host="127.0.0.1",
                           log_to_driver=False)
    except Exception as exc:  # noqa: BLE001 - any start/join failure is one line for the user
        raise ServiceError(f"--address {address or '(embedded)'}: cannot start or join Ray: "
                           f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
    finally:
        # Only the embedded instance needed them; a later ray.init in this process (tests) starts clean.
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    try:
        dashboard = context.dashboard_url
        config["dashboard"] = dashboard if "://" in dashboard else f"http://{dashboard}"
        if address is not None:
            enabled, cluster_port = cluster_direct_ingress()
            direct = cluster_port == port
            if enabled and not direct:
                print(f"lorafleet: the cluster's Serve runs with direct ingress, on a port range other than --port "
                      f"{port} alone; the API answers through Serve's proxy at {host}:{port} (docs/api.md)",
                      file=sys.stderr)
        proxy_port = free_port(host) if direct else port
        serve.start(http_options={"host": host, "port": proxy_port})
        app = FineTuningAPI.options(ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": env}}).bind(config)
        serve.run(app, name=APP_NAME, route_prefix="/")
        # After Ray's start-up, which installs its own SIGTERM handler (the process would die without clean-up).
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        url = f"http://{host}:{port}/v1"
        if not wait_for(lambda: answers(url), timeout_s=60, poll_s=0.2):
            raise ServiceError(f"the API was deployed but does not answer at {url} (see the Serve logs under "
                               f"/tmp/ray/session_latest/logs/serve)")
        if direct:
            print(f"lorafleet: Serve's proxy at http://{host}:{proxy_port}/v1 (the API answers directly at {url})",
                  file=sys.stderr)
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
        if address is None and direct:
            # The replica's process can outlive ray.shutdown() by seconds. Its connections left in TIME_WAIT are not
            # waited for here: the next start does that (claim_port).
            wait_for(lambda: not port_listened(port), timeout_s=15, poll_s=0.2)
