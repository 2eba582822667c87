"""Allocation -> peft.LoraConfig on real models: ranks, scaling and parameter counts must match exactly."""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from fimlora.allocation import Allocation, allocate_ranks, uniform_rank_budget
from fimlora.errors import FimloraError

# transformers deprecation noise from inside PEFT; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

PEFT_PREFIX = "base_model.model."
LORA_ALPHA = 8


def tiny_bert(num_layers: int = 2, hidden: int = 32, intermediate: int = 64) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=intermediate,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(config).eval()


def encoder_linear_shapes(model: nn.Module, suffix: str = "") -> dict[str, tuple[int, int]]:
    return {
        name: tuple(module.weight.shape)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("bert.encoder.layer.") and name.endswith(suffix)
    }


def lora_layers(peft_model: nn.Module) -> dict[str, LoraLayer]:
    """LoRA-wrapped modules, keyed by their name in the base model."""
    found = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            assert name.startswith(PEFT_PREFIX)
            found[name.removeprefix(PEFT_PREFIX)] = module
    return found


def lora_param_count(peft_model: nn.Module) -> int:
    return sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n and p.requires_grad)


@pytest.fixture(scope="module")
def bert_allocation() -> Allocation:
    shapes = encoder_linear_shapes(tiny_bert())
    assert len(shapes) == 12
    generator = torch.Generator().manual_seed(1)
    values = torch.rand(12, generator=generator) ** 2
    scores = {name: float(v) for name, v in zip(sorted(shapes), values, strict=True)}
    allocation = allocate_ranks(scores, shapes, budget=uniform_rank_budget(shapes, 4), r_max=16)
    # Without varied ranks the test could not tell rank_pattern from r.
    assert len(set(allocation.ranks.values())) >= 3
    return allocation


@pytest.mark.parametrize("scaling", ["alpha_over_r", "constant"])
def test_peft_model_gets_exactly_the_allocated_ranks(bert_allocation: Allocation, scaling: str) -> None:
    config = bert_allocation.to_lora_config(lora_alpha=LORA_ALPHA, scaling=scaling, task_type="SEQ_CLS")
    assert config.target_modules == set(bert_allocation.ranks)
    assert all(not key.startswith("base_model") for key in config.rank_pattern)
    assert set(config.rank_pattern) <= set(bert_allocation.ranks)
    r_ref = config.r

    peft_model = get_peft_model(tiny_bert(), config)
    layers = lora_layers(peft_model)
    assert set(layers) == set(bert_allocation.ranks)
    for name, layer in layers.items():
        rank = bert_allocation.ranks[name]
        assert layer.r["default"] == rank, name
        expected = LORA_ALPHA / rank if scaling == "alpha_over_r" else LORA_ALPHA / r_ref
        assert layer.scaling["default"] == pytest.approx(expected), name
    assert lora_param_count(peft_model) == bert_allocation.num_params


def test_reference_rank_is_most_common_with_ties_to_the_smaller() -> None:
    shapes = {name: (8, 8) for name in "abcde"}
    allocation = Allocation(
        ranks={"a": 4, "b": 4, "c": 2, "d": 2, "e": 7}, shapes=shapes, budget=10**6, strategy="x"
    )
    config = allocation.to_lora_config(lora_alpha=16)
    assert config.r == 2
    assert config.rank_pattern == {"a": 4, "b": 4, "e": 7}
    assert not config.alpha_pattern
    constant = allocation.to_lora_config(lora_alpha=16, scaling="constant")
    assert constant.alpha_pattern == {"a": 32.0, "b": 32.0, "e": 56.0}


@pytest.mark.parametrize("special", [1, 11])
def test_rank_for_layer_1_does_not_leak_onto_layer_11(special: int) -> None:
    model = tiny_bert(num_layers=12, hidden=8, intermediate=16)
    shapes = encoder_linear_shapes(model, suffix="attention.self.query")
    assert len(shapes) == 12
    ranks = {name: 2 for name in shapes}
    ranks[f"bert.encoder.layer.{special}.attention.self.query"] = 7
    allocation = Allocation(ranks=ranks, shapes=shapes, budget=10**6, strategy="manual")

    peft_model = get_peft_model(model, allocation.to_lora_config(lora_alpha=LORA_ALPHA))
    actual = {name: layer.r["default"] for name, layer in lora_layers(peft_model).items()}
    assert actual == ranks
    assert lora_param_count(peft_model) == allocation.num_params


class _Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)


