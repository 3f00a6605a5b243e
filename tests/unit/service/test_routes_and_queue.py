"""The API and the queue without Ray: FastAPI's TestClient against the app, the scheduler driven tick by tick over a
fake backend that plays Ray's part (statuses and log lines as `lorafleet.remote.entrypoint` prints them)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from lorafleet.remote.client import STEP_MARK, SUMMARY_MARK
from lorafleet.service.app import Service, create_app
from lorafleet.service.auth import create_key
from lorafleet.service.catalog import load_catalog
from lorafleet.service.db import MIGRATIONS, Database
from lorafleet.service.files import FileStore
from lorafleet.service.scheduler import Scheduler

CHAT = [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i}"}]}
        for i in range(40)]
GOOD = ("\n".join(json.dumps(r) for r in CHAT) + "\n").encode()


class FakeRay:
    """Ray's part: a cluster of `cpus` CPUs; jobs are PENDING→RUNNING on the first poll, and end when a test says."""

    def __init__(self, cpus: float = 2.0):
        self.cpus, self.jobs, self.submitted = cpus, {}, []

    def total_resources(self):
        return {"CPU": self.cpus}

    def submit(self, spec, job_id):
        self.submitted.append(job_id)
        self.jobs.setdefault(job_id, {"status": "RUNNING", "logs": "", "spec": spec})

    def info(self, job_id):
        job = self.jobs.get(job_id)
        return None if job is None else {"status": job["status"], "message": ""}

    def logs(self, job_id):
        return self.jobs[job_id]["logs"]

    def stop(self, job_id):
        if job_id in self.jobs:
            self.jobs[job_id]["status"] = "STOPPED"

    def finish(self, job_id, steps=2, adapter="/runs/x/checkpoint_1"):
        job = self.jobs[job_id]
        for step in range(1, steps + 1):
            job["logs"] += STEP_MARK + json.dumps({"step": step, "loss": 3.0 - step * 0.1, "lr": 1e-3,
                                                   "tokens_per_s": 100.0, "step_time_s": 0.5}) + "\n"
        job["logs"] += SUMMARY_MARK + json.dumps({"status": "succeeded", "adapter_uri": adapter}) + "\n"
        job["status"] = "SUCCEEDED"


@pytest.fixture
def env(tmp_path):
    db = Database(f"sqlite:///{tmp_path}/api.db")
    files = FileStore(str(tmp_path / "store"))
    ray = FakeRay()
    service = Service(db, files, load_catalog(), max_upload_bytes=128 * 1024)
    client = TestClient(create_app(service))
    keys = {"a": create_key(db, "team-a"), "b": create_key(db, "team-b"), "admin": create_key(db, "ops", admin=True)}
    scheduler = Scheduler(db, files, ray)
    return {"db": db, "files": files, "ray": ray, "client": client, "keys": keys, "scheduler": scheduler,
            "path": tmp_path}


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def upload(env, who="a", data=GOOD, purpose="fine-tune", name="train.jsonl"):
    return env["client"].post("/v1/files", headers=auth(env["keys"][who]), files={"file": (name, data)},
                              data={"purpose": purpose})


def create(env, who="a", **body):
    body.setdefault("model", "llama-demo")
    return env["client"].post("/v1/fine_tuning/jobs", headers=auth(env["keys"][who]), json=body)


def job_with_file(env, who="a", **body):
    file_id = upload(env, who).json()["id"]
    response = create(env, who, training_file=file_id, **body)
    assert response.status_code == 200, response.text
    return response.json()


def get(env, path, who="a"):
    return env["client"].get(path, headers=auth(env["keys"][who]))


def error_of(response):
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_database_is_migrated_and_reopens(tmp_path):
    url = f"sqlite:///{tmp_path}/x.db"
    Database(url).close()
    db = Database(url)
    assert db.schema_version() == len(MIGRATIONS)
    assert db.rows("SELECT COUNT(*) AS n FROM schema_version")[0]["n"] == 1


