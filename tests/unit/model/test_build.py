"""Model building, 4-bit determinism and the adapter-only checkpoint round trip (no Ray)."""

import torch
from safetensors.torch import load_file

from lorafleet.runstore.checkpoint import is_complete, load_training_state, save_checkpoint, set_rng_state
from lorafleet.data.batching import collate
from lorafleet.data.encode import prepare_samples
import dataclasses
import hashlib
from pathlib import Path
import json
import shutil

import pytest

from lorafleet import bases
from lorafleet.model.build import (build_model, load_tokenizer_for, local_base, materialize, materialize_builtin,
                                   resolve_base_model, weights_digest)
from lorafleet.model.device import fast_bf16, torch_dtype
from lorafleet.spec import ModelSpec, SpecError, load_spec
from lorafleet.train.strategies import DDPStrategy

from helpers.cli import TEST_JOB
from helpers.process_group import run_in_process_group

SMALL = ["model.config={num_hidden_layers: 2}", "kernels.enabled=false", "training.dtype=float32", "model.dtype=float32"]


def small_spec(*extra):
    return load_spec(TEST_JOB, SMALL + list(extra))


def batch_for(spec, tokenizer, n=4):
    samples = prepare_samples(spec.data, tokenizer)[:n]
    return {k: v for k, v in collate(samples, tokenizer.pad_token_id).items() if v is not None}


def test_materialize_is_deterministic_and_cached(tmp_path):
    spec = ModelSpec(architecture="llama", config={"num_hidden_layers": 1}, dtype="float32")
    a = materialize(spec, root=tmp_path / "a")
    b = materialize(spec, root=tmp_path / "b")
    assert materialize(spec, root=tmp_path / "a") == a
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "tokenizer.json").exists() and not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]


def test_the_builtin_base_is_checked_copied_with_the_tokenizer_and_loads(tmp_path):
    path = materialize_builtin("tasks-llama", root=tmp_path)
    shipped = bases.builtin_bases()["tasks-llama"]
    assert (path / "model.safetensors").read_bytes() == (shipped.folder / "model.safetensors").read_bytes()
    assert (path / "tokenizer.json").exists() and materialize_builtin("tasks-llama", root=tmp_path) == path
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == len(load_tokenizer_for(str(path)))
    spec = load_spec(TEST_JOB, ["model.architecture=null", "model.config={}", "model.builtin=tasks-llama",
                                "kernels.enabled=false", "model.dtype=float32"])
    model, _ = build_model(spec, str(path))
    embeddings = model.get_input_embeddings().weight  # not quantized: the shipped values, cast to float32
    assert torch.equal(embeddings, load_file(path / "model.safetensors")["model.embed_tokens.weight"].float())


def test_damaged_builtin_weights_are_refused(tmp_path, monkeypatch):
    folder = tmp_path / "shipped"
    shutil.copytree(bases.builtin_bases()["tasks-llama"].folder, folder)
    (folder / "model.safetensors").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")  # an LFS pointer
    damaged = dataclasses.replace(bases.builtin_bases()["tasks-llama"], folder=folder)
    monkeypatch.setattr(bases, "builtin_bases", lambda: {"tasks-llama": damaged})
    monkeypatch.setattr("lorafleet.model.build.builtin_bases", lambda: {"tasks-llama": damaged})
    with pytest.raises(SpecError, match="^model.builtin: .* damaged"):
        materialize_builtin("tasks-llama", root=tmp_path / "models")
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_a_node_without_the_drivers_folder_materializes_its_own_base(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "node2"))
    spec = load_spec(TEST_JOB, ["model.config={num_hidden_layers: 1}"])
    elsewhere = str(tmp_path / "driver-only" / "llama-abc")  # the driver's path, absent on this node
    # The driver's base, materialized in its own home: the digest the workers receive.
    driver_digest = weights_digest(spec, str(materialize(spec.model, root=tmp_path / "driver-home")))
    here = local_base(spec, elsewhere, driver_digest)
    assert here != elsewhere and Path(here, "config.json").exists() and str(tmp_path / "node2") in here
    assert weights_digest(spec, here) == driver_digest  # the same seed: the same weights on every node
    assert local_base(spec, here) == here
    with pytest.raises(RuntimeError, match=r"is not the driver's \(weights sha256 [0-9a-f]{12}, the driver's 0{12}"):
        local_base(spec, elsewhere, "0" * 64)  # a node whose torch initializes otherwise
    hub = load_spec(TEST_JOB, ["model.architecture=null", "model.config={}", "model.name_or_path=org/model"])
    assert local_base(hub, "org/model") == "org/model"  # a hub id is not a folder, and is loaded as given


MATERIALIZE_AT_RANK = """
import sys
from lorafleet.model.build import materialize, weights_digest
from lorafleet.spec import load_spec
spec = load_spec(sys.argv[1], ["model.config={num_hidden_layers: 1}"])
print(weights_digest(spec, str(materialize(spec.model, root=f"{sys.argv[2]}/rank-{dist.get_rank()}"))))
"""


