"""metrics.jsonl + loss.png in the run's storage folder (local and S3), `lorafleet report`, the Ray gauges helper."""

from __future__ import annotations

import json
import subprocess

import pytest

from helpers.cli import run_cli, TEST_JOB


def _history(start: int, stop: int, loss0: float = 3.0) -> list[dict]:
    return [
        {"step": s, "loss": loss0 - 0.1 * s, "lr": 1e-3, "tokens_per_s": 900.0, "peak_rss_mb": 700.0,
         "start_step": start, "total_steps": stop, **({"kernels": {"mlp": 4}} if s == start + 1 else {})}
        for s in range(start + 1, stop + 1)
    ]


def _location(storage: str, *extra: str):
    from lorafleet.runstore.location import RunLocation
    from lorafleet.spec import load_spec

    return RunLocation.of(load_spec(TEST_JOB, [f"checkpoint.storage={storage}", "name=mon-test", *extra]))


def report_cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli("report", *args, timeout=120)


def test_artifacts_written_next_to_checkpoints_and_merged_on_resume(tmp_path):
    from lorafleet.runstore.monitoring import read_metrics, write_run_artifacts

    location = _location(str(tmp_path / "runs"))
    where = write_run_artifacts(location, _history(0, 6))
    assert where["run_dir"] == str(tmp_path / "runs" / "mon-test")
    lines = (tmp_path / "runs" / "mon-test" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2, 3, 4, 5, 6]
    assert "kernels" not in json.loads(lines[0])  # per-run info, not a per-step series
    assert (tmp_path / "runs" / "mon-test" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A run resumed from step 4 keeps steps 1-4 of the first attempt and replaces what came after.
    write_run_artifacts(location, _history(4, 8, loss0=5.0))
    records = read_metrics(location)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert records[3]["loss"] == pytest.approx(2.6) and records[4]["loss"] == pytest.approx(4.5)


def test_artifacts_never_fail_a_run(tmp_path):
    from lorafleet.runstore.monitoring import write_run_artifacts

    blocker = tmp_path / "runs" / "mon-test"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the run folder should be")
    assert write_run_artifacts(_location(str(tmp_path / "runs")), _history(0, 2)) is None
    assert write_run_artifacts(_location(str(tmp_path / "runs")), []) is None


def test_artifacts_on_s3(s3_server):
    from lorafleet.runstore.monitoring import read_metrics, write_run_artifacts

    bucket = s3_server.bucket
    location = _location(f"s3://{bucket}/mon-runs", f"checkpoint.endpoint={s3_server.endpoint}")
    where = write_run_artifacts(location, _history(0, 3))
    assert where["metrics"] == f"s3://{bucket}/mon-runs/mon-test/metrics.jsonl"
    assert [r["step"] for r in read_metrics(location)] == [1, 2, 3]
    png = s3_server.client.get_object(Bucket=bucket, Key="mon-runs/mon-test/loss.png")
    assert png["Body"].read()[:4] == b"\x89PNG"


def test_report_command(tmp_path):
    from lorafleet.runstore.monitoring import write_run_artifacts

    storage = str(tmp_path / "runs")
    write_run_artifacts(_location(storage), _history(0, 5))
    by_name = report_cli("mon-test", "--storage", storage, "--json")
    assert by_name.returncode == 0, by_name.stderr
    out = json.loads(by_name.stdout)
    assert out["metrics"] == f"{storage}/mon-test/metrics.jsonl" and out["steps"] == 5
    by_spec = report_cli(str(TEST_JOB), "--set", f"checkpoint.storage={storage}", "--set", "name=mon-test")
    assert by_spec.returncode == 0 and f"plot:    {storage}/mon-test/loss.png" in by_spec.stdout
    missing = report_cli("never-ran", "--storage", storage)
    assert missing.returncode == 2 and missing.stderr.startswith("error: no metrics for job 'never-ran'")
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


class _Gauge:
    """Stands in for a Ray gauge: records what is set, or fails like a gauge whose metrics agent is gone."""

    def __init__(self, broken: bool = False):
        self.broken, self.values = broken, []

    def set(self, value, tags):
        if self.broken:
            raise RuntimeError("metrics agent gone")
        self.values.append((value, tags))


def test_export_step_is_best_effort(monkeypatch, caplog):
    from lorafleet.runstore import monitoring

    gauges = {name: _Gauge() for name in monitoring._GAUGES}
    monkeypatch.setattr(monitoring, "_gauges", dict(gauges))
    monitoring.export_step({"step": 1, "loss": 1.0}, job="x", rank=1)
    assert all(g.values == [] for g in gauges.values())  # other ranks export nothing
    monitoring.export_step({"step": 1, "loss": 1.0, "lr": None, "peak_rss_mb": 2.0}, job="x", rank=0)
    assert gauges["lorafleet_train_loss"].values == [(1.0, {"job": "x"})]
    assert gauges["lorafleet_train_peak_rss_bytes"].values == [(2.0 * 1024 * 1024, {"job": "x"})]
    assert gauges["lorafleet_train_learning_rate"].values == []  # a missing value leaves the gauge alone

    monkeypatch.setattr(monitoring, "_gauges", {name: _Gauge(broken=True) for name in monitoring._GAUGES})
    with caplog.at_level("WARNING", logger=monitoring.logger.name):
        monitoring.export_step({"step": 2, "loss": 0.5}, job="x", rank=0)  # no exception reaches the training loop
        monitoring.export_step({"step": 3, "loss": 0.4}, job="x", rank=0)
    assert [r.getMessage() for r in caplog.records] == ["lorafleet: Ray metrics export disabled: metrics agent gone"]