def test_keys_are_hashed_and_required(env):
    stored = env["db"].rows("SELECT key_hash FROM api_keys")
    assert all(env["keys"]["a"] not in row["key_hash"] for row in stored)
    for headers in ({}, {"Authorization": "Bearer lf-nope"}, {"Authorization": env["keys"]["a"]}):
        response = env["client"].get("/v1/models", headers=headers)
        assert response.status_code == 401 and error_of(response)["code"] == "invalid_api_key"
    assert get(env, "/v1/models").status_code == 200


def test_files_round_trip_and_names_never_paths(env):
    created = upload(env, name="../../etc/passwd").json()
    assert created["object"] == "file" and created["bytes"] == len(GOOD) and created["purpose"] == "fine-tune"
    assert created["filename"] == ".._.._etc_passwd"
    stored = env["db"].row("SELECT uri FROM files WHERE id = ?", [created["id"]])["uri"]
    assert stored.endswith(f"/files/{created['id']}.jsonl") and "passwd" not in stored
    assert get(env, f"/v1/files/{created['id']}").json()["id"] == created["id"]
    assert get(env, f"/v1/files/{created['id']}/content").content == GOOD
    assert [f["id"] for f in get(env, "/v1/files").json()["data"]] == [created["id"]]
    deleted = env["client"].delete(f"/v1/files/{created['id']}", headers=auth(env["keys"]["a"])).json()
    assert deleted == {"id": created["id"], "object": "file", "deleted": True}
    assert get(env, f"/v1/files/{created['id']}").status_code == 404


@pytest.mark.parametrize("data,purpose,status,words", [
    (b"", "fine-tune", 400, "empty"),
    (b"not json at all\n", "fine-tune", 400, "not JSONL"),
    (b"\xff\xfe\x00bad", "fine-tune", 400, "UTF-8"),
    (GOOD + b'{"a": "' + "\u00e9".encode() * 40000 + b'"}\n', "fine-tune", 200, ""),  # a character cut at 64 KiB
    (GOOD, "assistants", 400, "purpose"),
    (b"x" * (129 * 1024), "fine-tune", 413, "too large"),  # cut by the route
])
def test_bad_uploads_are_4xx_error_objects(env, data, purpose, status, words):
    response = upload(env, data=data, purpose=purpose)
    assert response.status_code == status
    if status != 200:
        assert words in error_of(response)["message"]


def test_bad_job_requests_name_the_problem(env):
    file_id = upload(env).json()["id"]
    client, headers = env["client"], {**auth(env["keys"]["a"]), "Content-Type": "application/json"}
    malformed = client.post("/v1/fine_tuning/jobs", headers=headers, content=b'{"model": "llama-demo",')
    assert malformed.status_code == 400 and "JSON" in error_of(malformed)["message"]
    wrong_type = create(env, training_file=file_id, seed="abc")
    assert wrong_type.status_code == 400 and error_of(wrong_type)["param"] == "seed"
    unknown = create(env, training_file=file_id, bogus=1)
    assert unknown.status_code == 400 and error_of(unknown)["message"] == "Unrecognized request argument supplied: bogus"
    missing = create(env)
    assert missing.status_code == 400 and error_of(missing)["param"] == "training_file"
    model = create(env, model="gpt-9", training_file=file_id)
    assert model.status_code == 404 and error_of(model)["code"] == "model_not_found"
    no_file = create(env, training_file="file-nope")
    assert no_file.status_code == 400 and error_of(no_file)["param"] == "training_file"
    spec_field = create(env, training_file=file_id, lorafleet={"lora": {"r": -1}})
    assert spec_field.status_code == 400 and error_of(spec_field)["param"] == "lorafleet.lora.r"
    unknown_spec = create(env, training_file=file_id, lorafleet={"training": {"stepz": 3}})
    assert error_of(unknown_spec)["message"] == "lorafleet.training.stepz: unknown field"
    reserved = create(env, training_file=file_id, lorafleet={"checkpoint": {"storage": "/etc"}})
    assert reserved.status_code == 400 and error_of(reserved)["param"] == "lorafleet.checkpoint.storage"
    hyper = create(env, training_file=file_id, hyperparameters={"n_epochs": "many"})
    assert hyper.status_code == 400 and error_of(hyper)["param"].startswith("hyperparameters.n_epochs")
    assert env["db"].rows("SELECT id FROM jobs") == []


