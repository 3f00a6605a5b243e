"""Ray internals lorafleet's checkpoint upload, run settings and start-up, sweeps and console output rely on.

Checked on: ray 2.60.0 (installed; `tests/unit/compat/test_compat_ray.py` exercises each item: the Ray Train ones
without a cluster, on a `StorageContext` built directly on a temporary folder as Ray's own doctests do; item 8 on a
real embedded Ray instance; item 9 on a real embedded Ray instance with `lorafleet api`'s Serve app; item 10 by the
source of the method it replaces and a real embedded instance's Train run).

Private things touched:

1. `ray.train.get_context().get_storage()`, a DeveloperAPI ("may change without notice between minor versions")
   returning `ray.train.v2._internal.execution.storage.StorageContext`, an internal class: [`current_storage`].
2. Of that `StorageContext`: the attribute `storage_filesystem` (the run's pyarrow filesystem) and the methods
   `build_checkpoint_path_from_name(name)` (the checkpoint folder's path on it) and
   `persist_current_checkpoint(checkpoint, name)` (Ray Train's own copy): [`storage_filesystem`],
   [`checkpoint_fs_path`], [`persist_checkpoint`]. lorafleet's `checkpoint_upload_fn`
   ([`lorafleet.runstore.storage.upload_checkpoint`]) needs the destination Ray Train will register, and Ray passes
   that function only the checkpoint and the folder name. Gone when Ray passes the destination (filesystem and path)
   to `checkpoint_upload_fn` or makes `StorageContext` public.
3. `RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`, an undocumented setting read by the Train V2 controller
   (`ray.train.v2._internal.constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR`, default 2 s) and passed on from the driver
   to the controller (`ENV_VARS_TO_PROPAGATE`): [`TRAIN_ENV`], [`train_env`]. Gone when the controller registers a
   worker's report when it arrives instead of on its next poll, or offers the poll interval as a documented option.
4. `RAY_JOB_CONFIG_JSON_ENV_VAR`, the variable (`ray._private.runtime_env.constants`) through which the Jobs API's
   job supervisor hands an entrypoint its job's runtime environment; `ray.init(runtime_env=...)` in that entrypoint
   is merged with it and raises on an `env_vars` key both set (`ray.runtime_env.runtime_env._merge_runtime_env`):
   [`in_submitted_job`]. Gone when Ray says publicly whether a driver runs as a submitted job.
5. Behaviour, not API: with `CheckpointConfig(num_to_keep=N, checkpoint_score_attribute=...)` the Train V2 checkpoint
   manager (`ray.train.v2._internal.execution.checkpoint.checkpoint_manager.CheckpointManager`,
   `_save_state_and_delete_old_checkpoints`) deletes all but the best N by the score *except the latest registered
   checkpoint*, which it keeps even when it is not among the best N; `Result.best_checkpoints` lists the best N only
   (the latest is `Result.checkpoint`). A checkpoint whose metrics lack the score counts as the worst (`-inf` after the
   sign flip, with an error logged), NaN likewise. lorafleet relies on it for `checkpoint.keep_best_by`: `keep` best +
   the latest, so resume always finds the newest checkpoint and pruning never deletes the best: [`checkpoint_config`].
   Were Ray to stop keeping the latest, `checkpoint_config` would have to ask for one more and the worker keep the
   latest itself.
6. The message of the bare `Exception` `ray.init` raises when a node it starts does not register within a fixed
   30 s (`ray._private.node.Node.__init__`, "timed out during startup"; not configurable), which happens on a loaded
   machine: [`node_start_timed_out`]. The processes of that failed start are the driver's children, and nothing in
   Ray stops them: [`stop_child_processes`]. Gone when the wait is configurable or the error has its own class.
7. Ray Tune: `Tuner._local_tuner` (a `TunerInternal`) and its `get_run_config()`, to give a restored sweep the new
   driver's callbacks: [`restored_run_config`].
8. `ray._private.worker.print_to_stdstream`, which the driver's error-listener thread (`listen_error_messages`, started
   by `ray.init`) looks up at each message and calls with `pid="raylet"` and `is_err=False`: the cluster's error
   messages (the raylet's "N PYTHON worker processes have been started", a dead worker) go to stdout, whatever
   `log_to_driver` says, at any moment, e.g. after a `--json` line. [`cluster_messages_to_stderr`] wraps it so that
   those messages go to stderr; the workers' own output keeps its stream. Gone when Ray prints them to stderr or
   honours `log_to_driver` for them.
9. Ray Serve's direct ingress (`ray.serve._private.constants`, environment variables read once when a Serve process
   imports them, so they must be in the Ray processes' environment: set before `ray.init` starts an embedded
   instance, or given to `ray start`): `RAY_SERVE_ENABLE_DIRECT_INGRESS=1` makes the ingress replica serve HTTP
   itself on a port the controller hands out (`NodePortManager`: the lowest free port of
   `range(RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT, RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT)`, the upper bound
   excluded, so `MIN=P, MAX=P+1` gives exactly `P`), on `http_options.host`, while Serve's proxy still starts on the
   head node at `http_options.port`. `RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=0` and
   `RAY_SERVE_PORT_QUARANTINE_S=0` drop the 30 s a stopping replica otherwise stays up for a load balancer to notice,
   and the 150 s a released port is kept out of the pool (a restarted replica would find its one port withheld).
   `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` (unless the environment says otherwise) also runs the app on the replica's own
   event loop rather than a second thread, with gRPC between Serve's processes (about 1.5x the throughput).
   `lorafleet api` uses it because the proxy's extra hop (proxy actor -> replica, both on the same cores) cost about
   half the throughput and most of the tail latency on a 2-core machine (bench/README.md): [`direct_ingress_env`],
   [`cluster_direct_ingress`]. Gone when Serve offers a documented option to serve an application on its own port
   without the proxy (or makes direct ingress the default with a public port setting).
10. `DataParallelTrainer._initialize_and_run_controller` (`ray.train.v2.api.data_parallel_trainer`), the private
   method `fit()` calls to start the Train controller actor: it gives the controller `runtime_env={"env_vars": ...}`
   (the Train settings of `get_env_vars_to_propagate()` plus `RAY_WARN_BLOCKING_GET_INSIDE_ASYNC=0`), and a runtime
   environment other than the job's rules out the Python workers the raylet prestarts when the instance starts, so
   the controller waits for a fresh process to boot, and so does every helper actor it creates (they inherit its
   runtime environment). On an instance this process started, whose processes inherit its environment, those
   settings are in that environment already ([`EMBEDDED_TRAIN_ENV`], set before `ray.init`): [`embedded_trainer`]
   starts the controller without a runtime environment of its own, in a prestarted worker, otherwise as Ray does.
   Its workers keep Ray's runtime environment. Also `RAY_TRAIN_ENABLE_PREEMPTION_WATCHER` (`ray.train.v2._internal.
   constants`, the preemption watcher's feature flag): one machine has no node to drain, so an embedded instance
   goes without the watcher's actor (one more process booting while the workers set up). Gone when Train V2 stops
   giving its controller a runtime environment of its own, or offers a documented way to start it in the job's.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional

# The controller takes at most one report from each worker each time it polls them, every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), so checkpoints that come faster register later and later. On
# the default job with a checkpoint every 5 steps (0.75 s), the last one became "latest" 35 s after training ended;
# with polls every 0.5 s, 1.8 s after, and the steps were no slower. A value set in the environment wins (item 3).
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


# What an instance this process starts gives its Train controller through the environment instead of a runtime
# environment of the controller's own (item 10): Ray's value for the blocking-get warning, and no preemption watcher.
EMBEDDED_TRAIN_ENV = {"RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def train_env(embedded: bool = False) -> dict[str, str]:
    """The Ray Train settings lorafleet's runs use (see `TRAIN_ENV`), a value set in the environment taking precedence.

    Args:
        embedded (`bool`, *optional*, defaults to `False`):
            For an instance this process starts: `EMBEDDED_TRAIN_ENV` too (item 10).

    Example:

    ```python
    >>> import os
    >>> train_env()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    True
    ```
    """
    settings = {**TRAIN_ENV, **(EMBEDDED_TRAIN_ENV if embedded else {})}
    return {key: os.environ.get(key, value) for key, value in settings.items()}


@functools.cache
def embedded_trainer(trainer_cls: type) -> type:
    """`trainer_cls` (a Ray Train V2 `DataParallelTrainer`, e.g. `TorchTrainer`) with its controller started without
    a runtime environment of its own (item 10), for an instance this process started with [`train_env`]`(embedded=
    True)` in its environment: the controller takes one of the Python workers the raylet prestarted.

    Args:
        trainer_cls (`type`):
            The trainer class to derive from.

    Returns:
        `type`: A subclass of `trainer_cls`; everything but the controller's start is `trainer_cls`'s.

    Example:

    ```python
    >>> from ray.train.torch import TorchTrainer
    >>> issubclass(embedded_trainer(TorchTrainer), TorchTrainer)
    True
    ```
    """
    return type(trainer_cls.__name__, (trainer_cls,), {"_initialize_and_run_controller": _run_controller_in_the_jobs_env})


def _run_controller_in_the_jobs_env(self: Any, **controller_init_kwargs: Any) -> Any:
    """Ray's `DataParallelTrainer._initialize_and_run_controller` (2.60) less the controller's `runtime_env`."""
    import threading

    import ray
    from ray.train.v2.api.data_parallel_trainer import TrainController

    controller_actor_cls = ray.remote(
        num_cpus=0,
        # On the driver's node, as Ray attaches it.
        label_selector={ray._raylet.RAY_NODE_ID_KEY: ray.get_runtime_context().get_node_id()},
    )(TrainController)
    controller = controller_actor_cls.remote(**controller_init_kwargs)
    if threading.current_thread() is threading.main_thread():
        self._register_sigint_handler(controller)
    ray.get(controller.run.remote())
    return ray.get(controller.get_result.remote())


def in_submitted_job() -> bool:
    """Whether this process is the entrypoint of a job submitted through the Jobs API (item 4): its job already has a
    runtime environment, which a driver's own must not repeat.

    Example:

    ```python
    >>> in_submitted_job()
    False
    ```
    """
    # Deferred: a Ray import, and only the driver asks, once, just before ray.init.
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    return RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ


def current_storage() -> Any:
    """This Ray Train worker's `StorageContext` (item 1); only valid inside a training function."""
    # Deferred: `import ray.train` costs about a second, and the CLI imports this module's callers.
    import ray.train

    return ray.train.get_context().get_storage()


