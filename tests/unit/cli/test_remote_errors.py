"""Remote commands refused before any cluster is involved: each is one `error:` line and exit 2."""

from helpers.cli import one_line_error, run_cli
from helpers.net import free_port


def test_unreachable_address_is_one_line(monkeypatch):
    # run_cli adds its env to this process's environment: a RAY_ADDRESS of the developer's would name a cluster.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    env = {"RAY_AUTH_TOKEN": "x"}
    line = one_line_error(run_cli("list", "--address", f"http://127.0.0.1:{free_port()}", env=env, timeout=120))
    assert "cannot reach" in line
    line = one_line_error(run_cli("status", "some-job", "--address", "127.0.0.1:6379", env=env, timeout=120))
    assert "not a Ray dashboard URL" in line
    assert "no cluster given" in one_line_error(run_cli("stop", "some-job", env=env, timeout=120))
