"""Readers of what a finished run left in local storage: its metrics records and its adapter."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def records(storage: Path, name: str) -> dict[int, dict]:
    """Step -> rank 0's metrics record from the run's metrics.jsonl (a later record of a step wins: restarts and
    resumes repeat steps)."""
    out = {}
    for line in (Path(storage) / name / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[int(record["step"])] = record
    return out


def losses(storage: Path, name: str) -> dict[int, float]:
    """Step -> training loss ([`records`])."""
    return {step: float(record["loss"]) for step, record in records(storage, name).items()}


def adapter(summary: dict) -> dict[str, torch.Tensor]:
    """The adapter weights of the checkpoint a `--json` summary names (local storage)."""
    return load_file(Path(summary["adapter_uri"]) / "adapter_model.safetensors")
