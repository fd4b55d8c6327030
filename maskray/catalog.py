"""What can be trained: the registered objectives with their config keys, and the timm archs maskray accepts.

``launch/pretrain.py --list-objectives`` / ``--list-backbones`` print :func:`objectives_text` /
:func:`backbones_text`; neither starts Ray.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from typing import Any

import timm
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python

from maskray.models.vit import accepted_archs, is_beit_arch
from maskray.objective import load_all_objectives

_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "len >="), ("max_length", "len <="))


@dataclass(frozen=True)
class FieldRow:
    """One config key: dotted name, type, default (JSON; ``required`` without one), bounds, description."""

    key: str
    type: str
    default: str
    bounds: str
    description: str


def type_name(annotation: Any) -> str:
    """``float``, ``str | None``, ``list[PartConfig]``: the annotation without module prefixes."""
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)", r"\1", text)


def field_bounds(field: FieldInfo) -> str:
    """The field's constraints from its metadata (``>= 0.0, < 1.0``), empty when it has none."""
    parts = [f"{symbol} {getattr(item, name)}" for item in field.metadata for name, symbol in _BOUNDS
             if getattr(item, name, None) is not None]
    return ", ".join(parts)


def field_default(field: FieldInfo) -> str:
    """The default as JSON (a ``default_factory`` called), ``required`` when there is none."""
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    return json.dumps(to_jsonable_python(value))


def config_rows(config: type[BaseModel], prefix: str) -> list[FieldRow]:
    """One :class:`FieldRow` per field of ``config``, keys prefixed (``objective.mask_ratio``)."""
    return [
        FieldRow(f"{prefix}.{name}", type_name(field.annotation), field_default(field), field_bounds(field),
                 field.description or "")
        for name, field in config.model_fields.items()
    ]


def format_table(headers: tuple[str, ...], rows: list[tuple[str, ...]], indent: str = "") -> list[str]:
    """Left-aligned columns two spaces apart (trailing spaces stripped)."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    return [(indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))).rstrip()
            for row in [headers, *rows]]


def objectives_text() -> str:
    """Every registered objective (core, plugins, entry points), its module and first doc line, and a table of its
    ``objective.*`` keys."""
    lines: list[str] = []
    for name, cls in load_all_objectives().items():
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip()
        lines.append(f"{name}  ({cls.__module__}){'  ' + doc.splitlines()[0] if doc else ''}")
        rows = [(row.key, row.type, row.default, row.bounds, row.description)
                for row in config_rows(cls.Config, "objective")]
        if rows:
            lines += format_table(("key", "type", "default", "bounds", "description"), rows, indent="  ")
        else:
            lines.append("  (no keys besides objective.name)")
        lines.append("")
    return "\n".join(lines).rstrip()


def backbones_text() -> str:
    """The timm archs ``model.arch`` accepts, with the timm class (``Beit`` ones take ``model.rel_pos_bias``) and
    the module that defines them."""
    rows = [(name, "Beit" if is_beit_arch(name) else "VisionTransformer", timm.models.model_entrypoint(name).__module__)
            for name in accepted_archs()]
    return "\n".join(format_table(("model.arch", "timm class", "timm module"), rows))
