"""metrics.jsonl + loss.png in the run's storage folder (local and S3), `lorafleet report`, the Ray gauges helper."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import JOBS, REPO
from test_remote_helpers import free_port


def _history(start: int, stop: int, loss0: float = 3.0) -> list[dict]:
    return [
        {"step": s, "loss": loss0 - 0.1 * s, "lr": 1e-3, "tokens_per_s": 900.0, "peak_rss_mb": 700.0,
         "start_step": start, "total_steps": stop, **({"kernels": {"mlp": 4}} if s == start + 1 else {})}
        for s in range(start + 1, stop + 1)
    ]


def _spec(storage: str, *extra: str):
    from lorafleet.spec import load_spec

    return load_spec(JOBS / "llama.yaml", [f"checkpoint.storage={storage}", "name=mon-test", *extra])


def report_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorafleet.cli", "report", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_artifacts_written_next_to_checkpoints_and_merged_on_resume(tmp_path):
    from lorafleet.runstore.monitoring import read_metrics, write_run_artifacts

    spec = _spec(str(tmp_path / "runs"))
    where = write_run_artifacts(spec, _history(0, 6))
    assert where["run_dir"] == str(tmp_path / "runs" / "mon-test")
    lines = (tmp_path / "runs" / "mon-test" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2, 3, 4, 5, 6]
    assert "kernels" not in json.loads(lines[0])  # per-run info, not a per-step series
    assert (tmp_path / "runs" / "mon-test" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A run resumed from step 4 keeps steps 1-4 of the first attempt and replaces what came after.
    write_run_artifacts(spec, _history(4, 8, loss0=5.0))
    records = read_metrics(spec.storage_uri, spec.name)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert records[3]["loss"] == pytest.approx(2.6) and records[4]["loss"] == pytest.approx(4.5)


def test_artifacts_never_fail_a_run(tmp_path):
    from lorafleet.runstore.monitoring import write_run_artifacts

    blocker = tmp_path / "runs" / "mon-test"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the run folder should be")
    assert write_run_artifacts(_spec(str(tmp_path / "runs")), _history(0, 2)) is None
    assert write_run_artifacts(_spec(str(tmp_path / "runs")), []) is None


def test_artifacts_on_s3(tmp_path, monkeypatch):
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    from lorafleet.runstore.monitoring import read_metrics, write_run_artifacts

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="lf-mon")
        spec = _spec("s3://lf-mon/runs", f"checkpoint.endpoint={endpoint}")
        where = write_run_artifacts(spec, _history(0, 3))
        assert where["metrics"] == "s3://lf-mon/runs/mon-test/metrics.jsonl"
        assert [r["step"] for r in read_metrics(spec.storage_uri, spec.name, endpoint)] == [1, 2, 3]
        png = boto3.client("s3", endpoint_url=endpoint).get_object(Bucket="lf-mon", Key="runs/mon-test/loss.png")
        assert png["Body"].read()[:4] == b"\x89PNG"
    finally:
        server.stop()


def test_report_command(tmp_path):
    from lorafleet.runstore.monitoring import write_run_artifacts

    storage = str(tmp_path / "runs")
    write_run_artifacts(_spec(storage), _history(0, 5))
    by_name = report_cli("mon-test", "--storage", storage, "--json")
    assert by_name.returncode == 0, by_name.stderr
    out = json.loads(by_name.stdout)
    assert out["metrics"] == f"{storage}/mon-test/metrics.jsonl" and out["steps"] == 5
    by_spec = report_cli(str(JOBS / "llama.yaml"), "--set", f"checkpoint.storage={storage}", "--set", "name=mon-test")
    assert by_spec.returncode == 0 and f"plot:    {storage}/mon-test/loss.png" in by_spec.stdout
    missing = report_cli("never-ran", "--storage", storage)
    assert missing.returncode == 2 and missing.stderr.startswith("error: no metrics for job 'never-ran'")
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


def test_export_step_is_best_effort():
    from lorafleet.runstore.monitoring import export_step

    export_step({"step": 1, "loss": 1.0}, job="x", rank=1)  # other ranks: nothing
    export_step({"step": 1, "loss": 1.0, "lr": None}, job="x", rank=0)  # outside a Ray worker: no exception
