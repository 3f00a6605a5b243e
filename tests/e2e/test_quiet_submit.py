"""A local `lorafleet submit` without `--verbose` shows only lorafleet's own lines: no DeepSpeed banner (DeepSpeed is
not even imported by a DDP job), no "Writing model shards" bar when the base model is materialized, no Ray
token-authentication banner, no library warnings."""

import pytest

from helpers.cli import run_cli, TEST_JOB
from helpers.console import foreign_lines


@pytest.mark.slow
def test_a_small_submit_shows_only_lorafleets_lines(tmp_path):
    storage = tmp_path / "runs"
    # A fresh home, so the run materializes its base model (the save that used to import DeepSpeed).
    result = run_cli(
        "submit", str(TEST_JOB),
        "--set", "training.steps=3", "--set", "training.warmup=1", "--set", "checkpoint.every_n_steps=3",
        "--set", f"checkpoint.storage={storage}",
        env={"LORAFLEET_HOME": str(tmp_path / "home")},
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert foreign_lines(result.stderr) == [], result.stderr
    assert "[llama-tasks] step 3/3" in result.stderr and "lorafleet: llama-tasks: done, loss" in result.stderr
    # stdout is the result alone (DeepSpeed's accelerator warning went to stdout).
    (line,) = result.stdout.splitlines()
    assert line.startswith(f"adapter: {storage}/llama-tasks/checkpoint_")
    assert (tmp_path / "home" / "models").is_dir()
