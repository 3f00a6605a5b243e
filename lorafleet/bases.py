"""The base models shipped inside lorafleet (`model.builtin`): one registry that the spec and model building read.

Each lives in `lorafleet/assets/bases/<name>/` as `config.json`, `model.safetensors` and a `manifest.json` that
records the weights' sha256 and the recipe of the script that built them. This module reads only the manifests
(no torch, no transformers), so the spec can validate `model.builtin` without importing either.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

BASES_DIR = Path(__file__).resolve().parent / "assets" / "bases"


@dataclass(frozen=True)
class BuiltinBase:
    """One shipped base model.

    Attributes:
        name (`str`): The `model.builtin` value.
        folder (`Path`): Where its files are, inside the installed package.
        sha256 (`str`): The sha256 of its `model.safetensors`, checked before the weights are used.
        description (`str`): One line for humans.
    """

    name: str
    folder: Path
    sha256: str
    description: str


@lru_cache(maxsize=1)
def builtin_bases() -> dict[str, BuiltinBase]:
    """The shipped base models by name.

    Returns:
        `dict[str, BuiltinBase]`: One entry per folder of `lorafleet/assets/bases` that has a `manifest.json`.

    Example:

    ```python
    >>> "tasks-llama" in builtin_bases()
    True
    ```
    """
    bases = {}
    for manifest in sorted(BASES_DIR.glob("*/manifest.json")):
        meta = json.loads(manifest.read_text())
        bases[meta["name"]] = BuiltinBase(meta["name"], manifest.parent, meta["sha256"], meta.get("description", ""))
    return bases
