"""The fine-tuning API end to end: a real `lorafleet api` process on Serve, on a real token-auth Ray cluster, driven by
the official `openai` client. One cluster and one service for the module; few real training jobs (each costs about a
minute here): the happy path with a validation file, a cancel, and two jobs across a service restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import requests
from openai import OpenAI

from helpers.cli import JOBS, REPO, run_cli
from helpers.net import free_port
from helpers.ray_cluster import LocalRayCluster

# The tiny-run settings of helpers.cli.SMALL_RUN, as the `lorafleet` extension object of a request.
FAST = {"kernels": {"enabled": False}, "model": {"config": {"num_hidden_layers": 2}, "dtype": "float32"},
        "quantization": {"compute_dtype": "float32"}, "data": {"max_length": 64},
        "training": {"dtype": "float32", "micro_batch_size": 4, "steps": 4, "warmup": 1},
        "checkpoint": {"every_n_steps": 2, "keep": 2}}
CHAT = JOBS / "data" / "chat_sample.jsonl"


def fast(steps: int = 4) -> dict:
    out = json.loads(json.dumps(FAST))
    out["training"]["steps"] = steps
    return out


class ApiProcess:
    """`lorafleet api --address GCS` in a subprocess, on a free port, stopped with SIGTERM."""

    def __init__(self, cluster: LocalRayCluster, db: str, log: Path):
        self.cluster, self.db, self.log = cluster, db, log
        self.port = free_port()
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 180) -> None:
        env = {**os.environ, **self.cluster.client_env(), "LORAFLEET_HOME": self.cluster.lorafleet_home}
        # Ray's driver reads a token file named by RAY_AUTH_TOKEN_PATH before RAY_AUTH_TOKEN: keep only the token.
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lorafleet.cli", "api", "--address", self.cluster.gcs_address, "--port",
             str(self.port), "--db", self.db], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
            stderr=open(self.log, "a"),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if requests.get(f"{self.url}/models", timeout=2).status_code == 401:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise AssertionError(f"the API did not come up:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api")
    cluster = LocalRayCluster(auth=True, num_cpus=2)
    db = f"sqlite:///{folder}/api.db"
    keys = {}
    try:
        for tenant, extra in (("team-a", ["--max-concurrent", "2"]), ("team-b", []), ("ops", ["--admin"])):
            result = run_cli("api", "keys", "create", "--tenant", tenant, *extra, "--db", db)
            assert result.returncode == 0, result.stderr
            keys[tenant] = result.stdout.strip().splitlines()[-1]
        api = ApiProcess(cluster, db, folder / "api.log")
        api.start()
        yield {"api": api, "cluster": cluster, "keys": keys, "folder": folder}
        if api.proc.poll() is None:
            assert api.stop() == 0
    finally:
        cluster.shutdown()


def client(service, tenant="team-a") -> OpenAI:
    return OpenAI(base_url=service["api"].url, api_key=service["keys"][tenant], max_retries=0, timeout=60)


def wait_status(c: OpenAI, job_id: str, wanted: tuple[str, ...], timeout: float = 400):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.fine_tuning.jobs.retrieve(job_id)
        if job.status in wanted:
            return job
        time.sleep(2)
    raise AssertionError(f"{job_id} still {job.status} after {timeout}s")


def ray_status(service, job_id: str) -> str:
    cluster = service["cluster"]
    out = run_cli("status", job_id, "--address", cluster.address, "--json", env=cluster.client_env())
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["status"]


@pytest.fixture(scope="module")
def finished(service):
    """The happy path: upload → create (with a validation file) → poll until succeeded."""
    c = client(service)
    train = c.files.create(file=CHAT.open("rb"), purpose="fine-tune")
    valid = c.files.create(file=("valid.jsonl", CHAT.read_bytes()[:4000].rsplit(b"\n", 1)[0] + b"\n"),
                           purpose="fine-tune")
    started = time.monotonic()
    job = c.fine_tuning.jobs.create(model="llama-demo", training_file=train.id, validation_file=valid.id,
                                    suffix="e2e", extra_body={"lorafleet": fast(4)})
    assert job.status == "validating_files" and job.training_file == train.id
    done = wait_status(c, job.id, ("succeeded", "failed", "cancelled"))
    return {"job": done, "train": train, "seconds": time.monotonic() - started}


def test_happy_path_with_the_openai_client(service, finished):
    c, job = client(service), finished["job"]
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model and job.trained_tokens and job.trained_tokens > 0 and job.finished_at
    events = c.fine_tuning.jobs.list_events(job.id, limit=100).data
    steps = sorted(e.data["step"] for e in events if e.type == "metrics")
    assert steps == [1, 2, 3, 4]
    messages = [e.message for e in events]
    assert any("successfully completed" in m for m in messages) and any("queued" in m for m in messages)
    checkpoints = c.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [ck.step_number for ck in checkpoints] == [4, 2]
    assert all(ck.metrics.train_loss is not None and ck.metrics.valid_loss is not None for ck in checkpoints)
    assert checkpoints[0].fine_tuned_model_checkpoint == job.fine_tuned_model
    assert job.fine_tuned_model in {m.id for m in c.models.list().data}

    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(PeftConfig.from_pretrained(job.fine_tuned_model).base_model_name_or_path)
    model = PeftModel.from_pretrained(base, job.fine_tuned_model)
    assert any("lora_B" in name for name, _ in model.named_parameters())
    # The admin's CLI sees the API's job as a Ray job under the same id.
    assert ray_status(service, job.id) == "SUCCEEDED"
    cluster = service["cluster"]
    logs = run_cli("logs", job.id, "--address", cluster.address, env=cluster.client_env())
    assert logs.returncode == 0 and job.fine_tuned_model in logs.stdout
    print(f"happy path: {finished['seconds']:.0f}s from create to succeeded")


def test_errors_are_the_openai_exception_classes(service, finished):
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=service["api"].url, api_key="lf-wrong", max_retries=0).fine_tuning.jobs.list()
    c = client(service)
    with pytest.raises(openai.NotFoundError):
        c.fine_tuning.jobs.retrieve("ftjob-doesnotexist")
    with pytest.raises(openai.NotFoundError):
        c.fine_tuning.jobs.create(model="no-such-model", training_file=finished["train"].id)
    with pytest.raises(openai.BadRequestError) as bad:
        c.fine_tuning.jobs.create(model="llama-demo", training_file=finished["train"].id,
                                  extra_body={"lorafleet": {"lora": {"r": 0}}})
    assert bad.value.body["param"] == "lorafleet.lora.r"
    with pytest.raises(openai.BadRequestError):
        c.fine_tuning.jobs.cancel(finished["job"].id)  # already succeeded
    with pytest.raises(openai.BadRequestError):
        c.files.create(file=("empty.jsonl", b""), purpose="fine-tune")


def test_two_tenants_cannot_see_each_other(service, finished):
    b, job, file_id = client(service, "team-b"), finished["job"], finished["train"].id
    for call in (lambda: b.fine_tuning.jobs.retrieve(job.id), lambda: b.fine_tuning.jobs.cancel(job.id),
                 lambda: b.fine_tuning.jobs.list_events(job.id), lambda: b.fine_tuning.jobs.checkpoints.list(job.id),
                 lambda: b.files.retrieve(file_id), lambda: b.files.content(file_id), lambda: b.files.delete(file_id),
                 lambda: b.models.retrieve(job.fine_tuned_model)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert b.fine_tuning.jobs.list().data == [] and b.files.list().data == []
    assert job.fine_tuned_model not in {m.id for m in b.models.list().data}
    admin = client(service, "ops")
    assert admin.fine_tuning.jobs.retrieve(job.id).id == job.id


def test_pagination(service, finished):
    c = client(service)
    train = finished["train"].id
    ids = []
    never_runs = {"scaling": {"resources_per_worker": {"CPU": 1e6}}}  # larger than the cluster: stays queued
    for _ in range(3):
        job = c.fine_tuning.jobs.create(model="llama-demo", training_file=train, extra_body={"lorafleet": never_runs},
                                        metadata={"priority": "-100"})
        c.fine_tuning.jobs.cancel(job.id)
        ids.append(job.id)
    first = c.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in first.data] == ids[::-1][:2] and first.has_more
    rest = c.fine_tuning.jobs.list(limit=2, after=first.data[-1].id)
    assert rest.data[0].id == ids[0]
    every = [j.id for j in c.fine_tuning.jobs.list(limit=1)]  # the client's auto-pagination follows has_more
    assert every[:3] == ids[::-1] and finished["job"].id in every


def test_cancel_stops_the_ray_job(service, finished):
    c = client(service)
    job = c.fine_tuning.jobs.create(model="llama-demo", training_file=finished["train"].id,
                                    extra_body={"lorafleet": fast(400)})
    wait_status(c, job.id, ("running",), timeout=120)
    deadline = time.monotonic() + 120
    while ray_status(service, job.id) != "RUNNING" and time.monotonic() < deadline:
        time.sleep(2)
    assert c.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    deadline = time.monotonic() + 120
    while ray_status(service, job.id) != "STOPPED":
        assert time.monotonic() < deadline, "the Ray job was not stopped"
        time.sleep(2)
    assert c.fine_tuning.jobs.retrieve(job.id).status == "cancelled"


def test_a_tenant_at_its_quota_waits_while_another_tenant_runs(service, finished):
    """Room for two one-worker jobs: team-b (quota 1) gets one running and one waiting, team-a's job runs beside it."""
    one_worker = fast(400)
    one_worker["scaling"] = {"num_workers": 1}
    a, b = client(service, "team-a"), client(service, "team-b")
    train_b = b.files.create(file=CHAT.open("rb"), purpose="fine-tune")
    b1 = b.fine_tuning.jobs.create(model="llama-demo", training_file=train_b.id, extra_body={"lorafleet": one_worker})
    b2 = b.fine_tuning.jobs.create(model="llama-demo", training_file=train_b.id, extra_body={"lorafleet": one_worker})
    a1 = a.fine_tuning.jobs.create(model="llama-demo", training_file=finished["train"].id,
                                   extra_body={"lorafleet": one_worker})
    try:
        wait_status(b, b1.id, ("running",), timeout=60)
        wait_status(a, a1.id, ("running",), timeout=60)
        time.sleep(3)
        assert b.fine_tuning.jobs.retrieve(b2.id).status == "queued"
    finally:
        for c, job in ((b, b2), (b, b1), (a, a1)):
            c.fine_tuning.jobs.cancel(job.id)
    deadline = time.monotonic() + 120
    while {ray_status(service, j.id) for j in (b1, a1)} != {"STOPPED"}:
        assert time.monotonic() < deadline, "the Ray jobs were not stopped"
        time.sleep(2)


