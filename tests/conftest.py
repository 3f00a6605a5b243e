import os
import subprocess
import sys
import tempfile
from pathlib import Path

# The Triton interpreter must be on before any @triton.jit function is defined (STACK-NOTES).
os.environ.setdefault("TRITON_INTERPRET", "1")
# Materialized models and default run storage go to a throwaway home unless CI already chose one.
os.environ.setdefault("LORAFLEET_HOME", tempfile.mkdtemp(prefix="lorafleet-test-home-"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
# The development-time generators (scripts/demo_data.py, scripts/demo_alora.py) are importable by the tests.
sys.path.insert(0, str(REPO / "scripts"))

# Overrides that shrink the default job to a few seconds of training: enough to exercise checkpoints, resume and
# storage, in fp32 so results can be compared bitwise. LoRA dropout is on so that every worker's RNG stream shapes the
# losses: a resume that restored any worker's RNG state wrongly would show.
SMALL_RUN = [
    "lora.dropout=0.1",
    "kernels.enabled=false",
    "model.config.num_hidden_layers=2",
    "model.dtype=float32",
    "quantization.compute_dtype=float32",
    "training.dtype=float32",
    "data.max_length=64",
    "training.micro_batch_size=4",
    "training.steps=6",
    "training.warmup=1",
    "checkpoint.every_n_steps=2",
    "checkpoint.keep=2",
]


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `lorafleet ARGS` in a fresh interpreter, the way a user does."""
    return subprocess.run(
        [sys.executable, "-m", "lorafleet.cli", *args],
        cwd=cwd or REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def default_job() -> Path:
    return JOBS / "llama.yaml"
