"""`lorafleet ARGS` with faults injected into the run's workers (see `helpers.faults`):

    python tests/helpers/faulty_cli.py [--kill-at K --kill-once-file PATH [--kill-rank R]] [--nan-at K]
        [--stop-after K] -- submit jobs/llama.yaml ...   (or: -- sweep jobs/sweep.yaml ...)

It passes the faults to [`~lorafleet.train.driver.run_job`] as `step_hooks` and runs the CLI as `lorafleet` does.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

# `helpers` is a package under tests/, imported as in the tests (not this folder's modules as top-level names).
sys.path[0] = str(Path(__file__).resolve().parents[1])

import ray.cloudpickle

import lorafleet.cli.jobs
import lorafleet.sweep.runner
import lorafleet.train.driver
from helpers import faults
from lorafleet.cli.main import main


def install(hooks: list) -> None:
    """Make every `run_job` the CLI reaches pass `hooks` as `step_hooks`."""
    original = lorafleet.train.driver.run_job
    patched = functools.partial(original, step_hooks=tuple(hooks))
    lorafleet.train.driver.run_job = patched
    if getattr(lorafleet.cli.jobs, "run_job", None) is original:  # imported by name at the top of cli/jobs.py
        lorafleet.cli.jobs.run_job = patched
    # A sweep's trials run in Ray Tune's processes: the hooks travel with the sweep.
    lorafleet.sweep.runner.run_sweep = functools.partial(lorafleet.sweep.runner.run_sweep, step_hooks=tuple(hooks))


if __name__ == "__main__":
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    # The workers cannot import `helpers` (tests/ is not on their path): the hooks travel with their code.
    ray.cloudpickle.register_pickle_by_value(faults)
    install(faults.from_options(argv[:split]))
    main(argv[split + 1 :])
