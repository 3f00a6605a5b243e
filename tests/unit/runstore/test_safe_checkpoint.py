"""Checkpoints load without running code, round-trip exactly, and damaged ones are named and refused (fast: no Ray,
no training; one subprocess runs a single-process DeepSpeed ZeRO-3 engine, two run the CLI)."""

from __future__ import annotations

import contextlib
import enum
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import get_scheduler

from lorafleet.runstore.checkpoint import (
    CheckpointError,
    adapter_problem,
    checkpoint_problem,
    cpu_copy,
    flatten_state,
    is_complete,
    load_state,
    load_training_state,
    read_info,
    rng_state,
    save_checkpoint,
    save_state,
    set_rng_state,
    unflatten_state,
)
from lorafleet.train.worker import WorkerContext, resume

from helpers.checkpoints import FakePeft, plant_pickle, write_checkpoint, write_legacy_checkpoint
from helpers.cli import REPO, one_line_error, run_cli
from helpers.models import tiny_alora
from helpers.net import free_port


def assert_same(got, want, where="state"):
    """Equal values of identical types all the way down: tensors (dtype, shape, bits), NumPy arrays, tuples as
    tuples, dict keys with their types."""
    assert type(got) is type(want), f"{where}: {type(got).__name__} instead of {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), where
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and np.array_equal(got, want), where
    elif isinstance(want, dict):
        assert list(got) == list(want), f"{where}: keys {list(got)} instead of {list(want)}"
        for key in want:
            assert_same(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and want != want:
        assert got != got, where  # NaN
    else:
        assert got == want, where


def trained_optimizer(seed=0):
    """An AdamW (non-default betas: a tuple) and transformers' cosine schedule after 3 steps on one parameter."""
    torch.manual_seed(seed)
    param = torch.nn.Parameter(torch.randn(3, 2))
    optimizer = torch.optim.AdamW([param], lr=0.1, betas=(0.8, 0.95))
    scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=1, num_training_steps=10)
    for _ in range(3):
        param.grad = torch.randn(3, 2)
        optimizer.step()
        scheduler.step()
    return param, optimizer, scheduler


def draws() -> tuple:
    return random.random(), float(np.random.rand()), np.random.get_state()[2], torch.rand(3)


# ---------------------------------------------------------------------------------------------------------------------
# Nothing in storage runs code on load


def test_the_planted_payload_is_live(tmp_path):
    # The crafted file really runs code under the plain torch.load that checkpoints used: what the tests below refuse.
    plant_pickle(tmp_path / "payload.pt", tmp_path / "marker")
    torch.load(tmp_path / "payload.pt", weights_only=False)
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize("victim", ["training_state.pt", "optimizer_rank1.pt", "rng_rank1.pt"])
def test_planted_pickle_in_an_old_checkpoint_is_refused(tmp_path, victim):
    checkpoint, marker = tmp_path / "checkpoint", tmp_path / "marker"
    write_legacy_checkpoint(checkpoint, rng_files=victim.startswith("rng"))
    plant_pickle(checkpoint / victim, marker)
    with pytest.raises(CheckpointError, match=rf"^{victim}: refused to load: it would call io\.open"):
        load_training_state(checkpoint, rank=1)
    assert not marker.exists()


@pytest.mark.parametrize("victim", ["training_state.json", "training_state.safetensors", "optimizer_rank1.json",
                                    "optimizer_rank1.safetensors"])
def test_planted_pickle_in_a_checkpoint_is_refused(tmp_path, victim):
    write_checkpoint(tmp_path / "checkpoint")
    marker = tmp_path / "marker"
    plant_pickle(tmp_path / "checkpoint" / victim, marker)
    problem = checkpoint_problem(tmp_path / "checkpoint")
    assert problem is not None and problem.startswith(victim), problem
    with pytest.raises(CheckpointError, match=victim.replace(".", r"\.")):
        load_training_state(tmp_path / "checkpoint", rank=1)
    assert not marker.exists()


