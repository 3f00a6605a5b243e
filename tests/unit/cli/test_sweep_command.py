"""`lorafleet sweep` refusals: each one `error:` line with exit code 2, before any Ray instance or job starts."""

from __future__ import annotations

import pytest

from helpers.cli import JOBS, one_line_error

SWEEP = str(JOBS / "sweep.yaml")


@pytest.mark.parametrize(
    "args, words",
    [
        (["--resume", "--fresh"], "--resume: cannot be given with --fresh"),
        (["--wait"], "--wait: needs a Jobs API address"),
        (["--address", "http://127.0.0.1:9", "--fresh"], "--fresh: not available with a Jobs API address"),
        (["--set", "sweep.params.lora.r={choice: [0]}"], "lora.r"),
        (["--set", "sweep.scheduler=hyperband"], "sweep.scheduler"),
        (["--address", "http://127.0.0.1:9"], "cannot reach the Ray Jobs API at http://127.0.0.1:9"),
    ],
)
def test_refusals_are_one_line(cli, tmp_path, args, words):
    line = one_line_error(cli("sweep", SWEEP, "--set", f"checkpoint.storage={tmp_path}", *args))
    assert words in line
    assert not any(tmp_path.iterdir())  # nothing started, nothing written
