"""CLI options generated from a pass's settings model, so that the CLI and recipes share one source.

Every settings field becomes ``--field-name`` (underscores as dashes), with the field's description as
help and its default shown. Values reach the settings model as the user typed them and are validated
there, exactly as a recipe's values are: the same value gets the same error. A field may add
spellings through ``json_schema_extra={"flags": [...]}`` (e.g. ``--sym/--asym`` beside
``--symmetric/--asymmetric``) and a metavar through ``{"metavar": "..."}``.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

__all__ = ["FieldOption", "field_options", "option_parameters"]


@dataclass(frozen=True)
class FieldOption:
    """How one settings field appears on the command line."""

    field: str
    decls: tuple[str, ...]
    is_flag: bool
    is_list: bool
    metavar: str
    help: str
    #: the default as typer shows it in --help (the field's default, or None)
    default: Any


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """The annotation without ``| None``, and whether it is a list."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    if origin is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _metavar(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return "|".join(str(a) for a in typing.get_args(annotation))
    if annotation is int:
        return "INT"
    if annotation is float:
        return "FLOAT"
    if annotation in (Path,):
        return "PATH"
    return "TEXT"


def _default_value(info: FieldInfo) -> Any:
    """The field's default as an option default: text, or a list of texts; None for none."""
    if info.default_factory is not None:
        value = info.default_factory()
    elif info.default is PydanticUndefined:
        return None
    else:
        value = info.default
    if value is None or value == []:
        return None
    if isinstance(value, list):
        return [str(v) for v in value]
    return str(value)


def field_options(model: type[BaseModel], skip: set[str] | frozenset[str] = frozenset()) -> list[FieldOption]:
    """One :class:`FieldOption` per field of ``model`` not in ``skip``."""
    found = []
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        inner, is_list = _unwrap(info.annotation)
        dash = name.replace("_", "-")
        is_flag = inner is bool and not is_list
        if is_flag:
            # a flag's own spellings replace the default pair; the first starts with --field-name
            decls = tuple(extra.get("flags") or (f"--{dash}/--no-{dash}",))
            default = info.default if isinstance(info.default, bool) else None
        else:
            decls = (f"--{dash}", *extra.get("flags", ()))
            default = _default_value(info)
        help_text = (info.description or "").strip()
        if is_list:
            help_text += " Repeatable."
        metavar = "" if is_flag else str(extra.get("metavar") or _metavar(inner))
        found.append(FieldOption(name, decls, is_flag, is_list, metavar, help_text, default))
    return found


def option_parameters(options: list[FieldOption], prefix: str = "") -> list[inspect.Parameter]:
    """typer parameters (keyword-only, with the field's default for --help) for ``options``; each
    parameter is named ``prefix + field``. Which ones the user gave is read back by :func:`given`."""
    params = []
    for opt in options:
        kind = bool if opt.is_flag else list[str] if opt.is_list else str
        annotation = Annotated[kind | None, typer.Option(*opt.decls, help=opt.help, metavar=opt.metavar, show_default=opt.default is not None)]
        params.append(inspect.Parameter(prefix + opt.field, inspect.Parameter.KEYWORD_ONLY, default=opt.default, annotation=annotation))
    return params


def with_signature(fn: Callable[..., Any], params: list[inspect.Parameter]) -> Callable[..., Any]:
    """``fn(**kwargs)`` presented to typer with ``params`` as its signature."""
    fn.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    fn.__annotations__ = {p.name: p.annotation for p in params}
    return fn


def given(ctx: typer.Context, values: dict[str, Any], options: list[FieldOption], prefix: str = "") -> dict[str, Any]:
    """The settings values the user gave on the command line (``ctx`` knows where each value came
    from); options left out are not passed, so the settings model (or a settings file) supplies them."""
    out = {}
    for opt in options:
        name = prefix + opt.field
        source = ctx.get_parameter_source(name)
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
            continue
        out[opt.field] = values[name]
    return out