def test_job_object_and_hyperparameters(env):
    job = job_with_file(env, hyperparameters={"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 0.5},
                        suffix="demo", seed=7, metadata={"team": "x"})
    assert job["object"] == "fine_tuning.job" and job["status"] == "validating_files"
    assert job["id"].startswith("ftjob-") and job["organization_id"] == "team-a" and job["seed"] == 7
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 0.5}
    assert job["lorafleet"]["steps"] == 10  # 2 epochs x 40 records / 8 per step
    assert job["user_provided_suffix"] == "demo" and job["metadata"] == {"team": "x"}
    spec = env["db"].row("SELECT spec FROM jobs WHERE id = ?", [job["id"]])["spec"]
    assert spec["training"]["learning_rate"] == pytest.approx(1.5e-3) and spec["name"] == job["id"]


def test_lifecycle_events_and_models(env):
    job = job_with_file(env, lorafleet={"training": {"steps": 2}})
    env["scheduler"].tick()
    assert get(env, f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "running"
    assert env["ray"].submitted == [job["id"]]
    env["ray"].finish(job["id"], adapter="/runs/a/checkpoint_9")
    env["scheduler"].tick()
    done = get(env, f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert done["status"] == "succeeded" and done["fine_tuned_model"] == "/runs/a/checkpoint_9"
    assert done["trained_tokens"] == 100 and done["finished_at"] is not None
    events = get(env, f"/v1/fine_tuning/jobs/{job['id']}/events?limit=100").json()["data"]
    metrics = [e for e in events if e["type"] == "metrics"]
    assert [e["data"]["step"] for e in metrics] == [2, 1]  # newest first, as OpenAI lists them
    assert metrics[0]["data"]["train_loss"] == pytest.approx(2.8)
    assert "successfully completed" in events[0]["message"]
    env["scheduler"].tick()  # a later poll (or a restarted service) adds nothing
    assert len(get(env, f"/v1/fine_tuning/jobs/{job['id']}/events?limit=100").json()["data"]) == len(events)
    models = {m["id"]: m for m in get(env, "/v1/models").json()["data"]}
    assert "llama-demo" in models and models["/runs/a/checkpoint_9"]["owned_by"] == "team-a"
    assert "/runs/a/checkpoint_9" not in {m["id"] for m in get(env, "/v1/models", who="b").json()["data"]}
    assert get(env, "/v1/models/llama-demo").json()["id"] == "llama-demo"
    assert get(env, "/v1/models/nope").status_code == 404


def test_invalid_training_file_fails_the_job_naming_the_line(env):
    bad = GOOD + b'{"messages": [{"role": "wizard", "content": "hi"}]}\n'
    file_id = upload(env, data=bad).json()["id"]
    job = create(env, training_file=file_id).json()
    env["scheduler"].tick()
    failed = get(env, f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_training_file"
    assert "line 41" in failed["error"]["message"] and file_id in failed["error"]["message"]
    assert env["ray"].submitted == []


def test_pagination(env):
    ids = [job_with_file(env)["id"] for _ in range(5)]
    first = get(env, "/v1/fine_tuning/jobs?limit=2").json()
    assert [j["id"] for j in first["data"]] == ids[::-1][:2] and first["has_more"]
    rest = get(env, f"/v1/fine_tuning/jobs?limit=10&after={first['data'][-1]['id']}").json()
    assert [j["id"] for j in rest["data"]] == ids[::-1][2:] and not rest["has_more"]
    assert get(env, "/v1/fine_tuning/jobs?limit=0").status_code == 400
    other = job_with_file(env, who="b")["id"]
    assert get(env, f"/v1/fine_tuning/jobs?after={other}").status_code == 400  # not in team-a's list
    assert get(env, f"/v1/fine_tuning/jobs?after={other}", who="admin").status_code == 200


def test_tenants_are_isolated_and_admin_sees_all(env):
    job = job_with_file(env, who="a")
    file_id = job["training_file"]
    for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content", f"/v1/fine_tuning/jobs/{job['id']}",
                 f"/v1/fine_tuning/jobs/{job['id']}/events", f"/v1/fine_tuning/jobs/{job['id']}/checkpoints"):
        response = get(env, path, who="b")
        assert response.status_code == 404, path
        assert get(env, path, who="admin").status_code == 200, path
    client, b = env["client"], auth(env["keys"]["b"])
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=b).status_code == 404
    assert client.delete(f"/v1/files/{file_id}", headers=b).status_code == 404
    assert create(env, who="b", training_file=file_id).status_code == 400  # cannot train on it either
    assert get(env, "/v1/fine_tuning/jobs", who="b").json()["data"] == []
    assert get(env, "/v1/files", who="b").json()["data"] == []
    assert len(get(env, "/v1/fine_tuning/jobs", who="admin").json()["data"]) == 1


def test_cancel_queued_running_and_finished(env):
    queued = job_with_file(env)
    cancelled = env["client"].post(f"/v1/fine_tuning/jobs/{queued['id']}/cancel", headers=auth(env["keys"]["a"]))
    assert cancelled.json()["status"] == "cancelled"
    again = env["client"].post(f"/v1/fine_tuning/jobs/{queued['id']}/cancel", headers=auth(env["keys"]["a"]))
    assert again.status_code == 400 and error_of(again)["code"] == "job_not_cancellable"
    running = job_with_file(env)
    env["scheduler"].tick()
    assert env["ray"].jobs[running["id"]]["status"] == "RUNNING"
    env["client"].post(f"/v1/fine_tuning/jobs/{running['id']}/cancel", headers=auth(env["keys"]["a"]))
    env["scheduler"].tick()
    assert env["ray"].jobs[running["id"]]["status"] == "STOPPED"
    assert get(env, f"/v1/fine_tuning/jobs/{running['id']}").json()["status"] == "cancelled"
    assert queued["id"] not in env["ray"].submitted


def test_queue_runs_by_priority_then_fifo_with_capacity_for_one(env):
    low = job_with_file(env, metadata={"priority": "0"})["id"]
    high = job_with_file(env, metadata={"priority": "5"})["id"]
    low2 = job_with_file(env, metadata={"priority": "0"})["id"]
    env["db"].execute("UPDATE tenants SET max_concurrent = 10")
    order = []
    for _ in range(3):
        env["scheduler"].tick()
        running = [r["id"] for r in env["db"].rows("SELECT id FROM jobs WHERE status = 'running'")]
        assert len(running) == 1  # 2 CPUs, each job asks for 2 workers x 1 CPU
        order.append(running[0])
        env["ray"].finish(running[0])
        env["scheduler"].tick()
    assert order == [high, low, low2]


def test_a_tenant_at_its_quota_waits_while_another_runs(env):
    env["ray"].cpus = 8
    a1, a2 = job_with_file(env, who="a")["id"], job_with_file(env, who="a")["id"]
    b1 = job_with_file(env, who="b")["id"]
    env["scheduler"].tick()
    status = {r["id"]: r["status"] for r in env["db"].rows("SELECT id, status FROM jobs")}
    assert status == {a1: "running", a2: "queued", b1: "running"}


def test_restart_reconciles_without_duplicates(env):
    first = job_with_file(env, lorafleet={"training": {"steps": 2}})["id"]
    second = job_with_file(env)["id"]
    env["scheduler"].tick()
    env["ray"].jobs[first]["logs"] = STEP_MARK + json.dumps({"step": 1, "loss": 2.0, "tokens_per_s": 10.0,
                                                             "step_time_s": 1.0}) + "\n"
    env["scheduler"].tick()
    # A new service process: same database, fresh scheduler. The first job ended on Ray while it was down.
    env["ray"].jobs[first]["logs"] = ""
    env["ray"].finish(first)
    restarted = Scheduler(Database(f"sqlite:///{env['path']}/api.db"), env["files"], env["ray"])
    restarted.tick()
    restarted.tick()
    assert env["ray"].submitted == [first, second]
    steps = [e["data"]["step"] for e in env["db"].rows("SELECT data FROM events WHERE job_id = ? AND type = "
                                                     "'metrics' ORDER BY seq", [first])]
    assert steps == [1, 1, 2] or steps == [1, 2]
    assert env["db"].row("SELECT status FROM jobs WHERE id = ?", [first])["status"] == "succeeded"
    assert env["db"].row("SELECT status FROM jobs WHERE id = ?", [second])["status"] == "running"


def test_running_job_unknown_to_ray_is_submitted_once_more(env):
    job = job_with_file(env)["id"]
    env["scheduler"].tick()
    del env["ray"].jobs[job]  # recorded as running, but the submission never reached Ray
    env["scheduler"].tick()
    assert env["ray"].submitted == [job, job] and job in env["ray"].jobs


def test_upload_over_the_limit_is_refused_by_its_declared_length(env):
    response = upload(env, data=b"x" * (300 * 1024))
    assert response.status_code == 413 and error_of(response)["code"] == "file_too_large"


def test_checkpoints_from_the_run_folder(env):
    from lorafleet.service.app import checkpoint_objects

    job = job_with_file(env)
    row = env["db"].row("SELECT * FROM jobs WHERE id = ?", [job["id"]])
    run = env["path"] / "runs" / job["id"]
    row["spec"]["checkpoint"]["storage"] = str(env["path"] / "runs")
    row["validation_file"] = "file-v"
    for step in (2, 4):
        folder = run / f"checkpoint_00000{step}"
        folder.mkdir(parents=True)
        (folder / "lorafleet.json").write_text(json.dumps({"step": step}))
    (run / "checkpoint_000006").mkdir()  # being written: no lorafleet.json yet
    (run / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": 3.0 - s / 10, "eval_loss": 3.5 - s / 10})
                                                 for s in range(1, 5)) + "\n")
    found = checkpoint_objects(row)
    assert [c["step_number"] for c in found] == [4, 2]
    assert found[0]["metrics"]["train_loss"] == pytest.approx(2.6) and found[0]["metrics"]["valid_loss"] == pytest.approx(3.1)
    assert found[0]["fine_tuned_model_checkpoint"] == str(run / "checkpoint_000004")
    assert found[0]["object"] == "fine_tuning.job.checkpoint" and found[0]["fine_tuning_job_id"] == job["id"]


