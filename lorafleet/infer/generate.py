"""Inference with trained adapters: load one, generate, and run an aLoRA adapter on the base model's KV cache.

An aLoRA adapter leaves every token before its invocation exactly as the base model computes it, so a conversation
the base model has already prefilled does not need to be recomputed when the adapter is invoked: only the
invocation and the tokens after it go through the model ([`continue_with_adapter`]). A plain LoRA adapter changes
every token, so the same call recomputes the whole sequence. The output is the same as one adapter forward over
the whole sequence either way; only the work differs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from lorafleet.compat.transformers import cache_argument
from lorafleet.data.alora import find_invocation
from lorafleet.model.build import load_base, load_tokenizer_for
from lorafleet.model.device import torch_dtype
from lorafleet.runstore.checkpoint import ADAPTER_FILES, INFO_FILE, check_adapter, read_info
from lorafleet.runstore.location import fetch_files, split_uri
from lorafleet.spec import QuantizationSpec


def fetch_adapter(uri: str, endpoint: Optional[str] = None) -> Path:
    """A local directory holding the adapter at `uri` (a local path, `file://`, `s3://` or `gs://`).

    Remote adapters are copied (only `adapter_config.json` and `adapter_model.safetensors`, and the checkpoint's
    `lorafleet.json` where there is one) to a temporary directory. Either way the files are checked first
    ([`~lorafleet.runstore.checkpoint.check_adapter`]: against the sizes and checksums they were written with, where
    `lorafleet.json` records them), so a damaged adapter is refused before the base model loads.

    Args:
        uri (`str`): What `lorafleet submit` printed as `adapter:`, or any PEFT adapter directory.
        endpoint (`str`, *optional*): Object-store endpoint (S3-compatible servers).

    Returns:
        `Path`: The directory.

    Raises:
        `FileNotFoundError`: No adapter at `uri`.
        [`~lorafleet.runstore.checkpoint.CheckpointError`]: A damaged adapter file (cut off, corrupted).
    """
    scheme, path = split_uri(uri)
    if scheme == "":
        local = Path(path)
        if not (local / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{uri}: no adapter_config.json (not a PEFT adapter directory)")
        check_adapter(local)
        return local
    target = Path(tempfile.mkdtemp(prefix="lorafleet-adapter-"))
    fetch_files(uri, (*ADAPTER_FILES, INFO_FILE), target, endpoint=endpoint, optional=(INFO_FILE,))
    check_adapter(target)
    return target


def saved_template(directory: Union[str, Path]) -> dict[str, Any]:
    """How the job that trained the adapter in `directory` rendered its data, from the checkpoint's `lorafleet.json`.

    Args:
        directory (`str` or `Path`): A local adapter directory ([`fetch_adapter`]).

    Returns:
        `dict`: `format` (`text`, `instruction` or `chat`), `max_length` and `train_on_inputs` of the job's `data`
        section; `{}` for an adapter without them (a plain PEFT directory, or a checkpoint of an earlier version).

    Example:

    ```python
    >>> saved_template("/path/to/run/checkpoint_000002")  # doctest: +SKIP
    {'format': 'instruction', 'max_length': 128, 'train_on_inputs': False}
    >>> saved_template(tempfile.mkdtemp())
    {}
    ```
    """
    template = read_info(directory).get("template")
    return dict(template) if isinstance(template, dict) and template.get("format") else {}


def adapter_config(uri: str, endpoint: Optional[str] = None) -> dict[str, Any]:
    """The adapter's `adapter_config.json` as a dict."""
    return json.loads((fetch_adapter(uri, endpoint) / "adapter_config.json").read_text())


