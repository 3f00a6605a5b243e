"""The sweep runner's pieces that need no Ray instance: what identifies a sweep in its folder, the summary's round
trip through a remote job's log, and what a remote sweep ships."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers.cli import JOBS
from lorafleet.remote.client import stage_sweep
from lorafleet.runstore.location import RunLocation
from lorafleet.spec import SpecError
from lorafleet.sweep.runner import SweepSummary, TrialOutcome, _check_recorded, _identity
from lorafleet.sweep.space import load_sweep

SWEEP = JOBS / "sweep.yaml"


def test_a_sweep_is_identified_by_its_data_content_not_its_path(tmp_path):
    copy = tmp_path / "copy.jsonl"
    shutil.copy(JOBS / "data" / "tasks.jsonl", copy)
    here, there = load_sweep(SWEEP), load_sweep(SWEEP, [f"data.path={copy}"])
    assert _identity(here) == _identity(there)
    copy.write_text(copy.read_text()[:-200])
    assert _identity(load_sweep(SWEEP, [f"data.path={copy}"])) != _identity(here)


def test_a_folder_holding_another_sweep_is_refused(tmp_path):
    sweep = load_sweep(SWEEP, [f"checkpoint.storage={tmp_path}"])
    location = RunLocation(str(tmp_path), sweep.name)
    with pytest.raises(SpecError, match="no sweep 'llama-sweep'"):
        _check_recorded(sweep, location, resume=True)
    assert _check_recorded(sweep, location, resume=False) is False
    location.write("lorafleet-sweep.json", json.dumps(_identity(sweep)).encode())
    assert _check_recorded(sweep, location, resume=True) is True
    other = load_sweep(SWEEP, [f"checkpoint.storage={tmp_path}", "sweep.num_samples=2"])
    with pytest.raises(SpecError, match="started with another sweep file or other values"):
        _check_recorded(other, location, resume=False)


def test_summary_round_trips_through_its_dict():
    summary = SweepSummary(sweep="s", metric="eval_loss", mode="min", status="succeeded",
                           best={"trial": "trial-001", "params": {"lora.r": 8}, "metric": 1.5, "adapter_uri": "/a"},
                           trials=[TrialOutcome("trial-001", {"lora.r": 8}, "succeeded", 1.5, 10, "/a"),
                                   TrialOutcome("trial-000", {"lora.r": 4}, "failed", None, 2, error="nan")])
    raw = json.loads(json.dumps(summary.to_dict()))
    assert "error" not in raw["trials"][0] and raw["trials"][1]["metric"] is None
    assert SweepSummary.from_dict({**raw, "job_id": "x"}) == summary


def test_a_remote_sweep_ships_its_section_job_and_data(tmp_path):
    sweep = load_sweep(SWEEP)
    shipped = json.loads(stage_sweep(sweep, tmp_path).read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "sweep.json"]
    assert shipped["sweep"] == sweep.to_json()["sweep"]
    assert shipped["job"]["data"]["path"] == "data/tasks.jsonl"
    assert (tmp_path / "data" / "tasks.jsonl").read_bytes() == (JOBS / "data" / "tasks.jsonl").read_bytes()
