"""One test per bitsandbytes assumption of `lorafleet.compat.bitsandbytes` (checked on bitsandbytes 0.50.2), on one
`Linear4bit` layer. The repack path is forced on CPUs without AVX512-BF16 (it is pure torch, so it runs anywhere).

Each failure message names the assumption, so a bitsandbytes upgrade that breaks one says which workaround to revisit.
"""

import torch
from bitsandbytes.nn import Linear4bit, Params4bit

from lorafleet.compat import bitsandbytes as compat


def _layer() -> Linear4bit:
    torch.manual_seed(0)
    layer = Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4", module=layer)
    return layer.to("cpu").eval()  # quantizes; eval mode with a no-grad input is the repack path


def _forward(layer: Linear4bit) -> torch.Tensor:
    with torch.no_grad():
        return layer(torch.ones(2, 64, dtype=torch.bfloat16))


def test_support_avx512bf16_for_cpu_gates_the_in_place_repack():
    layer = _layer()
    assert hasattr(layer, "support_avx512bf16_for_cpu"), (
        "bitsandbytes: Linear4bit.support_avx512bf16_for_cpu is gone (lorafleet.compat.bitsandbytes item 1, checked "
        "0.50.2); disable_cpu_repack no longer keeps 4-bit weights fixed"
    )
    layer.support_avx512bf16_for_cpu = True  # what bitsandbytes sets on an AVX512-BF16 CPU
    before = layer.weight.data.clone()
    _forward(layer)
    assert layer.weight.data.shape != before.shape or not torch.equal(layer.weight.data, before), (
        "bitsandbytes: Linear4bit.forward no longer repacks the weight when support_avx512bf16_for_cpu is set "
        "(lorafleet.compat.bitsandbytes item 1, checked 0.50.2): the workaround may be obsolete"
    )

    layer = _layer()
    layer.support_avx512bf16_for_cpu = True
    assert compat.disable_cpu_repack(torch.nn.Sequential(layer)) == 1
    before = layer.weight.data.clone()
    first, second = _forward(layer), _forward(layer)
    assert torch.equal(layer.weight.data, before) and torch.equal(first, second), (
        "bitsandbytes: Linear4bit.forward repacked its weight with support_avx512bf16_for_cpu=False "
        "(lorafleet.compat.bitsandbytes item 1, checked 0.50.2)"
    )


def test_packing_format_for_cpu_marks_a_repacked_weight():
    layer = _layer()
    assert not compat.is_cpu_packed(layer.weight)
    layer.support_avx512bf16_for_cpu = True
    _forward(layer)
    assert compat.is_cpu_packed(layer.weight), (
        "bitsandbytes: a repacked Linear4bit weight's quant_state no longer has packing_format_for_cpu=True "
        "(lorafleet.compat.bitsandbytes item 2, checked 0.50.2); the fused kernels' refusal of repacked weights "
        "no longer sees them"
    )


IMPORT_UNCOMPILED = """
import sys, torch
import torch._dynamo  # transformers imports it before bitsandbytes in a worker; Inductor it does not
from lorafleet.compat.bitsandbytes import import_uncompiled
import_uncompiled()
import os
import bitsandbytes.functional as F
weights = torch.randn(6, 33)  # an odd last dimension: the native CPU kernel refuses it, the torch fallback runs
packed, state = F.quantize_4bit(weights, quant_type="nf4")
error = (F.dequantize_4bit(packed, state) - weights).abs().max().item()
print("bitsandbytes" in sys.modules, "torch._inductor.compile_fx" in sys.modules, "TORCHDYNAMO_DISABLE" in os.environ,
      error < 0.5)
"""


def test_import_uncompiled_keeps_inductor_out_and_the_fallbacks_exact():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", IMPORT_UNCOMPILED], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    imported, inductor, env_left, close = result.stdout.split()
    assert imported == "True"
    # Neither the import nor a call of a fallback op (which would compile it) brought TorchInductor in.
    assert inductor == "False", (
        "bitsandbytes: imported with TORCHDYNAMO_DISABLE=1, it still imports TorchInductor (lorafleet.compat."
        "bitsandbytes item 3, checked 0.50.2): the 1-2 s per process it saved is back"
    )
    assert env_left == "False"
    assert close == "True"  # the eager fallback dequantizes what was quantized
