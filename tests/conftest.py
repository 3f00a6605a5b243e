"""Session setup and the fixtures shared across test modules.

Shared code lives in `tests/helpers/` (imported as `helpers.<module>`: this file puts `tests/` on `sys.path`); no test
module imports another. Everything under `tests/e2e/` is marked slow here, by place, so `-m "not slow"` skips every
Ray job and end-to-end run.
"""

import os
import sys
import tempfile
from pathlib import Path

# The Triton interpreter must be on before any @triton.jit function is defined (STACK-NOTES).
os.environ.setdefault("TRITON_INTERPRET", "1")
# Materialized models and default run storage go to a throwaway home unless CI already chose one.
os.environ.setdefault("LORAFLEET_HOME", tempfile.mkdtemp(prefix="lorafleet-test-home-"))
# So does what `datasets.load_dataset` writes (data.hub examples and tests): read once, when datasets is imported.
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="lorafleet-test-hf-datasets-"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

TESTS = Path(__file__).resolve().parent
# `helpers` for every test module, whatever directory pytest imported it from; scripts/ for the development-time
# generators (scripts/demo_data.py, scripts/demo_alora.py) that some tests call.
sys.path[:0] = [p for p in (str(TESTS), str(TESTS.parent / "scripts")) if p not in sys.path]

import pytest  # noqa: E402

from lorafleet.data.tokenizer import load_tokenizer  # noqa: E402

from helpers.cli import run_cli  # noqa: E402
from helpers.gcs_server import running_gcs_server  # noqa: E402
from helpers.hub import hub_env  # noqa: E402
from helpers.models import save_family_models  # noqa: E402
from helpers.ray_cluster import LocalRayCluster  # noqa: E402
from helpers.s3_server import running_s3_server  # noqa: E402

E2E = TESTS / "e2e"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.is_relative_to(E2E):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def cli():
    """[`helpers.cli.run_cli`]: `lorafleet ARGS` in a fresh interpreter."""
    return run_cli


@pytest.fixture(scope="session")
def shared_ray():
    """One `ray start` cluster (2 CPUs, token auth, none of this shell's storage settings) for the whole session."""
    hidden = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("AWS_")}
    try:
        cluster = LocalRayCluster(auth=True, num_cpus=2)
    finally:
        os.environ.update(hidden)
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="module")
def joined_ray(shared_ray):
    """For the module's duration, `lorafleet` commands join [`shared_ray`] (`RAY_ADDRESS` and its token in this
    environment) instead of starting a Ray instance each: a run's own start costs more than a small run's training.
    Modules that check the start of a run's own instance (test_submit, test_interrupts, ...) do not use it. Returns
    the variables set."""
    env = {**shared_ray.client_env(), "RAY_ADDRESS": shared_ray.gcs_address, "RAY_AUTH_MODE": "token"}
    changed = {k: v for k, v in env.items() if os.environ.get(k) != v}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in changed.items():
            patch.setenv(key, value)
        yield changed


@pytest.fixture
def console_restored(monkeypatch):
    """Undo what a command run in this process (click's `CliRunner`) set up for its console
    (`lorafleet.cli.console.configure_console`: lorafleet's log handler, quieted loggers, `warnings.showwarning`, the
    environment), so later tests see the logging they expect."""
    import logging
    import warnings

    from lorafleet.cli.console import QUIET_ENV, QUIET_LOGGERS

    own = logging.getLogger("lorafleet")
    saved = (list(own.handlers), own.propagate, own.level, warnings.showwarning)
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    for key in QUIET_ENV:  # monkeypatch restores a variable it was told about, whatever sets it later
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])
        else:
            monkeypatch.delenv(key, raising=False)
    yield
    own.handlers[:], own.propagate, own.level, warnings.showwarning = saved
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on 127.0.0.1 with one bucket; the AWS_* variables point at it for the module's duration."""
    with running_s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def gcs_server():
    """fake-gcs-server on 127.0.0.1 with one bucket, for the module's duration (no environment variable set)."""
    with running_gcs_server() as server:
        yield server


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> dict[str, str]:
    """`datasets` offline with its cache in this test's folder (here and, through the returned environment, in a
    `lorafleet` subprocess), so hub tests read only local dataset folders and leave nothing in the user's cache."""
    import datasets

    env = hub_env(tmp_path / "hf-datasets")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # datasets reads these variables once, at import.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(env["HF_DATASETS_CACHE"]))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return env


@pytest.fixture(scope="module")
def tok():
    """lorafleet's built-in tokenizer; one per module (tests may set its padding side)."""
    return load_tokenizer()


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory) -> dict[str, Path]:
    """Family -> path of a tiny random-init saved model of that family ([`helpers.models.save_family_models`])."""
    return save_family_models(tmp_path_factory.mktemp("kernel_models"))