def test_restart_while_a_job_runs_and_two_wait_in_priority_order(service):
    """Capacity for one job (2 CPUs, 2 workers each): the later, higher-priority job runs before the earlier one, and
    a restart of the service while the first runs loses and duplicates nothing."""
    c, api = client(service, "team-b"), service["api"]
    train = c.files.create(file=CHAT.open("rb"), purpose="fine-tune")
    first = c.fine_tuning.jobs.create(model="llama-demo", training_file=train.id, extra_body={"lorafleet": fast(8)})
    wait_status(c, first.id, ("running",), timeout=120)
    low = c.fine_tuning.jobs.create(model="llama-demo", training_file=train.id, extra_body={"lorafleet": fast(4)},
                                    metadata={"priority": "0"})
    high = c.fine_tuning.jobs.create(model="llama-demo", training_file=train.id, extra_body={"lorafleet": fast(4)},
                                     metadata={"priority": "5"})
    time.sleep(3)
    assert c.fine_tuning.jobs.retrieve(low.id).status == "queued"
    assert c.fine_tuning.jobs.retrieve(high.id).status == "queued"
    assert api.stop() == 0
    time.sleep(5)
    api.start()
    c = client(service, "team-b")
    done = wait_status(c, first.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    then = wait_status(c, high.id, ("succeeded", "failed", "cancelled"))
    assert then.status == "succeeded", then.error
    assert c.fine_tuning.jobs.retrieve(low.id).status in ("queued", "validating_files", "running")
    last = wait_status(c, low.id, ("succeeded", "failed", "cancelled"))
    assert last.status == "succeeded", last.error
    assert done.finished_at <= then.finished_at <= last.finished_at
    steps = [e.data["step"] for e in c.fine_tuning.jobs.list_events(first.id, limit=100).data if e.type == "metrics"]
    assert sorted(steps) == list(range(1, 9))  # every step reported once, across the restart
    cluster = service["cluster"]
    listed = json.loads(run_cli("list", "--address", cluster.address, "--json", env=cluster.client_env()).stdout)
    ids = [j["job_id"] for j in (listed if isinstance(listed, list) else listed.get("jobs", []))]
    assert [ids.count(job.id) for job in (first, high, low)] == [1, 1, 1]


def test_embedded_service_serves_its_models_and_stops_cleanly(tmp_path, service):
    """`lorafleet api` as a user starts it first: no `--address`, so its own Ray instance (while the module's cluster
    runs on this machine); it answers the `openai` client, exits 0 on SIGTERM and leaves the other service alone."""
    db = f"sqlite:///{tmp_path}/api.db"
    created = run_cli("api", "keys", "create", "--tenant", "solo", "--db", db)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    log = tmp_path / "api.log"
    proc = subprocess.Popen([sys.executable, "-m", "lorafleet.cli", "api", "--port", str(port), "--db", db], cwd=REPO,
                            env={**env, "LORAFLEET_HOME": str(tmp_path / "home")}, stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"))
    try:
        c = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=30)
        deadline, models = time.monotonic() + 180, None
        while models is None and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                models = [m.id for m in c.models.list()]
            except openai.APIConnectionError:
                time.sleep(1)
        assert models is not None and "llama-demo" in models, log.read_text()[-3000:]
        # The proxy answers a moment before `serve.run` returns; SIGTERM is the service's to handle once it says so.
        while "API ready" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    assert code == 0, log.read_text()[-3000:]
    # Its app has the same name as the module's service: on a shared cluster it would have replaced that one.
    assert "llama-demo" in [m.id for m in client(service).models.list()]
