"""The accelerate assumption of `lorafleet.compat.accelerate` (checked on accelerate 1.15.0 with transformers 5.24.0).

The failure messages name the assumption, so an accelerate upgrade that breaks it (or makes it unnecessary) says so.
"""

import subprocess
import sys

from accelerate.utils import extract_model_from_parallel

# Saves a tiny model twice in a fresh interpreter (this one may have imported DeepSpeed already): first inside the
# workaround, then as transformers does by default; prints whether DeepSpeed was imported after each.
SAVE_TWICE = """
import sys, tempfile
from transformers import LlamaConfig, LlamaForCausalLM
from lorafleet.compat.accelerate import unwrap_without_deepspeed

config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1)
model = LlamaForCausalLM(config)
with unwrap_without_deepspeed():
    model.save_pretrained(tempfile.mkdtemp())
print("deepspeed" in sys.modules)
model.save_pretrained(tempfile.mkdtemp())
print("deepspeed" in sys.modules)
"""


def test_unwrap_looks_up_is_deepspeed_available_as_a_module_global():
    assert "is_deepspeed_available" in extract_model_from_parallel.__code__.co_names, (
        "accelerate: extract_model_from_parallel no longer reads the module global is_deepspeed_available "
        "(lorafleet.compat.accelerate item 1, checked 1.15.0); unwrap_without_deepspeed no longer keeps DeepSpeed out"
    )


def test_save_pretrained_imports_deepspeed_only_without_the_workaround():
    result = subprocess.run([sys.executable, "-c", SAVE_TWICE], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    # DeepSpeed's own import prints an accelerator warning on stdout too; only the two answers matter here.
    within, without = [line for line in result.stdout.splitlines() if line in ("True", "False")]
    assert within == "False", (
        "save_pretrained imported DeepSpeed inside unwrap_without_deepspeed (lorafleet.compat.accelerate item 1, "
        "checked 1.15.0): something else in the save path imports it now"
    )
    assert without == "True", (
        "save_pretrained no longer imports DeepSpeed by itself: lorafleet.compat.accelerate item 1 can go "
        "(checked 1.15.0)"
    )
