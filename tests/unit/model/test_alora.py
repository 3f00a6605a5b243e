"""aLoRA: invocation checks, offsets under padding and packing, activation in the layers, checkpoints, submit-time refusals."""

import json
import warnings

import pytest
import torch

from lorafleet.data.alora import Invocation, InvocationBoundaryWarning, find_invocation, resolve_invocation
from lorafleet.model.alora import activation
from lorafleet.kernels.alora import offsets_to_mask
from lorafleet.data.encode import IGNORE_INDEX, prepare_samples
from lorafleet.data.batching import collate, pack_samples
from lorafleet.spec import AloraSpec, DataSpec, SpecError

from helpers.models import tiny_alora

INV = "<|reserved_0|>judge<|reserved_1|>"


@pytest.fixture(scope="module")
def inv_ids(tok):
    return resolve_invocation(AloraSpec(invocation_string=INV), tok)


# ---------------------------------------------------------------------------------------------------------------------
# Invocation


def test_resolve_invocation_without_bos_and_framed_by_special_tokens(tok, inv_ids):
    assert inv_ids[0] == 8 and inv_ids[-1] == 9 and tok.bos_token_id not in inv_ids
    assert len(inv_ids) > 2
    assert resolve_invocation(AloraSpec(invocation_tokens=[8, 9]), tok) == [8, 9]


