"""Typed plugin parameters: one pydantic model per plugin, one-line errors, self-describing tables.

Every plugin (attack, defense, model, dataset) declares its parameters once, as a nested
``Params`` class deriving from :class:`PluginParams`: a type, a default, a constraint
(``Field(ge=0)``, ``Literal[...]``) and a one-line ``description`` per field. From that one
declaration come

- validation before any work: unknown names, wrong types, out-of-range and non-finite values
  fail as one :class:`~bench.core.errors.BenchError` line naming the plugin, the parameter, what
  is allowed and the value given -- ``shrinkpad: pad must be >= 0, got -1``;
- normalisation: the validated model is what the plugin uses, and its JSON dump is the plugin's
  part of every cache key, so ``pad: 4`` and ``pad: 4.0`` are one setting (integer fields take
  integral floats);
- documentation: :func:`param_docs` lists name, type, default, constraint and description for
  ``run_bench.py describe NAME`` and ``list --verbose``.

The same error wording serves the grid configuration (:func:`validation_error_line`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt, MinLen
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError, PydanticUndefined

_NUMBERS = (int, float)


class PluginParams(BaseModel):
    """Base class of every plugin's ``Params``: unknown names and non-finite floats are errors.

    Beyond pydantic's usual coercions (``4.0`` -> ``4`` for an integer field, ``1`` -> ``1.0``
    for a float one), a boolean is never taken for a number, a string never for a number, and
    only ``true``/``false`` for a boolean: a YAML slip such as ``pad: yes`` is an error, not 1.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_silent_type_changes(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is None or value is None:
            return value
        admitted = admitted_types(field.annotation)
        if not admitted:  # Any, mappings, nested models: pydantic decides
            return value
        numeric = bool(admitted & {int, float})
        if isinstance(value, bool) and bool not in admitted and numeric:
            raise PydanticCustomError("type_mismatch", "a boolean is not a number")
        if isinstance(value, str) and numeric and not admitted & {str, Path}:
            raise PydanticCustomError("type_mismatch", "a string is not a number")
        if admitted == {bool} and not isinstance(value, bool):
            raise PydanticCustomError("type_mismatch", "not a boolean")
        return value


# ----------------------------------------------------------------------------- reading annotations


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """(the bare type, the constraint metadata of its ``Annotated`` layers)."""
    metadata: list[Any] = []
    while get_origin(annotation) is Annotated:
        annotation, *extra = get_args(annotation)
        for item in extra:
            metadata.extend(item.metadata if isinstance(item, FieldInfo) else [item])
    return annotation, metadata


def _members(annotation: Any) -> list[Any]:
    """The alternatives of a union (``X | None`` gives ``[X, NoneType]``), else ``[annotation]``."""
    bare, _ = _unwrap(annotation)
    if get_origin(bare) in (Union, types.UnionType):
        return list(get_args(bare))
    return [annotation]


def admitted_types(annotation: Any) -> set[type]:
    """Scalar Python types a field accepts at its top level (empty: anything goes)."""
    out: set[type] = set()
    for member in _members(annotation):
        bare, _ = _unwrap(member)
        if bare is type(None):
            continue
        if get_origin(bare) is Literal:
            out.update(type(v) for v in get_args(bare))
        elif bare in (int, float, bool, str, Path):
            out.add(bare)
        elif get_origin(bare) in (list, tuple, Sequence) or bare in (list, tuple):
            out.add(list)
        else:
            return set()
    return out


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def bounds_of(metadata: list[Any]) -> dict[str, Any]:
    """A field's declared bounds: any of ``ge``, ``gt``, ``le``, ``lt`` and ``min_length``."""
    out: dict[str, Any] = {}
    for item in metadata:
        for cls, key in ((Ge, "ge"), (Gt, "gt"), (Le, "le"), (Lt, "lt")):
            if isinstance(item, cls):
                out[key] = getattr(item, key)
        if isinstance(item, MinLen):
            out["min_length"] = item.min_length
    return out


def range_text(metadata: list[Any]) -> str:
    """``>= 0``, ``< 1``, ``in (0, 1]``, or '' for an unbounded value."""
    b = bounds_of(metadata)
    low = ("[", b["ge"]) if "ge" in b else ("(", b["gt"]) if "gt" in b else None
    high = ("]", b["le"]) if "le" in b else (")", b["lt"]) if "lt" in b else None
    if low and high:
        return f"in {low[0]}{_num(low[1])}, {_num(high[1])}{high[0]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {_num(low[1])}"
    if high:
        return f"{'<=' if high[0] == ']' else '<'} {_num(high[1])}"
    return ""


_NOUNS = {int: ("an integer", "integers"), float: ("a number", "numbers"), bool: ("true or false", "booleans"),
          str: ("a string", "strings"), Path: ("a path", "paths")}  # fmt: skip


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML: strings quoted, null, true/false, lists in brackets."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _show(dataclasses.asdict(value))
    if isinstance(value, BaseModel):
        return _show(value.model_dump())
    return _num(value)


def _phrase(annotation: Any, plural: bool = False) -> str:
    """What a value of this type must be, in words: 'an integer >= 1', 'one of 'a', 'b'', ..."""
    members = _members(annotation)
    nullable = any(_unwrap(m)[0] is type(None) for m in members)
    parts = [_single_phrase(m, plural) for m in members if _unwrap(m)[0] is not type(None)]
    text = " or ".join(parts)
    return f"{text} or null" if nullable else text


def _single_phrase(annotation: Any, plural: bool) -> str:
    bare, metadata = _unwrap(annotation)
    bounds = range_text(metadata)
    origin = get_origin(bare)
    if origin is Literal:
        values = ", ".join(_show(v) for v in get_args(bare))
        return f"one of {values}" if len(get_args(bare)) > 1 else values
    if bare in _NOUNS:
        noun = _NOUNS[bare][1 if plural else 0]
        return f"{noun} {bounds}".strip()
    if origin in (list, Sequence) or bare is list:
        args = get_args(bare)
        inner = _phrase(args[0], plural=True) if args else "values"
        size = bounds_of(metadata).get("min_length")
        lead = "a non-empty list" if size == 1 else f"a list of at least {size}" if size else "a list"
        return f"{lead} of {inner}"
    if origin is tuple:
        args = get_args(bare)
        if len(args) == 2 and args[1] is not Ellipsis and _phrase(args[0]) == _phrase(args[1]):
            return f"a pair of {_phrase(args[0], plural=True)}"
        return "[" + ", ".join(_phrase(a) for a in args if a is not Ellipsis) + "]"
    if origin in (dict, Mapping) or bare is dict:
        return "a mapping"
    if isinstance(bare, type) and (issubclass(bare, BaseModel) or dataclasses.is_dataclass(bare)):
        phrase = getattr(bare, "value_phrase", None)  # (singular, plural), where a class words itself
        if phrase:
            return phrase[1 if plural else 0]
        return f"{bare.__name__} settings" if plural else f"a mapping of {bare.__name__} settings"
    return getattr(bare, "__name__", str(bare))


def _short_type(annotation: Any) -> str:
    """A compact type for tables: int, float | null, 'sgd' | 'adam', list[float], [float, float]."""
    if _nested(annotation, index=False) is not None:
        return "mapping"
    out = []
    for member in _members(annotation):
        bare, _ = _unwrap(member)
        origin = get_origin(bare)
        if bare is type(None):
            out.append("null")
        elif origin is Literal:
            out.extend(_show(v) for v in get_args(bare))
        elif origin in (list, Sequence):
            out.append(f"list[{_short_type(get_args(bare)[0])}]")
        elif origin is tuple:
            out.append("[" + ", ".join(_short_type(a) for a in get_args(bare) if a is not Ellipsis) + "]")
        elif origin in (dict, Mapping) or bare is dict:
            out.append("mapping")
        else:
            out.append(getattr(bare, "__name__", str(bare)))
    return " | ".join(out)


def allowed_text(field: FieldInfo) -> str:
    """What a field accepts, in words, bounds included: 'a number in (0, 1] or null'."""
    annotation = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    return _phrase(annotation)


def constraint_text(field: FieldInfo) -> str:
    """The field's bounds for a table: '>= 1', 'in (0, 1]', 'each in (0, 1], non-empty'; '' when
    free (choices of a ``Literal`` show in the type column)."""
    parts = [range_text(field.metadata)]
    element = _nested(field.annotation, index=True)
    if element is not None and range_text(_unwrap(element)[1]):
        parts.append(f"each {range_text(_unwrap(element)[1])}")
    size = bounds_of(field.metadata).get("min_length")
    if size:
        parts.append("non-empty" if size == 1 else f"at least {size} items")
    return ", ".join(p for p in parts if p)


# ----------------------------------------------------------------------------- documentation


@dataclass(frozen=True)
class ParamDoc:
    """One row of a plugin's parameter table."""

    name: str
    type: str
    default: str
    constraint: str
    description: str


def param_docs(params: Any, prefix: str = "") -> list[ParamDoc]:
    """The rows of ``describe NAME``: every field's name, type, default, constraint, description.

    A field holding a settings model (BDMAE's ``mae_train``) gets one row, then one row per
    setting inside it (``mae_train.epochs``, ...).
    """
    rows = []
    for name, field in _model_fields(params).items():
        nested = _nested(field.annotation, index=False)
        default = field.get_default(call_default_factory=True)
        shown = "(required)" if default is PydanticUndefined else "(below)" if nested else _show(default)
        rows.append(ParamDoc(prefix + name, _short_type(field.annotation), shown, constraint_text(field),
                             (field.description or "").strip()))  # fmt: skip
        if nested is not None:
            rows.extend(param_docs(nested, f"{prefix}{name}."))
    return rows


def format_table(rows: list[ParamDoc], indent: str = "  ") -> str:
    """Aligned text columns with a header; '' when there are no parameters."""
    if not rows:
        return ""
    header = ParamDoc("parameter", "type", "default", "constraint", "description")
    cells = [[r.name, r.type, r.default, r.constraint, r.description] for r in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(4)]
    lines = ["  ".join([*(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)), row[4]]).rstrip() for row in cells]
    return "\n".join(indent + line for line in lines)