def storage_filesystem(storage: Any) -> Any:
    """The run's pyarrow filesystem, `storage.storage_filesystem` (item 2)."""
    return storage.storage_filesystem


def checkpoint_fs_path(storage: Any, checkpoint_dir_name: str) -> str:
    """The path, on [`storage_filesystem`], of the run's checkpoint folder `checkpoint_dir_name` (item 2).

    Example:

    ```python
    >>> import tempfile
    >>> from ray.train.v2._internal.execution.storage import StorageContext
    >>> root = tempfile.mkdtemp()
    >>> storage = StorageContext(storage_path=root, experiment_dir_name="run")
    >>> checkpoint_fs_path(storage, "checkpoint_1") == f"{root}/run/checkpoint_1"
    True
    ```
    """
    return storage.build_checkpoint_path_from_name(checkpoint_dir_name)


def persist_checkpoint(storage: Any, checkpoint: Any, checkpoint_dir_name: str) -> Any:
    """Ray Train's own copy of a worker's checkpoint into the run's folder (item 2).

    Returns:
        `ray.train.Checkpoint`: The checkpoint in storage.
    """
    return storage.persist_current_checkpoint(checkpoint, checkpoint_dir_name)


def checkpoint_config(keep: int, score_attribute: Optional[str] = None) -> Any:
    """Ray Train's `CheckpointConfig` for `checkpoint.keep` and `checkpoint.keep_best_by` (item 5).

    Without `score_attribute`: the newest `keep` checkpoints. With it: the `keep` lowest by that metric, and the latest
    checkpoint as well (Ray keeps the latest registered one whatever its score), so at most `keep + 1` folders.

    Args:
        keep (`int`):
            `checkpoint.keep`.
        score_attribute (`str`, *optional*):
            The reported metric checkpoints are ranked by, lowest best (`checkpoint.keep_best_by`).

    Returns:
        `ray.train.CheckpointConfig`

    Example:

    ```python
    >>> config = checkpoint_config(1, "eval_loss")
    >>> config.num_to_keep, config.checkpoint_score_attribute, config.checkpoint_score_order
    (1, 'eval_loss', 'min')
    ```
    """
    from ray.train import CheckpointConfig

    if score_attribute is None:
        return CheckpointConfig(num_to_keep=keep)
    return CheckpointConfig(
        num_to_keep=keep, checkpoint_score_attribute=score_attribute, checkpoint_score_order="min"
    )


