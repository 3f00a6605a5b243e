"""Live progress of a run on the terminal (stderr): step, loss, held-out loss (`eval 2.31`), tokens/s and ETA.

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
    >>> import contextlib, io
    >>> view = ProgressView("demo", total_steps=2, live=False)
    >>> with contextlib.redirect_stderr(io.StringIO()) as err:
    ...     view.update({"step": 1, "loss": 2.5, "tokens_per_s": 1000.0, "step_time_s": 0.5, "total_steps": 2})
    ...     view.update({"step": 2, "loss": 2.4, "eval_loss": 2.31, "tokens_per_s": 1000.0, "total_steps": 2})
    >>> print(err.getvalue(), end="")  # each line ends with the ETA
    [demo] step 1/2  loss 2.5000  1,000 tok/s...
    [demo] step 2/2  loss 2.4000  eval 2.31  1,000 tok/s...
    >>> view.close()
    ```

    A step with a held-out evaluation (`eval_loss` in its metrics) always prints its line, with `eval` after the
    training loss; the live bar keeps the latest evaluation.
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
                TextColumn("{task.fields[eval]}"),
                TextColumn("{task.fields[tps]} tok/s"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._task = self._progress.add_task(self.job, total=total_steps, loss="-", eval="", tps="-")
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
        evaluated = metrics.get("eval_loss") is not None
        held_out = f"eval {metrics['eval_loss']:.2f}" if evaluated else ""
        if metrics.get("eval_exact_match") is not None:  # eval.generate: the share of exactly right answers
            held_out += f"  em {metrics['eval_exact_match']:.0%}"
        if self._progress is not None:
            fields = dict(completed=step, loss=loss, tps=tps)
            if evaluated:
                fields["eval"] = held_out
            self._progress.update(self._task, **fields)
            return
        if step % self.every == 0 or step == self.total or step == self.first_step + 1 or evaluated:
            eta = self.eta_s(step)
            eta_text = f"  eta {eta:.0f}s" if eta is not None else ""
            eval_text = f"  {held_out}" if evaluated else ""
            print(f"[{self.job}] step {step}/{self.total}  loss {loss}{eval_text}  {tps} tok/s{eta_text}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()

