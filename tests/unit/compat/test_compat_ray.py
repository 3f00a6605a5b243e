"""One test per Ray assumption of `lorafleet.compat.ray` (checked on ray 2.60.0). The Ray Train items run without a
cluster: a `StorageContext` is built directly on a temporary folder, as Ray's own doctests build one. The cluster
messages of item 8 come from a real embedded Ray instance in a subprocess, and so does item 10's Train run.

Each failure message names the assumption, so a Ray upgrade that breaks one says which workaround to revisit.
"""

import dataclasses
import json
import inspect
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import ray.train

from lorafleet.compat import ray as compat

CHECKED = "lorafleet.compat.ray item {}, checked 2.60.0"


@pytest.fixture
def storage(tmp_path):
    try:
        from ray.train.v2._internal.execution.storage import StorageContext
    except ImportError as exc:
        raise AssertionError(
            f"ray: ray.train.v2._internal.execution.storage.StorageContext moved ({CHECKED.format(1)})"
        ) from exc
    return StorageContext(storage_path=str(tmp_path / "runs"), experiment_dir_name="run")


def test_get_storage_returns_the_workers_storage_context(storage, monkeypatch):
    from ray.train.v2._internal.execution import context as internal
    from ray.train.v2.api.context import DistributedTrainContext

    fields = [f.name for f in dataclasses.fields(internal.TrainContext)]
    assert "storage_context" in fields and internal.TrainContext.get_storage(
        SimpleNamespace(storage_context=storage)
    ) is storage, (
        f"ray: the worker's internal TrainContext no longer hands out its `storage_context` from get_storage() "
        f"({CHECKED.format(1)}): fields {fields}"
    )
    # The public context of a worker delegates to the internal one; lorafleet reaches it through get_context().
    monkeypatch.setattr(internal, "_train_context", SimpleNamespace(get_storage=lambda: storage))
    monkeypatch.setattr(ray.train, "get_context", DistributedTrainContext)
    assert compat.current_storage() is storage, (
        f"ray: ray.train.get_context().get_storage() no longer returns the worker's StorageContext "
        f"({CHECKED.format(1)})"
    )


def test_storage_filesystem_is_the_runs_pyarrow_filesystem(storage):
    from pyarrow import fs

    assert isinstance(getattr(storage, "storage_filesystem", None), fs.FileSystem), (
        f"ray: StorageContext.storage_filesystem is gone or not a pyarrow filesystem ({CHECKED.format(2)})"
    )
    assert compat.storage_filesystem(storage).type_name == "local"


def test_build_checkpoint_path_from_name_is_in_the_run_folder(storage):
    assert hasattr(storage, "build_checkpoint_path_from_name"), (
        f"ray: StorageContext.build_checkpoint_path_from_name is gone ({CHECKED.format(2)})"
    )
    path = compat.checkpoint_fs_path(storage, "checkpoint_000001")
    assert path == f"{storage.storage_fs_path}/run/checkpoint_000001", (
        f"ray: StorageContext.build_checkpoint_path_from_name no longer gives <storage>/<run>/<name> "
        f"({CHECKED.format(2)}): {path}"
    )


