"""The Markdown reference of every spec field (`lorafleet spec-doc`, the tables in `jobs/README.md`).

Generated from the field descriptions in `lorafleet.spec.schema`, so the documentation cannot drift from the schema.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel

from lorafleet.spec.schema import JobSpec


def _type_name(annotation: Any) -> str:
    """A short, readable type for the reference table: `int`, `nf4 | fp4 | none`, `list[str] | all-linear`."""
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin is Union or (origin is not None and type(annotation).__name__ == "UnionType"):
        return " | ".join(_type_name(a) for a in args if a is not type(None))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation)).replace("Any", "any")


def spec_reference() -> str:
    """Markdown reference of every spec field, generated from the field descriptions (`lorafleet spec-doc`).

    Returns:
        `str`: One table per section: field, type, default, meaning.

    Example:

    ```python
    >>> "| `training.steps` |" in spec_reference()
    True
    ```
    """
    lines = []
    for section, info in JobSpec.model_fields.items():
        model = _section_model(info.annotation)
        if model is None:
            lines += [f"## `{section}`", "", info.description or "", ""]
            continue
        optional = " (optional section)" if info.default is None and not info.is_required() else ""
        lines += [f"## `{section}`{optional}", "", "| field | type | default | meaning |", "|---|---|---|---|"]
        lines += _rows(section, model)
        lines.append("")
    return "\n".join(lines)


def _section_model(annotation: Any) -> Any:
    """The pydantic model a field holds (`Optional[X]` included), or `None` for a plain value."""
    return next(
        (a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)),
        None,
    )


def _rows(prefix: str, model: Any) -> list[str]:
    """One table row per field of `model`, and after a nested section's own row, one per field of it."""
    rows = []
    for name, field in model.model_fields.items():
        if field.is_required():
            default = "required"
        elif field.default_factory is not None:
            default = f"`{json_default(field.default_factory())}`"
        else:
            default = f"`{json_default(field.default)}`"
        nested = _section_model(field.annotation)
        kind = "section" if nested is not None else _type_name(field.annotation).replace("|", "\\|")
        rows.append(f"| `{prefix}.{name}` | {kind} | {default} | {field.description or ''} |")
        if nested is not None:
            rows += _rows(f"{prefix}.{name}", nested)
    return rows


def json_default(value: Any) -> str:
    import json

    return json.dumps(value)

