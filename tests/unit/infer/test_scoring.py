"""Generation metrics: the metrics on known answers, prompts rendered as training renders them, batched greedy decoding
equal to one prompt at a time, and aLoRA adapters answering with their activation."""

import pytest
import torch

from lorafleet.constants import IGNORE_INDEX
from lorafleet.data.encode import prepare_samples
from lorafleet.data.tokenizer import load_tokenizer
from lorafleet.infer.generate import continue_with_adapter, stop_ids
from lorafleet.infer.scoring import greedy_generate, record_query, score, score_records
from lorafleet.spec import DataSpec

from helpers.models import tiny_alora

INVOCATION = "<|reserved_0|>judge<|reserved_1|>"


def test_metrics_on_known_predictions():
    predictions = ["  fox red\n", "fox red!", "The answer: tree sky blue.", "cat", ""]
    references = ["fox red", "fox red", "tree sky blue", " dog ", "x"]
    assert score(predictions, references) == {"exact_match": 1 / 5, "contains": 3 / 5}
    assert score(predictions, references, metrics=["contains"]) == {"contains": 3 / 5}
    with pytest.raises(ValueError, match="unknown metrics"):
        score(predictions, references, metrics=["bleu"])


def _prompt_part(sample):
    """The tokens before the first trained one: what the model saw before its target in training."""
    first = next(i for i, label in enumerate(sample["labels"]) if label != IGNORE_INDEX)
    return sample["input_ids"][:first]


def test_prompts_are_what_training_saw_before_the_target():
    tok = load_tokenizer()
    record = {"instruction": "Reverse the words.", "input": "red fox", "output": "fox red"}
    [instruction_sample] = prepare_samples(DataSpec(path="x.jsonl", max_length=128), tok, [record])
    assert record_query(record, "instruction", tok) == (_prompt_part(instruction_sample), "fox red")
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"},
                         {"role": "assistant", "content": "hello again"}]}
    [sample] = prepare_samples(DataSpec(path="x.jsonl", format="chat", max_length=128), tok, [chat])
    ids, reference = record_query(chat, "chat", tok)
    assert reference == "hello again"
    # The prompt is the sample up to the last assistant turn's content: every earlier turn, then the turn header.
    last = len(sample["input_ids"]) - len(tok("hello again", add_special_tokens=False)["input_ids"]) - 1
    assert ids == sample["input_ids"][:last] and tok.decode(ids[-1:]) == "<|assistant|>"
    # Text records: only aLoRA ones split (at the invocation), and the invocation is appended where missing.
    invocation = tok(INVOCATION, add_special_tokens=False)["input_ids"]
    text = {"text": f"<|user|>a 7<|end|>{INVOCATION}yes<|end|>"}
    ids, reference = record_query(text, "text", tok, invocation)
    assert reference == "yes" and ids[-len(invocation):] == invocation
    assert record_query(text, "text", tok) is None
    ids, _ = record_query(record, "instruction", tok, invocation)
    assert ids == _prompt_part(instruction_sample) + invocation


def test_batched_greedy_equals_one_prompt_at_a_time():
    model = tiny_alora(None, seed=3)
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(16, 2048, (n,), generator=g).tolist() for n in (3, 9, 5, 12, 1)]
    stop = [2, 7]
    batched = greedy_generate(model, prompts, max_new_tokens=6, stop=stop, pad_token_id=0, batch_size=3)
    alone = [continue_with_adapter(model, p, max_new_tokens=6, eos_token_id=stop).tokens for p in prompts]
    assert batched == alone and all(len(t) == 6 or t[-1] in stop for t in batched)


def test_alora_answers_with_its_activation_and_leaves_the_model_as_found():
    tok = load_tokenizer()
    invocation = tok(INVOCATION, add_special_tokens=False)["input_ids"]
    model = tiny_alora(invocation, seed=4)
    records = [{"text": f"<|user|>{words}<|end|>{INVOCATION}yes<|end|>"} for words in ("a 7 b", "sun moon", "9 9")]
    model.train()
    torch.manual_seed(11)
    expected_draw = torch.rand(3)
    torch.manual_seed(11)
    scores = score_records(model, tok, records, "text", max_new_tokens=4)
    assert model.training and torch.equal(torch.rand(3), expected_draw)  # mode and RNG stream untouched
    model.eval()
    for record, prediction in zip(records, scores.predictions):
        ids, _ = record_query(record, "text", tok, invocation)
        tokens = continue_with_adapter(model, ids, max_new_tokens=4, eos_token_id=stop_ids(tok)).tokens
        assert prediction == tok.decode(tokens, skip_special_tokens=True)
    assert scores.samples == 3 and scores.references == ["yes"] * 3
    assert scores.metrics["exact_match"] == sum(p.strip() == "yes" for p in scores.predictions) / 3
    base = score_records(model, tok, records, "text", max_new_tokens=4, adapter=False)
    with model.disable_adapter():
        plain = [_plain_greedy(model.get_base_model(), record_query(r, "text", tok, invocation)[0], 4, stop_ids(tok))
                 for r in records]
    assert base.predictions == [tok.decode(t, skip_special_tokens=True) for t in plain]
    assert base.predictions != scores.predictions


def _plain_greedy(model, ids, steps, stop):
    """Greedy decoding by full forwards without a cache (the reference)."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
            if token in stop:
                break
    return out
