"""Live progress of a run on the terminal (stderr): step, loss, tokens/s and ETA.

On a terminal it is a single updating rich progress bar; elsewhere (CI logs, pipes) it prints a plain line every
few steps, so logs stay readable and stdout stays free for results.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional


class ProgressView:
    """Render step metrics as they arrive.

    Args:
        job (`str`):
            Shown as the bar's title.
        total_steps (`int`):
            Steps the run will reach.
        live (`bool`, *optional*):
            Force the rich bar on or off; defaults to whether stderr is a terminal.

    Example:

    ```python
    >>> view = ProgressView("demo", total_steps=2, live=False)
    >>> view.update({"step": 1, "loss": 2.5, "tokens_per_s": 1000.0, "step_time_s": 0.5, "total_steps": 2})
    >>> view.close()
    ```
    """

    def __init__(self, job: str, total_steps: int, live: Optional[bool] = None):
        self.job = job
        self.total = total_steps
        self.live = sys.stderr.isatty() if live is None else live
        self.every = max(1, total_steps // 20)
        self.started = time.monotonic()
        self.first_step: Optional[int] = None
        self._progress = None
        self._task = None
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[tps]} tok/s"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._task = self._progress.add_task(self.job, total=total_steps, loss="-", tps="-")
            self._progress.start()

    def eta_s(self, step: int) -> Optional[float]:
        if self.first_step is None or step <= self.first_step:
            return None
        rate = (time.monotonic() - self.started) / (step - self.first_step)
        return rate * (self.total - step)

    def update(self, metrics: dict[str, Any]) -> None:
        step = int(metrics["step"])
        if self.first_step is None:
            self.first_step = step - 1
            self.started = time.monotonic() - float(metrics.get("step_time_s", 0.0))
        loss = f"{metrics['loss']:.4f}"
        tps = f"{metrics.get('tokens_per_s', 0.0):,.0f}"
        if self._progress is not None:
            self._progress.update(self._task, completed=step, loss=loss, tps=tps)
            return
        if step % self.every == 0 or step == self.total or step == self.first_step + 1:
            eta = self.eta_s(step)
            eta_text = f"  eta {eta:.0f}s" if eta is not None else ""
            print(f"[{self.job}] step {step}/{self.total}  loss {loss}  {tps} tok/s{eta_text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()

