"""One test per PEFT assumption of `lorafleet.compat.peft` (checked on peft 0.21.2), on a tiny aLoRA llama.

Each failure message names the assumption, so a PEFT upgrade that breaks one says which workaround to revisit.
"""

import inspect

import pytest
import torch
from peft.tuners.lora import LoraLayer

from lorafleet.compat import peft as compat
from lorafleet.model.alora import activation

from helpers.models import tiny_alora

INVOCATION = [9]
IDS = torch.tensor([[1, 5, 7, 9, 6, 4], [1, 3, 9, 6, 2, 2]])
OFFSETS = [3, 4]  # from each row's invocation to the row end


@pytest.fixture(scope="module")
def model():
    return tiny_alora(INVOCATION)


def _lora_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def _record_offsets(model):
    """Forward hooks recording, per LoRA layer, the `alora_offsets` its forward received and what the compat reader
    returned at that moment."""
    seen, handles = {}, []
    for name, layer in _lora_layers(model):

        def hook(module, args, kwargs, output, name=name):
            seen[name] = (kwargs.get("alora_offsets"), compat.hooked_alora_offsets(module))

        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    return seen, handles


def test_enable_peft_forward_hooks_hands_offsets_to_every_lora_layer(model):
    assert hasattr(model.base_model, "_enable_peft_forward_hooks"), (
        "peft: LoraModel._enable_peft_forward_hooks is gone (lorafleet.compat.peft item 1, checked 0.21.2)"
    )
    seen, handles = _record_offsets(model)
    try:
        with torch.no_grad(), compat.alora_forward_hooks(model, OFFSETS):
            model.get_base_model()(input_ids=IDS)
    finally:
        for handle in handles:
            handle.remove()
    assert seen and len(seen) == len(_lora_layers(model))
    received = {name: offsets for name, (offsets, _) in seen.items()}
    assert all(offsets == OFFSETS for offsets in received.values()), (
        f"peft: LoraModel._enable_peft_forward_hooks(alora_offsets=...) no longer passes the offsets to the LoRA "
        f"layers' calls (lorafleet.compat.peft item 1, checked 0.21.2); layers received {received}"
    )


def test_offsets_hook_is_found_by_name_during_a_forward(model):
    from peft.tuners.lora import model as lora_model_module

    assert hasattr(lora_model_module, compat.ALORA_HOOK_NAME), (
        f"peft: peft.tuners.lora.model.{compat.ALORA_HOOK_NAME} is gone (lorafleet.compat.peft item 2, checked 0.21.2)"
    )
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert compat.hooked_alora_offsets(q_proj) is None
    # Both ways PEFT activates the layers: lorafleet's context (fused loss) and the public forward argument.
    seen, handles = _record_offsets(model)
    try:
        with torch.no_grad():
            with compat.alora_forward_hooks(model, OFFSETS):
                assert compat.hooked_alora_offsets(q_proj) == OFFSETS, (
                    f"peft: no {compat.ALORA_HOOK_NAME} carrying the offsets in q_proj._forward_pre_hooks inside "
                    "_enable_peft_forward_hooks (lorafleet.compat.peft item 2, checked 0.21.2)"
                )
                model.get_base_model()(input_ids=IDS)
            from_context = dict(seen)
            model(input_ids=IDS, alora_offsets=OFFSETS)
    finally:
        for handle in handles:
            handle.remove()
    for where, found in (("alora_forward_hooks", from_context), ("PeftModel.forward(alora_offsets=)", seen)):
        read = {name: hooked for name, (_, hooked) in found.items()}
        assert all(hooked == OFFSETS for hooked in read.values()), (
            f"peft: the aLoRA pre-forward hook ({compat.ALORA_HOOK_NAME}, a functools.partial with keyword "
            f"alora_offsets in nn.Module._forward_pre_hooks) is no longer found on the layers during a forward via "
            f"{where} (lorafleet.compat.peft item 2, checked 0.21.2); read {read}"
        )
    assert compat.hooked_alora_offsets(q_proj) is None, "peft: the aLoRA hook outlived its forward"


def test_alora_variant_class_and_the_layer_variant_dict(model):
    try:
        variant_class = compat.alora_variant_class()
    except ImportError as exc:
        raise AssertionError(
            "peft: peft.tuners.lora.variants.ALoraLinearVariant is gone (lorafleet.compat.peft item 3, checked 0.21.2)"
        ) from exc
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(getattr(q_proj, "lora_variant", None), dict), (
        "peft: LoraLayer.lora_variant is no longer a dict of adapter -> variant (lorafleet.compat.peft item 3, "
        "checked 0.21.2)"
    )
    assert isinstance(compat.lora_variant(q_proj, "default"), variant_class), (
        "peft: an aLoRA adapter's layer no longer holds an ALoraLinearVariant in lora_variant (lorafleet.compat.peft "
        "item 3, checked 0.21.2)"
    )
    plain = tiny_alora(None).get_base_model().model.layers[0].self_attn.q_proj
    assert compat.lora_variant(plain, "default") is None and not compat.is_alora_variant(None)


def test_alora_variant_forward_takes_the_offsets_as_a_keyword():
    params = inspect.signature(compat.alora_variant_class().forward).parameters
    positional = [p.name for p in params.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    assert positional == ["module", "active_adapter", "x", "result"] and any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    ), (
        "peft: ALoraLinearVariant.forward is no longer forward(module, active_adapter, x, result, **kwargs) "
        f"(lorafleet.compat.peft item 3, lorafleet.model.alora's subclass; checked 0.21.2): {list(params)}"
    )
    # lorafleet's subclass, given the per-token mask equal to the offsets, computes what PEFT's variant computes.
    model = tiny_alora(INVOCATION)
    mask = torch.zeros(IDS.shape, dtype=torch.bool)
    for row, offset in enumerate(OFFSETS):
        mask[row, -offset:] = True
    with torch.no_grad():
        expected = model(input_ids=IDS, alora_offsets=OFFSETS).logits
        with activation(model, mask) as causal_lm:
            got = causal_lm(input_ids=IDS).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_peft_forward_alora_offsets_activate_only_the_last_tokens(model):
    # The public API lorafleet.infer.generate calls: the adapter is on only for the last `alora_offsets[i]` tokens.
    with torch.no_grad():
        adapted = model(input_ids=IDS, alora_offsets=OFFSETS).logits
        with model.disable_adapter():
            base = model(input_ids=IDS).logits
    for row, offset in enumerate(OFFSETS):
        before, after = slice(0, IDS.shape[1] - offset), slice(IDS.shape[1] - offset, None)
        assert torch.equal(adapted[row, before], base[row, before]), (
            "peft: PeftModel.forward(alora_offsets=...) changed tokens before the activation (checked 0.21.2)"
        )
        assert (adapted[row, after] - base[row, after]).abs().max() > 1e-4, (
            "peft: PeftModel.forward(alora_offsets=...) no longer activates the adapter on the last offsets tokens "
            "(checked 0.21.2)"
        )
