"""Model building: materialize a small base model, load it (4-bit) through `from_pretrained`, add PEFT LoRA.

Everything a worker needs to turn a [`~lorafleet.spec.JobSpec`] into a trainable module lives here; the driver only
calls [`resolve_base_model`] so that the adapter's `base_model_name_or_path` points at a directory anyone can load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from lorafleet.bases import BASES_DIR, builtin_bases
from lorafleet.compat.bitsandbytes import disable_cpu_repack, import_uncompiled
from lorafleet.compat.transformers import refuses_sdpa, save_model
from lorafleet.data.tokenizer import load_tokenizer
from lorafleet.kernels import KernelPlan, apply_kernels
from lorafleet.model.device import torch_dtype
from lorafleet.model.families import family_config
from lorafleet.spec import JobSpec, ModelSpec, QuantizationSpec, SpecError, lorafleet_home

logger = logging.getLogger(__name__)


# Bumped when the way a materialized model is built changes, so stale caches are not reused.
_MATERIALIZE_VERSION = 1


def _assets_fingerprint() -> str:
    # The materialized model embeds the shipped tokenizer; a new tokenizer must not reuse an old model.
    digest = hashlib.sha256()
    assets = Path(__file__).resolve().parent.parent / "assets"
    for file in sorted(assets.rglob("*")) if assets.is_dir() else []:
        if file.is_file() and BASES_DIR not in file.parents:
            digest.update(file.name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def _model_key(model: ModelSpec) -> str:
    payload = json.dumps(
        {
            "v": _MATERIALIZE_VERSION,
            "family": model.architecture,
            "config": model.config,
            "tokenizer": _assets_fingerprint(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _publish(target: Path, write) -> Path:
    """Have `write(folder)` fill a temporary folder beside `target`, then rename it to `target`, so concurrent callers
    never see half a model; when another process finished first, its identical copy stays."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def materialize(model: ModelSpec, root: Optional[Path] = None) -> Path:
    """Build a small model of `model.architecture` with lorafleet's tokenizer and save it once.

    The weights come from a fixed seed, so every node that materializes the same spec gets the same model; the
    directory is written under a temporary name and renamed, so concurrent callers never see half a model.

    Args:
        model ([`~lorafleet.spec.ModelSpec`]):
            The spec's `model` section; `architecture` must be set.
        root (`Path`, *optional*):
            Cache folder. Defaults to `$LORAFLEET_HOME/models`.

    Returns:
        `Path`: A directory with `config.json`, safetensors weights and the tokenizer.

    Example:

    ```python
    >>> from lorafleet.spec import ModelSpec
    >>> path = materialize(ModelSpec(architecture="llama", config={"num_hidden_layers": 1}))
    >>> (path / "config.json").exists()
    True
    ```
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging


    if model.architecture is None:
        raise ValueError("materialize() needs model.architecture")
    root = Path(root) if root is not None else lorafleet_home() / "models"
    target = root / f"{model.architecture}-{_model_key(model)}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer()
    config = family_config(
        model.architecture,
        vocab_size=len(tokenizer),
        overrides=model.config,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # A private generator keeps the caller's global RNG untouched and makes the weights a function of the spec.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # Saved in float32: loading casts to whatever dtype a worker's device wants.
        built = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    def write(folder: Path) -> None:
        save_model(built, folder)
        if not any(folder.glob("*.safetensors")):
            # A folder published without weights would be taken as this base on every later run.
            raise RuntimeError(f"transformers saved no weight files for the {model.architecture} base in {folder}")
        tokenizer.save_pretrained(folder)

    # One shard of a small model, saved once: transformers' "Writing model shards" bar would only be console noise.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _publish(target, write)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def materialize_builtin(name: str, root: Optional[Path] = None) -> Path:
    """Copy the shipped base `name` (see [`~lorafleet.bases.builtin_bases`]) into a model directory with lorafleet's
    tokenizer, once, after checking its weights against the manifest's sha256.

    Every node materializes it from its own installed package, so nothing a worker loads lives only on the driver's
    disk; the checksum makes sure every node trains on the same weights.

    Args:
        name (`str`):
            The `model.builtin` value.
        root (`Path`, *optional*):
            Cache folder. Defaults to `$LORAFLEET_HOME/models`.

    Returns:
        `Path`: A directory with `config.json`, the weights and the tokenizer.

    Raises:
        [`~lorafleet.spec.SpecError`]: The shipped weights do not match their manifest (a damaged install or a git LFS
            pointer): one line naming `model.builtin`, before anything starts.

    Example:

    ```python
    >>> path = materialize_builtin("tasks-llama")
    >>> path.name.startswith("tasks-llama-"), (path / "tokenizer.json").exists()
    (True, True)
    ```
    """
    base = builtin_bases()[name]
    root = Path(root) if root is not None else lorafleet_home() / "models"
    target = root / f"{name}-{base.sha256[:12]}-{_assets_fingerprint()[:8]}"
    if (target / "config.json").exists():
        return target
    weights = base.folder / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if digest != base.sha256:
        raise SpecError(f"model.builtin: the shipped weights {weights} are damaged (sha256 {digest[:12]}, the "
                        f"manifest says {base.sha256[:12]}); reinstall lorafleet")
    root.mkdir(parents=True, exist_ok=True)

    def write(folder: Path) -> None:
        shutil.copyfile(base.folder / "config.json", folder / "config.json")
        shutil.copyfile(weights, folder / "model.safetensors")
        load_tokenizer().save_pretrained(folder)

    return _publish(target, write)


def resolve_base_model(spec: JobSpec) -> str:
    """The directory or hub id the workers load: `model.name_or_path`, or the materialized `model.builtin` or
    `model.architecture`."""
    if spec.model.name_or_path is not None:
        return spec.model.name_or_path
    if spec.model.builtin is not None:
        return str(materialize_builtin(spec.model.builtin))
    return str(materialize(spec.model))


def weights_digest(spec: JobSpec, base: str) -> Optional[str]:
    """The sha256 of the weight files of a base lorafleet materialized (`model.builtin`, `model.architecture`), which
    every node must reproduce exactly ([`local_base`]); `None` for `model.name_or_path` (the user's own files).

    Example:

    ```python
    >>> from lorafleet.spec import load_spec
    >>> spec = load_spec("jobs/llama.yaml")
    >>> len(weights_digest(spec, resolve_base_model(spec)))
    64
    ```
    """
    if spec.model.name_or_path is not None:
        return None
    digest = hashlib.sha256()
    for weights in sorted(Path(base).glob("*.safetensors")):
        digest.update(weights.name.encode())
        with open(weights, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def local_base(spec: JobSpec, base: str, digest: Optional[str] = None) -> str:
    """`base` as this node can load it: the driver's materialized directory when this node sees it, else the same
    model materialized here (another node of a cluster without a shared folder), checked against the driver's
    [`weights_digest`]. Hub ids and user directories are returned as given.

    Args:
        spec ([`~lorafleet.spec.JobSpec`]): The job.
        base (`str`): The driver's [`resolve_base_model`].
        digest (`str`, *optional*): The driver's [`weights_digest`] of it.

    Returns:
        `str`: A directory or hub id to load the base from.

    Raises:
        `RuntimeError`: The model materialized here has other weights than the driver's (nodes with other torch or
        transformers versions would otherwise train different bases under one adapter).
    """
    if spec.model.name_or_path is not None or Path(base).is_dir():
        return base
    here = resolve_base_model(spec)
    found = weights_digest(spec, here)
    if digest is not None and found != digest:
        import socket

        raise RuntimeError(
            f"node {socket.gethostname()}: the base model materialized here ({here}) is not the driver's (weights "
            f"sha256 {found[:12]}, the driver's {digest[:12]}); install the same torch and transformers on every node"
        )
    return here


def load_tokenizer_for(base: str, trust_remote_code: bool = False):
    """Load the tokenizer saved with the base model, making sure it can pad."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def bnb_config(quant: QuantizationSpec, model_dtype: str, device: torch.device | str = "cpu", zero3: bool = False):
    """A `BitsAndBytesConfig` for a `quantization` section and the model's dtype (`model.dtype`), or `None` for
    `type: none`; `zero3` stores the 4-bit weights in the compute dtype, as DeepSpeed ZeRO-3 needs."""
    if quant.type == "none":
        return None
    from transformers import BitsAndBytesConfig

    compute_name = quant.compute_dtype if quant.compute_dtype != "auto" else model_dtype
    compute = torch_dtype(compute_name, device)
    storage = torch_dtype(quant.storage_dtype) if quant.storage_dtype else (compute if zero3 else None)
    kwargs: dict[str, Any] = dict(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute,
    )
    if storage is not None:
        # ZeRO-3 partitions parameters by dtype; packed uint8 weights next to bf16 ones break its flattening.
        kwargs["bnb_4bit_quant_storage"] = storage
    return BitsAndBytesConfig(**kwargs)