class _Outer(nn.Module):
    """Has both 'fc' and 'block.fc': PEFT's suffix matching would give 'block.fc' the rank of 'fc'."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.block = _Inner()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.fc(self.fc(x))


@pytest.mark.parametrize("scaling", ["alpha_over_r", "constant"])
def test_suffix_names_do_not_share_a_rank(scaling: str) -> None:
    allocation = Allocation(
        ranks={"fc": 4, "block.fc": 2}, shapes={"fc": (8, 8), "block.fc": (8, 8)}, budget=10**6, strategy="x"
    )
    peft_model = get_peft_model(_Outer(), allocation.to_lora_config(lora_alpha=LORA_ALPHA, scaling=scaling))
    layers = lora_layers(peft_model)
    assert {name: layer.r["default"] for name, layer in layers.items()} == {"fc": 4, "block.fc": 2}
    for name, layer in layers.items():
        expected = LORA_ALPHA / allocation.ranks[name] if scaling == "alpha_over_r" else LORA_ALPHA / 2
        assert layer.scaling["default"] == pytest.approx(expected), name
    assert lora_param_count(peft_model) == allocation.num_params


def test_kwargs_pass_through(bert_allocation: Allocation) -> None:
    config = bert_allocation.to_lora_config(
        lora_alpha=LORA_ALPHA, lora_dropout=0.1, task_type="SEQ_CLS", modules_to_save=["classifier"]
    )
    assert config.lora_dropout == 0.1
    assert config.lora_alpha == LORA_ALPHA
    assert set(config.modules_to_save) == {"classifier"}


@pytest.mark.parametrize(
    "key", ["r", "target_modules", "rank_pattern", "alpha_pattern", "lora_alpha", "layers_to_transform"]
)
def test_conflicting_kwargs_are_refused(bert_allocation: Allocation, key: str) -> None:
    with pytest.raises(FimloraError, match=key):
        bert_allocation.to_lora_config(**{"lora_alpha": LORA_ALPHA, key: None})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lora_alpha": 8, "scaling": "sqrt"}, "alpha_over_r, constant"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_alpha": float("nan")}, "lora_alpha"),
        ({"lora_alpha": 8, "use_rslora": True}, "use_rslora"),
    ],
)
def test_bad_lora_arguments_are_refused(bert_allocation: Allocation, kwargs: dict, match: str) -> None:
    with pytest.raises(FimloraError, match=match):
        bert_allocation.to_lora_config(**kwargs)


# --------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------


def test_json_round_trip(tmp_path, bert_allocation: Allocation) -> None:
    path = tmp_path / "sub" / "allocation.json"
    assert bert_allocation.save(path) == path
    assert Allocation.load(path) == bert_allocation
    data = json.loads(path.read_text())
    assert data["num_params"] == bert_allocation.num_params
    assert all(isinstance(shape, list) for shape in data["shapes"].values())

    # Overwriting goes through a temp file that is renamed away, so nothing else is left behind.
    uniform = allocate_ranks(None, bert_allocation.shapes, budget=bert_allocation.budget, strategy="uniform")
    uniform.save(path)
    assert Allocation.load(path) == uniform
    assert uniform.scores is None
    assert [p.name for p in path.parent.iterdir()] == ["allocation.json"]


def test_dict_round_trip_keeps_settings() -> None:
    allocation = allocate_ranks(
        {"a": 1.0, "b": 2.0},
        {"a": (8, 4), "b": (8, 4)},
        budget=60,
        strategy="random",
        r_max=3,
        tau=0.5,
        seed=4,
    )
    assert Allocation.from_dict(json.loads(json.dumps(allocation.to_dict()))) == allocation


def test_load_errors(tmp_path, bert_allocation: Allocation) -> None:
    with pytest.raises(FimloraError, match="No allocation file"):
        Allocation.load(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(FimloraError, match="not valid JSON"):
        Allocation.load(tmp_path / "broken.json")

    data = bert_allocation.to_dict()
    with pytest.raises(FimloraError, match="num_params"):
        Allocation.from_dict({**data, "num_params": data["num_params"] + 1})
    with pytest.raises(FimloraError, match="Unknown allocation field"):
        Allocation.from_dict({**data, "rank": 3})
    with pytest.raises(FimloraError, match="missing"):
        Allocation.from_dict({k: v for k, v in data.items() if k != "ranks"})


def test_rank_zero_modules_get_no_adapter_and_the_count_stays_exact() -> None:
    model = tiny_bert()
    shapes = encoder_linear_shapes(model)
    names = sorted(shapes)
    ranks = {n: (0 if i % 3 == 0 else 1 + i % 2) for i, n in enumerate(names)}
    allocation = Allocation(ranks, shapes, budget=10**9, strategy="proportional", r_min=0)
    config = allocation.to_lora_config(lora_alpha=LORA_ALPHA)
    adapted = {n for n, r in ranks.items() if r > 0}
    assert set(config.target_modules) == adapted
    assert allocation.reference_rank in {1, 2}  # the most common rank of the adapted modules, never 0
    peft_model = get_peft_model(model, config)
    layers = {
        n.removeprefix(PEFT_PREFIX): m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)
    }
    assert set(layers) == adapted
    trainable = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert trainable == allocation.num_params


def test_an_allocation_with_every_rank_zero_is_refused() -> None:
    with pytest.raises(FimloraError, match="Every module has rank 0"):
        Allocation({"a": 0, "b": 0}, {"a": (4, 4), "b": (4, 4)}, budget=16, strategy="uniform", r_min=0)
    with pytest.raises(FimloraError, match=">= 0"):
        Allocation({"a": -1, "b": 2}, {"a": (4, 4), "b": (4, 4)}, budget=16, strategy="uniform")
