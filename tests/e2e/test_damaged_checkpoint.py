"""A checkpoint damaged in storage, end to end through the CLI (slow: two runs start Ray).

A finished run keeps its two newest checkpoints (steps 4 and 6); the newest one's adapter is then cut in half, as an
interrupted copy or a bad disk would leave it. Re-submitted with more steps, the run must say which checkpoint it
skipped and why, and resume from the one before, exactly: the loss of step 5 is again the one the first run had.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers.cli import submit_small as submit
from helpers.runs import losses

# Runs join the session's Ray cluster rather than each starting one (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("joined_ray")


def test_resubmit_skips_a_damaged_checkpoint_and_resumes_from_the_one_before(tmp_path):
    storage = tmp_path / "runs"
    proc, summary = submit("damaged", storage)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = losses(storage, "damaged")
    latest = Path(summary["adapter_uri"])
    assert json.loads((latest / "lorafleet.json").read_text())["step"] == 6
    adapter = latest / "adapter_model.safetensors"
    size = adapter.stat().st_size
    adapter.write_bytes(adapter.read_bytes()[: size // 2])

    proc, summary = submit("damaged", storage, "training.steps=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["start_step"] == 4 and summary["steps"] == 8, summary
    assert (
        f"lorafleet: checkpoint {latest.name} is damaged or incomplete: adapter_model.safetensors is {size // 2} "
        f"bytes, not the {size} written (cut off or replaced); trying an older one"
    ) in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    # Step 5 trains on the weights, optimizer state and RNG of checkpoint 4 (its learning rate follows the longer
    # schedule only from that step's update on): the same loss as the first time.
    assert losses(storage, "damaged")[5] == first[5]
