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
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

TESTS = Path(__file__).resolve().parent
# `helpers` for every test module, whatever directory pytest imported it from; scripts/ for the development-time
# generators (scripts/demo_data.py, scripts/demo_alora.py) that some tests call.
sys.path[:0] = [p for p in (str(TESTS), str(TESTS.parent / "scripts")) if p not in sys.path]

import pytest  # noqa: E402

from lorafleet.data.tokenizer import load_tokenizer  # noqa: E402

from helpers.cli import run_cli  # noqa: E402
from helpers.gcs_server import running_gcs_server  # noqa: E402
from helpers.models import save_family_models  # noqa: E402
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


@pytest.fixture(scope="module")
def tok():
    """lorafleet's built-in tokenizer; one per module (tests may set its padding side)."""
    return load_tokenizer()


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory) -> dict[str, Path]:
    """Family -> path of a tiny random-init saved model of that family ([`helpers.models.save_family_models`])."""
    return save_family_models(tmp_path_factory.mktemp("kernel_models"))
