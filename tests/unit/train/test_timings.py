"""The phase clock behind `lorafleet submit -v`'s phase lines and the `--json` summary's `phases`."""

from lorafleet.train.driver import RunSummary
from lorafleet.train.timings import PHASES, WORKER_PHASES, PhaseClock


def test_laps_are_consecutive_and_add_up_to_the_elapsed_time():
    clock = PhaseClock(started=10.0)
    assert clock.lap("preflight", now=12.0) == 2.0
    assert clock.lap("ray_start", now=17.5) == 5.5
    clock.skip_to(30.0)  # training steps: not a phase
    assert clock.lap("after_last_step", now=31.25) == 1.25
    assert clock.as_dict() == {"preflight": 2.0, "ray_start": 5.5, "after_last_step": 1.25}
    assert list(clock.as_dict()) == ["preflight", "ray_start", "after_last_step"]


def test_a_phase_lapped_twice_accumulates_and_time_never_runs_backwards():
    clock = PhaseClock(started=0.0)
    clock.lap("preflight", now=1.0)
    clock.lap("preflight", now=3.0)
    assert clock.as_dict() == {"preflight": 3.0}
    # A stamp from a machine whose clock lags: nothing negative, and the mark stays where it was.
    assert clock.lap("train_start", now=2.0) == 0.0
    assert clock.mark == 3.0


def test_a_workers_phases_join_the_drivers_timeline():
    worker = PhaseClock(started=120.0)
    worker.lap("worker_imports", now=124.0)
    worker.lap("worker_model", now=127.0)
    worker.lap("worker_resume", now=127.5)
    event = worker.event()
    assert event["event"] == "phases" and set(event["phases"]) == set(WORKER_PHASES)

    driver = PhaseClock(started=100.0)
    driver.lap("ray_start", now=110.0)
    driver.merge_worker(event)
    driver.lap("first_step", now=128.0)
    phases = driver.as_dict()
    assert phases == {"ray_start": 10.0, "train_start": 10.0, "worker_imports": 4.0, "worker_model": 3.0,
                      "worker_resume": 0.5, "first_step": 0.5}
    assert sum(phases.values()) == 128.0 - 100.0


def test_lines_name_every_phase_in_words_with_seconds():
    clock = PhaseClock(started=0.0)
    for i, name in enumerate(PHASES, start=1):
        clock.lap(name, now=float(i))
    lines = clock.lines()
    assert len(lines) == len(PHASES)
    assert lines[2] == "phase Ray start (or join; what is left of a start begun in the background): 1.0 s"
    assert all(line.startswith("phase ") and line.endswith(" s") for line in lines)


def test_the_summary_carries_the_phases():
    summary = RunSummary(job="j", status="succeeded", phases={"preflight": 1.5, "ray_start": 4.0})
    assert summary.to_dict()["phases"] == {"preflight": 1.5, "ray_start": 4.0}
