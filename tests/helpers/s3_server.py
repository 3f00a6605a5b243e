"""A real S3 server on 127.0.0.1 for storage tests (moto's threaded server), behind the `s3_server` fixture of
tests/conftest.py.

[`running_s3_server`] sets the standard AWS variables in this process's environment for the module's duration, so the
driver, the embedded Ray instance it starts and its workers all reach the server the way a user's job reaches S3.
The credentials are fake but distinctive (`SECRET_KEY`) so tests can grep outputs and files for leaks.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import boto3
from moto.server import ThreadedMotoServer

from helpers.net import free_port

SECRET_KEY = "lorafleet-test-SECRET-9f3a7c1e"
ACCESS_KEY = "lorafleet-test-access"
BUCKET = "lorafleet-test-bucket"


@dataclass
class S3Server:
    """Handle on the running server: `endpoint`, `bucket`, a boto3 `client`; [`stop`], [`start`] and [`stop_at`]
    take it down and bring it back."""

    server: object
    endpoint: str
    bucket: str
    client: object
    _trigger: Optional[tuple[Callable[[str, str], bool], threading.Event]] = field(default=None, repr=False)
    _down: bool = field(default=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        self._wrap_app()

    def _wrap_app(self) -> None:
        # Every request passes here first, so an outage can start at an exact request rather than at whatever
        # moment a polling test notices (training steps of the tiny test model take less than a poll interval).
        app = self.server._server.app

        def gate(environ, start_response):
            trigger = self._trigger
            # Requests run on threads of their own, and a condition may hold its request: only the first match fires.
            if trigger is not None and trigger[0](environ["REQUEST_METHOD"], environ["PATH_INFO"]):
                with self._lock:
                    fire = self._trigger is trigger
                    if fire:
                        self._trigger, self._down = None, True
                if fire:
                    threading.Thread(target=lambda: (self.stop(), trigger[1].set()), daemon=True).start()
            if self._down:
                start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
                return [b"stopped by the test"]
            return app(environ, start_response)

        self.server._server.app = gate

    def stop_at(self, condition: Callable[[str, str], bool]) -> threading.Event:
        """Take the server down at the first request for which `condition(method, path)` is true.

        That request and any that arrive before the listener is closed get 503; after that connections are refused
        until [`start`]. `condition` runs on the request's thread and may block it, to hold a request until something
        else has happened. Set while the server is down, the trigger is in place from the first request after
        [`start`]. Returns an event that is set once the server is down.
        """
        stopped = threading.Event()
        self._trigger = (condition, stopped)
        return stopped

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under `prefix`."""
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def stop(self) -> None:
        """Take the server down: connections are refused until [`start`]; buckets and objects survive (moto keeps
        them in process memory)."""
        self.server.stop()
        # moto's stop() leaves the listening socket open (clients would hang instead of being refused) and bound
        # (a restart on the same port would fail): close it.
        self.server._server.server_close()

    def start(self) -> None:
        self.server.start()
        self._down = False
        self._wrap_app()


@contextmanager
def running_s3_server() -> Iterator[S3Server]:
    """Start moto's S3 server on a free 127.0.0.1 port with one bucket; AWS_* variables point at it until exit."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name="us-east-1"
    )
    client.create_bucket(Bucket=BUCKET)
    try:
        yield S3Server(server=server, endpoint=endpoint, bucket=BUCKET, client=client)
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
