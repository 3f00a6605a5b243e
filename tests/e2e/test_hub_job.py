"""A job over `data.hub` end to end (slow): `lorafleet submit` loads a local dataset folder (offline) on the driver,
builds the tokenized cache from its Arrow files and trains 2 steps on it (one worker, ~45 s on 2 cores); the checkpoint
records the dataset."""

from __future__ import annotations

import json
from pathlib import Path

from helpers.cli import JOBS, submit_small
from helpers.hub import dataset_folder


def test_submit_trains_on_hub_data(tmp_path, offline_hub):
    folder = dataset_folder(tmp_path / "tasks", {"train": (JOBS / "data" / "tasks.jsonl").read_text().splitlines()})
    proc, summary = submit_small("hub", tmp_path / "runs", "data.path=null", f"data.hub.name={folder}",
                                 "training.steps=2", "scaling.num_workers=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["steps"] == 2 and summary["final_loss"] > 0
    assert Path(summary["data_cache"]).parent == tmp_path / "runs" / "_cache" / "tokenized"
    [info] = (tmp_path / "runs" / "hub").glob("checkpoint_*/lorafleet.json")
    recorded = json.loads(info.read_text())["data"]
    assert recorded["hub"]["name"] == str(folder) and list(recorded["files"]) == ["tasks-train.arrow"]
