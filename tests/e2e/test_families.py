"""Every family of the registry trains through `lorafleet submit`, on the transformers this install resolved: a
2-step job on a 1-layer model of the family, one worker, every fused path on.

A family whose model transformers refuses to build the way lorafleet loads it (gemma2 and SDPA attention, since
transformers 5.24) fails here before its first step, whatever the unit tests of the pieces say.

The jobs join the session's Ray cluster (`joined_ray`) instead of each starting its own: training takes ~1 s of a
case, Ray's start ~20 s (tests/e2e/test_submit.py covers the start of a run's own instance).
"""

import json
import math
from pathlib import Path

import pytest

from lorafleet.families import FAMILY_NAMES

from helpers.cli import run_cli, TEST_JOB

# The cheapest job that still builds, trains, checkpoints and reports: one decoder layer (its attention, MLP and the
# fused loss on the LM head), two steps, one checkpoint, one worker.
TINY = [
    "model.config.num_hidden_layers=1",
    "data.max_length=64",
    "training.micro_batch_size=4",
    "training.steps=2",
    "training.warmup=0",
    "checkpoint.every_n_steps=2",
    "scaling.num_workers=1",
]


pytestmark = pytest.mark.usefixtures("joined_ray")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_trains_through_submit(family, tmp_path):
    sets = [f"name=family-{family}", f"model.architecture={family}", f"checkpoint.storage={tmp_path}", *TINY]
    result = run_cli("submit", str(TEST_JOB), "--json", *(a for s in sets for a in ("--set", s)))
    lines = result.stdout.strip().splitlines()
    assert lines, f"{family}: no summary (exit {result.returncode}):\n{result.stderr[-3000:]}"
    summary = json.loads(lines[-1])
    assert result.returncode == 0 and summary["status"] == "succeeded", f"{family}: {summary.get('error')}"
    assert summary["steps"] == 2
    assert math.isfinite(summary["first_loss"]) and math.isfinite(summary["final_loss"]), summary
    # One decoder layer: the MLP, Q/K/V and O paths fused on it, and the loss on the (frozen, possibly tied) LM head.
    assert summary["kernels"] == {"mlp": 1, "qkv": 1, "o": 1, "loss": 1}, summary["kernels"]
    adapter = Path(summary["adapter_uri"])
    assert adapter.is_relative_to(tmp_path) and (adapter / "adapter_model.safetensors").is_file()
