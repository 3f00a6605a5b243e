"""Where a job's fixed cost goes: seconds per phase, from the command's start to the first step and after the last.

One [`PhaseClock`] per run, on the driver. The phases it can see itself (pre-flight, Ray start, the first step's
arrival, the end) it laps; the ones inside a worker, rank 0 times with its own clock (started when the training loop's
module starts importing) and sends over the progress channel as a `phases` event ([`PhaseClock.event`]), which the
driver merges ([`PhaseClock.merge_worker`]). Wall-clock stamps (`time.time()`), so that the driver can place a
worker's start on its own timeline; on a cluster whose clocks disagree a phase that spans machines is off by the skew
(never negative: clamped at 0).

`lorafleet submit -v` logs one line per phase ([`PhaseClock.lines`]); the `--json` summary carries them as `phases`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

# Every phase, in the order a run goes through them, with what the `-v` line calls it.
PHASES: dict[str, str] = {
    "command_start": "command start (imports, spec)",
    "preflight": "pre-flight (base model, data read and tokenized, storage checks)",
    "ray_start": "Ray start (or join; what is left of a start begun in the background)",
    "train_start": "Train controller and worker group start",
    "worker_imports": "worker imports (torch, transformers, peft)",
    "worker_model": "worker model build (4-bit load, LoRA, kernel patch)",
    "worker_resume": "worker optimizer set-up and resume",
    "first_step": "first step",
    "after_last_step": "after the last step (last checkpoint registered, summary)",
}

# The phases rank 0 times itself and sends to the driver.
WORKER_PHASES = ("worker_imports", "worker_model", "worker_resume")


@dataclass
class PhaseClock:
    """Seconds per named phase, each lapped from the end of the one before.

    Args:
        started (`float`, *optional*):
            Wall-clock time (`time.time()`) the first phase starts at; default now.

    Example:

    ```python
    >>> clock = PhaseClock(started=100.0)
    >>> clock.lap("preflight", now=101.5)
    1.5
    >>> clock.lap("ray_start", now=104.0)
    2.5
    >>> clock.as_dict()
    {'preflight': 1.5, 'ray_start': 2.5}
    >>> clock.lines()[0]
    'phase pre-flight (base model, data read and tokenized, storage checks): 1.5 s'
    ```
    """

    started: float = field(default_factory=time.time)
    phases: dict[str, float] = field(default_factory=dict)
    mark: Optional[float] = None

    def __post_init__(self) -> None:
        if self.mark is None:
            self.mark = self.started

    def lap(self, name: str, now: Optional[float] = None) -> float:
        """Record the time since the previous lap (or the start) as phase `name`, added to what it already holds.

        Args:
            name (`str`):
                The phase (a key of `PHASES`).
            now (`float`, *optional*):
                Wall-clock time the phase ended; default now.

        Returns:
            `float`: The seconds recorded by this lap (0 when `now` is before the previous lap).
        """
        now = time.time() if now is None else now
        seconds = max(0.0, now - self.mark)
        self.phases[name] = self.phases.get(name, 0.0) + seconds
        self.mark = max(self.mark, now)
        return seconds

    def skip_to(self, now: float) -> None:
        """Move the mark to `now` without recording, e.g. past the training steps, which are not fixed cost."""
        self.mark = max(self.mark, now)

    def as_dict(self) -> dict[str, float]:
        """The phases recorded so far, in seconds rounded to milliseconds, in the order they were first lapped."""
        return {name: round(seconds, 3) for name, seconds in self.phases.items()}

    def lines(self) -> list[str]:
        """One line per recorded phase: `phase <what it covers>: <seconds> s`."""
        return [f"phase {PHASES.get(name, name)}: {seconds:.1f} s" for name, seconds in self.phases.items()]

    def event(self) -> dict[str, Any]:
        """This (worker's) clock as a progress-channel event for the driver's [`merge_worker`].

        Example:

        ```python
        >>> worker = PhaseClock(started=110.0)
        >>> _ = worker.lap("worker_imports", now=113.0)
        >>> _ = worker.lap("worker_model", now=115.0)
        >>> driver = PhaseClock(started=100.0)
        >>> _ = driver.lap("ray_start", now=104.0)
        >>> driver.merge_worker(worker.event())
        >>> driver.as_dict()
        {'ray_start': 4.0, 'train_start': 6.0, 'worker_imports': 3.0, 'worker_model': 2.0}
        >>> driver.mark
        115.0
        ```
        """
        return {"event": "phases", "started": self.started, "phases": self.as_dict()}

    def merge_worker(self, event: dict[str, Any]) -> None:
        """Take a worker's [`event`]: the time from the previous lap until the worker began is `train_start`, then the
        worker's own phases, the mark ending where the worker's last phase ended."""
        self.lap("train_start", now=float(event["started"]))
        end = float(event["started"])
        for name, seconds in event["phases"].items():
            self.phases[name] = self.phases.get(name, 0.0) + float(seconds)
            end += float(seconds)
        self.skip_to(end)