def test_every_rank_of_a_process_group_materializes_the_whole_base(tmp_path):
    # Inside a Ray Train worker the group is initialized: the node whose first worker is rank 1 builds the base too.
    ranks = run_in_process_group(MATERIALIZE_AT_RANK, world_size=2, args=(str(TEST_JOB), str(tmp_path)))
    assert all(r.returncode == 0 for r in ranks), [r.stderr[-2000:] for r in ranks]
    digests = [r.stdout.split()[-1] for r in ranks]
    assert len(set(digests)) == 1 and digests[0] != hashlib.sha256().hexdigest(), digests  # not the empty digest
    assert list((tmp_path / "rank-1").glob("*/*.safetensors"))


def test_auto_dtype_follows_the_cpu():
    expected = torch.bfloat16 if fast_bf16("cpu") else torch.float32
    assert torch_dtype("auto", "cpu") == expected
    assert torch_dtype("float16") == torch.float16


def test_4bit_forward_is_repeatable():
    """The same forward twice on the NF4 model gives identical logits, in eval mode with no-grad inputs too: the path
    on which bitsandbytes would otherwise repack weights in place on AVX512-BF16 CPUs."""
    spec = small_spec()
    base = resolve_base_model(spec)
    model, _ = build_model(spec, base)
    import bitsandbytes as bnb

    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and all(m.support_avx512bf16_for_cpu is False for m in four_bit)
    assert all(m.weight.quant_state.quant_type == "nf4" for m in four_bit)
    batch = batch_for(spec, load_tokenizer_for(base))
    batch.pop("labels")
    packed_before = [m.weight.data.clone() for m in four_bit]
    model.eval()
    with torch.no_grad():
        first, second = model(**batch).logits, model(**batch).logits
    model.train()
    third = model(**batch).logits.detach()
    assert torch.equal(first, second) and torch.equal(first, third)
    assert all(torch.equal(a, m.weight.data) for a, m in zip(packed_before, four_bit))


def test_adapter_state_equals_peft_adapter_state_dict():
    """Checkpoints take the adapter from the trainable parameters alone, not from a walk of the 4-bit model's whole
    state dict: the same names and tensors as PEFT's own `get_peft_model_state_dict`, copied. The names are resolved
    once; later snapshots still copy the parameters' current values."""
    from peft import get_peft_model_state_dict

    spec = small_spec()
    model, _ = build_model(spec, resolve_base_model(spec))
    strategy = DDPStrategy(model, spec, torch.device("cpu"))
    ours = strategy.adapter_state()
    theirs = get_peft_model_state_dict(model)
    assert len(theirs) == 2 * len(spec.lora.target_modules) * 2  # lora_A and lora_B, 7 projections, 2 layers
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    # A snapshot: the checkpoint is written while training goes on and changes the live parameters (which PEFT's
    # state dict shares).
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(1.0)
    assert all(not torch.equal(ours[k], theirs[k]) for k in theirs)
    later = strategy.adapter_state()
    assert later.keys() == theirs.keys()
    assert all(torch.equal(later[k], theirs[k]) and later[k].data_ptr() != theirs[k].data_ptr() for k in theirs)


def _train(strategy, batch, steps):
    losses = []
    for _ in range(steps):
        loss, count = strategy.module(**batch)
        strategy.backward(loss / count)
        strategy.step()
        losses.append(float(loss / count))
    return losses


def test_checkpoint_round_trip_resumes_exactly(tmp_path):
    """Train 3 steps, checkpoint, train 2 more; a fresh model restored from the checkpoint trains the same 2 steps
    to bitwise the same adapter (optimizer moments, scheduler position and RNG all restored)."""
    spec = small_spec("lora.dropout=0.1", "training.warmup=1")
    base = resolve_base_model(spec)
    tokenizer = load_tokenizer_for(base)
    batch = batch_for(spec, tokenizer)

    torch.manual_seed(1)
    model, _ = build_model(spec, base)
    strategy = DDPStrategy(model, spec, torch.device("cpu"))
    _train(strategy, batch, 3)
    save_checkpoint(
        tmp_path,
        rank=0,
        step=3,
        adapter_state=strategy.adapter_state(),
        peft_model=model,
        optimizer_state=strategy.optimizer_state(),
        info={"job": spec.name},
    )
    assert is_complete(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(t.numel() for t in tensors.values()) == trainable
    assert not any("base_layer" in k or "embed" in k for k in tensors)
    uninterrupted = _train(strategy, batch, 2)
    expected = strategy.adapter_state()

    fresh, _ = build_model(spec, base)
    restored = DDPStrategy(fresh, spec, torch.device("cpu"))
    state = load_training_state(tmp_path, rank=0)
    assert state["step"] == 3
    restored.load_adapter_state(state["adapter"])
    restored.load_optimizer_state(state["optimizer"])
    set_rng_state(state["rng"])
    assert restored.scheduler.last_epoch == 3
    resumed = _train(restored, batch, 2)
    assert resumed == uninterrupted
    actual = restored.adapter_state()
    assert all(torch.equal(actual[k], expected[k]) for k in expected)
