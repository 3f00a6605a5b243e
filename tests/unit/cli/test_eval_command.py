"""`lorafleet eval` (loss and generation metrics of an adapter on a file) and `lorafleet generate`'s templated prompts,
on a tiny materialized llama whose adapters are saved as training saves checkpoints (with the job's data format)."""

import json

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import AutoModelForCausalLM

from lorafleet.cli.main import cli
from lorafleet.data.encode import prepare_samples
from lorafleet.data.templates import format_instruction_prompt
from lorafleet.data.tokenizer import load_tokenizer
from lorafleet.model.build import materialize
from lorafleet.model.device import torch_dtype
from lorafleet.runstore.checkpoint import save_checkpoint
from lorafleet.spec import DataSpec, ModelSpec
from lorafleet.train.evaluate import evaluate_loss
from lorafleet.train.loss import LossModule

from helpers.cli import one_line_error, run_cli

# Commands run in this process (CliRunner) set up the console; undone after each test.
pytestmark = pytest.mark.usefixtures("console_restored")

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 16}
WORDS = ["red fox", "blue sky tree", "cat", "sun moon star river", "green", "apple pie"]
RECORDS = [{"instruction": "Reverse the order of these words.", "input": w, "output": " ".join(reversed(w.split()))}
           for w in WORDS]
CHAT = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]


def _save(root, name, base, fmt, invocation=None, seed=0, info=True):
    """An adapter checkpoint as a worker writes it: random non-zero LoRA weights, `lorafleet.json` with the job's
    data format (`info=False`: without it, as earlier versions wrote them)."""
    torch.manual_seed(seed)
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM",
                        alora_invocation_tokens=invocation)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    with torch.no_grad():  # large enough that the adapter changes losses and answers visibly
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name:
                parameter.copy_(torch.randn(parameter.shape) * 0.5)
    template = {"format": fmt, "max_length": 128, "train_on_inputs": False}
    save_checkpoint(root / name, rank=0, step=1, adapter_state=get_peft_model_state_dict(model), peft_model=model,
                    info={"job": name, "loss": 1.0, **({"template": template} if info else {})})
    return root / name


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    base = materialize(ModelSpec(architecture="llama", config=TINY), root=root / "models")
    data = root / "tasks.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return {
        "base": base,
        "data": data,
        "instruction": _save(root, "instruction", base, "instruction"),
        "chat": _save(root, "chat", base, "chat", seed=1),
        "old": _save(root, "old", base, "instruction", seed=2, info=False),
    }


def _invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def _eval_json(*args) -> dict:
    return json.loads(_invoke("eval", *args, "--json").stdout.strip().splitlines()[-1])


