"""Where a run's Ray comes from: an instance started for the run alone, or a cluster it joins ([`start_ray`]).

`lorafleet submit` starts the run's own instance on a helper thread as soon as its spec is valid
([`start_ray_in_background`]), so that Ray's processes boot on the CPU the driver's imports and pre-flight leave idle;
the driver's own [`start_ray`] then waits for that start instead of beginning one. A refusal after it
([`~lorafleet.spec.SpecError`]: bad data, storage that cannot be written, a run in use) stops that instance again
([`stop_background_ray`]) before its one error line, so nothing is left running.

Light on purpose (Ray, pyarrow's filesystems and the spec): the CLI imports it before torch, transformers and the
driver.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any, Optional

from lorafleet.compat.ray import (
    cluster_messages_to_stderr,
    in_submitted_job,
    node_start_timed_out,
    stop_child_processes,
    train_env,
)
from lorafleet.runstore.location import storage_env
from lorafleet.spec import SpecError


@contextlib.contextmanager
def _signal_action_kept(signum: int) -> Iterator[None]:
    """Put back the process's handler of `signum` as it was before the block, at the C level.

    `ray.init` installs Ray's C++ crash handler for SIGTERM, which prints a stack and aborts. On the main thread
    [`start_ray`] puts the driver's own Python handler back with `signal.signal`; off it, Python refuses that call,
    but `sigaction` is the process's and may be called from any thread. The action is copied as opaque bytes, so
    the struct's layout does not matter; where libc has no `sigaction`, nothing is kept.
    """
    action = ctypes.create_string_buffer(1024)  # larger than any platform's struct sigaction
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        kept = libc.sigaction(signum, None, action) == 0
    except (OSError, AttributeError):
        kept = False
    try:
        yield
    finally:
        if kept:
            libc.sigaction(signum, action, None)


def _not_the_sigterm_note(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("SIGTERM handler is not set")


class _BackgroundStart(threading.Thread):
    """[`start_ray`] for an embedded instance on a helper thread; [`result`] waits for it and returns or raises what
    the start did.

    The thread outlives the start: Ray starts its GCS and raylet with `PR_SET_PDEATHSIG`, which kills them when the
    *thread* that forked them ends, not the process. It waits (a daemon, so it never holds up the exit) until
    [`stop_background_ray`] has shut the instance down, or until the process ends, after Ray's own exit handler.
    """

    def __init__(self, verbose: bool):
        super().__init__(name="lorafleet-ray-start", daemon=True)
        self.verbose = verbose
        self.error: Optional[BaseException] = None
        self.started = threading.Event()
        self.released = threading.Event()

    def run(self) -> None:
        # ray.init off the main thread warns that it set no SIGTERM handler: the driver's own stays, as it should.
        ray_worker_log = logging.getLogger("ray._private.worker")
        ray_worker_log.addFilter(_not_the_sigterm_note)
        try:
            with _signal_action_kept(signal.SIGTERM):
                start_ray(None, self.verbose)
        except BaseException as exc:  # handed to the thread that waits: it fails there as a direct start would
            self.error = exc
        finally:
            ray_worker_log.removeFilter(_not_the_sigterm_note)
            self.started.set()
        self.released.wait()

    def result(self) -> None:
        self.started.wait()
        if self.error is not None:
            raise self.error


# The start `start_ray_in_background` began in this process, if any; kept after it finished, for
# `stop_background_ray`.
_background: Optional[_BackgroundStart] = None


def _wait_for_background() -> bool:
    """Wait for this process's background start, if there is one (and this is not its own thread); raises what it
    raised. Whether there was one."""
    background = _background
    if background is None or background is threading.current_thread():
        return False
    background.result()
    return True


def start_ray_in_background(address: Optional[str] = None, verbose: bool = False) -> bool:
    """Begin starting this run's own Ray instance on a helper thread, when the run will start one: no `address`, no
    `RAY_ADDRESS`, Ray not yet initialized in this process. [`start_ray`] in this process waits for it.

    Args:
        address (`str`, *optional*):
            The run's `--address`; with one (or with `RAY_ADDRESS`) nothing starts here: joining stays where the
            driver does it, with its announcement line.
        verbose (`bool`, *optional*, defaults to `False`):
            Forward Ray's and the workers' logs, as [`start_ray`] takes it.

    Returns:
        `bool`: Whether a start began.

    Example:

    ```python
    >>> start_ray_in_background("127.0.0.1:6379")  # a cluster to join: nothing starts in the background
    False
    ```
    """
    global _background
    if address or os.environ.get("RAY_ADDRESS") or _background is not None:
        return False
    import ray

    if ray.is_initialized():
        return False
    _background = _BackgroundStart(verbose)
    _background.start()
    return True


def stop_background_ray() -> None:
    """Undo [`start_ray_in_background`] for a run refused before it trained: wait for the start to finish, then shut
    that instance down with its processes. Does nothing when no background start was begun (an instance this
    process started any other way is left alone).

    Example:

    ```python
    >>> stop_background_ray()  # none was begun
    ```
    """
    global _background
    background, _background = _background, None
    if background is None:
        return
    background.started.wait()
    import ray

    ray.shutdown()
    background.released.set()


# The GCS address of the instance this process's last `start_ray` started (not joined), for `started_here`.
_started_instance: Optional[str] = None


def started_here() -> bool:
    """Whether the Ray instance this process is connected to is one [`start_ray`] started (not a cluster it joined,
    nor a notebook's own `ray.init`): its processes inherit this process's environment.

    Example:

    ```python
    >>> import ray
    >>> started_here() == (ray.is_initialized() and _started_instance is not None)
    True
    ```
    """
    import ray

    return ray.is_initialized() and _started_instance == ray.get_runtime_context().gcs_address


def start_ray(address: Optional[str] = None, verbose: bool = False, dashboard: bool = False) -> Optional[str]:
    """Start a Ray instance for this job alone, or join the cluster at `address` (or `RAY_ADDRESS`).

    Without an address, `ray.init(address="local")`: a new instance, even when one started with `ray start` runs on
    this machine (plain `ray.init()` would join that one, whose workers lack this shell's environment: storage
    credentials, `AWS_ENDPOINT_URL`). Its processes inherit this environment.

    With an address (`auto`, `HOST:PORT`, `ray://...`), it joins, prints one line naming the cluster, and the job's
    runtime environment carries this shell's storage settings ([`~lorafleet.runstore.location.storage_env`]) to the
    cluster's processes. Not as the entrypoint of a Jobs API job (`lorafleet submit --address http://...`): that job
    has its own runtime environment, the cluster's.

    In a process where [`start_ray_in_background`] began the run's instance, it waits for that start instead.

    Args:
        address (`str`, *optional*):
            The cluster to join; default `RAY_ADDRESS`, else none.
        verbose (`bool`, *optional*, defaults to `False`):
            Forward Ray's and the workers' logs.
        dashboard (`bool`, *optional*, defaults to `False`):
            Give a new instance its dashboard (the State API), which Ray Train's placement-group cleaner needs to free
            the workers' CPUs of a run whose controller was killed (a sweep's stopped trial). A run's own instance
            goes without: it starts faster.

    Returns:
        `str` or `None`: The line printed on joining a cluster; `None` for a new instance, or when Ray was already
        initialized in this process (a notebook's own `ray.init`, used as it is).

    Raises:
        [`~lorafleet.spec.SpecError`]: No cluster answers at the address.

    Example:

    ```python
    >>> start_ray("127.0.0.1:6379")  # doctest: +SKIP
    'lorafleet: joined the Ray cluster at 127.0.0.1:6379 (--address=127.0.0.1:6379): 1 node, 2 CPUs; ...'
    ```
    """
    if _wait_for_background():  # `lorafleet submit` began this run's instance already
        return None
    import ray

    if ray.is_initialized():
        return None
    source = "--address" if address else "RAY_ADDRESS"
    target = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = dict(
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.WARNING,
    )
    settings: dict[str, str] = {}
    if target is None:
        # Workers import lorafleet from the installed package.
        kwargs.update(address="local", include_dashboard=dashboard)
    else:
        kwargs["address"] = target
        settings = {} if in_submitted_job() else storage_env()
        if settings:
            kwargs["runtime_env"] = {"env_vars": settings}
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # An embedded instance's processes (the Train controller among them) inherit this environment; jobs sent to a
    # cluster carry the same settings in their runtime environment (lorafleet.remote).
    os.environ.update(train_env(embedded=target is None))
    # stdout holds lorafleet's lines only (the --json line last); Ray would print the cluster's messages there.
    cluster_messages_to_stderr()
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        try:
            ray.init(**kwargs)
        except Exception as exc:
            if target is not None or not node_start_timed_out(exc):
                raise
            # A loaded machine: Ray waits a fixed 30 s for the node it starts. Once more, without the first try's
            # processes.
            stop_child_processes()
            ray.init(**kwargs)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        # Ray sends its auth token to an explicit address only in token mode, and `ray start` turns token auth on
        # by default: a likely cause worth naming.
        hint = (
            "; a cluster with token authentication needs RAY_AUTH_MODE=token here"
            if target != "auto" and os.environ.get("RAY_AUTH_MODE", "").lower() != "token"
            else ""
        )
        raise SpecError(f"{source}: cannot join the Ray cluster at '{target}' ({first}){hint}") from None
    if callable(sigterm) and threading.current_thread() is threading.main_thread():
        # ray.init makes SIGTERM exit the driver on the spot; a handler the caller installed (`lorafleet submit`
        # turns SIGTERM into a clean stop of the run) is put back.
        signal.signal(signal.SIGTERM, sigterm)
    if target is None:
        global _started_instance
        _started_instance = ray.get_runtime_context().gcs_address
        return None
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    resources = ray.cluster_resources()
    sizes = "".join(f", {int(resources[k])} {k}s" for k in ("CPU", "GPU") if resources.get(k))
    line = (
        f"lorafleet: joined the Ray cluster at {ray.get_runtime_context().gcs_address} ({source}={target}): "
        f"{nodes} node{'s' if nodes != 1 else ''}{sizes}; "
        + (
            f"this shell's storage settings go to its workers ({', '.join(sorted(settings))})"
            if settings
            else "its workers use their own storage settings"
        )
    )
    print(line, file=sys.stderr, flush=True)
    return line