# ----------------------------------------------------------------------------- error lines


def _model_fields(cls: Any) -> dict[str, FieldInfo]:
    """The declared fields of a pydantic model or pydantic dataclass ({} for anything else)."""
    return getattr(cls, "model_fields", None) or getattr(cls, "__pydantic_fields__", None) or {}


def _nested(annotation: Any, index: bool) -> Any:
    """The model (or, with ``index``, the list element type) a field's value holds, if any."""
    for member in _members(annotation):
        bare, _ = _unwrap(member)
        if index and get_origin(bare) in (list, Sequence, tuple) and get_args(bare):
            return get_args(bare)[0]
        if not index and isinstance(bare, type) and _model_fields(bare):
            return bare
    return None


def _field_at(model: Any, loc: tuple[Any, ...]) -> tuple[FieldInfo | None, list[Any], bool]:
    """Walk ``loc`` through nested models and lists: (the deepest declared field, the path to its
    value, whether the error sits inside one element of that field rather than on the field)."""
    field: FieldInfo | None = None
    path: list[Any] = []
    current: Any = model
    inside = False
    for part in loc:
        if isinstance(part, int):
            element = _nested(field.annotation, index=True) if field is not None else None
            if element is None:
                break
            inside = True
            element_model = _unwrap(element)[0]
            current = element_model if _model_fields(element_model) else None
            path.append(part)
            continue
        fields = _model_fields(current)
        if part not in fields:
            break
        field, inside = fields[part], False
        path.append(part)
        current = _nested(field.annotation, index=False)
    return field, path, inside


