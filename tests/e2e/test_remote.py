"""Remote jobs end to end against a real token-auth Ray head started by the test (Jobs API, dashboard, metrics)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import requests

from helpers.cli import one_line_error, run_cli, sweep_args, TEST_JOB
from helpers.ray_cluster import LocalRayCluster

FAST = ["training.steps=4", "training.warmup=1", "kernels.enabled=false", "checkpoint.every_n_steps=4"]


@pytest.fixture(scope="module")
def cluster():
    head = LocalRayCluster(auth=True, num_cpus=2)
    try:
        yield head
    finally:
        head.shutdown()


class MetricsScraper(threading.Thread):
    """Polls the head's Prometheus endpoint while a job runs (worker gauges vanish with the worker process)."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port, self.seen, self.stop = port, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                text = requests.get(f"http://127.0.0.1:{self.port}/metrics", timeout=2).text
                self.seen += [l for l in text.splitlines() if l.startswith("ray_lorafleet_train_")]
            except requests.RequestException:
                pass
            self.stop.wait(1.0)


@pytest.fixture(scope="module")
def finished(cluster):
    """One short job submitted with --wait --json; the lifecycle tests below inspect it."""
    scraper = MetricsScraper(cluster.metrics_port)
    scraper.start()
    started = time.monotonic()
    result = run_cli("submit", 
        str(TEST_JOB), *[a for s in FAST + ["name=remote-e2e"] for a in ("--set", s)],
        "--address", cluster.address, "--wait", "--json", env=cluster.client_env(),
    )
    scraper.stop.set()
    scraper.join()
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    return {"out": out, "stderr": result.stderr, "metrics": scraper.seen, "seconds": time.monotonic() - started}


def test_submit_wait_reports_like_a_local_run(finished):
    out = finished["out"]
    assert out["status"] == "SUCCEEDED" and out["job_id"].startswith("lorafleet-remote-e2e-")
    assert out["steps"] == 4 and out["final_loss"] < out["first_loss"]
    assert out["adapter_uri"] and out["metrics_uri"].endswith("metrics.jsonl")
    # The progress view ran on the client from the job's log lines.
    assert "[remote-e2e] step 4/4" in finished["stderr"]
    assert "done, loss" in finished["stderr"]


