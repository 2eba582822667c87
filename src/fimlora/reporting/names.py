"""Module names → (block stack, layer index, module type), and per-module values → a layer × type grid.

``bert.encoder.layer.3.attention.self.query`` → stack ``bert.encoder.layer``, layer 3, type
``attention.self.query``; ``model.layers.3.self_attn.q_proj`` → ``model.layers``, 3, ``self_attn.q_proj``.
The layer index is the *first* all-digit component of the dotted name (the block index of a
``ModuleList``); the type is everything after it. Models with several block stacks (an encoder and a
decoder) keep them apart through the stack prefix. A name without any digit component does not parse:
it gets a row of its own, labelled with the full name, in a single ``(unparsed)`` column.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

UNPARSED = "(unparsed)"
BLOCK = "(block)"


@dataclass(frozen=True)
class ModuleName:
    """``stack``: the dotted prefix before the layer index; ``layer``: None when the name does not parse."""

    stack: str
    layer: int | None
    kind: str


def parse_module_name(name: str) -> ModuleName:
    """Split a module name into stack prefix, layer index and module type (see the module docstring)."""
    parts = str(name).split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            kind = ".".join(parts[index + 1 :]) or BLOCK
            return ModuleName(".".join(parts[:index]), int(part), kind)
    return ModuleName("", None, str(name))


@dataclass
class Grid:
    """``values[i, j]``: the value of the module at row ``rows[i]``, column ``columns[j]`` (NaN: none)."""

    rows: list[str]
    columns: list[str]
    values: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), len(self.columns)


def module_grid(values: Mapping[str, float], order: Iterable[str] | None = None) -> Grid:
    """Arrange per-module values as layers (rows) × module types (columns).

    Rows are sorted by (stack in order of appearance, layer index); a row is labelled with the layer
    number alone when there is one stack, else ``<stack>.<layer>``. Columns follow the first appearance
    of each type in ``order`` (e.g. the model's module order) and then in ``values``; unparsed names come
    last, one row each.
    """
    names = list(dict.fromkeys([*(n for n in (order or []) if n in values), *values]))
    parsed = {n: parse_module_name(n) for n in names}
    stacks = list(dict.fromkeys(p.stack for p in parsed.values() if p.layer is not None))
    kinds = list(dict.fromkeys(p.kind for p in parsed.values() if p.layer is not None))
    layer_keys = sorted({(stacks.index(p.stack), p.layer) for p in parsed.values() if p.layer is not None})
    unparsed = [n for n, p in parsed.items() if p.layer is None]

    def row_label(stack_index: int, layer: int) -> str:
        return str(layer) if len(stacks) == 1 else f"{stacks[stack_index]}.{layer}"

    rows = [row_label(s, layer) for s, layer in layer_keys] + unparsed
    columns = kinds + ([UNPARSED] if unparsed else [])
    grid = np.full((len(rows), len(columns)), np.nan)
    row_of = {key: i for i, key in enumerate(layer_keys)}
    for name, p in parsed.items():
        value = float(values[name])
        if p.layer is None:
            grid[len(layer_keys) + unparsed.index(name), len(columns) - 1] = value
        else:
            grid[row_of[(stacks.index(p.stack), p.layer)], kinds.index(p.kind)] = value
    return Grid(rows=rows, columns=columns, values=grid)


def log10_grid(grid: Grid) -> Grid:
    """The same grid on a log10 scale; values ≤ 0 become NaN (shown as missing)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        logged = np.where(grid.values > 0, np.log10(np.where(grid.values > 0, grid.values, 1.0)), math.nan)
    return Grid(rows=list(grid.rows), columns=list(grid.columns), values=logged)