def _dotted(path: list[Any]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _value_at(raw: Any, path: list[Any]) -> Any:
    for part in path:
        if isinstance(part, int) and isinstance(raw, (list, tuple)) and part < len(raw):
            raw = raw[part]
        elif isinstance(part, str) and isinstance(raw, Mapping) and part in raw:
            raw = raw[part]
        else:
            return PydanticUndefined
    return raw


_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def validation_error_line(
    err: ValidationError, model: type, raw: Mapping[str, Any], owner: str, unknown: str = "parameter"
) -> str:
    """The first problem of ``err`` as one line ``<owner>: <name> must be <allowed>, got <value>``.

    ``model`` is the validated class (to look up what a field allows), ``raw`` what the user gave,
    ``owner`` the plugin name or config file, ``unknown`` what to call an unexpected key.
    """
    first = err.errors()[0]
    # One problem per parameter: a union (corner name or [row, col]) reports once per alternative.
    others = len({e["loc"][:1] for e in err.errors()} - {first["loc"][:1]})
    more = f" (and {others} more problem{'s' if others > 1 else ''})" if others else ""
    loc = tuple(first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        parent, parent_path, _ = _field_at(model, loc[:-1]) if len(loc) > 1 else (None, [], False)
        container = _nested(parent.annotation, index=False) if parent is not None else model
        valid = sorted(_model_fields(container))
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        where = _dotted([*parent_path, loc[-1]])
        listing = f"; valid: {', '.join(valid)}" if valid else "; there are none"
        return f"{owner}: unknown {unknown} {where!r}{hint}{listing}{more}"
    field, path, inside = _field_at(model, loc)
    if field is None:
        where = _dotted(list(loc))
        return f"{owner}: {where + ': ' if where else ''}{message}{more}"
    name = _dotted(path)
    value = _value_at(raw, path)
    if first["type"] == "missing" or value is PydanticUndefined:
        return f"{owner}: {name} is required: {allowed_text(field)}{more}"
    if first["type"] in ("value_error", "assertion_error"):
        # A validator's message completes "<name> must ..." (and names the value unless it did),
        # or is a sentence of its own ("seed 0 is listed twice").
        if not message.startswith("must "):
            return f"{owner}: {name}: {message}{more}"
        given = "" if ", got " in message else f", got {_show(value)}"
        return f"{owner}: {name} {message}{given}{more}"
    if inside:  # an element of a list field: say what each element must be
        element = _nested(field.annotation, index=True)
        return f"{owner}: {name} must be {_phrase(element)}, got {_show(value)}{more}"
    bounds = range_text(field.metadata)
    allowed = bounds if first["type"] in _BOUND_ERRORS and bounds else allowed_text(field)
    if isinstance(value, float) and not math.isfinite(value):
        allowed = f"a finite number {bounds}".rstrip()
    return f"{owner}: {name} must be {allowed}, got {_show(value)}{more}"
