"""A throwaway Ray cluster for tests: `ray start` head (and extra nodes) on free ports, torn down by process id.

Several engineers and CI jobs run Ray on the same machine, so nothing here may use Ray's default ports or `ray stop`
(which kills every Ray process of the user): each node gets its own ports and temp dir, and teardown kills only the
processes whose command line names that temp dir, plus their children.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import psutil
import requests

from helpers.net import free_port

RAY = str(Path(sys.executable).parent / "ray")


def can_hide_folders() -> bool:
    """Whether this machine lets a process mount over a folder in a mount namespace of its own (root in a container,
    as CI runs), which `add_node(hide=...)` needs."""
    if shutil.which("unshare") is None:
        return False
    probe = tempfile.mkdtemp(prefix="lf-hide-probe-")
    try:
        command = ["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs", "probe", probe]
        return subprocess.run(command, capture_output=True).returncode == 0
    finally:
        shutil.rmtree(probe, ignore_errors=True)


class LocalRayCluster:
    """`ray start --head` (+ `add_node`) with isolated ports and temp dir.

    Args:
        auth (`bool`): token auth on (a fresh random token, in `self.token`) or `RAY_AUTH_MODE=disabled`.
        num_cpus (`int`): CPUs of the head.
        lorafleet_home (`str`): `LORAFLEET_HOME` of the cluster's processes (where remote runs are stored).
    """

    def __init__(
        self, auth: bool = True, num_cpus: int = 2, lorafleet_home: Optional[str] = None, head_ip: str = "127.0.0.1"
    ):
        self.temp_dir = tempfile.mkdtemp(prefix="lfray", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.token = secrets.token_hex(16) if auth else None
        self.head_ip = head_ip
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.metrics_port = free_port()
        # The test session's home by default: the cluster reuses base models the session already materialized.
        self.lorafleet_home = (
            lorafleet_home or os.environ.get("LORAFLEET_HOME") or tempfile.mkdtemp(prefix="lf-cluster-home-")
        )
        self.env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "LORAFLEET_HOME": self.lorafleet_home,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token" if auth else "disabled",
            # Report metrics every second instead of every 10 s, so tests see them quickly.
            "RAY_metrics_report_interval_ms": "1000",
        }
        self.env.pop("RAY_ADDRESS", None)
        if self.token:
            self.env["RAY_AUTH_TOKEN"] = self.token
        else:
            self.env.pop("RAY_AUTH_TOKEN", None)
        self._start(
            "--head",
            f"--port={self.gcs_port}",
            f"--num-cpus={num_cpus}",
            f"--node-ip-address={head_ip}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--metrics-export-port={self.metrics_port}",
            f"--ray-client-server-port={free_port()}",
        )
        self._wait_dashboard()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"{self.head_ip}:{self.gcs_port}"

    def client_env(self) -> dict:
        """Environment for a lorafleet client process talking to this cluster."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
        env["LORAFLEET_REMOTE_PYTHON"] = sys.executable
        # An unused token file, so the developer's own ~/.ray/auth_token never leaks into a test.
        env["RAY_AUTH_TOKEN_PATH"] = str(Path(self.temp_dir) / "no-token")
        if self.token:
            env["RAY_AUTH_TOKEN"] = self.token
        return env

    def _start(self, *args: str, attempt: int = 0, env: Optional[dict] = None, hide: Sequence[str] = ()) -> None:
        ports = [
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
        ]
        temp = [f"--temp-dir={self.temp_dir}"] if "--head" in args else []
        command = [RAY, "start", *args, *ports, *temp, "--disable-usage-stats"]
        if hide:
            # A mount namespace of the node's own (its raylet and workers inherit it), with an empty tmpfs over each
            # hidden folder: this node cannot see what lives only on the head's disk, as on another machine.
            mounts = " && ".join(f"mount -t tmpfs -o size=1m lorafleet-hidden {shlex.quote(h)}" for h in hide)
            command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                       f"{mounts} && exec {shlex.join(command)}"]
        result = subprocess.run(command, env=env or self.env, capture_output=True, text=True, timeout=180)
        if result.returncode != 0 and "timed out during startup" in result.stderr and attempt == 0:
            # `ray start` waits a fixed 30 s for the raylet to register; on a loaded 2-core CI box that is sometimes
            # too short. Start over once, on fresh ports.
            if "--head" in args:
                self.shutdown()
                self.gcs_port, self.dashboard_port, self.metrics_port = free_port(), free_port(), free_port()
                stale = ("--port=", "--dashboard-port=", "--metrics-export-port=")
                args = tuple(a for a in args if not a.startswith(stale))
                args += (f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
                         f"--metrics-export-port={self.metrics_port}")
            return self._start(*args, attempt=1, env=env, hide=hide)
        if result.returncode != 0:
            self.shutdown()
            raise RuntimeError(f"ray start failed:\n{result.stdout}\n{result.stderr[-3000:]}")

    def add_node(self, node_ip: str, num_cpus: int = 1, lorafleet_home: Optional[str] = None,
                 hide: Sequence[str] = ()) -> None:
        """Join a worker node (its own raylet) with a different node IP, e.g. 127.0.0.2.

        Args:
            node_ip (`str`): The node's IP address.
            num_cpus (`int`, *optional*, defaults to 1): Its CPUs.
            lorafleet_home (`str`, *optional*): `LORAFLEET_HOME` of its processes (default: the head's).
            hide (`Sequence[str]`, *optional*): Folders the node must not see (needs mount namespaces:
                [`can_hide_folders`]).
        """
        env = dict(self.env, LORAFLEET_HOME=lorafleet_home) if lorafleet_home else None
        self._start(f"--address={self.gcs_address}", f"--node-ip-address={node_ip}", f"--num-cpus={num_cpus}",
                    env=env, hide=hide)

    def _wait_dashboard(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.address}/api/version", headers=headers, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        self.shutdown()
        raise RuntimeError(f"Ray dashboard at {self.address} did not come up")

    def _processes(self) -> list[psutil.Process]:
        mine = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(self.temp_dir in part for part in proc.info["cmdline"] or []):
                    mine.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        family = {p.pid: p for p in mine}
        for proc in mine:
            try:
                for child in proc.children(recursive=True):
                    family.setdefault(child.pid, child)
            except psutil.NoSuchProcess:
                continue
        return list(family.values())

    def shutdown(self) -> None:
        """Kill this cluster's processes (by pid: never `ray stop`, which would stop other people's Ray too)."""
        procs = self._processes()
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)  # session logs and unpacked working dirs

