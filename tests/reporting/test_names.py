"""Module names → layer × module-type grids, including names that do not parse."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fimlora.reporting.names import UNPARSED, ModuleName, log10_grid, module_grid, parse_module_name


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "bert.encoder.layer.3.attention.self.query",
            ModuleName("bert.encoder.layer", 3, "attention.self.query"),
        ),
        ("model.layers.11.self_attn.q_proj", ModuleName("model.layers", 11, "self_attn.q_proj")),
        ("model.layers.0.mlp.down_proj", ModuleName("model.layers", 0, "mlp.down_proj")),
        (
            "encoder.block.2.layer.0.SelfAttention.q",
            ModuleName("encoder.block", 2, "layer.0.SelfAttention.q"),
        ),
        ("transformer.h.7.attn.c_attn", ModuleName("transformer.h", 7, "attn.c_attn")),
        ("layers.4", ModuleName("layers", 4, "(block)")),
        ("5.fc", ModuleName("", 5, "fc")),
        ("classifier", ModuleName("", None, "classifier")),
        ("pooler.dense", ModuleName("", None, "pooler.dense")),
        ("layer3.conv", ModuleName("", None, "layer3.conv")),
    ],
)
def test_parse_module_name(name, expected):
    assert parse_module_name(name) == expected


def test_grid_of_a_llama_like_model_keeps_the_given_order():
    names = [f"model.layers.{i}.{k}" for i in (1, 0, 10, 2) for k in ("self_attn.q_proj", "mlp.up_proj")]
    values = {n: float(i) for i, n in enumerate(names)}
    grid = module_grid(values)
    assert grid.rows == ["0", "1", "2", "10"]  # numeric, not lexicographic
    assert grid.columns == ["self_attn.q_proj", "mlp.up_proj"]
    assert grid.values[3, 1] == values["model.layers.10.mlp.up_proj"]
    ordered = module_grid(values, order=["model.layers.0.mlp.up_proj"])
    assert ordered.columns == ["mlp.up_proj", "self_attn.q_proj"]


def test_grid_with_missing_cells_two_stacks_and_unparsed_names():
    values = {
        "encoder.block.0.q": 1.0,
        "encoder.block.1.q": 2.0,
        "encoder.block.1.v": 3.0,
        "decoder.block.0.q": 4.0,
        "lm_head": 5.0,
        "pooler.dense": 6.0,
    }
    grid = module_grid(values)
    assert grid.rows == ["encoder.block.0", "encoder.block.1", "decoder.block.0", "lm_head", "pooler.dense"]
    assert grid.columns == ["q", "v", UNPARSED]
    assert grid.shape == (5, 3)
    assert math.isnan(grid.values[0, 1])  # encoder layer 0 has no "v"
    assert grid.values[2, 0] == 4.0
    assert grid.values[3, 2] == 5.0 and grid.values[4, 2] == 6.0
    assert np.isnan(grid.values[3, :2]).all()
    assert int(np.isfinite(grid.values).sum()) == len(values)


def test_log10_grid_blanks_non_positive_values():
    grid = log10_grid(module_grid({"m.layers.0.a": 1e-8, "m.layers.0.b": 0.0, "m.layers.1.a": 100.0}))
    assert grid.values[0, 0] == pytest.approx(-8.0)
    assert math.isnan(grid.values[0, 1]) and grid.values[1, 0] == pytest.approx(2.0)
