"""The repository's paths, the tiny-run overrides, and `lorafleet` run as a user runs it (a fresh interpreter)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
JOBS = REPO / "jobs"
# The suite's own job (a random-weights base built from a config, no evaluation): see tests/jobs/llama.yaml.
TEST_JOB = REPO / "tests" / "jobs" / "llama.yaml"
FAULTY_CLI = Path(__file__).with_name("faulty_cli.py")

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


def _command(faults: Sequence[str]) -> list[str]:
    return [sys.executable, str(FAULTY_CLI), *faults, "--"] if faults else [sys.executable, "-m", "lorafleet.cli"]


def run_cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600, faults: Sequence[str] = ()
) -> subprocess.CompletedProcess:
    """Run `lorafleet ARGS` in a fresh interpreter, the way a user does; `env` is added to this process's environment.
    `faults` (options of `faulty_cli.py`, e.g. `["--nan-at", "3"]`) injects those faults into the run's workers."""
    return subprocess.run(
        [*_command(faults), *args],
        cwd=cwd or REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def submit_small(
    name: str, storage, *overrides: str, env: dict | None = None, faults: Sequence[str] = ()
) -> tuple[subprocess.CompletedProcess, dict]:
    """`lorafleet submit jobs/llama.yaml --json` with [`SMALL_RUN`] into `storage` (`faults`: see [`run_cli`]); returns
    the process and the JSON summary (`{}` when nothing was printed)."""
    sets = [f"name={name}", f"checkpoint.storage={storage}", *SMALL_RUN, *overrides]
    args = [a for s in sets for a in ("--set", s)]
    proc = run_cli("submit", "tests/jobs/llama.yaml", "--json", *args, env=env, timeout=600, faults=faults)
    lines = proc.stdout.strip().splitlines()
    return proc, json.loads(lines[-1]) if lines else {}


class Submitted:
    """`lorafleet submit jobs/llama.yaml --json` into `storage` with [`SMALL_RUN`] (unless `small=False`) and
    `overrides`, running in the background (`env`, `faults`: see [`run_cli`]). Its stderr is read as it comes, so a
    test can act at a given step (the `[name] step k/N` progress lines)."""

    def __init__(self, name: str, storage, *overrides: str, small: bool = True, env: dict | None = None,
                 faults: Sequence[str] = ()):
        self.name = name
        sets = [f"name={name}", f"checkpoint.storage={storage}", *(SMALL_RUN if small else []), *overrides]
        args = [*_command(faults), "submit", "tests/jobs/llama.yaml", "--json"]
        args += [a for s in sets for a in ("--set", s)]
        self.proc = subprocess.Popen(args, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.step = 0
        self._seen = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._seen:
                self.lines.append(line)
                match = re.match(rf"\[{re.escape(self.name)}\] step (\d+)/", line)
                if match:
                    self.step = int(match.group(1))
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    def wait_for_step(self, step: int, timeout: float = 300) -> int:
        """Block until a progress line reports `step` or later; returns the step seen."""
        with self._seen:
            ok = self._seen.wait_for(lambda: self.step >= step or self.proc.poll() is not None, timeout=timeout)
        assert ok and self.step >= step, "".join(self.lines)[-3000:]
        return self.step

    def finish(self, timeout: float = 600) -> tuple[int, str, dict]:
        """Wait for the end: exit code, whole stderr, JSON summary (`{}` if none)."""
        stdout = self.proc.stdout.read()
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=30)
        lines = stdout.strip().splitlines()
        return self.proc.returncode, "".join(self.lines), json.loads(lines[-1]) if lines else {}


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The single `error: ...` line a refused command prints (exit 2, no traceback); asserts that shape."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# The small run as one worker (the global batch kept by accumulation), evaluated at every checkpoint.
SWEEP_TRIAL = [o for o in SMALL_RUN if not o.startswith(("training.steps", "checkpoint.every", "checkpoint.keep"))] + [
    "scaling.num_workers=1",
    "training.grad_accum=2",
    "data.group_by_length=false",
    "eval.max_samples=16",
    "checkpoint.keep=1",
]


def sweep_args(storage: Path, *extra: str) -> list[str]:
    """`lorafleet sweep jobs/sweep.yaml --json` arguments: trials of [`SWEEP_TRIAL`] stored in `storage`, with `extra`
    overrides (job fields or `sweep.*`)."""
    return [
        "sweep", str(JOBS / "sweep.yaml"), "--json",
        *(a for o in SWEEP_TRIAL for a in ("--set", o)),
        "--set", f"checkpoint.storage={storage}",
        *(a for o in extra for a in ("--set", o)),
    ]
