"""Adapter-only checkpoints: what a checkpoint directory holds and how a worker writes, verifies and restores it.

A checkpoint directory is a loadable PEFT adapter plus what an exact resume needs, and nothing of the frozen base:

- `adapter_config.json`, `adapter_model.safetensors`: the adapter (plain `PeftModel.from_pretrained` loads it);
- `training_state.safetensors` + `training_state.json`: optimizer and scheduler state, the step reached (the data
  position: batches are a function of the step, see [`~lorafleet.data.plan.BatchPlan`]) and every worker's Python, NumPy
  and torch RNG states (LoRA dropout draws differ per worker); tensors in the first, everything else as JSON in the
  second ([`flatten_state`]);
- `optimizer_rank{R}.safetensors` + `optimizer_rank{R}.json`: each worker's optimizer shard, only when the optimizer
  is partitioned (DeepSpeed ZeRO);
- `lorafleet.json`: job name, step, base model, loss, world size, whether optimizer shards exist, and the size and
  CRC-32 of every file rank 0 wrote, for people and tools that list checkpoints and for [`is_complete`].

Nothing in a checkpoint is unpickled: whoever can write to the storage must not be able to run code in the workers
that resume from it. Checkpoints of earlier versions (`training_state.pt`, `optimizer_rank{R}.pt`, `rng_rank{R}.pt`)
are still read, through `torch.load(weights_only=True)`, which only rebuilds tensors, plain data and the NumPy array
pieces their RNG states need.

Rank 0 writes the adapter, `lorafleet.json` and the training state, with the RNG states of every worker gathered to
it; under DeepSpeed ZeRO every worker also writes its optimizer shard. Each worker writes into its own local directory
and Ray Train merges them in storage, so a checkpoint is only whole once every writing worker's upload has finished;
[`is_complete`] checks exactly that, and that no file was cut off or altered since it was written. Under DDP only
rank 0 writes, so each checkpoint is one worker's five files.
"""

from __future__ import annotations

import copy
import importlib
import json
import pickle
import random
import re
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


STATE_NAME = "training_state"


INFO_FILE = "lorafleet.json"


# lorafleet.json's `format`: 2 is tensors in safetensors and the rest in JSON, with file records; absent means the
# pickled files of earlier versions.
FORMAT = 2


