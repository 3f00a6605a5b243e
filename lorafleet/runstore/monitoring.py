"""Monitoring: per-step Ray metrics from the workers, and a run's metrics file and loss curve in its storage folder.

Two audiences, two paths:

- a live cluster: [`export_step`] sets Ray metric gauges (`ray_lorafleet_*`, tagged with the job name) from rank 0,
  so Ray's Prometheus endpoint, the dashboard's Metrics view and Grafana show loss, learning rate, tokens/s and
  memory while the run is going;
- after the run: [`write_run_artifacts`] (called by the driver with the steps it collected) writes `metrics.jsonl`
  and `loss.png` next to the run's checkpoints, on local disk or an object store, and
  [`~lorafleet.runstore.location.RunLocation.artifacts`] says where.
"""

from __future__ import annotations

import io
import json
import logging
import math
from typing import Any, Optional

from lorafleet.constants import GENERATION_METRICS
from lorafleet.runstore.location import METRICS_FILE, PLOT_FILE, RunLocation

logger = logging.getLogger(__name__)


# name -> (metrics key, description, scale). Memory is exported in bytes, the Prometheus convention.
_GAUGES = {
    "lorafleet_train_loss": ("loss", "Training loss (token mean over the global batch).", 1.0),
    "lorafleet_train_learning_rate": ("lr", "Learning rate of the step.", 1.0),
    "lorafleet_train_tokens_per_second": ("tokens_per_s", "Tokens per second over all workers.", 1.0),
    "lorafleet_train_peak_rss_bytes": ("peak_rss_mb", "Peak resident memory of the rank-0 worker.", 1024.0 * 1024.0),
    "lorafleet_train_grad_norm": ("grad_norm", "Gradient norm before clipping.", 1.0),
    "lorafleet_train_step": ("step", "Optimizer steps completed.", 1.0),
    "lorafleet_eval_loss": ("eval_loss", "Held-out loss (token mean over the held-out set), at evaluation steps.", 1.0),
}


_gauges: dict[str, Any] = {}


def export_step(metrics: dict[str, Any], job: str, rank: int = 0) -> None:
    """Set the Ray metric gauges from one step's metrics; a no-op on ranks other than 0.

    Gauges are created once per process. Exporting must never stop a training run, so errors are logged once and
    swallowed (Ray metrics need a connected Ray worker; outside one this does nothing).

    Args:
        metrics (`dict`):
            The worker's step metrics (`step`, `loss`, `lr`, `tokens_per_s`, `peak_rss_mb`, `grad_norm`).
        job (`str`):
            The job name, exported as the `job` tag.
        rank (`int`, *optional*, defaults to `0`):
            The worker's world rank: only rank 0 exports, so a job is one time series, not one per worker.

    Example:

    ```python
    >>> metrics = {"step": 1, "loss": 2.5, "lr": 1e-3, "tokens_per_s": 900.0, "peak_rss_mb": 812.0}
    >>> export_step(metrics, job="demo", rank=1)
    ```
    """
    if rank != 0:
        return
    try:
        if not _gauges:
            from ray.util.metrics import Gauge

            for name, (_, description, _scale) in _GAUGES.items():
                _gauges[name] = Gauge(name, description=description, tag_keys=("job",))
        for name, (key, _, scale) in _GAUGES.items():
            value = metrics.get(key)
            if isinstance(value, (int, float)):
                _gauges[name].set(float(value) * scale, tags={"job": job})
    except Exception as exc:  # noqa: BLE001 - monitoring is best effort by design
        if not _gauges.get("_warned"):
            logger.warning("lorafleet: Ray metrics export disabled: %s", exc)
            _gauges["_warned"] = True