def test_unframed_invocation_warns(tok):
    with pytest.warns(InvocationBoundaryWarning, match="alora.invocation_string"):
        resolve_invocation(AloraSpec(invocation_string="Judge:"), tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_invocation(AloraSpec(invocation_string="<|reserved_0|>"), tok)


def test_out_of_vocab_tokens_refused(tok):
    with pytest.raises(SpecError, match=r"^alora.invocation_tokens: ids \[99999\]"):
        resolve_invocation(AloraSpec(invocation_tokens=[8, 99999]), tok, warn=False)


def test_last_occurrence_wins():
    assert find_invocation([8, 9, 1, 8, 9], [8, 9]) == 3
    assert find_invocation(torch.tensor([8, 9, 1]), [8, 9]) == 0
    assert find_invocation([8], [8, 9]) is None
    assert find_invocation([], [8]) is None


def text_records(tok, texts):
    return [{"text": t} for t in texts]


def test_prepare_samples_masks_labels_before_invocation(tok, inv_ids):
    spec = DataSpec(path="unused.jsonl", format="text", max_length=64)
    [s] = prepare_samples(spec, tok, [{"text": f"apple 7 river{INV}yes<|end|>"}], invocation=Invocation(inv_ids))
    start = s["alora_start"]
    assert s["input_ids"][start : start + len(inv_ids)] == inv_ids
    trained = [t for t, l in zip(s["input_ids"], s["labels"]) if l != IGNORE_INDEX]
    assert tok.decode(trained) == "yes<|end|></s>"
    assert all(l == IGNORE_INDEX for l in s["labels"][: start + len(inv_ids)])


def test_missing_invocation_is_an_error_naming_records(tok, inv_ids):
    spec = DataSpec(path="unused.jsonl", format="text", max_length=64)
    records = [{"text": f"a{INV}yes"}, {"text": "no invocation"}, {"text": f"b{INV}no"}, {"text": "none here"}]
    with pytest.raises(SpecError) as err:
        prepare_samples(spec, tok, records, invocation=Invocation(inv_ids))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("data.path: 2 of 4 records") and "(records 2, 4)" in msg
    assert "alora.drop_samples_without_invocation" in msg
    samples, stats = prepare_samples(spec, tok, records, invocation=Invocation(inv_ids, drop_missing=True), return_stats=True)
    assert len(samples) == 2 and stats.dropped == 2


def test_truncated_invocation_counts_as_missing(tok, inv_ids):
    spec = DataSpec(path="unused.jsonl", format="text", max_length=8)
    with pytest.raises(SpecError, match="within max_length=8"):
        prepare_samples(spec, tok, [{"text": "apple river stone cloud green house" + INV + "yes"}], invocation=Invocation(inv_ids))


# ---------------------------------------------------------------------------------------------------------------------
# Offsets under padding and packing


def _samples(tok, inv_ids, texts):
    spec = DataSpec(path="unused.jsonl", format="text", max_length=128)
    return prepare_samples(spec, tok, [{"text": t} for t in texts], invocation=Invocation(inv_ids))


TEXTS = [f"apple 7 river stone{INV}yes<|end|>", f"cat{INV}no<|end|>", f"x {INV} y{INV}yes"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_offsets_select_the_same_tokens_for_both_padding_sides(tok, inv_ids, side):
    samples = _samples(tok, inv_ids, TEXTS)
    batch = collate(samples, tok.pad_token_id, padding_side=side)
    width = batch["input_ids"].shape[1]
    active = offsets_to_mask(batch["alora_offsets"].tolist(), width)
    for row, s in enumerate(samples):
        real = batch["attention_mask"][row].bool()
        # The activated real tokens are exactly the sample's tokens from its (last) invocation on.
        got = batch["input_ids"][row][active[row] & real].tolist()
        assert got == s["input_ids"][s["alora_start"] :]
        assert got[: len(inv_ids)] == inv_ids
    # Offsets agree with what PEFT computes itself from the padded ids.
    from peft.tuners.lora.variants import calculate_alora_offsets
    from peft import LoraConfig

    peft_offsets = calculate_alora_offsets({"default": LoraConfig(task_type="CAUSAL_LM", alora_invocation_tokens=inv_ids)}, "default", batch["input_ids"])
    assert peft_offsets == batch["alora_offsets"].tolist()


def test_packing_masks_each_sample_from_its_own_invocation(tok, inv_ids):
    samples = _samples(tok, inv_ids, TEXTS)
    rows = pack_samples(samples, max_length=128)
    assert len(rows) == 1 and len(rows[0]["alora_spans"]) == 3
    for side in ("right", "left"):
        extra = {"input_ids": [1, 5], "labels": [-100, 5], "position_ids": [0, 1], "alora_spans": [[1, 2]]}
        batch = collate([rows[0], extra], tok.pad_token_id, padding_side=side)
        mask = batch["alora_mask"][0]
        ids = batch["input_ids"][0]
        # Concatenating each sample's activated part must give back every sample's suffix from its invocation.
        activated = ids[mask].tolist()
        order = sorted(samples, key=lambda s: -len(s["input_ids"]))
        assert activated == [t for s in order for t in s["input_ids"][s["alora_start"] :]]
        # Every trained label lies in an activated position (nothing is trained where the adapter is off).
        labels = batch["labels"][0]
        assert bool(mask[labels != IGNORE_INDEX].all())
        assert batch["alora_mask"][1].sum() == 1


# ---------------------------------------------------------------------------------------------------------------------
# The layers


@pytest.mark.parametrize("kernels", [False, True])
def test_tokens_before_the_invocation_see_exactly_the_base_model(inv_ids, kernels):
    from lorafleet.kernels import apply_kernels
    from lorafleet.spec import KernelsSpec

    model = tiny_alora(inv_ids)
    if kernels:
        apply_kernels(model, KernelsSpec())
    ids = torch.tensor([[1, 20, 30, 40, *inv_ids, 50, 60]])
    start = 4
    with torch.no_grad():
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        adapted = model(input_ids=ids).logits  # PEFT computes the offsets itself from input_ids
    assert torch.equal(adapted[:, :start], base[:, :start])
    assert not torch.allclose(adapted[:, start:], base[:, start:])


def test_mask_activation_equals_offsets_and_packed_rows_equal_separate_rows(inv_ids):
    model = tiny_alora(inv_ids)
    a = [1, 20, 30, *inv_ids, 50, 60]
    b = [1, 70, *inv_ids, 80]
    with torch.no_grad():
        ref_a = model(input_ids=torch.tensor([a])).logits[0]
        ref_b = model(input_ids=torch.tensor([b])).logits[0]
        with activation(model, torch.tensor([len(a) - 3])) as lm:
            off_a = lm(input_ids=torch.tensor([a])).logits[0]
        torch.testing.assert_close(off_a, ref_a, rtol=0, atol=0)
        row = torch.tensor([a + b])
        pos = torch.tensor([list(range(len(a))) + list(range(len(b)))])
        mask = torch.zeros(1, len(a) + len(b), dtype=torch.bool)
        mask[0, 3 : len(a)] = True
        mask[0, len(a) + 2 :] = True
        with activation(model, mask) as lm:
            packed = lm(input_ids=row, position_ids=pos, use_cache=False).logits[0]
    torch.testing.assert_close(packed[: len(a)], ref_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[len(a) :], ref_b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("fused", [True, False])
def test_loss_module_trains_only_after_the_invocation(inv_ids, fused, kernels):
    from lorafleet.kernels import apply_kernels
    from lorafleet.train.loss import LossModule
    from lorafleet.spec import KernelsSpec

    model = tiny_alora(inv_ids).train()
    if kernels:
        assert apply_kernels(model, KernelsSpec(loss=fused)).applied == {"mlp": 2, "qkv": 2, "o": 2, **({"loss": 1} if fused else {})}
    for p in model.parameters():
        if p.requires_grad:
            p.grad = None
    module = LossModule(model, fused_loss=fused)
    a = [1, 20, 30, *inv_ids, 50, 60]
    sample = {"input_ids": a, "labels": [IGNORE_INDEX] * (len(a) - 2) + [50, 60], "alora_start": 3}
    batch = collate([sample, sample], 0, padding_side="left")
    loss, n = module(**batch)
    assert int(n) == 4
    # Same loss as PEFT's own forward (which computes offsets from input_ids), on either loss path.
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-4, atol=1e-4)
    loss.backward()
    grads = [p.grad for n_, p in model.named_parameters() if "lora_" in n_]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_checkpoint_is_a_peft_alora_adapter_and_merge_is_refused(tmp_path, inv_ids):
    from peft import PeftModel

    from lorafleet.infer.merge import MergeRefused, merge_adapter

    model = tiny_alora(inv_ids)
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["alora_invocation_tokens"] == inv_ids
    clean = tiny_alora(inv_ids).get_base_model()
    loaded = PeftModel.from_pretrained(clean, adapter_dir)
    assert loaded.peft_config["default"].alora_invocation_tokens == inv_ids
    with pytest.raises(MergeRefused, match="aLoRA adapter"):
        merge_adapter(str(adapter_dir), str(tmp_path / "merged"))
    assert not (tmp_path / "merged").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Submit-time refusals through the CLI


def _job(tmp_path, records, **alora):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = {
        "name": "alora-refusal",
        "model": {"architecture": "llama", "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                                       "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}},
        "quantization": {"type": "none"},
        "alora": alora,
        "data": {"path": str(data), "format": "text", "max_length": 64},
        "training": {"steps": 1},
        "checkpoint": {"storage": str(tmp_path / "runs")},
    }
    path = tmp_path / "job.yaml"
    import yaml

    path.write_text(yaml.safe_dump(spec))
    return path


def test_cli_refuses_data_without_invocation(cli, tmp_path):
    job = _job(tmp_path, [{"text": f"a{INV}yes"}, {"text": "b no"}], invocation_string=INV)
    res = cli("submit", str(job), env={"LORAFLEET_HOME": str(tmp_path / "home")})
    assert res.returncode == 2, res.stderr
    errors = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "1 of 2 records" in errors[0] and "(records 2)" in errors[0]
    assert not (tmp_path / "runs").exists()


def test_cli_refuses_empty_invocation(cli, tmp_path):
    job = _job(tmp_path, [{"text": "a"}], invocation_string="   ")
    res = cli("submit", str(job))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: alora: ")


def test_cli_merge_refuses_alora_adapter(cli, tmp_path, inv_ids):
    tiny_alora(inv_ids).save_pretrained(tmp_path / "adapter")
    res = cli("merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"), timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len([l for l in lines if l.startswith("error:")]) == 1 and "aLoRA adapter" in lines[-1]
    assert not (tmp_path / "merged").exists()
