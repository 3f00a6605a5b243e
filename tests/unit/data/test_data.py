"""The data pipeline: records in, masked/packed/collated tensors out, and the global batch plan."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from lorafleet.data.plan import BatchPlan
from lorafleet.data.batching import collate, pack_samples
from lorafleet.data.encode import count_target_tokens, prepare_samples
from lorafleet.data.templates import format_instruction_prompt
from lorafleet.data.records import load_records
from lorafleet.spec import DataSpec, SpecError
from lorafleet.data.templates import CHAT_TEMPLATE, SPECIAL_TOKENS

from helpers.cli import REPO

TASKS = REPO / "jobs" / "data" / "tasks.jsonl"
CHAT = REPO / "jobs" / "data" / "chat_sample.jsonl"
TEXT = REPO / "jobs" / "data" / "text_sample.jsonl"


@pytest.fixture(scope="module")
def tiny_llama(tok):
    from transformers import AutoModelForCausalLM

    from lorafleet.model.families import family_config

    torch.manual_seed(0)
    cfg = family_config(
        "llama", len(tok), {"num_hidden_layers": 2},
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    return model.train()  # training mode, as in a worker (dropout is 0 in these configs)


def trained_text(tok, sample) -> str:
    return tok.decode([t for t, l in zip(sample["input_ids"], sample["labels"]) if l != -100])


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_special_tokens(tok):
    assert len(tok) == 2048
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(16))
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    # Special tokens are never split, and byte-level BPE encodes any text losslessly without <unk>.
    text = "Ünïcode ✓ 🙂 tabs\tand\nnewlines <|reserved_3|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.convert_tokens_to_ids("<|reserved_3|>") in ids
    assert tok.decode(ids) == text
    assert tok("hi")["input_ids"][0] == tok.bos_token_id


def test_tokenizer_save_pretrained_roundtrip_offline(tok, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "Reverse the order of these words.\nred fox 🙂"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.all_special_tokens == tok.all_special_tokens
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (0, 1, 2)
    assert again.chat_template == CHAT_TEMPLATE
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert again.apply_chat_template(conv, tokenize=False) == "<s><|user|>Hi<|end|><|assistant|>Hello<|end|>"


def test_chat_template_generation_mask_matches_prepared_labels(tok):
    records = load_records(DataSpec(path=str(CHAT), format="chat"))[:30]
    samples = prepare_samples(DataSpec(path=str(CHAT), format="chat", max_length=512), tok, records)
    for record, sample in zip(records, samples):
        out = tok.apply_chat_template(
            record["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert out["input_ids"] == sample["input_ids"]
        assert out["assistant_masks"] == [int(l != -100) for l in sample["labels"]]


# ---------------------------------------------------------------------------------------------------------------------
# Masking per format


def test_instruction_masking(tok):
    spec = DataSpec(path=str(TASKS), format="instruction", max_length=256)
    records = load_records(spec)
    samples, stats = prepare_samples(spec, tok, records, return_stats=True)
    assert len(samples) == len(records) == stats.samples and stats.dropped == stats.truncated == 0
    for record, sample in zip(records[:50], samples[:50]):
        assert trained_text(tok, sample) == record["output"] + "</s>"
        assert sample["input_ids"][0] == tok.bos_token_id and sample["input_ids"][-1] == tok.eos_token_id
        first_trained = next(i for i, label in enumerate(sample["labels"]) if label != -100)
        prompt = format_instruction_prompt(record["instruction"], record.get("input"))
        assert tok.decode(sample["input_ids"][1:first_trained]) == prompt
        assert len(sample["labels"]) == len(sample["input_ids"])
    assert stats.target_tokens == count_target_tokens(samples)


def test_instruction_without_input_has_no_input_block(tok):
    [s] = prepare_samples(DataSpec(path="x.jsonl"), tok, [{"instruction": "Say hi 2 times.", "output": "hi hi"}])
    assert tok.decode(s["input_ids"]) == "<s>### Instruction:\nSay hi 2 times.\n\n### Response:\nhi hi</s>"


def test_chat_masking(tok):
    spec = DataSpec(path=str(CHAT), format="chat", max_length=512)
    records = load_records(spec)
    samples = prepare_samples(spec, tok, records)
    assert any(r["messages"][0]["role"] == "system" for r in records)
    assert any(sum(m["role"] == "assistant" for m in r["messages"]) == 2 for r in records)
    for record, sample in zip(records, samples):
        expected = "".join(m["content"] + "<|end|>" for m in record["messages"] if m["role"] == "assistant")
        assert trained_text(tok, sample) == expected


def test_text_masking_and_train_on_inputs(tok):
    spec = DataSpec(path=str(TEXT), format="text")
    record = load_records(spec)[0]
    [s] = prepare_samples(spec, tok, [record])
    assert trained_text(tok, s) == record["text"] + "</s>"
    assert s["labels"][0] == -100 and s["input_ids"][0] == tok.bos_token_id

    rec = {"instruction": "Count the words.", "input": "red fox", "output": "2"}
    [s] = prepare_samples(DataSpec(path="x.jsonl", train_on_inputs=True), tok, [rec])
    assert s["labels"][0] == -100 and s["labels"][1:] == s["input_ids"][1:]


def test_truncation_and_dropping(tok, caplog):
    records = [
        {"instruction": "Repeat the word cat 5 times.", "output": "cat cat cat cat cat"},
        {"instruction": "Count the words. " * 10, "output": "3"},  # the prompt alone is longer than max_length
    ]
    prompt = len(tok(format_instruction_prompt(records[0]["instruction"]), add_special_tokens=False)["input_ids"])
    max_length = 1 + prompt + 3  # bos, prompt, 3 of the 6 output+eos tokens
    with caplog.at_level(logging.WARNING, logger="lorafleet.data.encode"):
        samples, stats = prepare_samples(DataSpec(path="x.jsonl", max_length=max_length), tok, records, return_stats=True)
    assert (stats.truncated, stats.dropped, stats.samples) == (2, 1, 1)
    assert "dropped 1 of 2 samples" in caplog.text
    [s] = samples
    assert len(s["input_ids"]) == len(s["labels"]) == max_length
    assert s["input_ids"][-1] != tok.eos_token_id  # cut inside the output: no eos to learn
    assert trained_text(tok, s) == "cat cat cat"

    with pytest.raises(SpecError, match=r"^data.max_length: every sample was dropped"):
        prepare_samples(DataSpec(path="x.jsonl", max_length=8), tok, records[1:])


def test_foreign_chat_template(tok):
    # A model's own template (newlines around contents, an eos after each assistant turn, no generation markers):
    # the generic path must find exactly the assistant text plus what the template appends to it.
    from transformers import PreTrainedTokenizerFast

    other = PreTrainedTokenizerFast(
        tokenizer_object=tok.backend_tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        chat_template=(
            "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
            "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
        ),
    )
    record = load_records(DataSpec(path=str(CHAT), format="chat"))[0]
    [s] = prepare_samples(DataSpec(path="x.jsonl", format="chat", max_length=512), other, [record])
    expected = "".join(m["content"] + "</s>\n" for m in record["messages"] if m["role"] == "assistant")
    assert trained_text(other, s) == expected


# ---------------------------------------------------------------------------------------------------------------------
# Packing and collation


def test_packing_positions_and_boundaries(tok):
    spec = DataSpec(path=str(TASKS), max_length=128)
    records = load_records(spec)[:200]
    plain = prepare_samples(spec, tok, records)
    rows, stats = prepare_samples(spec.model_copy(update={"packing": True}), tok, records, return_stats=True)
    assert len(rows) == stats.rows < len(plain) / 3
    assert all(len(r["input_ids"]) <= 128 for r in rows)
    pieces = []
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"])
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert starts[0] == 0
        for a, b in zip(starts, starts[1:] + [len(row["input_ids"])]):
            assert row["position_ids"][a:b] == list(range(b - a))
            assert row["labels"][a] == -100 and row["input_ids"][a] == tok.bos_token_id
            pieces.append((tuple(row["input_ids"][a:b]), tuple(row["labels"][a:b])))
    # Every sample exactly once, unchanged.
    assert sorted(pieces) == sorted((tuple(s["input_ids"]), tuple(s["labels"])) for s in plain)
    assert count_target_tokens(rows) == count_target_tokens(plain)
    # Deterministic.
    assert rows == prepare_samples(spec.model_copy(update={"packing": True}), tok, records)


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # HF convention: position i predicts labels[i + 1].
    return torch.nn.functional.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=-100, reduction="none")


def test_packed_row_loss_equals_separate_samples(tok, tiny_llama):
    spec = DataSpec(path=str(TASKS), max_length=256)
    samples = prepare_samples(spec, tok, load_records(spec)[:6])
    [row] = pack_samples(samples, max_length=256)
    order = sorted(samples, key=lambda s: -len(s["input_ids"]))  # best-fit decreasing puts longest first
    with torch.no_grad():
        batch = collate([row], tok.pad_token_id)
        assert "attention_mask" not in batch
        packed = _token_losses(tiny_llama(**batch, use_cache=False).logits[0], batch["labels"][0])
        separate = []
        for s in order:
            b = collate([s], tok.pad_token_id)
            separate.append(_token_losses(tiny_llama(**b, use_cache=False).logits[0], b["labels"][0]))
    # The packed row's shifted loss vector is the separate ones joined by one zero (the boundary target is -100).
    expected = torch.cat([torch.cat([sep, torch.zeros(1)]) for sep in separate])[:-1]
    assert packed.shape == expected.shape
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=1e-5)
    assert packed.sum() > 0


def test_collate_right_and_left_padding(tok, tiny_llama):
    spec = DataSpec(path=str(TASKS))
    samples = prepare_samples(spec, tok, load_records(spec)[:4])
    lengths = [len(s["input_ids"]) for s in samples]
    assert len(set(lengths)) > 1
    right = collate(samples, tok.pad_token_id)
    left = collate(samples, tok.pad_token_id, padding_side="left")
    width = max(lengths)
    for i, n in enumerate(lengths):
        assert right["input_ids"][i, :n].tolist() == samples[i]["input_ids"]
        assert right["input_ids"][i, n:].eq(tok.pad_token_id).all() and right["labels"][i, n:].eq(-100).all()
        assert right["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert left["input_ids"][i, width - n :].tolist() == samples[i]["input_ids"]
        assert left["labels"][i, : width - n].eq(-100).all()
        assert left["attention_mask"][i].tolist() == [0] * (width - n) + [1] * n
        assert left["position_ids"][i, width - n :].tolist() == list(range(n))
    # The padding side must not change what the model computes on real tokens.
    with torch.no_grad():
        lr = tiny_llama(**right, use_cache=False).logits
        ll = tiny_llama(**left, use_cache=False).logits
    for i, n in enumerate(lengths):
        torch.testing.assert_close(lr[i, :n], ll[i, width - n :], atol=1e-4, rtol=1e-4)


def test_collate_packed_rows_with_padding(tok):
    rows = [
        {"input_ids": [1, 5, 6, 1, 7], "labels": [-100, 5, 6, -100, 7], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [1, 8], "labels": [-100, 8], "position_ids": [0, 1]},
    ]
    b = collate(rows, pad_id=0)
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert b["labels"][1].tolist() == [-100, 8, -100, -100, -100]
    b = collate(rows, pad_id=0, padding_side="left")
    assert b["input_ids"][1].tolist() == [0, 0, 0, 1, 8] and b["position_ids"][1].tolist() == [0, 1, 2, 0, 1]
    with pytest.raises(ValueError, match="packed rows with plain samples"):
        collate([rows[0], {"input_ids": [1], "labels": [-100]}], pad_id=0)


# ---------------------------------------------------------------------------------------------------------------------
# BatchPlan


@pytest.mark.parametrize("world_size,micro,accum", [(1, 12, 1), (1, 3, 4), (2, 6, 1), (2, 2, 3), (4, 1, 3)])
def test_batch_plan_partition_and_world_size_invariance(world_size, micro, accum):
    plan = BatchPlan(num_samples=50, global_batch_size=12, seed=7)
    for step in (0, 3, 4, 9):
        parts = [
            plan.micro_batches(step, rank, world_size, micro, accum) for rank in range(world_size)
        ]
        assert all(len(p) == accum and all(len(mb) == micro for mb in p) for p in parts)
        flat = [i for p in parts for mb in p for i in mb]
        assert flat == plan.global_batch(step)


def test_batch_plan_epochs_determinism_and_resume():
    plan = BatchPlan(num_samples=10, global_batch_size=4, seed=3)
    stream = [i for step in range(10) for i in plan.global_batch(step)]  # 40 positions = 4 epochs
    epochs = [stream[k : k + 10] for k in range(0, 40, 10)]
    assert all(sorted(e) == list(range(10)) for e in epochs)  # each epoch sees every sample once
    assert len({tuple(e) for e in epochs}) == 4  # and reshuffles
    assert epochs[1] == list(plan.epoch_order(1))
    assert plan.global_batch(2) == epochs[0][8:] + epochs[1][:2]  # wraps across the epoch boundary
    # A fresh plan (a resumed run) gives the same batches from the step number alone.
    assert BatchPlan(10, 4, seed=3).global_batch(7) == plan.global_batch(7)
    assert BatchPlan(10, 4, seed=4).global_batch(0) != plan.global_batch(0)
    assert BatchPlan(10, 4, seed=3, shuffle=False).global_batch(1) == [4, 5, 6, 7]
    assert plan.epoch(5) == 2.0
    # Batch larger than the dataset: spans epochs.
    assert sorted(BatchPlan(3, 6, seed=0).global_batch(0)) == [0, 0, 1, 1, 2, 2]


def test_batch_plan_refusals():
    plan = BatchPlan(10, 4, seed=0)
    with pytest.raises(ValueError, match="!= global_batch_size 4"):
        plan.micro_batches(0, 0, world_size=2, micro_batch_size=1, grad_accum=1)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        plan.micro_batches(0, 2, world_size=2, micro_batch_size=2, grad_accum=1)
    with pytest.raises(ValueError):
        BatchPlan(0, 4, seed=0)


# ---------------------------------------------------------------------------------------------------------------------
# load_records


GOOD = {"instruction": "Count the words.", "input": "red fox", "output": "2"}


@pytest.mark.parametrize(
    "lines,fmt,message",
    [
        ([GOOD, {"instruction": "x"}], "instruction", "record 2: missing 'output'"),
        ([GOOD, {"instruction": "x", "output": 3}], "instruction", "record 2: 'output' must be a string (got int)"),
        ([{"instruction": "x", "input": ["a"], "output": "y"}], "instruction", "record 1: 'input' must be a string (got list)"),
        ([{"instruction": " ", "output": "y"}], "instruction", "record 1: 'instruction' is empty"),
        ([GOOD, '{"instruction": "x", "output": "y"'], "instruction", "line 2: invalid JSON"),
        ([GOOD, "", "[1, 2]"], "instruction", r"record 2 \(line 3\): expected an object, got list"),
        ([{"text": "hello"}], "instruction", "record 1: missing 'instruction' (it looks like the text format: set data.format: text)"),
        ([{"text": None}], "text", "record 1: missing 'text'"),
        ([{"text": 5}], "text", "record 1: 'text' must be a string (got int)"),
        ([{"messages": []}], "chat", "record 1: 'messages' must be a non-empty list"),
        ([{"messages": [{"role": "bot", "content": "x"}]}], "chat", r"record 1: messages\[0\].role must be one of"),
        ([{"messages": [{"role": "user", "content": 1}]}], "chat", r"record 1: messages\[0\].content must be a string"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], "chat", "record 1: no assistant message"),
    ],
)
def test_load_records_refusals(tmp_path, lines, fmt, message):
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(SpecError) as err:
        load_records(DataSpec(path=str(path), format=fmt))
    text = str(err.value)
    assert "\n" not in text and text.startswith("data.path: ")
    assert re.search(message if "\\" in message else re.escape(message), text), text


def test_load_records_empty_and_missing(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(SpecError, match=r"^data.path: .* holds no records$"):
        load_records(DataSpec(path=str(empty)))
    with pytest.raises(SpecError, match="^data.path: no such file"):
        load_records(DataSpec(path=str(tmp_path / "nope.jsonl")))
    (tmp_path / "bad.json").write_text('{"a": 1')
    with pytest.raises(SpecError, match="^data.path: invalid JSON at line 1"):
        load_records(DataSpec(path=str(tmp_path / "bad.json")))
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(SpecError, match="holds no records"):
        load_records(DataSpec(path=str(tmp_path / "empty.json")))


def test_load_records_json_parquet_and_saved_dataset_roundtrip(tmp_path):
    import datasets

    records = load_records(DataSpec(path=str(TASKS)))[:20]
    (tmp_path / "d.json").write_text(json.dumps(records))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": records}))
    ds = datasets.Dataset.from_list(records)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "saved_dict"))

    def norm(rs):  # columnar formats fill an absent optional `input` with None
        return [{k: v for k, v in r.items() if v is not None} for r in rs]

    for name in ("d.json", "wrapped.json", "d.parquet", "saved", "saved_dict"):
        assert norm(load_records(DataSpec(path=str(tmp_path / name)))) == records, name

    bad = datasets.Dataset.from_list([{"instruction": "x", "output": None}])
    bad.to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(SpecError, match="^data.path: record 1: missing 'output'$"):
        load_records(DataSpec(path=str(tmp_path / "bad.parquet")))


def test_shipped_data_sizes_and_regeneration(tmp_path):
    import demo_data  # scripts/ (conftest puts it on sys.path)

    assert TASKS.stat().st_size < 1_500_000
    assert len(load_records(DataSpec(path=str(TASKS)))) == demo_data.NUM_TASKS
    assert len(load_records(DataSpec(path=str(CHAT), format="chat"))) == demo_data.NUM_CHAT
    assert len(load_records(DataSpec(path=str(TEXT), format="text"))) == demo_data.NUM_TEXT
    # The generator is deterministic: regenerating gives the shipped bytes, tokenizer included.
    demo_data.main(["--data-dir", str(tmp_path), "--assets-dir", str(tmp_path)])
    for name in ("tasks.jsonl", "chat_sample.jsonl", "text_sample.jsonl"):
        assert (tmp_path / name).read_bytes() == (REPO / "jobs" / "data" / name).read_bytes(), name
    assert (tmp_path / "tokenizer.json").read_bytes() == (REPO / "lorafleet" / "assets" / "tokenizer.json").read_bytes()


def _padding(plan: BatchPlan, lengths: list[int], steps: int, world_size: int, micro: int) -> int:
    """Pad tokens collate adds over `steps` steps: each micro-batch is padded to its longest sample."""
    pad = 0
    for step in range(steps):
        for rank in range(world_size):
            for mb in plan.micro_batches(step, rank, world_size, micro, 1):
                pad += max(lengths[i] for i in mb) * len(mb) - sum(lengths[i] for i in mb)
    return pad


def test_length_grouped_plan_pads_less_and_keeps_epochs_and_resume():
    gen = torch.Generator().manual_seed(0)
    num, batch = 1003, 16  # an epoch is not a whole number of batches: batches span epoch boundaries
    lengths = (torch.randint(5, 200, (num,), generator=gen)).tolist()
    grouped = BatchPlan(num, batch, seed=5, lengths=lengths)
    steps = 3 * num // batch + 1  # three epochs and a bit
    stream = [i for step in range(steps) for i in grouped.global_batch(step)]
    for epoch in range(3):
        assert sorted(stream[epoch * num : (epoch + 1) * num]) == list(range(num))  # every sample once per epoch
    assert stream[:num] != stream[num : 2 * num]  # and each epoch in its own order
    # Batches of similar lengths: a quarter of the padding or less (measured: ~2% of it on these lengths).
    plain = BatchPlan(num, batch, seed=5)
    assert _padding(grouped, lengths, steps, 2, 8) < 0.25 * _padding(plain, lengths, steps, 2, 8)
    # Not a ramp from long to short: the window's batches come in a seeded order.
    firsts = [max(lengths[i] for i in grouped.global_batch(step)) for step in range(32)]
    assert firsts != sorted(firsts, reverse=True)
    # A resumed run (a fresh plan) gets the same batches from the step alone, a 1-worker run the same global batch.
    fresh = BatchPlan(num, batch, seed=5, lengths=lengths)
    assert [fresh.global_batch(step) for step in (150, 70, 3)] == [grouped.global_batch(step) for step in (150, 70, 3)]
    one = [i for mb in fresh.micro_batches(70, 0, 1, 8, 2) for i in mb]
    two = [i for rank in range(2) for mb in grouped.micro_batches(70, rank, 2, 8, 1) for i in mb]
    assert one == two == grouped.global_batch(70)
    assert BatchPlan(num, batch, seed=6, lengths=lengths).global_batch(0) != grouped.global_batch(0)
    with pytest.raises(ValueError, match="3 lengths for 4 samples"):
        BatchPlan(4, 2, seed=0, lengths=[1, 2, 3])


def test_length_grouping_is_read_from_the_spec(tok):
    from lorafleet.data.dataset import TrainingData
    from lorafleet.spec import load_spec

    spec = load_spec("tests/jobs/llama.yaml", ["data.group_by_length=true"])
    data = TrainingData.from_spec(spec, tok)
    plan = data.plan(spec)
    assert list(plan.lengths) == [len(s["input_ids"]) for s in data.samples]
    assert data.plan(load_spec("tests/jobs/llama.yaml")).lengths is None