def load_adapter(
    uri: str,
    device: Union[str, torch.device] = "cpu",
    dtype: str = "auto",
    endpoint: Optional[str] = None,
    as_trained: bool = False,
):
    """Load a trained adapter on its base model with plain `PeftModel.from_pretrained`, in eval mode.

    The base model is the adapter's `base_model_name_or_path` (for `model.architecture` jobs, the materialized
    model directory), loaded unquantized, or with `as_trained` as its job loaded it.

    Args:
        uri (`str`): Adapter directory or storage URI ([`fetch_adapter`]).
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`): Where to load.
        dtype (`str`, *optional*, defaults to `"auto"`): `auto` (bfloat16 where native, else float32), `float32`, ...
        endpoint (`str`, *optional*): Object-store endpoint.
        as_trained (`bool`, *optional*, defaults to `False`):
            Load the base with the job's `model.dtype` and `quantization` (4-bit NF4, ...) recorded in the
            checkpoint's `lorafleet.json`, so that losses match the run's held-out evaluation; `dtype` is then
            ignored. An adapter that records none (plain PEFT, earlier lorafleet) loads unquantized.

    Returns:
        `tuple`: (`peft.PeftModel`, tokenizer).

    Example:

    ```python
    >>> model, tokenizer = load_adapter("/path/to/run/checkpoint_000002")  # doctest: +SKIP
    >>> model.peft_config["default"].alora_invocation_tokens  # doctest: +SKIP
    [8, 1040, 9]
    ```
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM


    directory = fetch_adapter(uri, endpoint)
    base = json.loads((directory / "adapter_config.json").read_text())["base_model_name_or_path"]
    trained = read_info(directory).get("base") if as_trained else None
    if isinstance(trained, dict) and trained.get("quantization"):
        model = load_base(base, trained["dtype"], QuantizationSpec(**trained["quantization"]), device)
        model.config.use_cache = True  # load_base turns the cache off for training
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype(dtype, device)).to(device)
    peft_model = PeftModel.from_pretrained(model, str(directory)).eval()
    return peft_model, load_tokenizer_for(base)


def invocation_of(model) -> Optional[list[int]]:
    """The active adapter's aLoRA invocation ids, or `None` for a plain LoRA adapter (or a base model)."""
    config = getattr(model, "active_peft_config", None)
    tokens = getattr(config, "alora_invocation_tokens", None)
    return list(tokens) if tokens else None


@torch.no_grad()
def base_prefill(model, input_ids: torch.Tensor):
    """Run the *base* model over `input_ids` (`[1, n]`) and return its KV cache (a `DynamicCache`).

    With a PEFT model the adapter is disabled for the call; this is what a serving stack holds for a conversation
    before any adapter is invoked.
    """
    adapter_off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with adapter_off:
        return getattr(model(input_ids=input_ids, use_cache=True), cache_argument(model))


@dataclass
class AdapterOutput:
    """What [`continue_with_adapter`] returns.

    Attributes:
        tokens (`list[int]`): Generated token ids (greedy), eos included if reached.
        logits (`torch.Tensor`): `[len(tokens), vocab]` fp32 logits each token was chosen from.
        reused_tokens (`int`): Positions taken from the base cache instead of being recomputed.
        computed_tokens (`int`): Input positions run through the model before the first new token.
    """

    tokens: list[int]
    logits: torch.Tensor
    reused_tokens: int = 0
    computed_tokens: int = 0
    extra: dict = field(default_factory=dict)


def _as_batch(input_ids: Union[torch.Tensor, Sequence[int]]) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"input_ids must be one sequence ([n] or [1, n]), got shape {tuple(ids.shape)}")
    return ids