# Objects (not plain data) that optimizer state dicts carry and a checkpoint may rebuild, by import path: each comes
# back as an instance with its saved attributes, without calling anything of the class. Only these: building an
# object of a class named in a file is what makes unpickling unsafe, so the names a load accepts come from here.
RESTORABLE_CLASSES = (
    # ZeRO's optimizer state_dict() holds its loss scaler (`cur_scale`, `dynamic`, ...) as an object.
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    # ZeRO-1/2's state_dict() maps parameter names to their fragment of the flat partition (`numel`, `start`).
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class CheckpointError(ValueError):
    """A checkpoint file that is damaged, or that would need more than tensors and plain data to load."""


def state_files(stem: str) -> tuple[str, str]:
    """The two files [`save_state`] writes for `stem`: tensors (safetensors) and the rest (JSON)."""
    return f"{stem}.safetensors", f"{stem}.json"


def _optimizer_stem(rank: int) -> str:
    return f"optimizer_rank{rank}"


def _legacy_state_file() -> str:
    return f"{STATE_NAME}.pt"


def _legacy_optimizer_file(rank: int) -> str:
    return f"{_optimizer_stem(rank)}.pt"


def _legacy_rng_file(rank: int) -> str:
    # Where checkpoints written before the RNG states moved into the training state keep them; still read on resume.
    return f"rng_rank{rank}.pt"


def rng_state() -> dict[str, Any]:
    """The current Python, NumPy and torch RNG states."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states captured by [`rng_state`]."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def cpu_copy(value: Any) -> Any:
    """A copy of `value` that training can no longer change: tensors cloned to CPU, containers rebuilt.

    Optimizer and adapter state dicts hold references to the live tensors, which the next step updates in place; a
    checkpoint written after training moved on needs this copy of them taken at the checkpoint step.

    Args:
        value (`Any`):
            A tensor, or dicts, lists and tuples of tensors and other values (what `state_dict()` returns).

    Returns:
        `Any`: The same structure; other leaves are deep-copied (immutable ones, such as numbers, are shared).

    Example:

    ```python
    >>> live = {"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 0.1}]}
    >>> snapshot = cpu_copy(live)
    >>> _ = live["state"][0]["exp_avg"].add_(1.0)
    >>> snapshot["state"][0]["exp_avg"]
    tensor([0., 0.])
    ```
    """
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: cpu_copy(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(cpu_copy(item) for item in value)
    return copy.deepcopy(value)


# ---------------------------------------------------------------------------------------------------------------------
# State as tensors + JSON


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def flatten_state(value: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a state (nested dicts, lists and tuples of tensors and plain values) into JSON and a tensor dict.

    What optimizer, scheduler and RNG states are made of comes back as it was: tensors (by name into the tensor
    dict), tuples as tuples (NumPy's RNG state, Adam's betas), dict keys of any plain type (an optimizer's integer
    parameter ids), NumPy arrays and scalars, torch dtypes, and instances of [`RESTORABLE_CLASSES`]. A special value
    is a one-key JSON object whose key starts with `$`.

    Args:
        value (`Any`):
            The state.

    Returns:
        `tuple`: (`structure`, `tensors`): `structure` can be written with `json.dumps`, `tensors` (contiguous, on
        CPU, none sharing memory) with `safetensors.torch.save_file`; [`unflatten_state`] joins them again.

    Raises:
        `TypeError`: A value of another type (nothing is dropped silently).

    Example:

    ```python
    >>> structure, tensors = flatten_state({"state": {0: {"exp_avg": torch.ones(2)}}, "betas": (0.9, 0.999)})
    >>> structure["betas"], list(tensors)
    ({'$tuple': [0.9, 0.999]}, ['state/0/exp_avg'])
    >>> unflatten_state(json.loads(json.dumps(structure)), tensors)
    {'state': {0: {'exp_avg': tensor([1., 1.])}}, 'betas': (0.9, 0.999)}
    ```
    """
    tensors: dict[str, torch.Tensor] = {}
    storages: set[tuple[str, int]] = set()

    def tensor(item: torch.Tensor, path: str) -> dict[str, str]:
        item = item.detach().to("cpu").contiguous()
        if item.numel():
            # safetensors refuses tensors that share memory (views of one buffer): give a repeat its own copy.
            storage = (str(item.device), item.untyped_storage().data_ptr())
            if storage in storages:
                item = item.clone()
            storages.add((str(item.device), item.untyped_storage().data_ptr()))
        name, n = path or "tensor", 1
        while name in tensors:
            name, n = f"{path}#{n}", n + 1
        tensors[name] = item
        return {"$tensor": name}

    def encode(item: Any, path: str) -> Any:
        if item is None or type(item) in (bool, str):
            return item
        if isinstance(item, np.generic) and item.dtype.kind in "biuf":  # before float: np.float64 is one
            return {"$numpy": {"dtype": item.dtype.str, "value": item.item()}}
        if isinstance(item, str):
            return str(item)  # str-valued enums
        if isinstance(item, int):
            return int(item)  # IntEnum members (ZeRO's stage) too
        if isinstance(item, float):
            return float(item)
        if isinstance(item, torch.Tensor):
            return tensor(item, path)
        if isinstance(item, np.ndarray):
            if item.dtype.kind not in "biuf":
                raise TypeError(f"{path or 'state'}: a NumPy array of {item.dtype} cannot be stored in a checkpoint")
            return {"$ndarray": {"dtype": item.dtype.str, "shape": list(item.shape), "data": item.ravel().tolist()}}
        if isinstance(item, torch.dtype):
            return {"$dtype": str(item).removeprefix("torch.")}
        if type(item) is list:
            return [encode(x, f"{path}/{i}") for i, x in enumerate(item)]
        if type(item) is tuple:
            return {"$tuple": [encode(x, f"{path}/{i}") for i, x in enumerate(item)]}
        if isinstance(item, dict):
            if all(type(k) is str and not k.startswith("$") for k in item):
                return {k: encode(v, f"{path}/{k}" if path else k) for k, v in item.items()}
            return {"$dict": [[encode(k, ""), encode(v, f"{path}/{k}" if path else str(k))] for k, v in item.items()]}
        if _class_path(type(item)) in RESTORABLE_CLASSES:
            return {"$object": {"class": _class_path(type(item)), "attributes": encode(vars(item), path)}}
        raise TypeError(f"{path or 'state'}: a {_class_path(type(item))} cannot be stored in a checkpoint")

    return encode(value, ""), tensors


def unflatten_state(structure: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Rebuild what [`flatten_state`] split: `structure` (as read back from JSON) with its tensors put back.

    Runs no code named by the data: the only objects it creates are containers, tensors from `tensors`, NumPy
    arrays and scalars of numeric dtypes, torch dtypes, and instances of [`RESTORABLE_CLASSES`] (attributes set,
    nothing called).

    Args:
        structure (`Any`):
            The JSON part.
        tensors (`dict[str, torch.Tensor]`):
            The tensor part.

    Returns:
        `Any`: The state.

    Raises:
        [`CheckpointError`]: A reference to a missing tensor, or a special value this version does not know.

    Example:

    ```python
    >>> unflatten_state({"$dict": [[0, {"step": {"$tensor": "s"}}]]}, {"s": torch.tensor(3.0)})
    {0: {'step': tensor(3.)}}
    ```
    """

    def restore(cls_path: str, attributes: dict) -> Any:
        if cls_path not in RESTORABLE_CLASSES:
            raise CheckpointError(f"refused to rebuild a {cls_path}: not one of the classes a checkpoint may hold")
        module, _, name = cls_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        instance = cls.__new__(cls)
        instance.__dict__.update(attributes)
        return instance

    def decode(item: Any) -> Any:
        if isinstance(item, list):
            return [decode(x) for x in item]
        if not isinstance(item, dict):
            return item
        special = [k for k in item if k.startswith("$")]
        if not special:
            return {k: decode(v) for k, v in item.items()}
        tag, payload = special[0], item[special[0]]
        try:
            if tag == "$tensor":
                return tensors[payload]
            if tag == "$tuple":
                return tuple(decode(x) for x in payload)
            if tag == "$dict":
                return {decode(k): decode(v) for k, v in payload}
            if tag in ("$ndarray", "$numpy"):
                dtype = np.dtype(payload["dtype"])
                if dtype.kind not in "biuf":
                    raise CheckpointError(f"refused a NumPy value of dtype {dtype}")
                if tag == "$numpy":
                    return dtype.type(payload["value"])
                return np.asarray(payload["data"], dtype=dtype).reshape(payload["shape"])
            if tag == "$dtype":
                dtype = getattr(torch, payload)
                if not isinstance(dtype, torch.dtype):
                    raise CheckpointError(f"{payload!r} is not a torch dtype")
                return dtype
            if tag == "$object":
                return restore(payload["class"], decode(payload["attributes"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"malformed {tag} value ({type(exc).__name__}: {exc})") from None
        raise CheckpointError(f"unknown value type {tag} (written by a newer lorafleet?)")

    return decode(structure)


def file_record(path: str | Path) -> dict[str, int]:
    """The size and CRC-32 of a file, as checkpoints record them."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return {"size": Path(path).stat().st_size, "crc32": crc}


def _record_problem(path: Path, record: dict[str, Any]) -> Optional[str]:
    """What is wrong with `path` given its [`file_record`] (`None` when it matches)."""
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    if size != record.get("size"):
        return f"{path.name} is {size} bytes, not the {record.get('size')} written (cut off or replaced)"
    if "crc32" in record and file_record(path)["crc32"] != record["crc32"]:
        return f"{path.name} does not match the checksum it was written with (corrupted)"
    return None


def _safetensors_problem(path: Path) -> Optional[str]:
    """Whether a safetensors file is as long as its own header says (catches cut-off files without a record)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return f"{path.name} is not a readable safetensors file (cut off or corrupted)"
    if 8 + length + end != size:
        return f"{path.name} is {size} bytes, its header describes {8 + length + end} (cut off or corrupted)"
    return None


def save_state(value: Any, directory: str | Path, stem: str) -> dict[str, dict[str, int]]:
    """Write a state as `{stem}.safetensors` (its tensors) and `{stem}.json` (the rest, and the tensor file's record).

    Args:
        value (`Any`):
            What [`flatten_state`] accepts.
        directory (`str` or `Path`):
            Where to write.
        stem (`str`):
            The files' common name.

    Returns:
        `dict`: The [`file_record`] of each file written, by name.

    Example:

    ```python
    >>> import tempfile
    >>> directory = tempfile.mkdtemp()
    >>> sorted(save_state({"step": 3, "moment": torch.ones(2)}, directory, "example"))
    ['example.json', 'example.safetensors']
    >>> load_state(directory, "example")
    {'step': 3, 'moment': tensor([1., 1.])}
    ```
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors_name, json_name = state_files(stem)
    structure, tensors = flatten_state(value)
    save_file(tensors, directory / tensors_name)
    records = {tensors_name: file_record(directory / tensors_name)}
    # The JSON carries its own checksum: an optimizer shard's file has no record in rank 0's lorafleet.json.
    document = {
        "format": FORMAT,
        "tensors": {"file": tensors_name, **records[tensors_name]},
        "state_crc32": _json_crc(structure),
        "state": structure,
    }
    (directory / json_name).write_text(json.dumps(document))
    records[json_name] = file_record(directory / json_name)
    return records


def _json_crc(structure: Any) -> int:
    # JSON written by `json.dumps` reads back to values that dump to the same text, so the text's CRC is the content's.
    return zlib.crc32(json.dumps(structure).encode())


def _read_json_state(path: Path) -> dict[str, Any]:
    """A [`save_state`] JSON document, checked against its own checksum."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path.name} is not a lorafleet state file (cut off or corrupted: {exc})") from None
    if not isinstance(document, dict) or "state" not in document or not isinstance(document.get("tensors"), dict):
        raise CheckpointError(f"{path.name} is not a lorafleet state file (no state or tensors entry)")
    if document.get("state_crc32") != _json_crc(document["state"]):
        raise CheckpointError(f"{path.name} does not match the checksum it was written with (corrupted)")
    return document


def load_state(directory: str | Path, stem: str) -> Any:
    """Read what [`save_state`] wrote (checking the tensor file against its record); runs no code from the files.

    Args:
        directory (`str` or `Path`):
            Where the files are.
        stem (`str`):
            Their common name.

    Returns:
        `Any`: The state.

    Raises:
        [`CheckpointError`]: Damaged or foreign files.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    tensors_name, json_name = state_files(stem)
    document = _read_json_state(directory / json_name)
    problem = _record_problem(directory / tensors_name, document["tensors"])
    if problem:
        raise CheckpointError(problem)
    try:
        tensors = load_file(directory / tensors_name)
    except Exception as exc:  # noqa: BLE001 - safetensors' own error type; a record match makes this rare
        raise CheckpointError(f"{tensors_name} is not a readable safetensors file ({exc})") from None
    try:
        return unflatten_state(document["state"], tensors)
    except CheckpointError as exc:
        raise CheckpointError(f"{json_name}: {exc}") from None


# What the pickled files of earlier versions hold besides tensors and plain data: NumPy's RNG state, a uint32 array.
# The weights-only unpickler rebuilds nothing else; numpy<2 pickles name the array function under numpy.core.
_NUMPY_CORE = getattr(np, "_core", None) or np.core
_LEGACY_GLOBALS = [
    _NUMPY_CORE.multiarray._reconstruct,
    (_NUMPY_CORE.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
]


def _legacy_load(path: Path) -> Any:
    """A `.pt` file of an earlier version, read with the weights-only unpickler (tensors and plain data only)."""
    try:
        with torch.serialization.safe_globals(_LEGACY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if refused:
            raise CheckpointError(
                f"{path.name}: refused to load: it would call {refused.group(1)} (a checkpoint holds only tensors and "
                "plain data; this file was not written by lorafleet or was tampered with)"
            ) from None
        raise CheckpointError(f"{path.name} is not a readable checkpoint file (cut off or corrupted)") from None


# ---------------------------------------------------------------------------------------------------------------------
# Writing and reading checkpoints


def save_checkpoint(
    directory: str | Path,
    *,
    rank: int,
    step: int,
    adapter_state: Optional[dict[str, torch.Tensor]],
    peft_model=None,
    optimizer_state: Optional[dict] = None,
    optimizer_shard: Optional[dict] = None,
    world_size: int = 1,
    info: Optional[dict[str, Any]] = None,
    rng_states: Optional[dict[int, dict[str, Any]]] = None,
) -> Path:
    """Write this worker's share of a checkpoint into `directory`.

    The writer of the adapter (rank 0) writes it with `lorafleet.json` and the training state: optimizer and scheduler
    state, step and the RNG states it is given (every worker's). A worker with a partitioned optimizer writes its
    shard. Ray Train merges the workers' directories.

    Args:
        directory (`str` or `Path`):
            An empty local directory.
        rank (`int`):
            The worker's world rank.
        step (`int`):
            Optimizer steps completed.
        adapter_state (`dict[str, torch.Tensor]`, *optional*):
            The full (gathered) trainable adapter tensors, as `get_peft_model_state_dict` returns them. `None` on
            workers that do not write the adapter.
        peft_model ([`~peft.PeftModel`], *optional*):
            Needed with `adapter_state`: its config and base model name go into `adapter_config.json`.
        optimizer_state (`dict`, *optional*):
            What the strategy's `optimizer_state()` returned (optimizer and scheduler state).
        optimizer_shard (`dict`, *optional*):
            This worker's part of a partitioned optimizer (DeepSpeed ZeRO), written by every worker as
            `optimizer_rank{R}.safetensors` + `.json`. `None` when the optimizer is replicated (DDP).
        world_size (`int`, *optional*, defaults to 1):
            Workers writing this checkpoint; recorded so [`is_complete`] knows which per-rank files to expect.
        info (`dict`, *optional*):
            Extra fields for `lorafleet.json` (job name, loss).
        rng_states (`dict[int, dict]`, *optional*):
            RNG states by world rank, each from [`rng_state`] taken at the checkpoint step (the files are written
            later, by a background thread, while training goes on); only the adapter's writer writes them. Defaults
            to this worker's current states.

    Returns:
        `Path`: `directory`.

    Raises:
        `TypeError`: A state holding something [`flatten_state`] cannot store.

    Example:

    ```python
    >>> import tempfile
    >>> path = save_checkpoint(tempfile.mkdtemp(), rank=1, step=3, adapter_state=None, optimizer_shard={"state": {}})
    >>> sorted(p.name for p in path.iterdir())
    ['optimizer_rank1.json', 'optimizer_rank1.safetensors']
    ```
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if optimizer_shard is not None:
        save_state(optimizer_shard, directory, _optimizer_stem(rank))
    if adapter_state is None:
        return directory
    from safetensors.torch import save_file

    config = peft_model.peft_config["default"]
    config.save_pretrained(str(directory))
    # Plain tensors, contiguous and on CPU: what safetensors and every PEFT/vLLM loader expect.
    save_file({k: v.detach().to("cpu").contiguous() for k, v in adapter_state.items()}, directory / ADAPTER_FILES[1])
    rng = rng_states if rng_states is not None else {rank: rng_state()}
    records = {name: file_record(directory / name) for name in ADAPTER_FILES}
    records.update(save_state({"step": step, "optimizer": optimizer_state, "rng": rng}, directory, STATE_NAME))
    (directory / INFO_FILE).write_text(
        json.dumps(
            {
                "step": step,
                "base_model": config.base_model_name_or_path,
                "world_size": world_size,
                "optimizer_shards": optimizer_shard is not None,
                **(info or {}),
                "format": FORMAT,
                "files": records,
            },
            indent=2,
        )
    )
    return directory


def load_training_state(directory: str | Path, rank: int) -> dict[str, Any]:
    """Read what [`save_checkpoint`] wrote: adapter tensors, optimizer/scheduler state, step and this rank's RNG.

    Runs no code from the files: the current layout is safetensors and JSON, and the `.pt` files of earlier
    versions are read with the weights-only unpickler.

    Args:
        directory (`str` or `Path`):
            A local copy of a checkpoint.
        rank (`int`):
            The resuming worker's world rank.

    Returns:
        `dict`: `step`, `adapter` (tensor dict), `optimizer` (for the strategy), `optimizer_shard` (this rank's
        partitioned optimizer state, or `None`), `rng` (`None` when the checkpoint was written by fewer workers
        than are resuming it).

    Raises:
        `RuntimeError`: The checkpoint holds optimizer shards for a different number of workers (partitioned state
        cannot be re-split).
        [`CheckpointError`]: A damaged file, or a `.pt` file that would need more than tensors and plain data.

    Example:

    ```python
    >>> state = load_training_state("/path/to/checkpoint", rank=0)  # doctest: +SKIP
    >>> state["step"]  # doctest: +SKIP
    40
    ```
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    info = read_info(directory)
    current = int(info.get("format", 1)) >= FORMAT
    if current:
        state = load_state(directory, STATE_NAME)
        state["rng"] = state["rng"].get(rank)
    else:
        state = _legacy_load(directory / _legacy_state_file())
        legacy_rng = directory / _legacy_rng_file(rank)
        if "rng" in state:
            state["rng"] = state["rng"].get(rank)
        else:
            state["rng"] = _legacy_load(legacy_rng) if legacy_rng.exists() else None
    try:
        state["adapter"] = load_file(directory / ADAPTER_FILES[1])
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors' own error type
        raise CheckpointError(f"{ADAPTER_FILES[1]} is not a readable safetensors file ({exc})") from None
    state["optimizer_shard"] = None
    if info.get("optimizer_shards"):
        stem = _optimizer_stem(rank)
        shard = directory / (state_files(stem)[1] if current else _legacy_optimizer_file(rank))
        if not shard.is_file():
            raise RuntimeError(
                f"checkpoint at step {state['step']} was written by {info.get('world_size')} workers with a "
                "partitioned optimizer; resume it with the same scaling.num_workers"
            )
        state["optimizer_shard"] = load_state(directory, stem) if current else _legacy_load(shard)
    return state


def read_info(directory: str | Path) -> dict[str, Any]:
    """`lorafleet.json` of a checkpoint directory (`{}` when missing or unreadable)."""
    try:
        info = json.loads((Path(directory) / INFO_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def expected_files(info: dict[str, Any]) -> list[str]:
    """Every file a checkpoint described by `info` (its `lorafleet.json`) must hold."""
    world_size = int(info.get("world_size", 1))
    shards = range(world_size) if info.get("optimizer_shards") else ()
    if int(info.get("format", 1)) >= FORMAT:
        shard_files = (name for r in shards for name in state_files(_optimizer_stem(r)))
        return [*ADAPTER_FILES, *state_files(STATE_NAME), INFO_FILE, *shard_files]
    return [*ADAPTER_FILES, _legacy_state_file(), INFO_FILE, *(_legacy_optimizer_file(r) for r in shards)]


def checkpoint_problem(directory: str | Path) -> Optional[str]:
    """Why `directory` is not a whole, intact checkpoint, or `None` when it is.

    Every expected file must be there and not empty; files with a record (size and CRC-32, in `lorafleet.json` for
    rank 0's files and in each optimizer shard's JSON for its tensors) must match it, and safetensors files must be
    as long as their header says (which also covers checkpoints of earlier versions, written without records).

    Args:
        directory (`str` or `Path`):
            A local checkpoint directory (or a local copy of one).

    Returns:
        `str` or `None`: The first problem found, naming the file (e.g. `adapter_model.safetensors is 52 bytes, not
        the 104 written (cut off or replaced)`).

    Example:

    ```python
    >>> import tempfile
    >>> shard_only = save_checkpoint(tempfile.mkdtemp(), rank=1, step=3, adapter_state=None, optimizer_shard={})
    >>> checkpoint_problem(shard_only)
    'lorafleet.json is missing or unreadable'
    ```
    """
    directory = Path(directory)
    info = read_info(directory)
    if not info:
        return f"{INFO_FILE} is missing or unreadable"
    names = expected_files(info)
    for name in names:
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size == 0:
            return f"{name} is empty"
    records = dict(info.get("files") or {})
    for name in names:
        if name.startswith("optimizer_rank") and name.endswith(".json"):
            try:
                records[name.replace(".json", ".safetensors")] = _read_json_state(directory / name)["tensors"]
            except CheckpointError as exc:
                return str(exc)
    for name, record in records.items():
        problem = _record_problem(directory / name, record)
        if problem:
            return problem
    for name in names:
        if name.endswith(".safetensors") and name not in records:
            problem = _safetensors_problem(directory / name)
            if problem:
                return problem
    return None


def is_complete(directory: str | Path) -> bool:
    """Whether `directory` holds a whole, intact checkpoint: the adapter, the training state and every worker's files
    ([`checkpoint_problem`] finds nothing).

    Args:
        directory (`str` or `Path`):
            A local checkpoint directory (or a local copy of one).

    Returns:
        `bool`: `False` when any file is missing, empty, cut off or altered, e.g. an upload that was cut off.

    Example:

    ```python
    >>> import tempfile
    >>> shard_only = save_checkpoint(tempfile.mkdtemp(), rank=1, step=3, adapter_state=None, optimizer_shard={})
    >>> is_complete(shard_only)
    False
    ```
    """
    return checkpoint_problem(directory) is None


def adapter_problem(directory: str | Path) -> Optional[str]:
    """Why the PEFT adapter in `directory` cannot be loaded as written, or `None`.

    Checks `adapter_config.json` (JSON) and `adapter_model.safetensors` (as long as its header says) and, where
    the directory has the `lorafleet.json` of the checkpoint it came from, both files against their records. Any
    PEFT adapter directory can be checked; one without `lorafleet.json` gets the structural checks only.

    Args:
        directory (`str` or `Path`):
            A local adapter directory.

    Returns:
        `str` or `None`: The first problem found, naming the file.

    Example:

    ```python
    >>> import tempfile
    >>> directory = Path(tempfile.mkdtemp())
    >>> _ = (directory / "adapter_config.json").write_text("{}")
    >>> _ = (directory / "adapter_model.safetensors").write_bytes(b"\\x10" + bytes(7) + b"{")
    >>> adapter_problem(directory)
    'adapter_model.safetensors is not a readable safetensors file (cut off or corrupted)'
    ```
    """
    directory = Path(directory)
    for name in ADAPTER_FILES:
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size == 0:
            return f"{name} is empty"
    records = read_info(directory).get("files") or {}
    for name in ADAPTER_FILES:
        if name in records:
            problem = _record_problem(directory / name, records[name])
            if problem:
                return problem
    try:
        json.loads((directory / ADAPTER_FILES[0]).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        return f"{ADAPTER_FILES[0]} is not valid JSON (cut off or corrupted)"
    return _safetensors_problem(directory / ADAPTER_FILES[1])


def check_adapter(directory: str | Path) -> None:
    """Raise [`CheckpointError`] with [`adapter_problem`]'s finding, if any.

    Example:

    ```python
    >>> check_adapter("/path/to/run/checkpoint_000002")  # doctest: +SKIP
    ```
    """
    problem = adapter_problem(directory)
    if problem:
        raise CheckpointError(problem)
