"""One test per transformers assumption of `lorafleet.compat.transformers` (checked on transformers 5.24.0), on tiny
models of every family in the registry.

Each failure message names the assumption, so a transformers upgrade that breaks one says which workaround to revisit.
"""

import inspect
import sys
from typing import Optional

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from lorafleet.compat import transformers as compat
from lorafleet.families import FAMILY_NAMES
from lorafleet.model.families import family_config

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
         "num_key_value_heads": 1, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8}


def _model(family: str, attn_implementation: Optional[str] = None):
    """A 1-layer random-init model of `family` (the family's default attention unless one is named)."""
    torch.manual_seed(0)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return AutoModelForCausalLM.from_config(family_config(family, 64, SMALL), **kwargs)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_modeling_module_has_the_attention_functions(family):
    attn = _model(family).model.layers[0].self_attn
    missing = compat.missing_attention_functions(attn)
    assert not missing, (
        f"transformers: {type(attn).__module__} no longer has {missing} (lorafleet.compat.transformers item 1, "
        "checked 5.24.0); the fused attention forward cannot run for this family"
    )
    module = sys.modules[type(attn).__module__]
    assert all(callable(getattr(module, name)) for name in ("apply_rotary_pos_emb", "eager_attention_forward"))


def test_attention_interface_follows_attn_implementation():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    eager = _model("llama", "eager").model.layers[0].self_attn
    sdpa = _model("llama", "sdpa").model.layers[0].self_attn
    assert compat.attention_interface(eager) is sys.modules[type(eager).__module__].eager_attention_forward, (
        "transformers: config._attn_implementation='eager' no longer selects the modeling file's "
        "eager_attention_forward through ALL_ATTENTION_FUNCTIONS.get_interface (lorafleet.compat.transformers item 1, "
        "checked 5.24.0)"
    )
    assert compat.attention_interface(sdpa) is sdpa_attention_forward, (
        "transformers: config._attn_implementation='sdpa' no longer selects sdpa_attention_forward through "
        "ALL_ATTENTION_FUNCTIONS.get_interface (lorafleet.compat.transformers item 1, checked 5.24.0)"
    )


def test_apply_rotary_pos_emb_takes_query_key_cos_sin():
    model = _model("llama")
    attn = model.model.layers[0].self_attn
    q, k = torch.randn(1, 2, 5, 16), torch.randn(1, 1, 5, 16)
    positions = torch.arange(5)[None]
    cos, sin = model.model.rotary_emb(q, positions)
    q_rot, k_rot = compat.apply_rotary_pos_emb(attn, q, k, cos, sin)
    # Position 0 is not rotated; later positions are, and rotation keeps each head vector's norm.
    assert torch.allclose(q_rot[..., 0, :], q[..., 0, :]) and torch.allclose(k_rot[..., 0, :], k[..., 0, :]), (
        "transformers: apply_rotary_pos_emb(q, k, cos, sin) no longer rotates as RoPE (lorafleet.compat.transformers "
        "item 1, checked 5.24.0)"
    )
    assert not torch.allclose(q_rot[..., 1:, :], q[..., 1:, :])
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1))


def test_cache_argument_name_matches_forward_and_output():
    from transformers.cache_utils import Cache

    model = _model("llama")
    name = compat.cache_argument(model)
    assert name in inspect.signature(type(model).forward).parameters, (
        f"transformers: the causal LM's forward has no `{name}` argument (lorafleet.compat.transformers item 2, "
        "checked 5.24.0: `cache`, `past_key_values` before 5.24)"
    )
    with torch.no_grad():
        first = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
        cache = getattr(first, name, None)
        assert isinstance(cache, Cache), (
            f"transformers: the forward's output no longer carries the KV cache as `{name}` "
            "(lorafleet.compat.transformers item 2, checked 5.24.0)"
        )
        model(input_ids=torch.tensor([[4]]), use_cache=True, **{name: cache})
    assert cache.get_seq_length() == 4, f"transformers: the `{name}` argument did not receive the cache"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_attention_forward_takes_the_cache_fourth(family):
    attn = _model(family).model.layers[0].self_attn
    params = list(inspect.signature(type(attn).forward).parameters)
    assert params[1:5] == ["hidden_states", "position_embeddings", "attention_mask", "cache"] or params[1:5] == [
        "hidden_states", "position_embeddings", "attention_mask", "past_key_values"
    ], (
        f"transformers: {type(attn).__name__}.forward is no longer (hidden_states, position_embeddings, "
        f"attention_mask, cache, ...) (lorafleet.compat.transformers item 2, pop_cache_argument; checked 5.24.0): "
        f"{params}"
    )


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_sdpa_is_refused_exactly_where_transformers_would_fall_back_to_eager(family):
    # transformers' own choice when none is asked for: SDPA where the model class has it, else eager.
    default = _model(family).config._attn_implementation
    try:
        _model(family, "sdpa")
        refusal = None
    except ValueError as error:
        refusal = error
    assert (refusal is not None) == (default == "eager"), (
        f"transformers: asking {family} for attn_implementation='sdpa' no longer fails exactly when its default "
        f"attention is eager (default {default!r}, refusal {refusal!r}; lorafleet.compat.transformers item 3, "
        "checked 5.24.0)"
    )
    if refusal is not None:
        assert compat.refuses_sdpa(refusal), (
            f"transformers: the SDPA refusal for {family} no longer names scaled_dot_product_attention, so model "
            f"building would not fall back to eager (lorafleet.compat.transformers item 3, checked 5.24.0): {refusal}"
        )