def test_old_file_names_in_a_checkpoint_are_never_unpickled(tmp_path):
    # A pickle under the old name next to the current files is ignored; and claiming the old layout in lorafleet.json
    # only leads to the weights-only reader, which refuses it.
    checkpoint, marker = tmp_path / "checkpoint", tmp_path / "marker"
    adapter = write_checkpoint(checkpoint)
    plant_pickle(checkpoint / "training_state.pt", marker)
    state = load_training_state(checkpoint, rank=0)
    assert state["step"] == 7 and torch.equal(state["adapter"]["a.lora_A.weight"], adapter["a.lora_A.weight"])
    info = read_info(checkpoint)
    del info["format"], info["files"]
    (checkpoint / "lorafleet.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="training_state.pt: refused to load"):
        load_training_state(checkpoint, rank=0)
    assert not marker.exists()


def test_objects_are_rebuilt_only_from_the_allowed_classes(tmp_path):
    with pytest.raises(TypeError, match=r"^optimizer/hook: a pathlib\.\w*Path cannot be stored"):
        flatten_state({"optimizer": {"hook": Path("/x")}})
    crafted = {"$object": {"class": "subprocess.Popen", "attributes": {"args": ["touch", str(tmp_path / "marker")]}}}
    with pytest.raises(CheckpointError, match="refused to rebuild a subprocess.Popen"):
        unflatten_state({"optimizer": crafted}, {})
    with pytest.raises(CheckpointError, match=r"unknown value type \$eval"):
        unflatten_state({"$eval": "1"}, {})
    with pytest.raises(CheckpointError, match="refused a NumPy value of dtype object"):
        unflatten_state({"$ndarray": {"dtype": "|O", "shape": [1], "data": [1]}}, {})
    assert not (tmp_path / "marker").exists()


# ---------------------------------------------------------------------------------------------------------------------
# The current layout round-trips exactly


def test_checkpoint_round_trips_optimizer_scheduler_and_every_rng_exactly(tmp_path):
    param, optimizer, scheduler = trained_optimizer()
    states, expected_draws = {}, {}
    for rank in range(2):
        random.seed(10 + rank)
        np.random.seed(20 + rank)
        torch.manual_seed(30 + rank)
        np.random.randn()  # NumPy's state then holds a cached gaussian (its 4th and 5th fields)
        states[rank] = rng_state()
        expected_draws[rank] = draws()
    optimizer_state = cpu_copy({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})
    shard = {"torch": cpu_copy(optimizer.state_dict()), "partition": (3, [0, 1]), "stage": 2}
    save_checkpoint(tmp_path, rank=0, step=3, adapter_state={"a.lora_A.weight": param}, peft_model=FakePeft(),
                    optimizer_state=optimizer_state, optimizer_shard=shard, world_size=1, rng_states=states)
    assert is_complete(tmp_path) and not list(tmp_path.glob("*.pt"))

    state = load_training_state(tmp_path, rank=0)
    assert state["step"] == 3
    assert_same(state["optimizer"], optimizer_state, "optimizer")
    assert state["optimizer"]["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.95)
    assert_same(state["optimizer_shard"], shard, "shard")
    assert_same(state["rng"], states[0], "rng")
    assert type(state["rng"]["numpy"]) is tuple and state["rng"]["numpy"][1].dtype == np.uint32
    assert_same(state["adapter"], {"a.lora_A.weight": param.detach()}, "adapter")
    # Each rank's states restore its own streams.
    set_rng_state(state["rng"])
    assert_same(draws(), expected_draws[0], "draws")
    set_rng_state(load_state(tmp_path, "training_state")["rng"][1])
    assert_same(draws(), expected_draws[1], "draws of rank 1")

    # A fresh optimizer and schedule restored from it take the next steps bitwise as the originals do.
    fresh_param = torch.nn.Parameter(state["adapter"]["a.lora_A.weight"].clone())
    fresh = torch.optim.AdamW([fresh_param], lr=0.5)
    fresh_scheduler = get_scheduler("cosine", optimizer=fresh, num_warmup_steps=1, num_training_steps=10)
    fresh.load_state_dict(state["optimizer"]["optimizer"])
    fresh_scheduler.load_state_dict(state["optimizer"]["scheduler"])
    for _ in range(2):
        grad = torch.randn(3, 2)
        for p, opt, sched in ((param, optimizer, scheduler), (fresh_param, fresh, fresh_scheduler)):
            p.grad = grad.clone()
            opt.step()
            sched.step()
    assert torch.equal(fresh_param, param) and fresh_scheduler.get_last_lr() == scheduler.get_last_lr()


class Stage(enum.IntEnum):
    weights = 3


def test_state_values_keep_their_types(tmp_path):
    base = torch.arange(6, dtype=torch.float32)
    value = {
        "ints": {0: "zero", 1: None},
        "tuple_keys": {(1, "a"): [1, 2]},
        "dollar": {"$tensor": "not a reference"},
        "nested": ((1, 2.5), [True, False], ()),
        "floats": [float("inf"), -0.0, float("nan"), 1e-300],
        "numpy": (np.float64(0.1), np.int64(-5), np.bool_(True), np.arange(4, dtype=np.int16).reshape(2, 2)),
        "dtype": torch.bfloat16,
        "tensors": [torch.tensor(2.0), torch.zeros(0, 3), torch.randn(2, 2).to(torch.bfloat16), base, base[1:4]],
        "big": 2**64 + 1,
    }
    save_state(value, tmp_path, "example")
    assert_same(load_state(tmp_path, "example"), value)
    # IntEnum members (ZeRO's stage) come back as the plain ints they are equal to.
    assert_same(unflatten_state(*flatten_state({"zero_stage": Stage.weights})), {"zero_stage": 3})


def test_deepspeed_loss_scalers_come_back_as_themselves():
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

    dynamic = DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1, delayed_shift=2,
                                consecutive_hysteresis=False, dtype=torch.half)
    dynamic.cur_iter, dynamic.last_overflow_iter, dynamic.cur_hysteresis = 41, 40, 1  # after an overflow
    for scaler in (LossScaler(scale=1.0), dynamic):
        structure, tensors = flatten_state({"loss_scaler": scaler})
        back = unflatten_state(json.loads(json.dumps(structure)), tensors)["loss_scaler"]
        assert type(back) is type(scaler) and vars(back) == vars(scaler)
    assert back.cur_scale == 2.0**16 and back.dtype is torch.half and back.cur_hysteresis == 1


ZERO3_RESUME = r"""
import os, sys, tempfile
import torch, torch.distributed as dist

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
dist.init_process_group("gloo", rank=0, world_size=1)
import deepspeed

from lorafleet.runstore.checkpoint import cpu_copy, load_state, save_state

CONFIG = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 1,
          "gradient_clipping": 1.0, "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
          "bf16": {"enabled": False}, "fp16": {"enabled": False}, "steps_per_print": 2**31 - 1}


def engine():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=0.1, betas=(0.8, 0.9))
    return deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=params, config=CONFIG,
                                dist_init_required=False)[0]


def train(eng, xs):
    for x in xs:
        eng.backward(eng(x).pow(2).sum())
        eng.step()


def weights(eng):
    with deepspeed.zero.GatheredParameters(list(eng.module.parameters())):
        return [p.detach().clone() for p in eng.module.parameters()]


gen = torch.Generator().manual_seed(1)
xs = [torch.randn(2, 4, generator=gen) for _ in range(4)]
first = engine()
train(first, xs[:2])
directory = tempfile.mkdtemp()
# What DeepSpeedStrategy.optimizer_shard() returns under ZeRO-3, through the checkpoint's files.
save_state(cpu_copy({"zero3": first.optimizer.state_dict()}), directory, "optimizer_rank0")
train(first, xs[2:])
second = engine()
shard = load_state(directory, "optimizer_rank0")
print("loss scaler", type(shard["zero3"]["loss_scaler"]).__name__)
second.optimizer.load_state_dict([shard["zero3"]], load_optimizer_states=True, load_from_fp32_weights=True)
train(second, xs[2:])
same = all(torch.equal(a, b) for a, b in zip(weights(first), weights(second)))
print("resumed exactly" if same else "resumed weights differ")
"""


def test_zero3_optimizer_shard_resumes_exactly(tmp_path):
    # DeepSpeed's ZeRO-3 state (float32 master partition, moments, a loss-scaler object, ZeRO's stage enum) through
    # the checkpoint files into a fresh engine: the next steps give bitwise the same weights.
    script = tmp_path / "zero3_resume.py"
    script.write_text(ZERO3_RESUME)
    proc = subprocess.run([sys.executable, str(script), str(free_port())], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loss scaler LossScaler" in proc.stdout and "resumed exactly" in proc.stdout, proc.stdout


def test_old_checkpoint_still_loads(tmp_path):
    saved = write_legacy_checkpoint(tmp_path)
    assert is_complete(tmp_path)
    state = load_training_state(tmp_path, rank=1)
    assert state["step"] == 7
    assert_same(state["optimizer"], saved["state"]["optimizer"], "optimizer")
    assert_same(state["rng"], saved["rng"][1], "rng")
    assert_same(state["optimizer_shard"], {"state": {0: {"exp_avg": torch.ones(3)}}}, "shard")
    assert_same(state["adapter"], saved["adapter"], "adapter")


# ---------------------------------------------------------------------------------------------------------------------
# Damaged checkpoints are named


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # in the tensor data of a safetensors file, in a value of a JSON one
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_byte])
@pytest.mark.parametrize(
    "victim",
    ["adapter_model.safetensors", "adapter_config.json", "training_state.safetensors", "training_state.json",
     "optimizer_rank0.safetensors", "optimizer_rank1.json"],
)
def test_damaged_file_is_named(tmp_path, victim, damage):
    write_checkpoint(tmp_path)
    assert checkpoint_problem(tmp_path) is None
    damage(tmp_path / victim)
    problem = checkpoint_problem(tmp_path)
    assert problem is not None and problem.startswith(victim), problem
    assert not is_complete(tmp_path)


