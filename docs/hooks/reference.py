"""MkDocs hook: the configuration and CLI references, generated from the code at every build.

A page that contains ``<!-- reference:config -->``, ``<!-- reference:sweep -->`` or
``<!-- reference:cli -->`` gets that marker replaced by tables built from the pydantic models
(:class:`fimlora.config.ExperimentConfig`, :class:`fimlora.sweep.spec.SweepSpec`) or from the typer app, so
the reference cannot drift from what the code accepts. ``config_fields`` and ``cli_commands`` are also what
``tests/docs`` checks (every field described, every command listed).
"""

from __future__ import annotations

import enum
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined


@dataclass(frozen=True)
class FieldDoc:
    path: str  # dotted, as written in a config file
    type: str
    default: str
    allowed: str
    description: str


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return "one of"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(dict.fromkeys(_type_name(a) for a in get_args(annotation)))
    if origin in (list, tuple, set):
        args = get_args(annotation)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        key, value = get_args(annotation) or (Any, Any)
        return f"mapping {_type_name(key)} → {_type_name(value)}"
    if _is_model(annotation):
        return "section" if not annotation.__name__.endswith("Entry") else "mapping"
    return getattr(annotation, "__name__", str(annotation)).replace("StrictBool", "bool")


def _literals(annotation: Any) -> list[Any]:
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [m.value for m in annotation]
    return [v for a in get_args(annotation) for v in _literals(a)]


def _bounds(info: FieldInfo) -> list[str]:
    words = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "length ≥", "max_length": "length ≤"}
    found = []
    for item in info.metadata:
        for attr, word in words.items():
            value = getattr(item, attr, None)
            if value is not None:
                found.append(f"{word} {value}")
    return found


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    if isinstance(value, BaseModel):
        return "(section)"
    if value is None:
        return "null"
    return f"`{value!r}`".replace("'", '"') if not isinstance(value, bool) else f"`{str(value).lower()}`"


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if _is_model(annotation):
        return [annotation]
    return [m for a in get_args(annotation) for m in _models_in(a)]


def config_fields(model: type[BaseModel], prefix: str = "") -> Iterator[FieldDoc]:
    """Every field of ``model``, sections first as a row of their own, then their fields (dotted)."""
    for name, info in model.model_fields.items():
        key = info.alias or name
        path = f"{prefix}{key}"
        annotation = info.annotation
        allowed = [", ".join(f"`{v}`" for v in _literals(annotation))] if _literals(annotation) else []
        yield FieldDoc(
            path=path,
            type=_type_name(annotation),
            default=_default(info),
            allowed="; ".join(allowed + _bounds(info)),
            description=(info.description or "").strip(),
        )
        for nested in _models_in(annotation):
            # a section given as a model (not a list of entries): its keys are written under it
            if get_origin(annotation) not in (list, dict):
                yield from config_fields(nested, f"{path}.")


def _cell(text: str) -> str:
    # "<output_dir>" would be read as an HTML tag and vanish from the page
    return text.replace("|", "\\|").replace("\n", " ").replace("<", "&lt;").replace(">", "&gt;")


def _table(fields: list[FieldDoc]) -> str:
    rows = ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
    for f in fields:
        cells = [f"`{f.path}`", f.type, f.default, f.allowed, f.description]
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(rows)


def config_reference() -> str:
    from fimlora.config import ExperimentConfig

    return _table(list(config_fields(ExperimentConfig)))


def sweep_reference() -> str:
    from fimlora.sweep.spec import SweepSpec
    from fimlora.tune.spec import TuneSettings

    return "\n\n".join(
        [
            "### Sweep spec",
            _table(list(config_fields(SweepSpec))),
            "### `tune:` section",
            _table(list(config_fields(TuneSettings, "tune."))),
        ]
    )


@dataclass(frozen=True)
class CommandDoc:
    name: str
    help: str
    options: list[tuple[str, str, str]]  # (declaration, default, help)


def cli_commands() -> list[CommandDoc]:
    """The typer app's commands in order, with each argument's and option's default and help."""
    import typer

    from fimlora.cli import app

    group: Any = typer.main.get_command(app)  # typer vendors click: typed by duck
    docs = []
    for name, command in group.commands.items():
        options = []
        for param in command.params:
            if param.name == "help":
                continue
            if type(param).__name__.endswith("Argument"):
                declaration = param.name.upper()
            else:
                declaration = " / ".join([*param.opts, *param.secondary_opts])
            if param.required:
                default = "required"
            elif param.default is None or param.default == ():
                default = ""
            else:
                default = f"`{param.default}`"
            options.append((declaration, default, getattr(param, "help", "") or ""))
        docs.append(CommandDoc(name, (command.help or "").strip(), options))
    return docs


def cli_reference() -> str:
    parts = []
    for command in cli_commands():
        parts += [f"### `fimlora {command.name}`", "", command.help, ""]
        if command.options:
            parts += ["| argument / option | default | meaning |", "|---|---|---|"]
            parts += [f"| `{d}` | {default} | {_cell(h)} |" for d, default, h in command.options]
            parts.append("")
    return "\n".join(parts)


_MARKERS = {
    "<!-- reference:config -->": config_reference,
    "<!-- reference:sweep -->": sweep_reference,
    "<!-- reference:cli -->": cli_reference,
}


def on_page_markdown(markdown: str, **_: Any) -> str:
    for marker, build in _MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, build())
    return markdown


_SPHINX_ROLE = re.compile(r":(?:mod|func|class|meth|attr|data|exc):(?=<code>)")


def on_page_content(html: str, **_: Any) -> str:
    # Docstrings cross-reference in Sphinx roles (:func:`x`); rendered as Markdown they leave the role's
    # name in front of the code span.
    return _SPHINX_ROLE.sub("", html)