def test_sdpa_refusal_is_recognized_and_nothing_else():
    no_sdpa = type("NoSdpaLlamaForCausalLM", (LlamaForCausalLM,), {"_supports_sdpa": False})
    config = family_config("llama", 64, SMALL)
    config._attn_implementation = "sdpa"
    with pytest.raises(ValueError) as refusal:
        no_sdpa(config)
    assert compat.refuses_sdpa(refusal.value), (
        "transformers: a model class with _supports_sdpa=False no longer refuses attn_implementation='sdpa' with a "
        "ValueError naming scaled_dot_product_attention (lorafleet.compat.transformers item 3, checked 5.24.0): "
        f"{refusal.value}"
    )
    # An unknown implementation is refused too, with a message that lists `sdpa`: not the refusal to fall back on.
    with pytest.raises(ValueError) as unknown:
        _model("llama", "sdpa_v2")
    assert not compat.refuses_sdpa(unknown.value)
    assert not compat.refuses_sdpa(RuntimeError("scaled_dot_product_attention: out of memory"))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_boolean_logits_to_keep_gives_the_kept_rows_of_the_full_logits(family):
    model = _model(family)
    if getattr(model.config, "final_logit_softcapping", None) is not None:
        model.config.final_logit_softcapping = 0.5  # the kept rows must be soft-capped too
    assert compat.takes_logits_to_keep(model), (
        f"transformers: {type(model).__name__}.forward has no `logits_to_keep` argument (lorafleet.compat.transformers "
        "item 4, checked 5.23.0-5.24.0); the unfused loss falls back to full logits"
    )
    ids = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(0))
    keep = torch.zeros(3, 7, dtype=torch.bool)
    keep[0, 2:5] = keep[2, [0, 6]] = True  # a different count per row, and a row with none
    full = model(input_ids=ids).logits
    try:
        kept = compat.logits_at(model, keep, input_ids=ids)
    except RuntimeError as error:
        pytest.fail(str(error))
    assert kept.shape == (5, 64), (
        f"transformers: a boolean [batch, seq] logits_to_keep no longer gives [num_true, vocab] logits from "
        f"{type(model).__name__} (lorafleet.compat.transformers item 4, checked 5.23.0-5.24.0): {tuple(kept.shape)}"
    )
    torch.testing.assert_close(kept, full[keep], rtol=1e-5, atol=1e-6, msg=lambda m: (
        "transformers: the logits of a boolean logits_to_keep are not the full logits at the kept positions, in "
        f"row-major order (lorafleet.compat.transformers item 4, checked 5.23.0-5.24.0): {m}"
    ))
    if family == "gemma2":
        assert kept.abs().max() <= 0.5


def test_logits_at_refuses_a_forward_that_ignored_the_mask():
    class FullLogits(torch.nn.Module):
        def forward(self, input_ids, logits_to_keep=0):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 8)})()

    assert compat.takes_logits_to_keep(FullLogits())
    with pytest.raises(RuntimeError, match="item 4"):
        compat.logits_at(FullLogits(), torch.ones(2, 3, dtype=torch.bool), input_ids=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="2-D bool"):
        compat.logits_at(FullLogits(), torch.ones(2, 3, dtype=torch.long), input_ids=torch.zeros(2, 3, dtype=torch.long))


SAVE_AT_RANK = """
import sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM
from lorafleet.compat.transformers import save_model
from lorafleet.model.families import family_config
model = AutoModelForCausalLM.from_config(family_config("llama", 64, {"num_hidden_layers": 1, "hidden_size": 32,
    "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}))
out = Path(sys.argv[1], f"rank-{dist.get_rank()}")
model.save_pretrained(out / "plain", is_main_process=True)
save_model(model, out / "ours")
assert "should_save_on_this_rank" not in model.__dict__
"""


def test_save_pretrained_writes_weights_only_at_rank_0_and_save_model_at_any_rank(tmp_path):
    from helpers.process_group import run_in_process_group

    ranks = run_in_process_group(SAVE_AT_RANK, world_size=2, args=(str(tmp_path),))
    assert all(r.returncode == 0 for r in ranks), [r.stderr[-2000:] for r in ranks]
    weights = {p.relative_to(tmp_path).parent.as_posix() for p in tmp_path.glob("*/*/*.safetensors")}
    assert {"rank-0/plain", "rank-0/ours", "rank-1/ours"} <= weights, weights
    assert "rank-1/plain" not in weights, (
        "transformers: save_pretrained at rank 1 of a process group now writes weights (lorafleet.compat.transformers "
        "item 5, checked 5.24.0); save_model's shadowing of should_save_on_this_rank may be dropped"
    )