NODE_START_TIMEOUT = "timed out during startup"


def node_start_timed_out(exc: BaseException) -> bool:
    """Whether `ray.init` failed because the node it started did not register in time (item 6).

    Example:

    ```python
    >>> node_start_timed_out(Exception("The current node timed out during startup. This could happen ..."))
    True
    ```
    """
    return NODE_START_TIMEOUT in str(exc)


def stop_child_processes(timeout: float = 10.0) -> int:
    """Stop every process this one started (a failed `ray.init`'s GCS, raylet and agents; item 6): SIGTERM, then
    SIGKILL for those still alive after `timeout` seconds. Only called before this process started anything else.

    Returns:
        `int`: How many there were.
    """
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    return len(children)


# Ray Tune (lorafleet.sweep): a trial reports only its evaluations (the metric) and a final summary, so results
# without the metric are normal; Tune refuses them unless this documented switch (named in its own error) is on. Its
# console output (tables, "View detailed results") would mix with lorafleet's lines: the older output engine is
# silent at verbose=0.
TUNE_ENV = {"TUNE_DISABLE_STRICT_METRIC_CHECKING": "1", "RAY_AIR_NEW_OUTPUT": "0"}


def tune_env() -> dict[str, str]:
    """The Ray Tune settings a sweep's driver runs with (see `TUNE_ENV`).

    Example:

    ```python
    >>> tune_env()["TUNE_DISABLE_STRICT_METRIC_CHECKING"]
    '1'
    ```
    """
    return dict(TUNE_ENV)