def test_damaged_file_messages(tmp_path):
    write_checkpoint(tmp_path)
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    _truncate(tmp_path / "adapter_model.safetensors")
    assert checkpoint_problem(tmp_path) == (
        f"adapter_model.safetensors is {size // 2} bytes, not the {size} written (cut off or replaced)"
    )
    # A shard's JSON has no record in lorafleet.json (another worker writes it): it carries its own checksum, so an
    # edit that leaves valid JSON is caught too.
    write_checkpoint(tmp_path / "edited")
    shard = tmp_path / "edited" / "optimizer_rank1.json"
    document = json.loads(shard.read_text())
    document["state"]["extra"] = 1
    shard.write_text(json.dumps(document))
    assert checkpoint_problem(tmp_path / "edited") == (
        "optimizer_rank1.json does not match the checksum it was written with (corrupted)"
    )


def test_cut_off_adapter_of_an_old_checkpoint_or_plain_peft_folder_is_named(tmp_path):
    write_legacy_checkpoint(tmp_path / "old")
    _truncate(tmp_path / "old" / "adapter_model.safetensors")
    assert checkpoint_problem(tmp_path / "old").startswith("adapter_model.safetensors is ")
    tiny_alora(None).save_pretrained(tmp_path / "peft")
    assert adapter_problem(tmp_path / "peft") is None
    _truncate(tmp_path / "peft" / "adapter_model.safetensors")
    assert adapter_problem(tmp_path / "peft").startswith("adapter_model.safetensors is ")