def read_metrics(location: RunLocation) -> list[dict[str, Any]]:
    """The step records of a run's `metrics.jsonl` (empty if the run wrote none).

    Example:

    ```python
    >>> read_metrics(RunLocation("/tmp/lorafleet-doc-runs", "never-ran"))
    []
    ```
    """
    data = location.read(METRICS_FILE)
    if not data:
        return []
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def eval_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The held-out results of a run's step records: `eval_loss` (the last evaluation), `best_eval_loss` and
    `best_step` (the lowest finite one, the earliest on ties); with `eval.generate`, the last `eval_<metric>` scores
    and the base model's `base_<metric>` (measured before the first step); `{}` when no record has an `eval_loss`.

    Example:

    ```python
    >>> eval_summary([{"step": 2, "eval_loss": 2.5}, {"step": 3}, {"step": 4, "eval_loss": 2.7}])
    {'eval_loss': 2.7, 'best_eval_loss': 2.5, 'best_step': 2}
    >>> eval_summary([{"step": 1, "loss": 3.0, "base_exact_match": 0.0},
    ...               {"step": 2, "loss": 2.0, "eval_loss": 2.5, "eval_exact_match": 0.5}])
    {'eval_loss': 2.5, 'best_eval_loss': 2.5, 'best_step': 2, 'eval_exact_match': 0.5, 'base_exact_match': 0.0}
    >>> eval_summary([{"step": 1, "loss": 3.0}])
    {}
    ```
    """
    evaluated = [r for r in records if isinstance(r.get("eval_loss"), (int, float))]
    if not evaluated:
        return {}
    out: dict[str, Any] = {"eval_loss": evaluated[-1]["eval_loss"]}
    finite = [r for r in evaluated if math.isfinite(r["eval_loss"])]
    if finite:
        best = min(finite, key=lambda r: (r["eval_loss"], r["step"]))
        out.update(best_eval_loss=best["eval_loss"], best_step=best["step"])
    for prefix, pick in (("eval_", -1), ("base_", 0)):  # the last scores, and the base model's (the first record's)
        for metric in GENERATION_METRICS:
            scored = [r[prefix + metric] for r in records if isinstance(r.get(prefix + metric), (int, float))]
            if scored:
                out[prefix + metric] = scored[pick]
    return out


def loss_plot(history: list[dict[str, Any]], title: str) -> bytes:
    """A PNG of loss (and learning rate, on a second axis) against step; with held-out evaluations, their loss on
    the same axis and the best one marked.

    Example:

    ```python
    >>> png = loss_plot([{"step": 1, "loss": 3.0, "lr": 1e-3}, {"step": 2, "loss": 2.0, "lr": 1e-3}], "demo")
    >>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
    >>> loss_plot([{"step": 1, "loss": 3.0, "eval_loss": 3.2}, {"step": 2, "loss": 2.0, "eval_loss": 2.9}], "demo")[:4]
    b'\\x89PNG'
    ```
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes; Agg renders straight to bytes
    from matplotlib.figure import Figure

    steps = [h["step"] for h in history]
    figure = Figure(figsize=(6.4, 3.6), dpi=100)
    axis = figure.add_subplot()
    axis.plot(steps, [h["loss"] for h in history], color="tab:blue", marker="." if len(steps) < 50 else None,
              label="training")
    evaluated = [h for h in history if isinstance(h.get("eval_loss"), (int, float))]
    if evaluated:
        axis.plot([h["step"] for h in evaluated], [h["eval_loss"] for h in evaluated], color="tab:green", marker="o",
                  markersize=3, label="validation")
        best = eval_summary(evaluated)
        if "best_step" in best:
            axis.scatter([best["best_step"]], [best["best_eval_loss"]], s=80, marker="*", color="tab:red", zorder=3,
                         label=f"best: {best['best_eval_loss']:.4f} at step {best['best_step']}")
    axis.set_xlabel("step")
    axis.set_ylabel("loss", color="tab:blue")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    if all("lr" in h for h in history):
        lr_axis = axis.twinx()
        lr_axis.plot(steps, [h["lr"] for h in history], color="tab:orange", alpha=0.6, linewidth=1)
        lr_axis.set_ylabel("learning rate", color="tab:orange")
    if evaluated:
        # On the topmost axis, so the learning-rate curve is not drawn over it.
        top = figure.axes[-1]
        top.legend(*axis.get_legend_handles_labels(), loc="upper right", fontsize="small", framealpha=0.9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def run_records(location: RunLocation, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The step records of a whole run: a resumed run's own `history` after the earlier records of `metrics.jsonl` up
    to the step it resumed from (what [`write_run_artifacts`] writes, and the run summary's best evaluation reads).

    Example:

    ```python
    >>> run_records(RunLocation("/tmp/lorafleet-doc-runs", "never-ran"), [{"step": 1, "loss": 3.0, "kernels": {}}])
    [{'step': 1, 'loss': 3.0}]
    ```
    """
    start = int(history[0].get("start_step", 0) or 0) if history else 0
    earlier: list[dict[str, Any]] = []
    if start > 0:
        earlier = [r for r in read_metrics(location) if r["step"] <= start]
    return earlier + [{k: v for k, v in h.items() if k != "kernels"} for h in history]


def write_run_artifacts(location: RunLocation, history: list[dict[str, Any]]) -> Optional[dict[str, str]]:
    """Write `metrics.jsonl` and `loss.png` into the run's storage folder, next to its checkpoints.

    A resumed run keeps the earlier run's records up to where it resumed, so the file and the curve cover the whole
    training, not only the last attempt. Never raises: a finished run must not fail because a plot could not be
    written (the problem is logged instead).

    Args:
        location ([`~lorafleet.runstore.location.RunLocation`]):
            The run's location (`RunLocation.of(spec)`); its name is the plot's title.
        history (`list[dict]`):
            The per-step metrics the driver collected, in order.

    Returns:
        `dict` or `None`: The URIs ([`~lorafleet.runstore.location.RunLocation.artifacts`]), or `None` if nothing
        was written.

    Example:

    ```python
    >>> from lorafleet.spec import load_spec
    >>> spec = load_spec("jobs/llama.yaml", ["checkpoint.storage=/tmp/lorafleet-doc-runs"])
    >>> write_run_artifacts(RunLocation.of(spec), [{"step": 1, "loss": 3.0, "lr": 1e-3}])["metrics"]
    '/tmp/lorafleet-doc-runs/llama-tasks/metrics.jsonl'
    ```
    """
    if not history:
        return None
    try:
        records = run_records(location, history)
        location.write(METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records).encode())
        location.write(PLOT_FILE, loss_plot(records, location.name))
        return location.artifacts()
    except Exception as exc:  # noqa: BLE001 - see docstring
        logger.warning("lorafleet: could not write metrics/plot for %s: %s", location.name, exc)
        return None