def test_a_job_larger_than_the_cluster_does_not_hold_back_the_queue(env):
    huge = job_with_file(env, metadata={"priority": "9"}, lorafleet={"scaling": {"resources_per_worker": {"CPU": 64}}})
    small = job_with_file(env)
    env["scheduler"].tick()
    status = {r["id"]: r["status"] for r in env["db"].rows("SELECT id, status FROM jobs")}
    assert status == {huge["id"]: "queued", small["id"]: "running"}


def test_database_urls_and_a_newer_schema_are_refused(tmp_path):
    from lorafleet.service.db import DatabaseError

    with pytest.raises(DatabaseError, match="only sqlite"):
        Database("postgresql://host/db")
    url = f"sqlite:///{tmp_path}/new.db"
    Database(url).execute("UPDATE schema_version SET version = 99")
    with pytest.raises(DatabaseError, match="newer than this lorafleet"):
        Database(url)


def test_ray_backend_treats_a_refused_resubmission_of_a_known_job_as_submitted():
    from lorafleet.remote.client import RemoteError
    from lorafleet.service.scheduler import RayBackend

    class Client:
        def __init__(self, known):
            self.known = known

        def submit(self, spec, submission_id):
            raise RemoteError("Ray Jobs API at http://x: Request failed with status code 500: Traceback ...")

        def info(self, job_id):
            if job_id not in self.known:
                raise RemoteError(f"no job '{job_id}' on the Ray cluster at http://x (see `lorafleet list`)")
            return {"status": "RUNNING"}

    backend = RayBackend.__new__(RayBackend)
    backend.client = Client({"ftjob-1"})
    backend.submit(None, "ftjob-1")  # already on Ray: fine
    with pytest.raises(RemoteError):
        backend.submit(None, "ftjob-2")  # a real refusal
