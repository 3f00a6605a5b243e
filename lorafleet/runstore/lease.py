"""One run per folder: [`RunLease`], a file in the run's storage folder that the `lorafleet submit` training a run holds.

Two submits of the same `name` to the same `checkpoint.storage` would both train into one folder, each resuming from
and overwriting the other's checkpoints. The driver takes the run's lease before Ray starts
([`~lorafleet.train.driver.run_job`]); a second submit finds it held and is refused with [`RunInUse`] (one line that
names the holder and how to break the lease), having started nothing.

The lease is `lorafleet.lease.json` in the run folder: the holder (host, pid, a random token) and when it was created
and last renewed. A daemon thread renews it every `stale_s / 6` seconds (10 s by default) while the run lives; it is
deleted when the run ends, however it ends (success, failure, Ctrl-C, SIGTERM). A holder that died without releasing
it (SIGKILL, a lost machine) stops renewing: once the lease has not been renewed for `stale_s` seconds
(`LORAFLEET_LEASE_STALE_S`, default 60) the next submit breaks it, saying so in one line. A holder on this machine
whose process is gone is broken at once. Staleness compares the holder's clock with the reader's, so the machines'
clocks must agree to within a few seconds (NTP does).

Object stores (S3, GCS) offer no atomic create-if-absent through pyarrow, so taking the lease there is: read it,
write ours if absent or stale, wait `settle_s`, read it again, and go on only if it still holds our token (S3 and GCS
read back the latest write). **Race window:** two submits that both read "absent" both write, and the later write
wins; each re-reads after `settle_s` and only the winner goes on. Both go on only if one submit's read-then-write
takes longer than the other's `settle_s` (a request stalled for seconds). On local disk the first lease is created
atomically (a hard link that fails if the file exists), and only breaking a stale lease uses the write-and-check.
A holder whose lease was broken anyway (it could not renew for `stale_s`, e.g. storage away that long) finds another
token at its next renewal, stops renewing and says so in one line; its run goes on.

On S3, deleting the lease of a folder that holds nothing else leaves pyarrow's empty `folder/` marker object behind
(a run that trained has its checkpoints there).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any, Optional

from pyarrow import fs

from lorafleet.runstore.location import RunLocation
from lorafleet.spec import SpecError

logger = logging.getLogger(__name__)

LEASE_FILE = "lorafleet.lease.json"


STALE_ENV = "LORAFLEET_LEASE_STALE_S"


DEFAULT_STALE_S = 60.0


def _machine() -> str:
    """What identifies this machine's process table: host name, boot and (Linux) pid namespace.

    A lease written under the same identity names a pid this process can check; containers with the same host name
    but their own pid namespace, or the same host after a reboot, do not match.
    """
    parts = [socket.gethostname()]
    for source in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(os.readlink(source) if source.endswith("/pid") else Path(source).read_text().strip())
        except OSError:
            pass
    return "/".join(parts)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, alive
    return True


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


class RunInUse(SpecError):
    """The run's folder is held by another `lorafleet submit` (one line naming the holder and how to break the lease).

    A [`~lorafleet.spec.SpecError`]: like a bad spec, the submit is refused before anything starts (exit code 2).
    """


class RunLease:
    """The lease on one run's storage folder, held while the run trains there.

    Use it as a context manager (or call [`acquire`] and [`release`]): entering takes the lease or raises
    [`RunInUse`]; leaving releases it, however the block ends.

    Args:
        location ([`~lorafleet.runstore.location.RunLocation`]):
            The run's folder (local, `s3://` or `gs://`).
        stale_s (`float`, *optional*):
            A lease not renewed for this long is broken by the next submit. Defaults to `LORAFLEET_LEASE_STALE_S`, or 60.
        renew_s (`float`, *optional*):
            How often the holder renews it; defaults to `stale_s / 6` (10 s).
        settle_s (`float`, *optional*, defaults to 1.0):
            How long a write that is not atomic (any object store; breaking a stale lease) waits before reading the
            lease back to see whose it is.

    Example:

    ```python
    >>> import tempfile
    >>> location = RunLocation(tempfile.mkdtemp(), "demo")
    >>> with RunLease(location):
    ...     try:
    ...         RunLease(location).acquire()
    ...     except RunInUse as exc:
    ...         print(exc.problems[0].split(" in ")[0])
    name: run 'demo' is already being trained
    >>> RunLease(location).acquire().release()  # released on leaving the block
    ```
    """

    def __init__(
        self,
        location: RunLocation,
        *,
        stale_s: Optional[float] = None,
        renew_s: Optional[float] = None,
        settle_s: float = 1.0,
    ):
        self.location = location
        self.stale_s = float(os.environ.get(STALE_ENV, DEFAULT_STALE_S)) if stale_s is None else float(stale_s)
        self.renew_s = self.stale_s / 6 if renew_s is None else float(renew_s)
        self.settle_s = settle_s
        self.token = secrets.token_hex(16)
        self.created = 0.0
        self.held = False
        # The holder whose stale lease this one replaced (for the caller and tests), and whether ours was taken over.
        self.broken: Optional[dict[str, Any]] = None
        self.lost = False
        self._stop = threading.Event()
        self._renewer: Optional[threading.Thread] = None

    @property
    def uri(self) -> str:
        """The lease file as a URI for people (a path for local storage)."""
        return f"{self.location.uri}/{LEASE_FILE}"

    @property
    def _path(self) -> str:
        return f"{self.location.path}/{LEASE_FILE}"

    def _record(self) -> dict[str, Any]:
        return {
            "job": self.location.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": self.token,
            "machine": _machine(),
            "created": self.created,
            "renewed": time.time(),
        }

    def read(self) -> Optional[dict[str, Any]]:
        """The lease as stored: `None` when there is none, `{}` when it cannot be parsed.

        Raises:
            `OSError`: The storage cannot be read (anything but a missing file).
        """
        try:
            with self.location.filesystem.open_input_stream(self._path) as stream:
                data = stream.read()
        except FileNotFoundError:
            return None
        except OSError:
            # Not every pyarrow filesystem reports a missing object as FileNotFoundError.
            if self.location.filesystem.get_file_info(self._path).type == fs.FileType.NotFound:
                return None
            raise
        try:
            record = json.loads(data)
            return record if isinstance(record, dict) and "token" in record else {}
        except ValueError:
            return {}

    def _write(self, exclusive: bool = False) -> bool:
        """Store our record; `exclusive` (local disk only): only if there is no lease (returns `False` if there is)."""
        data = json.dumps(self._record(), indent=2).encode()
        if self.location.scheme:
            with self.location.filesystem.open_output_stream(self._path) as out:
                out.write(data)
            return True
        # Local disk: a lease file is always whole (written aside, then linked or renamed into place), so a reader never
        # sees a half-written one and takes it for garbage.
        folder = Path(self.location.path)
        folder.mkdir(parents=True, exist_ok=True)
        aside = folder / f".{LEASE_FILE}.{self.token}"
        aside.write_bytes(data)
        try:
            if exclusive:
                try:
                    os.link(aside, folder / LEASE_FILE)
                except FileExistsError:
                    return False
            else:
                os.replace(aside, folder / LEASE_FILE)
        finally:
            aside.unlink(missing_ok=True)
        return True

    def _staleness(self, record: dict[str, Any]) -> Optional[str]:
        """Why `record` may be broken (`None`: it is live)."""
        if not record:
            return "unreadable"
        if record.get("machine") == _machine() and not _pid_alive(int(record.get("pid", -1))):
            return f"its process {record.get('pid')} is no longer running"
        silent = time.time() - float(record.get("renewed", 0))
        if silent > self.stale_s:
            return f"not renewed for {silent:.0f} s"
        return None

    def _refusal(self, record: dict[str, Any]) -> RunInUse:
        ago = max(0.0, time.time() - float(record.get("renewed", 0)))
        return RunInUse(
            f"name: run '{self.location.name}' is already being trained in {self.location.uri}, by lorafleet on host "
            f"{record.get('host')} (pid {record.get('pid')}) since {_utc(float(record.get('created', 0)))}, lease "
            f"renewed {ago:.0f} s ago; wait for that run to end, or, if it is gone, delete {self.uri} (a lease not "
            f"renewed for {self.stale_s:.0f} s is broken by the next submit)"
        )

    def acquire(self) -> RunLease:
        """Take the lease, breaking a stale one (with one warning line), and start renewing it.

        Returns:
            [`RunLease`]: `self`, held.

        Raises:
            [`RunInUse`]: Another live submit holds it.
            [`~lorafleet.spec.SpecError`]: The storage could not be read or written (`checkpoint.storage: ...`).
        """
        try:
            self._take()
        except OSError as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise SpecError(f"checkpoint.storage: cannot write the run's lease {self.uri} ({reason})") from None
        self.held = True
        self._stop.clear()
        self._renewer = threading.Thread(target=self._keep_renewing, name="lorafleet-lease", daemon=True)
        self._renewer.start()
        return self

    def _take(self) -> None:
        for _ in range(3):  # a lease that appears or goes between our read and our write: look again
            current = self.read()
            why = None
            if current is not None:
                why = self._staleness(current)
                if why is None:
                    raise self._refusal(current)
            self.created = time.time()
            if current is None and not self.location.scheme:
                if not self._write(exclusive=True):
                    continue
                return
            self._write()
            time.sleep(self.settle_s)
            after = self.read()
            if after is None:
                continue  # released (or deleted) meanwhile: start over
            if after.get("token") != self.token:
                raise self._refusal(after)
            if current is not None:
                self.broken = current
                holder = f" of host {current.get('host')} (pid {current.get('pid')})" if current else ""
                logger.warning("%s: broke the stale lease %s%s: %s", self.location.name, self.uri, holder, why)
            return
        raise OSError("the lease kept changing while it was being taken")

    def renew(self) -> bool:
        """Write the lease again with a fresh `renewed` time, if it is still ours (or gone: `--fresh` deletes the run
        folder, lease included).

        Returns:
            `bool`: `False` when another submit holds it now (ours was broken as stale).

        Raises:
            `OSError`: The storage could not be read or written.
        """
        current = self.read()
        if current is not None and current.get("token") != self.token:
            return False
        self._write()
        return True

    def _keep_renewing(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                if not self.renew():
                    self.lost = True
                    logger.warning(
                        "%s: the lease %s was broken by another submit (it was not renewed for %.0f s); two runs may "
                        "now write this run's checkpoints", self.location.name, self.uri, self.stale_s,
                    )
                    return
            except OSError:
                continue  # storage away for now: the lease only goes stale after `stale_s` without a renewal

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (best effort: a lease left behind goes stale)."""
        self._stop.set()
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join(timeout=30)
        if not self.held:
            return
        self.held = False
        try:
            current = self.read()
            if current is not None and current.get("token") == self.token:
                self.location.filesystem.delete_file(self._path)
        except OSError:
            pass

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