# Where Ray Tune logs a failed trial's whole traceback and the list of trials that did not complete, at ERROR: a sweep
# says each trial's failure in one line of its own, so these are shown with `--verbose` only.
TUNE_ERROR_LOGGERS = ("ray.tune.execution.tune_controller", "ray.tune.tune")


def restored_run_config(tuner: Any) -> Any:
    """The `RunConfig` of a `Tuner` made by `Tuner.restore` (item 7): `tuner._local_tuner.get_run_config()`.
    `Tuner.restore` takes no callbacks, and a sweep's progress callback must be the new driver's, so it is set on
    the restored run config before `fit()`. Gone when `Tuner.restore` accepts a run config or callbacks."""
    return tuner._local_tuner.get_run_config()


def cluster_messages_to_stderr() -> None:
    """Send the Ray driver's cluster error messages to stderr instead of stdout (item 8), so that a command's stdout
    holds only what lorafleet prints. Safe to call more than once; call it before `ray.init`.

    Example:

    ```python
    >>> import contextlib, io
    >>> from ray._private import worker
    >>> cluster_messages_to_stderr()
    >>> out, err = io.StringIO(), io.StringIO()
    >>> with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    ...     worker.print_to_stdstream({"lines": ["a warning"], "pid": "raylet", "is_err": False}, ignore_prefix=True)
    >>> (out.getvalue(), err.getvalue().strip())
    ('', 'a warning')
    ```
    """
    from ray._private import worker

    original = worker.print_to_stdstream
    if getattr(original, "lorafleet_stderr", False):
        return

    def print_to_stdstream(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet":
            data = {**data, "is_err": True}
        original(data, ignore_prefix)

    print_to_stdstream.lorafleet_stderr = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = print_to_stdstream


# Item 9: names and semantics checked in ray/serve/_private/constants.py and node_port_manager.py (ray 2.60.0).
DIRECT_INGRESS = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
DIRECT_INGRESS_MIN_PORT = "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"
DIRECT_INGRESS_MAX_PORT = "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"
THROUGHPUT_OPTIMIZED = "RAY_SERVE_THROUGHPUT_OPTIMIZED"


def direct_ingress_env(port: int) -> dict[str, str]:
    """The environment that makes Serve's ingress replica itself answer HTTP on `port` (item 9), for the Ray
    processes: set it before `ray.init` starts an embedded instance, or pass it to `ray start`.

    Args:
        port (`int`):
            The port the application's ingress replica listens on (one replica: a range of exactly one port).

    Returns:
        `dict[str, str]`: Environment variables.

    Example:

    ```python
    >>> env = direct_ingress_env(8000)
    >>> env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]
    ('8000', '8001')
    ```
    """
    return {
        DIRECT_INGRESS: "1",
        # The allocator hands out range(MIN, MAX): MAX is excluded.
        DIRECT_INGRESS_MIN_PORT: str(port),
        DIRECT_INGRESS_MAX_PORT: str(port + 1),
        # No load balancer sits in front to deregister the replica, so there is nothing to wait for on stop.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
        # The replica's request path without its extra thread and loop hops (a value in the environment wins).
        THROUGHPUT_OPTIMIZED: os.environ.get(THROUGHPUT_OPTIMIZED, "1"),
    }


def _direct_ingress_on(env: dict[str, str]) -> bool:
    # Serve reads each of these as on when it is exactly "1"; the explicit switch wins over the optimized mode's.
    if DIRECT_INGRESS in env:
        return env[DIRECT_INGRESS] == "1"
    return env.get(THROUGHPUT_OPTIMIZED) == "1"


def direct_ingress_port(env: dict[str, str]) -> Optional[int]:
    """The one port on which Serve's ingress replica listens under the environment `env` of its Ray processes, or
    `None` when direct ingress is off there or its port range holds more than one port (item 9).

    Direct ingress is on with `RAY_SERVE_ENABLE_DIRECT_INGRESS=1`, or with `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` unless
    `RAY_SERVE_ENABLE_DIRECT_INGRESS` says otherwise.

    Example:

    ```python
    >>> direct_ingress_port(direct_ingress_env(8000)), direct_ingress_port({}), direct_ingress_port(
    ...     {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"})
    (8000, None, None)
    ```
    """
    if not _direct_ingress_on(env):
        return None
    low = int(env.get(DIRECT_INGRESS_MIN_PORT, "30000"))
    high = int(env.get(DIRECT_INGRESS_MAX_PORT, "31000"))
    return low if high == low + 1 else None


def cluster_direct_ingress() -> tuple[bool, Optional[int]]:
    """Whether the connected cluster's Serve runs with direct ingress, and its one port if its range is one port
    (item 9): read from the environment of a task on the head node, where Serve's controller runs and which `ray
    start` gave its processes. Call it after `ray.init`.

    Returns:
        `tuple[bool, Optional[int]]`: (direct ingress on, its port or `None`).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = next((node["NodeID"] for node in ray.nodes()
                 if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {})), None)
    names = (DIRECT_INGRESS, THROUGHPUT_OPTIMIZED, DIRECT_INGRESS_MIN_PORT, DIRECT_INGRESS_MAX_PORT)

    @ray.remote(num_cpus=0)
    def read_env() -> dict[str, str]:
        return {name: os.environ[name] for name in names if name in os.environ}

    options = {"scheduling_strategy": NodeAffinitySchedulingStrategy(head, soft=False)} if head else {}
    env = ray.get(read_env.options(**options).remote(), timeout=60)
    return _direct_ingress_on(env), direct_ingress_port(env)