class Candidate:
    """What `ray.train.Checkpoint` offers `resume`: a path and a local directory."""

    def __init__(self, directory: Path):
        self.path = str(directory)

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


class Recorder:
    def __init__(self):
        self.loaded = {}

    def load_adapter_state(self, state):
        self.loaded["adapter"] = state

    def load_optimizer_state(self, state):
        self.loaded["optimizer"] = state


def test_resume_skips_a_damaged_checkpoint_and_names_it(tmp_path, monkeypatch, capsys):
    import lorafleet.train.worker as worker

    older, newer = tmp_path / "checkpoint_000001", tmp_path / "checkpoint_000002"
    write_checkpoint(older, world_size=1, shards=False)
    write_checkpoint(newer, world_size=1, shards=False)
    info = read_info(newer)
    info["step"] = 9
    (newer / "lorafleet.json").write_text(json.dumps(info))
    _truncate(newer / "adapter_model.safetensors")
    monkeypatch.setattr(worker, "_checkpoint_candidates", lambda spec: [Candidate(newer), Candidate(older)])
    strategy = Recorder()
    assert resume(strategy, None, WorkerContext(rank=0, world_size=1, device=torch.device("cpu"))) == 7
    expected = load_training_state(older, 0)["adapter"]["a.lora_A.weight"]
    assert torch.equal(strategy.loaded["adapter"]["a.lora_A.weight"], expected)
    out = capsys.readouterr().out
    assert "checkpoint checkpoint_000002 is damaged or incomplete: adapter_model.safetensors is " in out
    assert "trying an older one" in out