def test_persist_current_checkpoint_copies_the_files(storage, tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    (local / "adapter_model.safetensors").write_bytes(b"\x01" * 100)
    assert hasattr(storage, "persist_current_checkpoint"), (
        f"ray: StorageContext.persist_current_checkpoint is gone ({CHECKED.format(2)})"
    )
    persisted = compat.persist_checkpoint(storage, ray.train.Checkpoint(str(local)), "checkpoint_000001")
    assert persisted.path == compat.checkpoint_fs_path(storage, "checkpoint_000001"), (
        f"ray: StorageContext.persist_current_checkpoint stored elsewhere than build_checkpoint_path_from_name "
        f"({CHECKED.format(2)}): {persisted.path}"
    )
    stored = persisted.filesystem.get_file_info(f"{persisted.path}/adapter_model.safetensors")
    assert stored.size == 100, f"ray: persist_current_checkpoint did not copy the files ({CHECKED.format(2)})"


def test_health_check_interval_setting_reaches_the_controller():
    try:
        from ray.train.v2._internal import constants
    except ImportError as exc:
        raise AssertionError(f"ray: ray.train.v2._internal.constants moved ({CHECKED.format(3)})") from exc
    name = getattr(constants, "HEALTH_CHECK_INTERVAL_S_ENV_VAR", None)
    assert name in compat.TRAIN_ENV, (
        f"ray: the controller's poll interval is no longer set by {sorted(compat.TRAIN_ENV)} ({CHECKED.format(3)}): "
        f"{name}"
    )
    assert name in constants.ENV_VARS_TO_PROPAGATE, (
        f"ray: {name} is no longer passed from the driver to the controller ({CHECKED.format(3)})"
    )
    # The setting only helps while Ray polls less often than lorafleet asks for.
    assert constants.DEFAULT_HEALTH_CHECK_INTERVAL_S > float(compat.TRAIN_ENV[name]), (
        f"ray: the default poll interval is now {constants.DEFAULT_HEALTH_CHECK_INTERVAL_S} s; lorafleet's "
        f"{name}={compat.TRAIN_ENV[name]} would slow it down ({CHECKED.format(3)})"
    )


def test_keep_best_keeps_the_best_and_the_latest(storage):
    import asyncio

    try:
        from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
        from ray.train.v2._internal.execution.training_report import _TrainingReport
    except ImportError as exc:
        raise AssertionError(f"ray: the Train V2 CheckpointManager moved ({CHECKED.format(5)})") from exc
    from pathlib import Path

    manager = CheckpointManager(compat.checkpoint_config(1, "eval_loss"), storage)
    folders = {}

    async def register(step: int, eval_loss: float) -> None:
        path = compat.checkpoint_fs_path(storage, f"checkpoint_{step:06d}")
        Path(path).mkdir(parents=True)
        folders[step] = Path(path)
        checkpoint = ray.train.Checkpoint(path=path, filesystem=storage.storage_filesystem)
        manager.register_checkpoint(_TrainingReport(checkpoint, {"step": step, "eval_loss": eval_loss}, False))

    def kept() -> list[int]:
        return sorted(step for step, path in folders.items() if path.exists())

    async def scenario() -> list[list[int]]:
        seen = []
        for step, loss in ((2, 1.0), (4, 3.0), (6, 2.5), (8, 0.5)):
            await register(step, loss)
            seen.append(kept())
        return seen

    seen = asyncio.run(scenario())
    # keep=1: the best by eval_loss (lowest) plus the latest, whatever its score; a worse older one goes.
    assert seen == [[2], [2, 4], [2, 6], [8]], (
        f"ray: CheckpointConfig(num_to_keep=1, checkpoint_score_attribute='eval_loss', order 'min') no longer keeps "
        f"the best plus the latest checkpoint ({CHECKED.format(5)}): kept after each report {seen}"
    )
    best = [r.metrics["step"] for r in manager.best_checkpoint_results]
    assert best == [8] and manager.latest_checkpoint_result.metrics["step"] == 8, (
        f"ray: best_checkpoint_results / latest_checkpoint_result changed ({CHECKED.format(5)}): {best}"
    )


def test_node_start_timeout_is_recognized_by_its_message():
    import inspect

    import ray._private.node

    source = inspect.getsource(ray._private.node.Node.__init__)
    assert compat.NODE_START_TIMEOUT in source and "raylet_start_wait_time_s = 30" in source, (
        f"ray: Node.__init__ no longer raises 'The current node {compat.NODE_START_TIMEOUT}' after a fixed 30 s "
        f"({CHECKED.format(6)}): review lorafleet.train.driver.start_ray's retry"
    )


def test_stop_child_processes_stops_what_this_process_started():
    # In a process of its own: the test session's own children (servers of other tests) are not this test's to stop.
    script = (
        "import subprocess\n"
        "from lorafleet.compat.ray import stop_child_processes\n"
        "procs = [subprocess.Popen(['sleep', '60']) for _ in range(2)]\n"
        "import psutil\n"
        "print(stop_child_processes(timeout=5), sum(psutil.pid_exists(p.pid) for p in procs))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["2", "0"], result.stdout + result.stderr  # two stopped, none left


def test_cluster_messages_reach_the_driver_through_print_to_stdstream_on_stdout():
    from ray._private import worker

    source = inspect.getsource(worker.listen_error_messages)
    assert "print_to_stdstream(" in source and '"pid": "raylet"' in source and '"is_err": False' in source, (
        f"ray: the driver's error listener no longer prints through print_to_stdstream as pid 'raylet' on stdout "
        f"({CHECKED.format(8)}): review cluster_messages_to_stderr"
    )


def test_a_cluster_message_goes_to_stderr_and_stdout_keeps_only_our_lines(tmp_path):
    # A real embedded Ray started as lorafleet starts it, and a real message published to every driver.
    # The listener thread delivers the message when it gets to it (seconds under load): the script waits until its
    # stderr saw it (30 s at most), and the assertions read what reached the real streams.
    script = (
        "import sys, time, ray\n"
        "from ray._private import utils, worker\n"
        "from lorafleet.train.cluster import start_ray\n"
        "class Seen:\n"
        "    def __init__(self, inner): self.inner, self.text = inner, ''\n"
        "    def write(self, text): self.text += text; return self.inner.write(text)\n"
        "    def __getattr__(self, name): return getattr(self.inner, name)\n"
        "sys.stderr = seen = Seen(sys.stderr)\n"
        "start_ray()\n"
        "utils.push_error_to_driver(worker.global_worker, 'lorafleet_test', 'a-cluster-message')\n"
        "deadline = time.monotonic() + 30\n"
        "while 'a-cluster-message' not in seen.text and time.monotonic() < deadline:\n"
        "    time.sleep(0.1)\n"
        "time.sleep(0.5)\n"
        "print('{\"last\": true}')\n"
        "ray.shutdown()\n"
    )
    env = {**os.environ, "LORAFLEET_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == '{"last": true}\n', result.stdout
    assert "a-cluster-message" in result.stderr, (
        f"the message never reached the driver ({CHECKED.format(8)}): {result.stderr[-2000:]}"
    )


def test_direct_ingress_env_gives_serve_exactly_the_one_port():
    # Serve reads these when its constants module is imported: a fresh interpreter with the environment set, as
    # the controller and replica processes of an embedded instance are.
    port = 8123
    script = (
        "from ray.serve._private import constants\n"
        "from ray.serve._private.node_port_manager import NoAvailablePortError, PortAllocator\n"
        "allocator = PortAllocator(constants.RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT,\n"
        "                          constants.RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT, 'HTTP', 'node')\n"
        "first = allocator.allocate('replica-1')\n"
        "try:\n"
        "    allocator.allocate('replica-2'); second = 'allocated'\n"
        "except NoAvailablePortError:\n"
        "    second = 'none-left'\n"
        "allocator.release('replica-1', first)\n"
        "again = allocator.allocate('replica-3')\n"
        "print(constants.RAY_SERVE_ENABLE_DIRECT_INGRESS, first, second, again,\n"
        "      constants.RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S, constants.RAY_SERVE_PORT_QUARANTINE_S,\n"
        "      constants.RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD)\n"
    )
    env = {**{k: v for k, v in os.environ.items() if k != compat.THROUGHPUT_OPTIMIZED}, **compat.direct_ingress_env(port)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, (
        f"ray: Serve's direct-ingress constants or PortAllocator moved ({CHECKED.format(9)}): {result.stderr[-2000:]}"
    )
    assert result.stdout.split() == ["True", str(port), "none-left", str(port), "0.0", "0.0", "False"], (
        f"ray: the direct-ingress variables no longer give one replica exactly port {port}, reusable at once after "
        f"a release, with no drain wait, the app on the replica's own loop ({CHECKED.format(9)}): {result.stdout}"
    )
    assert compat.direct_ingress_port(env) == port


def test_lorafleet_api_answers_on_its_port_from_the_replica(tmp_path):
    # The real thing: `lorafleet api` with its embedded Ray and Serve; the API must answer on --port, and Serve's
    # proxy elsewhere (without direct ingress the proxy would hold --port and the replica no port at all).
    import psutil
    import requests
    from helpers.net import free_port

    port = free_port()
    env = {**os.environ, "LORAFLEET_HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "lorafleet.cli", "api", "--port", str(port), "--db",
                             f"sqlite:///{tmp_path}/api.db"], stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "API ready" in line or proc.poll() is not None:
                break
        log = "".join(lines)
        assert "API ready" in log, log[-3000:]
        found = re.search(r"Serve's proxy at http://127\.0\.0\.1:(\d+)/v1", log)
        assert found is not None and int(found.group(1)) != port, log[-3000:]
        proxy = int(found.group(1))
        assert requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).status_code == 401
        assert requests.get(f"http://127.0.0.1:{proxy}/v1/models", timeout=10).status_code == 401
        listeners = {c.pid for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port}
        names = [psutil.Process(pid).name() for pid in listeners if pid]
        assert any("ServeRepli" in name for name in names), (
            f"ray: --port {port} is not served by the Serve replica itself ({CHECKED.format(9)}): {names}"
        )
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
        # RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=0: without it deleting the app waits 30 s for a load
        # balancer that is not there.
        assert proc.returncode == 0 and time.monotonic() - started < 25, (
            f"stopping took {time.monotonic() - started:.0f} s ({CHECKED.format(9)})"
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_trainers_controller_start_is_the_one_embedded_trainer_replaces():
    from ray.train.v2._internal import constants
    from ray.train.v2.api import data_parallel_trainer as dpt

    replaced = inspect.getsource(dpt.DataParallelTrainer._initialize_and_run_controller)
    for fragment in ("get_env_vars_to_propagate()", "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR",
                     "runtime_env={\"env_vars\": env_vars}", ")(TrainController)", "label_selector=",
                     "self._register_sigint_handler(controller)", "ray.get(controller.run.remote())",
                     "return ray.get(controller.get_result.remote())"):
        assert fragment in replaced, (
            f"ray: DataParallelTrainer._initialize_and_run_controller changed ({CHECKED.format(10)}): no "
            f"{fragment!r}; compare lorafleet.compat.ray._run_controller_in_the_jobs_env with it"
        )
    assert "self._initialize_and_run_controller(" in inspect.getsource(dpt.DataParallelTrainer.fit)
    for name, value in compat.EMBEDDED_TRAIN_ENV.items():
        assert name in constants.ENV_VARS_TO_PROPAGATE, f"ray: {name} is no longer a Train setting ({CHECKED.format(10)})"
    assert constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR in compat.EMBEDDED_TRAIN_ENV
    assert compat.EMBEDDED_TRAIN_ENV[dpt.RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR] == (
        dpt.DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE
    )


EMBEDDED_CONTROLLER = """
import json, os, sys, time
import psutil, ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from lorafleet.compat.ray import embedded_trainer
from lorafleet.train.cluster import start_ray

def look(config):
    import json, psutil
    actors = {}
    for process in psutil.process_iter(["cmdline"]):
        title = " ".join(process.info["cmdline"] or [])
        if title.startswith("ray::"):
            actors.setdefault(title.split()[0].split(".")[0], process)  # "ray::TrainController.run"
    controller = actors["ray::TrainController"]
    env = controller.environ()
    with open(config["out"], "w") as f:
        json.dump({"created": controller.create_time(), "actors": sorted(actors),
                   "env": {k: env.get(k) for k in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
                                                    "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC",
                                                    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")}}, f)

start_ray()
time.sleep(3)  # the raylet's prestarted workers are up
began = time.time()
trainer = embedded_trainer(TorchTrainer)(
    look, train_loop_config={"out": sys.argv[1]}, scaling_config=ScalingConfig(num_workers=1),
    run_config=RunConfig(name="item10", storage_path=sys.argv[2]))
result = trainer.fit()
seen = json.load(open(sys.argv[1]))
print(json.dumps({"error": repr(result.error) if result.error else None, "before_fit": seen["created"] < began - 1,
                  "actors": seen["actors"], "env": seen["env"]}))
"""


def test_an_embedded_trainers_controller_takes_a_prestarted_worker(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", EMBEDDED_CONTROLLER, str(tmp_path / "seen.json"), str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["error"] is None
    assert out["before_fit"], (
        f"ray: the Train controller started in a fresh process, not a prestarted worker ({CHECKED.format(10)})"
    )
    # Its settings came through the environment instead of a runtime environment of its own.
    assert out["env"] == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0",
                          "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    assert "ray::PreemptionWatcher" not in out["actors"] and "ray::RayTrainWorker" in out["actors"]
