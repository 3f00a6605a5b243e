"""Without `--verbose`, `lorafleet generate` and `lorafleet merge` show only lorafleet's own lines: no progress bars,
library warnings or DeepSpeed banner (which DeepSpeed prints on stdout, where results go)."""

import json

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lorafleet.data.tokenizer import load_tokenizer
from lorafleet.model.build import materialize
from lorafleet.spec import ModelSpec

from helpers.cli import run_cli
from helpers.console import foreign_lines

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 16}
INVOCATION = "<|reserved_0|>judge<|reserved_1|>"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A tiny materialized llama with lorafleet's tokenizer, and a plain LoRA and an aLoRA adapter saved on it."""
    root = tmp_path_factory.mktemp("quiet")
    base = materialize(ModelSpec(architecture="llama", config=TINY), root=root / "models")
    invocation = load_tokenizer()(INVOCATION, add_special_tokens=False)["input_ids"]
    saved = {}
    for kind, tokens in (("lora", None), ("alora", invocation)):
        model = AutoModelForCausalLM.from_pretrained(base)
        config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM",
                            alora_invocation_tokens=tokens)
        get_peft_model(model, config).save_pretrained(root / kind)
        saved[kind] = root / kind
    return saved


def test_generate_shows_only_its_own_lines_and_everything_with_verbose(adapters):
    args = ["generate", "--adapter", str(adapters["alora"]), "--prompt", "hi", "--max-new-tokens", "3", "--json"]
    quiet = run_cli(*args)
    assert quiet.returncode == 0, quiet.stderr
    assert foreign_lines(quiet.stderr) == []
    # lorafleet's own note stays, and stdout is the one JSON result.
    assert quiet.stderr.startswith("lorafleet: appended the aLoRA invocation"), quiet.stderr
    result = json.loads(quiet.stdout)
    assert result["invocation_appended"] is True and len(result["tokens"]) == 3
    # The same command with --verbose shows what the libraries print (here transformers' weight-loading bar).
    loud = run_cli(*args, "--verbose")
    assert loud.returncode == 0, loud.stderr
    assert foreign_lines(loud.stderr), "with --verbose the libraries' output shows as before"
    assert json.loads(loud.stdout)["tokens"] == result["tokens"]


def test_merge_prints_only_the_merged_path(adapters, tmp_path):
    out = tmp_path / "merged"
    result = run_cli("merge", "--adapter", str(adapters["lora"]), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{out}\n" and foreign_lines(result.stderr) == []
    assert (out / "config.json").is_file()