# ---------------------------------------------------------------------------------------------------------------------
# The commands that read an adapter refuse a damaged one in one line


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny LoRA adapter saved as a checkpoint (with lorafleet.json's file records)."""
    from peft import get_peft_model_state_dict

    model = tiny_alora(None)
    directory = tmp_path_factory.mktemp("adapter") / "checkpoint_000001"
    save_checkpoint(directory, rank=0, step=1, adapter_state=get_peft_model_state_dict(model), peft_model=model,
                    optimizer_state={}, info={"job": "tiny"})
    return directory


def _damaged_copy(checkpoint: Path, target: Path, damage) -> Path:
    target.mkdir()
    for path in checkpoint.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    damage(target / "adapter_model.safetensors")
    return target


def test_generate_and_merge_refuse_a_damaged_adapter_in_one_line(checkpoint, tmp_path):
    cut = _damaged_copy(checkpoint, tmp_path / "cut", _truncate)
    line = one_line_error(run_cli("generate", "--adapter", str(cut), "--prompt", "hi", timeout=300))
    assert line.startswith(f"error: --adapter: cannot load {cut}: adapter_model.safetensors is "), line
    flipped = _damaged_copy(checkpoint, tmp_path / "flipped", _flip_byte)
    line = one_line_error(run_cli("merge", "--adapter", str(flipped), "--out", str(tmp_path / "merged"), timeout=300))
    assert line == (
        f"error: --adapter: cannot load {flipped}: adapter_model.safetensors does not match the checksum it was "
        "written with (corrupted)"
    )
    assert not (tmp_path / "merged").exists()


def test_pull_refuses_a_damaged_adapter_in_one_line(checkpoint, tmp_path, monkeypatch):
    import lorafleet.remote.client as client
    from lorafleet.cli.main import cli

    cut = _damaged_copy(checkpoint, tmp_path / "cut", _truncate)

    class FinishedJob:
        """The Jobs API of a cluster whose job finished with its adapter at `cut`."""

        def __init__(self, address=None, token=None):
            pass

        def info(self, job_id):
            return {"status": "SUCCEEDED"}

        def summary(self, job_id):
            return {"adapter_uri": str(cut)}

    monkeypatch.setattr(client, "RemoteClient", FinishedJob)
    dest = tmp_path / "pulled"
    result = CliRunner().invoke(cli, ["pull", "job-1", str(dest), "--address", "http://127.0.0.1:8265"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {dest}: not a loadable PEFT adapter (adapter_model.safetensors is "), lines
    # The same adapter, intact, pulls.
    monkeypatch.setattr(FinishedJob, "summary", lambda self, job_id: {"adapter_uri": str(checkpoint)})
    result = CliRunner().invoke(cli, ["pull", "job-1", str(tmp_path / "intact"), "--address", "http://127.0.0.1:8265"])
    assert result.exit_code == 0, result.output