def _plain_loss(model, records) -> float:
    """Token-mean cross-entropy of each record's output + eos after its prompt: one plain forward per record."""
    tok = load_tokenizer()
    total, count = 0.0, 0
    with torch.no_grad():
        for r in records:
            prompt = [tok.bos_token_id] + tok(format_instruction_prompt(r["instruction"], r["input"]),
                                              add_special_tokens=False)["input_ids"]
            target = tok(r["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            logits = model(input_ids=torch.tensor([prompt + target])).logits[0].float()
            predicted = logits[len(prompt) - 1 : -1]
            total += float(torch.nn.functional.cross_entropy(predicted, torch.tensor(target), reduction="sum"))
            count += len(target)
    return total / count


def test_eval_json_loss_matches_plain_peft_and_evaluate_loss(adapters):
    out = _eval_json(adapters["instruction"], "--data", adapters["data"], "--max-new-tokens", "4")
    assert out["samples"] == len(RECORDS) and out["generated"] == len(RECORDS)
    assert set(out) >= {"loss", "exact_match", "contains", "samples"}
    base = AutoModelForCausalLM.from_pretrained(adapters["base"])
    model = PeftModel.from_pretrained(base, str(adapters["instruction"])).eval()
    assert out["loss"] == pytest.approx(_plain_loss(model, RECORDS), rel=1e-5)
    samples = prepare_samples(DataSpec(path="x.jsonl", max_length=128), load_tokenizer(), RECORDS)
    direct = evaluate_loss(LossModule(model, fused_loss=False), samples, 0, device=torch.device("cpu"),
                           micro_batch_size=3)
    assert out["loss"] == pytest.approx(direct.loss, rel=1e-5)


def test_base_only_scores_the_base_model(adapters):
    adapted = _eval_json(adapters["instruction"], "--data", adapters["data"], "--max-new-tokens", "2")
    alone = _eval_json(adapters["instruction"], "--data", adapters["data"], "--max-new-tokens", "2", "--base-only")
    assert alone["base_only"] and abs(alone["loss"] - adapted["loss"]) > 1e-3
    base = AutoModelForCausalLM.from_pretrained(adapters["base"]).eval()
    assert alone["loss"] == pytest.approx(_plain_loss(base, RECORDS), rel=1e-5)


def test_predictions_file_in_input_order_and_metrics_follow_it(adapters, tmp_path):
    # First learn what the adapter answers; then a file whose outputs are its answers for records 0, 2 and 4 (and
    # something else for the rest) must score exact_match 3/6, and the answer plus a suffix scores `contains` only.
    first = tmp_path / "first.jsonl"
    _invoke("eval", adapters["instruction"], "--data", adapters["data"], "--max-new-tokens", "4",
            "--predictions", first)
    answers = [json.loads(line)["prediction"] for line in first.read_text().splitlines()]
    assert len(answers) == len(RECORDS) and all(a.strip() for a in answers), answers
    records = [dict(r, output=(answers[i] if i % 2 == 0 else "zzz nothing")) for i, r in enumerate(RECORDS)]
    records[1]["output"] = answers[1].strip()[:2] or "zzz"  # a prefix of the answer: contained, not equal
    data = tmp_path / "known.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    predictions = tmp_path / "predictions.jsonl"
    out = _eval_json(adapters["instruction"], "--data", data, "--max-new-tokens", "4", "--predictions", predictions)
    written = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [{k: v for k, v in w.items() if k != "prediction"} for w in written] == records
    assert [w["prediction"] for w in written] == answers
    assert len(answers[1].strip()) > 2 and all(a.strip() != "zzz nothing" for a in answers)
    assert out["exact_match"] == pytest.approx(3 / 6) and out["contains"] == pytest.approx(4 / 6)
    assert out["empty_predictions"] == 0


def test_max_samples_takes_the_first_records(adapters, tmp_path):
    predictions = tmp_path / "p.jsonl"
    out = _eval_json(adapters["instruction"], "--data", adapters["data"], "--max-samples", "2", "--max-new-tokens",
                     "2", "--predictions", predictions)
    base = AutoModelForCausalLM.from_pretrained(adapters["base"])
    model = PeftModel.from_pretrained(base, str(adapters["instruction"])).eval()
    assert out["samples"] == 2 and out["loss"] == pytest.approx(_plain_loss(model, RECORDS[:2]), rel=1e-5)
    assert [json.loads(line)["input"] for line in predictions.read_text().splitlines()] == WORDS[:2]


def test_human_readable_output(adapters):
    text = _invoke("eval", adapters["instruction"], "--data", adapters["data"], "--max-new-tokens", "2").stdout
    assert "loss" in text and "exact_match" in text and "contains" in text and "6 records" in text


def test_old_checkpoint_needs_format_and_then_works(adapters):
    result = CliRunner().invoke(cli, ["eval", str(adapters["old"]), "--data", str(adapters["data"])])
    assert result.exit_code == 2 and "--format" in result.stderr
    out = _eval_json(adapters["old"], "--data", adapters["data"], "--format", "instruction", "--max-new-tokens", "2")
    assert out["samples"] == 6 and out["loss"] > 0


def test_bad_data_file_is_one_line_naming_file_and_line(adapters, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(RECORDS[1]) + "\n{\"instruction\": \"x\"\n")
    line = one_line_error(run_cli("eval", str(adapters["instruction"]), "--data", str(bad), timeout=300))
    assert str(bad) in line and "line 3" in line and "invalid JSON" in line
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"instruction": "x"}) + "\n")
    result = CliRunner().invoke(cli, ["eval", str(adapters["instruction"]), "--data", str(missing)])
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert line == f"error: --data: {missing}: record 2 (line 2): missing 'output'"
    result = CliRunner().invoke(cli, ["eval", str(adapters["instruction"]), "--data", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 2 and str(tmp_path / "nope.jsonl") in result.stderr


def test_damaged_adapter_is_one_line(adapters, tmp_path):
    import shutil

    cut = tmp_path / "cut"
    shutil.copytree(adapters["instruction"], cut)
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    result = CliRunner().invoke(cli, ["eval", str(cut), "--data", str(adapters["data"])])
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: ADAPTER: cannot load {cut}: adapter_model.safetensors")


def _generate(*args) -> dict:
    return json.loads(_invoke("generate", *args, "--max-new-tokens", "5", "--json").stdout.strip().splitlines()[-1])


def test_generate_instruction_equals_the_hand_templated_prompt(adapters):
    record = RECORDS[1]
    templated = _generate("--adapter", adapters["instruction"], "--instruction", record["instruction"], "--input",
                          record["input"])
    by_hand = _generate("--adapter", adapters["instruction"], "--raw",
                        format_instruction_prompt(record["instruction"], record["input"]))
    assert templated["tokens"] == by_hand["tokens"] and len(templated["tokens"]) == 5
    chat = _generate("--adapter", adapters["chat"], "--message", "hi")
    chat_by_hand = _generate("--adapter", adapters["chat"], "--prompt", "<|user|>hi<|end|><|assistant|>")
    assert chat["tokens"] == chat_by_hand["tokens"]


@pytest.mark.parametrize(
    "kind, args, expected",
    [
        ("instruction", ["--message", "hi"], "error: --message: wrong prompt shape for this adapter: it was trained on "
         "instruction data: give --instruction TEXT [--input TEXT] (or --raw TEXT for a prompt used as is)"),
        ("chat", ["--instruction", "Say hi."], "error: --instruction: wrong prompt shape"),
        ("chat", ["--message", "hi", "--message", "hello"], "error: --message: 2 messages end with an assistant turn"),
        ("instruction", [], "error: generate: give a prompt: --instruction, --message or --raw; this adapter was "
         "trained on instruction data"),
        ("instruction", ["--instruction", "a", "--raw", "b"], "error: generate: --raw and --instruction are exclusive"),
        ("instruction", ["--raw", "a", "--input", "b"], "error: --input: goes with --instruction"),
    ],
)
def test_generate_refuses_a_prompt_in_the_wrong_shape(adapters, kind, args, expected):
    result = CliRunner().invoke(cli, ["generate", "--adapter", str(adapters[kind]), *args])
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(expected)


def test_alora_adapter_is_evaluated_with_its_activation(adapters, tmp_path):
    from lorafleet.data.alora import Invocation

    tok = load_tokenizer()
    invocation = tok("<|reserved_0|>judge<|reserved_1|>", add_special_tokens=False)["input_ids"]
    alora = _save(tmp_path, "alora", adapters["base"], "text", invocation=invocation, seed=3)
    records = [{"text": f"<|user|>{w}<|end|><|reserved_0|>judge<|reserved_1|>{a}<|end|>"}
               for w, a in (("sun 7", "yes"), ("moon", "no"), ("9 tree", "yes"))]
    data = tmp_path / "judge.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = _eval_json(alora, "--data", data, "--max-new-tokens", "2")
    assert out["samples"] == 3 and out["generated"] == 3
    # Loaded as `lorafleet eval` loads it (`dtype: auto`: bfloat16 where this CPU computes it natively), and
    # evaluated in its micro-batches of 8, so both sides do the same arithmetic on any CPU.
    base = AutoModelForCausalLM.from_pretrained(adapters["base"], dtype=torch_dtype("auto", "cpu"))
    model = PeftModel.from_pretrained(base, str(alora)).eval()
    samples = prepare_samples(DataSpec(path="x.jsonl", format="text", max_length=128), tok, records,
                              invocation=Invocation(invocation))
    direct = evaluate_loss(LossModule(model, fused_loss=False), samples, 0, device=torch.device("cpu"),
                           micro_batch_size=8)
    # Only what follows each invocation is a target: the answer, <|end|> and </s>.
    assert direct.tokens == sum(len(tok(a, add_special_tokens=False)["input_ids"]) + 2 for a in ("yes", "no", "yes"))
    assert out["loss"] == pytest.approx(direct.loss, rel=1e-5)
    result = CliRunner().invoke(cli, ["generate", "--adapter", str(alora), "--instruction", "x"])
    assert result.exit_code == 2 and "trained on text data: give --raw TEXT" in result.stderr