@torch.no_grad()
def continue_with_adapter(
    model,
    input_ids: Union[torch.Tensor, Sequence[int]],
    base_cache: Any = None,
    max_new_tokens: int = 16,
    eos_token_id: Optional[Union[int, Sequence[int]]] = None,
) -> AdapterOutput:
    """Greedy generation with an adapter, reusing the base model's KV cache of the conversation where valid.

    `input_ids` is the whole sequence: the conversation followed by the invocation (and possibly more text).
    `base_cache` is the base model's cache for a prefix of it (e.g. from [`base_prefill`] or from serving the
    conversation with the base model); it is not modified. For an aLoRA adapter every cached position before the
    invocation's (last) start is reused and only the rest is computed; cached positions at or after the invocation
    are dropped and recomputed with the adapter. For a plain LoRA adapter nothing can be reused and the whole sequence
    is recomputed. Either way the result equals one adapter forward over the whole sequence (up to float rounding).

    Args:
        model (`peft.PeftModel`):
            The adapter on its base model, in eval mode.
        input_ids (`torch.LongTensor` or `Sequence[int]`):
            One sequence, `[n]` or `[1, n]`.
        base_cache (`transformers.Cache`, *optional*):
            The base model's cache for `input_ids[:, :c]` (the caller guarantees those are the cached tokens).
        max_new_tokens (`int`, *optional*, defaults to 16):
            Tokens to generate at most.
        eos_token_id (`int` or `Sequence[int]`, *optional*):
            Stop after generating one of these.

    Returns:
        [`AdapterOutput`]: The tokens, their logits and how many positions were reused.

    Raises:
        `ValueError`: For an aLoRA adapter when `input_ids` does not contain its invocation (the adapter would never
        switch on).

    Example:

    ```python
    >>> ids = tokenizer("<s>apple 7 river<|reserved_0|>judge<|reserved_1|>", add_special_tokens=False,  # doctest: +SKIP
    ...                 return_tensors="pt").input_ids
    >>> cache = base_prefill(model, ids[:, :-3])  # the conversation, served by the base model  # doctest: +SKIP
    >>> out = continue_with_adapter(model, ids, base_cache=cache, max_new_tokens=2)  # doctest: +SKIP
    >>> out.reused_tokens, tokenizer.decode(out.tokens)  # doctest: +SKIP
    (5, 'yes<|end|>')
    ```
    """
    from transformers import DynamicCache

    ids = _as_batch(input_ids).to(model.device)
    n = ids.shape[1]
    stop = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    invocation = invocation_of(model)
    start = None
    if invocation is not None:
        start = find_invocation(ids[0], invocation)
        if start is None:
            raise ValueError(f"the input does not contain the adapter's invocation {invocation}; append it to the prompt")
    cached = base_cache.get_seq_length() if base_cache is not None else 0
    # The base cache holds base-model keys/values, valid exactly where the adapter is off: before the invocation.
    reuse = min(cached, start) if start is not None else 0
    reuse = min(reuse, n - 1)  # at least one token must run to produce logits
    if reuse > 0:
        cache = copy.deepcopy(base_cache)
        if cached > reuse:
            cache.crop(reuse - cached)  # transformers 5 crops by a negative count of tokens to remove
    else:
        cache = DynamicCache()

    cache_name = cache_argument(model)

    def step(chunk: torch.Tensor, offsets: Optional[list[int]]):
        kwargs = {"alora_offsets": offsets} if invocation is not None else {}
        out = model(input_ids=chunk, use_cache=True, **{cache_name: cache}, **kwargs)
        return out.logits[:, -1].float()

    # PEFT's offset counts from the invocation start to the end of the *current* input chunk.
    logits = step(ids[:, reuse:], [n - start] if start is not None else None)
    tokens: list[int] = []
    all_logits = []
    for i in range(max_new_tokens):
        all_logits.append(logits[0])
        token = int(logits[0].argmax())
        tokens.append(token)
        if token in stop or i == max_new_tokens - 1:
            break
        # Generated tokens come after the invocation: the adapter is on for each (offset 1 = the whole 1-token chunk).
        logits = step(torch.tensor([[token]], device=ids.device), [1] if start is not None else None)
    return AdapterOutput(
        tokens=tokens,
        logits=torch.stack(all_logits) if all_logits else torch.empty(0),
        reused_tokens=reuse,
        computed_tokens=n - reuse,
    )


def prompt_ids(tokenizer, prompt: str, invocation: Optional[Sequence[int]] = None) -> tuple[list[int], bool]:
    """Token ids for a generation prompt: bos + prompt, with the aLoRA invocation appended if it is not in it.

    Returns:
        `tuple[list[int], bool]`: The ids and whether the invocation was appended.
    """
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + ids
    appended = False
    if invocation is not None and find_invocation(ids, invocation) is None:
        ids, appended = ids + list(invocation), True
    return ids, appended


def stop_ids(tokenizer) -> list[int]:
    """Token ids that end a generation: eos and, with lorafleet's tokenizer, the end-of-turn token."""
    out = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        out.append(end)
    return out

