"""`models.yaml`: the names clients send as `model`, each mapped to a base model and its default job settings.

Each entry is a lorafleet job spec without `name` and `data.path` (the service sets those per job). Entries are
checked when the service starts, as a job of that model would be, so a typo in the file stops `lorafleet api` with
one line per problem instead of failing every job later.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lorafleet.spec import SpecError, load_spec, read_yaml_file

DEFAULT_MODELS = Path(__file__).resolve().parent / "models.yaml"

# A one-record chat file to check a catalog entry against: `load_spec` wants a data file that exists.
_PROBE = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'


@dataclass(frozen=True)
class BaseModel:
    """One entry of `models.yaml`: `name` (the id clients use), the spec sections, and a description."""

    name: str
    spec: dict[str, Any]
    description: str = ""
    created: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def raw_spec(self) -> dict[str, Any]:
        """A fresh copy of the entry's spec sections, for one job to fill in."""
        return copy.deepcopy(self.spec)


def load_catalog(path: Optional[str | Path] = None) -> dict[str, BaseModel]:
    """Read and check a `models.yaml` (default: the one lorafleet ships, serving the demo base).

    Args:
        path (`str` or `Path`, *optional*):
            The file; defaults to `lorafleet/service/models.yaml`.

    Returns:
        `dict[str, BaseModel]`: the entries by name.

    Raises:
        [`~lorafleet.spec.SpecError`]: one line per problem, naming the entry and field.

    Example:

    ```python
    >>> catalog = load_catalog()
    >>> sorted(catalog), catalog["llama-demo"].spec["model"]["architecture"]
    (['llama-demo', 'tasks-llama'], 'llama')
    ```
    """
    file = Path(path) if path is not None else DEFAULT_MODELS
    raw = read_yaml_file(file, kind="models file")
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), dict) or not raw["models"]:
        raise SpecError(f"{file}: expected a mapping `models:` of model name -> {{spec: ..., description: ...}}")
    created = int(file.stat().st_mtime)
    problems: list[str] = []
    catalog: dict[str, BaseModel] = {}
    with tempfile.TemporaryDirectory() as probe_dir:
        probe = Path(probe_dir) / "probe.jsonl"
        probe.write_text(_PROBE)
        for name, entry in raw["models"].items():
            if not isinstance(entry, dict) or not isinstance(entry.get("spec"), dict):
                problems.append(f"{file}: models.{name}: expected `spec:` (a job spec without name and data.path)")
                continue
            spec = entry["spec"]
            if "name" in spec or "path" in (spec.get("data") or {}):
                problems.append(f"{file}: models.{name}: `name` and `data.path` are set per job by the service")
                continue
            try:
                _build(spec, "probe", probe)
            except SpecError as exc:
                problems += [f"{file}: models.{name}.spec.{line}" for line in exc.problems]
                continue
            catalog[str(name)] = BaseModel(name=str(name), spec=spec, description=str(entry.get("description", "")),
                                           created=created)
    if problems:
        raise SpecError(*problems)
    return catalog


def _build(spec: dict[str, Any], name: str, data: Path) -> Any:
    raw = copy.deepcopy(spec)
    raw["name"] = name
    raw.setdefault("data", {})["path"] = str(data)
    raw["data"].setdefault("format", "chat")
    return load_spec(raw=raw)