def test_status_list_logs_report(cluster, finished):
    env, job_id = cluster.client_env(), finished["out"]["job_id"]
    status = run_cli("status", job_id, "--address", cluster.address, "--json", env=env)
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["status"] == "SUCCEEDED" and info["job"] == "remote-e2e"
    assert info["summary"]["adapter_uri"] == finished["out"]["adapter_uri"]

    listed = json.loads(run_cli("list", "--address", cluster.address, "--json", env=env).stdout)
    assert job_id in [row["job_id"] for row in listed]

    logs = run_cli("logs", job_id, "--address", cluster.address, env=env)
    assert "LORAFLEET_SUMMARY" in logs.stdout and "LORAFLEET_STEP" in logs.stdout
    follow = run_cli("logs", job_id, "--follow", "--address", cluster.address, env=env)
    assert follow.returncode == 0 and "SUCCEEDED" in follow.stderr

    report = run_cli("report", job_id, "--address", cluster.address, "--json", env=env)
    assert report.returncode == 0, report.stderr
    where = json.loads(report.stdout)
    # Same machine: the run folder is readable here.
    records = [json.loads(l) for l in Path(where["metrics"]).read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert Path(where["plot"]).read_bytes()[:4] == b"\x89PNG"


def test_pull_leaves_a_loadable_peft_adapter(cluster, finished, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dest = tmp_path / "adapter"
    result = run_cli("pull", finished["out"]["job_id"], str(dest), "--address", cluster.address, "--json",
                        env=cluster.client_env())
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tensors"] > 0
    config = json.loads((dest / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(dest))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "B is all zeros: the adapter did not train"
    # Pulling into a non-empty directory is refused in one line.
    one_line_error(run_cli("pull", finished["out"]["job_id"], str(dest), "--address", cluster.address,
                              env=cluster.client_env()))


def test_monitoring_ray_metrics_and_train_view(cluster, finished):
    # Per-step gauges from rank 0, tagged with the job name, reached Ray's Prometheus endpoint.
    names = {l.split("{")[0] for l in finished["metrics"] if 'job="remote-e2e"' in l}
    assert {"ray_lorafleet_train_loss", "ray_lorafleet_train_learning_rate",
            "ray_lorafleet_train_tokens_per_second", "ray_lorafleet_train_peak_rss_bytes"} <= names, names
    # The run shows in the dashboard's Train view (RAY_TRAIN_ENABLE_STATE_TRACKING=1 in the job env).
    runs = requests.get(f"{cluster.address}/api/train/v2/runs/v1",
                        headers={"Authorization": f"Bearer {cluster.token}"}, timeout=10).json()
    assert "remote-e2e" in [run["name"] for run in runs["train_runs"]]
    # The job's processes (the Train controller among them) run with lorafleet's Ray Train settings.
    job = requests.get(f"{cluster.address}/api/jobs/{finished['out']['job_id']}",
                       headers={"Authorization": f"Bearer {cluster.token}"}, timeout=10).json()
    assert job["runtime_env"]["env_vars"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"


def test_unknown_job_and_refused_token_are_one_line(cluster, finished, tmp_path):
    env = cluster.client_env()
    for command in (["status", "no-such-job"], ["logs", "no-such-job"], ["stop", "no-such-job"], ["pull", "no-such-job", "/tmp/x"]):
        line = one_line_error(run_cli(*command, "--address", cluster.address, env=env))
        assert "no job 'no-such-job'" in line, line
    bad = {**env, "RAY_AUTH_TOKEN": "not-the-token"}
    assert "refused the auth token" in one_line_error(run_cli("list", "--address", cluster.address, env=bad))
    # A spec that cannot be shipped is refused before anything is submitted.
    (tmp_path / "config.json").write_text("{}")
    line = one_line_error(run_cli("submit", str(TEST_JOB), "--set", f"model.name_or_path={tmp_path}",
                                     "--set", "model.architecture=null", "--set", "model.config={}",
                                     "--address", cluster.address, env=env))
    assert "model.name_or_path" in line and "not shipped" in line


def test_submit_without_wait_then_stop(cluster, finished):
    env = cluster.client_env()
    result = run_cli("submit", str(TEST_JOB), "--set", "name=remote-stop", "--set", "training.steps=500",
                        "--address", cluster.address, env=env)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    assert job_id.startswith("lorafleet-remote-stop-")
    stopped = run_cli("stop", job_id, "--address", cluster.address, env=env)
    assert stopped.returncode == 0 and job_id in stopped.stdout
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        info = json.loads(run_cli("status", job_id, "--address", cluster.address, "--json", env=env).stdout)
        if info["status"] in ("STOPPED", "FAILED", "SUCCEEDED"):
            break
        time.sleep(2)
    assert info["status"] == "STOPPED"


def test_a_sweep_runs_on_the_cluster_through_the_jobs_api(cluster, finished, tmp_path):
    env = cluster.client_env()
    args = sweep_args(
        tmp_path, "name=remote-sweep", "training.steps=4", "checkpoint.every_n_steps=2", "training.warmup=1",
        "sweep.params.training.learning_rate={grid: [0.003, 0.0003]}", "sweep.params.lora.r={choice: [8]}",
        "sweep.num_samples=1", "sweep.scheduler=none",
    )
    # The local-only options are refused in one line before anything is submitted.
    assert "--fresh" in one_line_error(run_cli(*args, "--address", cluster.address, "--fresh", env=env))

    result = run_cli(*args, "--address", cluster.address, "--wait", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["job_id"].startswith("lorafleet-remote-sweep-") and out["status"] == "succeeded"
    assert [t["status"] for t in out["trials"]] == ["succeeded", "succeeded"]
    assert out["best"]["metric"] == min(t["metric"] for t in out["trials"])
    # The trials' progress lines came from the job's log.
    assert "[trial-000] started" in result.stderr and "[trial-001] succeeded" in result.stderr
    assert Path(out["best"]["adapter_uri"]).parent == tmp_path / "remote-sweep" / out["best"]["trial"]

    # The job commands work on a sweep's job id: status shows its summary, pull fetches the best adapter.
    status = run_cli("status", out["job_id"], "--address", cluster.address, "--json", env=env)
    info = json.loads(status.stdout)
    assert info["status"] == "SUCCEEDED" and info["summary"]["best"] == out["best"]
    listed = json.loads(run_cli("list", "--address", cluster.address, "--json", env=env).stdout)
    assert any(row["job_id"] == out["job_id"] and row["job"] == "remote-sweep" for row in listed)
    pulled = run_cli("pull", out["job_id"], str(tmp_path / "best"), "--address", cluster.address, "--json", env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "best" / "adapter_model.safetensors").is_file()
