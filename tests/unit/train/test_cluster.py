"""Where a run's Ray comes from (`lorafleet.train.cluster`): how `start_ray` decides between an instance of the job's
own and a cluster to join (with `ray.init` replaced, so nothing starts), and the background start `lorafleet submit`
begins while its pre-flight runs (a real embedded instance, in a subprocess of its own)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import ray

from lorafleet.runstore.location import storage_env
from lorafleet.spec import SpecError
from lorafleet.train.cluster import start_ray, start_ray_in_background, started_here

from helpers.s3_server import SECRET_KEY


# -- deciding, without Ray ----------------------------------------------------------------------------------------


@pytest.fixture
def fake_ray(monkeypatch):
    """`ray.init` recorded instead of run, and a one-node cluster for the joining line."""
    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": False}])
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray, "get_runtime_context", lambda: type("C", (), {"gcs_address": "10.0.0.5:6379"})())
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    return calls


def test_without_an_address_a_new_instance_even_beside_a_running_one(fake_ray, capsys):
    # address="local": Ray starts a new instance even when `ray start` left its address in ray_current_cluster,
    # where plain ray.init() would join it.
    assert start_ray() is None
    (kwargs,) = fake_ray
    assert kwargs["address"] == "local" and kwargs["include_dashboard"] is False
    assert "runtime_env" not in kwargs  # the instance's processes inherit this environment
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("given", ["option", "env"])
def test_joining_says_so_and_carries_the_storage_settings(fake_ray, monkeypatch, capsys, given):
    if given == "env":
        monkeypatch.setenv("RAY_ADDRESS", "auto")
    line = start_ray("10.0.0.5:6379" if given == "option" else None)
    (kwargs,) = fake_ray
    assert kwargs["address"] == ("10.0.0.5:6379" if given == "option" else "auto")
    assert kwargs["runtime_env"]["env_vars"] == storage_env()
    assert kwargs["runtime_env"]["env_vars"]["AWS_SECRET_ACCESS_KEY"] == SECRET_KEY
    source = "--address=10.0.0.5:6379" if given == "option" else "RAY_ADDRESS=auto"
    assert line.startswith(f"lorafleet: joined the Ray cluster at 10.0.0.5:6379 ({source}): 1 node, 2 CPUs; ")
    assert "AWS_SECRET_ACCESS_KEY" in line and SECRET_KEY not in line
    assert capsys.readouterr().err == line + "\n"


def test_a_jobs_api_entrypoint_keeps_its_jobs_runtime_env(fake_ray, monkeypatch):
    # The job supervisor sets RAY_ADDRESS and the job's runtime env; ray.init would refuse env_vars it also sets.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"A": "1"}}}))
    start_ray()
    assert "runtime_env" not in fake_ray[0]


def test_a_cluster_that_does_not_answer_is_one_line(fake_ray, monkeypatch):
    def refuse(**kwargs):
        raise ConnectionError("Could not find any running Ray instance.\nPlease specify ...")

    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(SpecError) as err:
        start_ray("auto")
    assert err.value.problems == [
        "--address: cannot join the Ray cluster at 'auto' (Could not find any running Ray instance.)"
    ]
    # An explicit address gets Ray's token only in token mode, which `ray start` clusters use by default.
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    with pytest.raises(SpecError) as err:
        start_ray()
    assert err.value.problems == [
        "RAY_ADDRESS: cannot join the Ray cluster at '10.0.0.5:6379' (Could not find any running Ray instance.); "
        "a cluster with token authentication needs RAY_AUTH_MODE=token here"
    ]


def test_ray_refuses_a_drivers_env_vars_that_repeat_its_jobs():
    # compat.ray item 4: why a Jobs API entrypoint passes no runtime env of its own.
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
    from ray.runtime_env.runtime_env import _merge_runtime_env

    assert RAY_JOB_CONFIG_JSON_ENV_VAR == "RAY_JOB_CONFIG_JSON_ENV_VAR"
    assert _merge_runtime_env({"env_vars": {"A": "1"}}, {"env_vars": {"A": "2"}}) is None
    assert _merge_runtime_env({"env_vars": {"A": "1"}}, {"env_vars": {"B": "2"}}) == {"env_vars": {"A": "1", "B": "2"}}




def test_joining_is_never_started_in_the_background(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert start_ray_in_background("10.0.0.5:6379") is False
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert start_ray_in_background() is False
    assert not started_here()


# -- a background start, on a real instance ------------------------------------------------------------------------

BACKGROUND = """
import json, os, signal, sys, time
import psutil, ray
from lorafleet.train.cluster import start_ray, start_ray_in_background, started_here, stop_background_ray

terms = []
signal.signal(signal.SIGTERM, lambda signum, frame: terms.append(signum))  # as `lorafleet submit` stops a run
began = start_ray_in_background()
waited = start_ray()  # what the driver calls: it waits for the background start instead of starting another
time.sleep(2)  # the helper thread's start is long over: the instance must still answer
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.5)
answer = ray.get(ray.remote(lambda: 41 + 1).remote())
gcs = [p for p in psutil.Process().children(recursive=True) if "gcs_server" in " ".join(p.cmdline())]
out = {"began": began, "waited": waited, "answer": answer, "here": started_here(), "gcs": len(gcs),
       "again": start_ray_in_background(), "terms": terms}
stop_background_ray()
out["stopped"] = not ray.is_initialized()
out["gcs_left"] = len([p for p in gcs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE])
print(json.dumps(out))
"""


def test_a_background_start_is_the_instance_the_run_uses_and_stops_when_undone():
    result = subprocess.run([sys.executable, "-c", BACKGROUND], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SIGTERM handler" not in result.stderr  # Ray's note on a start off the main thread is not shown
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["began"] is True and out["waited"] is None and out["here"] is True
    # Ray starts the GCS with PR_SET_PDEATHSIG, so a thread that ended after its start would have taken it along.
    assert out["answer"] == 42 and out["gcs"] == 1
    assert out["again"] is False  # one background start per process
    # The driver's own SIGTERM handler runs, and only it: not the crash handler ray.init installs for SIGTERM, which
    # prints a stack trace (and made `lorafleet submit` abort on its way out after a clean stop).
    assert out["terms"] == [15] and "SIGTERM received" not in result.stderr, result.stderr[-2000:]
    assert out["stopped"] is True and out["gcs_left"] == 0