def make_bnb_deterministic(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights in place on AVX512-BF16 CPUs.

    `Linear4bit.forward` repacks its weight into a CPU-friendly layout the first time it runs in eval mode on an input
    that does not require grad. The repack mutates the parameter DeepSpeed and DDP think they own, and under ZeRO-3 it
    silently corrupts the frozen base (STACK-NOTES). Turning the fast path off keeps forwards identical and costs <2%.

    Returns:
        `int`: How many 4-bit layers were switched.
    """
    return disable_cpu_repack(model)


def load_base_model(spec: JobSpec, base: str, device: torch.device | str = "cpu"):
    """Load the frozen base causal LM through `from_pretrained`, 4-bit unless `quantization.type: none`.

    Attention runs through PyTorch's SDPA where the model class supports it and through the family's own eager
    attention where transformers refuses SDPA for it (gemma2 since transformers 5.24: SDPA cannot soft-cap attention
    logits). transformers decides, per model class, so a hub model gets the same choice; the fused attention forward
    dispatches to whichever implementation the loaded config names.

    Example:

    ```python
    >>> from lorafleet.spec import load_spec
    >>> from lorafleet.compat.transformers import attention_interface
    >>> spec = load_spec("jobs/llama.yaml", ["model.builtin=null", "model.architecture=gemma2",
    ...                                         "model.config.num_hidden_layers=1"])
    >>> model = load_base_model(spec, resolve_base_model(spec))
    >>> attention_interface(model.model.layers[0].self_attn).__name__
    'eager_attention_forward'
    ```
    """
    zero3 = spec.scaling.strategy == "deepspeed" and spec.scaling.zero_stage == 3
    return load_base(base, spec.model.dtype, spec.quantization, device, zero3=zero3,
                     trust_remote_code=spec.model.trust_remote_code)


def load_base(
    base: str,
    model_dtype: str,
    quantization: QuantizationSpec,
    device: torch.device | str = "cpu",
    zero3: bool = False,
    trust_remote_code: bool = False,
):
    """Load a base model as a job with these `model.dtype` and `quantization` settings loads it
    ([`load_base_model`]), e.g. to evaluate an adapter on the base it was trained on.

    Args:
        base (`str`): The base model's directory or hub id.
        model_dtype (`str`): `model.dtype` (`auto`, `float32`, `bfloat16`, ...).
        quantization ([`~lorafleet.spec.QuantizationSpec`]): The `quantization` section.
        device (`torch.device` or `str`, *optional*, defaults to `"cpu"`): Where to load.
        zero3 (`bool`, *optional*, defaults to `False`): Store 4-bit weights as DeepSpeed ZeRO-3 needs.
        trust_remote_code (`bool`, *optional*, defaults to `False`): `model.trust_remote_code`.

    Returns:
        `transformers.PreTrainedModel`: The model, in eval mode, without KV cache.

    Example:

    ```python
    >>> from lorafleet.spec import QuantizationSpec, load_spec
    >>> base = resolve_base_model(load_spec("jobs/llama.yaml"))
    >>> model = load_base(base, "float32", QuantizationSpec(type="nf4", compute_dtype="float32"))
    >>> type(model.model.layers[0].mlp.up_proj).__name__
    'Linear4bit'
    ```
    """
    from transformers import AutoModelForCausalLM

    import_uncompiled()
    device = torch.device(device)

    def load(attention: str):
        return AutoModelForCausalLM.from_pretrained(
            base,
            # Fresh each time: from_pretrained may edit it.
            quantization_config=bnb_config(quantization, model_dtype, device, zero3=zero3),
            dtype=torch_dtype(model_dtype, device),
            device_map={"": device.index if device.type == "cuda" and device.index is not None else device.type},
            attn_implementation=attention,
            trust_remote_code=trust_remote_code,
        )

    try:
        model = load("sdpa")
    except ValueError as error:
        # Raised while the model is constructed, before any weight is read: the retry loads the weights only once.
        if not refuses_sdpa(error):
            raise
        logger.info("transformers has no SDPA attention for %s; loading it with eager attention", base)
        model = load("eager")
    make_bnb_deterministic(model)
    model.config.use_cache = False
    return model


def lora_config(spec: JobSpec, invocation_tokens: Optional[list[int]] = None):
    """The PEFT `LoraConfig` for the spec (an aLoRA config when invocation tokens are given)."""
    from peft import LoraConfig

    kwargs: dict[str, Any] = {}
    if invocation_tokens is not None:
        kwargs["alora_invocation_tokens"] = list(invocation_tokens)
    return LoraConfig(
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=spec.lora.target_modules,
        bias=spec.lora.bias,
        task_type="CAUSAL_LM",
        **kwargs,
    )


def add_lora(model, spec: JobSpec, invocation_tokens: Optional[list[int]] = None):
    """Wrap `model` with fresh LoRA adapters seeded by `training.seed` (identical on every worker)."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.training.seed)
        peft_model = get_peft_model(model, lora_config(spec, invocation_tokens))
    if spec.training.gradient_checkpointing:
        peft_model.enable_input_require_grads()
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # from_pretrained returns eval mode; training mode also keeps bitsandbytes off its in-place repack path.
    peft_model.train()
    return peft_model


def build_model(
    spec: JobSpec, base: str, device: torch.device | str = "cpu", invocation_tokens: Optional[list[int]] = None
) -> tuple[Any, KernelPlan]:
    """Load the base model, add LoRA and apply the fused kernels the spec asks for.

    Args:
        spec ([`~lorafleet.spec.JobSpec`]):
            The validated job spec.
        base (`str`):
            What [`resolve_base_model`] returned.
        device (`torch.device` or `str`, *optional*, defaults to `"cpu"`):
            Where the model lives.
        invocation_tokens (`list[int]`, *optional*):
            Build aLoRA adapters activated by this token sequence.

    Returns:
        `tuple`: the PEFT model and its [`~lorafleet.kernels.KernelPlan`] (what was fused, what was not and why;
        nothing fused when kernels are off). Whatever depends on the fused paths (the loss, the `kernels` metric)
        reads the plan, not the spec's flags: the model may refuse a path the spec asks for.

    Example:

    ```python
    >>> from lorafleet.spec import load_spec
    >>> spec = load_spec("jobs/llama.yaml", ["kernels.enabled=false"])
    >>> model, plan = build_model(spec, resolve_base_model(spec))
    >>> plan.applied, plan.fused_loss, model.peft_config["default"].r
    ({}, False, 16)
    ```
    """
    model = add_lora(load_base_model(spec, base, device), spec, invocation_tokens)
    return model, apply_kernels(model, spec.kernels)

