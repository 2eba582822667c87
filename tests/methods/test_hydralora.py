"""HydraLoRA: layout and parameter count, identity at init, softmax routing, padding-free routing
statistics, gradients, save/load bit-identity, the balance loss, choosing k, and clear errors."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from tiny_models import make_tiny_bert, make_tiny_llama
from torch import nn

from fimlora.errors import FimloraError
from fimlora.methods.adapters.hydralora import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    HydraLoraLinear,
    apply_hydralora,
    choose_num_heads,
    hydralora_layers,
    hydralora_param_count,
    hydralora_trainable_counts,
    load_balance_loss,
    load_hydralora,
    router_usage,
    routing_mask,
    save_hydralora,
)

K = 3


def _bert_ranks(layers: int = 2) -> dict[str, int]:
    """A rank pattern over every linear layer of the tiny BERT's blocks."""
    pattern = {
        "attention.self.query": 2,
        "attention.self.key": 1,
        "attention.self.value": 4,
        "attention.output.dense": 2,
        "intermediate.dense": 3,
        "output.dense": 2,
    }
    return {f"bert.encoder.layer.{i}.{m}": r + i for i in range(layers) for m, r in pattern.items()}


def _llama_ranks() -> dict[str, int]:
    return {
        "model.layers.0.self_attn.q_proj": 2,
        "model.layers.0.self_attn.v_proj": 4,
        "model.layers.1.self_attn.o_proj": 2,
        "model.layers.1.mlp.down_proj": 3,
        "model.layers.1.mlp.gate_proj": 2,
    }


def _shapes(model: nn.Module, names) -> dict[str, tuple[int, int]]:
    modules = dict(model.named_modules())
    return {n: tuple(modules[n].weight.shape) for n in names}


def _batch(seed: int = 0, batch: int = 4, seq: int = 10, num_labels: int = 3) -> dict[str, torch.Tensor]:
    """Right-padded token ids (pad id 0) with varied lengths, and labels."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 60, (batch, seq), generator=gen)
    lengths = torch.tensor([seq, 3, 7, 5][:batch])
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    return {
        "input_ids": ids * mask,
        "attention_mask": mask,
        "labels": torch.randint(0, num_labels, (batch,), generator=gen),
    }


def _train(model: nn.Module, batch: dict[str, torch.Tensor], steps: int = 4) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-2)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss + 0.1 * load_balance_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


# --------------------------------------------------------------------------------------------------


def test_layout_parameter_count_and_freezing() -> None:
    model = make_tiny_bert()
    ranks = _bert_ranks()
    shapes = _shapes(model, ranks)
    apply_hydralora(model, ranks, num_heads=K, alpha=8.0, modules_to_save=["classifier"])

    layers = hydralora_layers(model)
    assert set(layers) == set(ranks)
    for name, layer in layers.items():
        d_out, d_in = shapes[name]
        r = ranks[name]
        assert isinstance(layer, HydraLoraLinear)
        assert layer.lora_A.shape == (r, d_in)
        assert layer.lora_B.shape == (K, d_out, r)
        assert layer.router.weight.shape == (K, d_in) and layer.router.bias is None
        assert layer.scaling == pytest.approx(8.0 / r)  # alpha_over_r
        assert not layer.base_layer.weight.requires_grad and not layer.base_layer.bias.requires_grad
        assert torch.count_nonzero(layer.lora_B) == 0

    head = sum(p.numel() for p in model.classifier.parameters())
    expected = hydralora_param_count(shapes, ranks, K)
    by_hand = 0
    for name, r in ranks.items():
        d_out, d_in = shapes[name]
        by_hand += r * d_in + K * r * d_out + K * d_in  # A, K heads, router
    assert expected == by_hand
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected + head
    assert hydralora_trainable_counts(model) == {
        "adapter_params": expected,
        "head_params": head,
        "other_trainable_params": 0,
    }
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("classifier.")]
    assert all(any(key in n for key in ("lora_A", "lora_B", "router.weight")) for n in frozen)


def test_constant_scaling_uses_the_most_common_rank() -> None:
    model = make_tiny_llama()
    ranks = _llama_ranks()  # rank 2 is the most common
    apply_hydralora(model, ranks, num_heads=2, alpha=6.0, scaling="constant")
    assert {layer.scaling for layer in hydralora_layers(model).values()} == {3.0}


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_initial_model_equals_base(which: str) -> None:
    model = make_tiny_bert() if which == "bert" else make_tiny_llama()
    ranks = _bert_ranks() if which == "bert" else _llama_ranks()
    batch = _batch()
    batch.pop("labels")
    with torch.no_grad():
        before = model(**batch).logits
        apply_hydralora(model, ranks, num_heads=K, alpha=16.0, dropout=0.0, seed=3)
        after = model(**batch).logits
    assert torch.equal(before, after)


def test_routing_is_a_softmax_and_statistics_ignore_padding() -> None:
    model = apply_hydralora(make_tiny_bert(), _bert_ranks(), num_heads=K, alpha=8.0)
    batch = _batch()
    with torch.no_grad():
        model(**batch)  # labels are accepted; attention_mask reaches the layers through the hook
    for layer in hydralora_layers(model).values():
        gates = layer.last_gates
        assert gates is not None and gates.shape == (*batch["input_ids"].shape, K)
        assert torch.all(gates > 0)
        torch.testing.assert_close(gates.sum(-1), torch.ones(gates.shape[:-1]), atol=1e-6, rtol=0)
        assert torch.equal(layer.last_token_mask, batch["attention_mask"].bool())

    usage = router_usage(model, [batch])
    assert set(usage) == set(_bert_ranks())
    for row in usage.values():
        assert row.shape == (K,)
        assert float(row.sum()) == pytest.approx(1.0, abs=1e-6)

    # Padding is ignored: the padded batch routes like its examples run one by one without padding.
    singles = []
    for i, length in enumerate(batch["attention_mask"].sum(1).tolist()):
        singles.append({k: batch[k][i : i + 1, :length] for k in ("input_ids", "attention_mask")})
    unpadded = router_usage(model, singles)
    for name in usage:
        torch.testing.assert_close(usage[name], unpadded[name], atol=1e-5, rtol=0)
    # ...and the mask matters: counting pad positions gives a different answer.
    all_tokens = router_usage(model, [{"input_ids": batch["input_ids"]}])
    assert any(not torch.allclose(usage[n], all_tokens[n], atol=1e-4) for n in usage)


def test_routing_mask_for_direct_submodule_calls_and_kv_cache_shapes() -> None:
    model = apply_hydralora(make_tiny_bert(), _bert_ranks(1), num_heads=K, alpha=8.0)
    layer = hydralora_layers(model)["bert.encoder.layer.0.attention.self.query"]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    with torch.no_grad(), routing_mask(model, mask):
        layer(torch.randn(2, 3, 16))
        assert torch.equal(layer.last_token_mask, mask.bool())
        layer(torch.randn(2, 1, 16))  # one new position with a KV cache: the mask's last column
        assert torch.equal(layer.last_token_mask, mask[:, -1:].bool())
        layer(torch.randn(2, 16))  # one vector per sequence (a pooler): every row counts
        assert layer.last_token_mask is None
    layer(torch.randn(2, 3, 16))
    assert layer.last_token_mask is None  # the context restored "no mask"


def test_gradients_reach_a_every_head_and_the_router() -> None:
    model = apply_hydralora(make_tiny_bert(), _bert_ranks(), num_heads=K, alpha=8.0)
    batch = _batch()
    layers = hydralora_layers(model)

    # At init (B = 0) A and the router get exactly zero gradient: the LoRA trap, for both.
    model(**batch).loss.backward()
    for layer in layers.values():
        assert torch.count_nonzero(layer.lora_A.grad) == 0
        assert torch.count_nonzero(layer.router.weight.grad) == 0
        assert all(torch.count_nonzero(layer.lora_B.grad[i]) > 0 for i in range(K))

    model.zero_grad()
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_(0, 0.1)
    model(**batch).loss.backward()
    for layer in layers.values():
        assert torch.count_nonzero(layer.lora_A.grad) > 0
        assert all(torch.count_nonzero(layer.lora_B.grad[i]) > 0 for i in range(K))
        assert torch.count_nonzero(layer.router.weight.grad) > 0


def test_load_balance_loss() -> None:
    model = apply_hydralora(make_tiny_bert(), _bert_ranks(), num_heads=K, alpha=8.0)
    batch = _batch()
    model(**batch)
    loss = load_balance_loss(model)
    assert loss.ndim == 0 and float(loss.detach()) > 0

    # It is the mean over layers of CV² of the mean routing weight over real tokens.
    terms = []
    for layer in hydralora_layers(model).values():
        p = layer.last_gates[batch["attention_mask"].bool()].mean(0)
        terms.append(p.var(unbiased=False) / p.mean() ** 2)
    torch.testing.assert_close(loss, torch.stack(terms).mean())

    loss.backward()
    for layer in hydralora_layers(model).values():
        assert torch.count_nonzero(layer.router.weight.grad) > 0

    # Uniform routing is its minimum: exactly zero.
    with torch.no_grad():
        for layer in hydralora_layers(model).values():
            layer.router.weight.zero_()
    model(**batch)
    assert float(load_balance_loss(model).detach()) == 0.0
    assert float(load_balance_loss(make_tiny_bert())) == 0.0  # no HydraLoRA layers


@pytest.mark.parametrize(
    ("which", "scaling", "dropout"), [("bert", "alpha_over_r", 0.1), ("llama", "constant", 0.0)]
)
def test_save_load_reproduces_trained_model_bit_for_bit(tmp_path, which, scaling, dropout) -> None:
    make = make_tiny_bert if which == "bert" else make_tiny_llama
    ranks = _bert_ranks() if which == "bert" else _llama_ranks()
    head = "classifier" if which == "bert" else "lm_head"
    batch = _batch()
    if which == "llama":
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model = apply_hydralora(
        make(), ranks, num_heads=K, alpha=8.0, scaling=scaling, dropout=dropout, modules_to_save=[head]
    )
    head_before = copy.deepcopy(model.get_submodule(head).state_dict())
    _train(model, batch)
    for layer in hydralora_layers(model).values():
        assert all(torch.count_nonzero(layer.lora_B[i]) > 0 for i in range(K))
    assert not torch.equal(model.get_submodule(head).weight, head_before["weight"])

    directory = tmp_path / "adapter"
    save_hydralora(model, directory, base_model_name_or_path="tiny")
    save_hydralora(model, directory, base_model_name_or_path="tiny")  # overwriting is fine too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary leftovers
    assert sorted(p.name for p in directory.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    config = json.loads((directory / CONFIG_NAME).read_text())
    assert config["ranks"] == ranks and config["num_heads"] == K and config["scaling"] == scaling
    assert config["modules_to_save"] == [head] and config["base_model_name_or_path"] == "tiny"

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected = model(**inputs).logits
        loaded = load_hydralora(make(), directory).eval()
        assert torch.equal(loaded(**inputs).logits, expected)
    assert hydralora_trainable_counts(loaded) == hydralora_trainable_counts(model)


def test_deepcopy_after_a_training_forward() -> None:
    model = apply_hydralora(make_tiny_bert(), _bert_ranks(1), num_heads=2, alpha=4.0)
    model(**_batch()).loss.backward()
    clone = copy.deepcopy(model)  # the recorded gates are graph tensors; they are not copied
    batch = _batch(seed=1)
    clone(**batch)
    layer = hydralora_layers(clone)["bert.encoder.layer.0.attention.self.query"]
    assert torch.equal(layer.last_token_mask, batch["attention_mask"].bool())


def test_choose_num_heads_finds_three_topics() -> None:
    vocabularies = (
        "goal striker referee penalty stadium league keeper match season coach",
        "enzyme protein cell membrane receptor molecule gene mutation tissue assay",
        "mortgage interest loan bank credit equity bond dividend inflation market",
    )
    topics = [vocabulary.split() for vocabulary in vocabularies]
    rng = random.Random(0)
    texts = [" ".join(rng.choices(words, k=12)) for words in topics for _ in range(15)]
    rng.shuffle(texts)
    assert choose_num_heads(texts, k_max=6, seed=0) == 3
    assert choose_num_heads(texts, k_max=6, seed=0) == 3  # deterministic


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_heads": 0}, "num_heads"),
        ({"ranks": {"bert.encoder.layer.0.attention.self.query": 0}}, "rank"),
        ({"ranks": {"bert.encoder.layer.0.attention.self.nope": 2}}, "not a module"),
        ({"ranks": {"bert.embeddings": 2}}, "only nn.Linear"),
        ({"scaling": "rslora"}, "scaling"),
        ({"alpha": 0.0}, "alpha"),
        ({"modules_to_save": ["bert.encoder"]}, "overlaps"),
    ],
)
def test_clear_errors(kwargs, message) -> None:
    options = {"ranks": {"bert.encoder.layer.0.attention.self.query": 2}, "num_heads": 2, "alpha": 4.0}
    options.update(kwargs)
    ranks = options.pop("ranks")
    with pytest.raises(FimloraError, match=message):
        apply_hydralora(make_tiny_bert(), ranks, **options)


def test_other_errors(tmp_path) -> None:
    model = apply_hydralora(make_tiny_bert(), _bert_ranks(1), num_heads=2, alpha=4.0)
    with pytest.raises(FimloraError, match="already has HydraLoRA"):
        apply_hydralora(model, {"bert.encoder.layer.1.attention.self.query": 2}, num_heads=2, alpha=4.0)
    with pytest.raises(FimloraError, match="not a HydraLoRA directory"):
        load_hydralora(make_tiny_bert(), tmp_path)
    with pytest.raises(FimloraError, match="integer >= 1"):
        hydralora_param_count({"a": (4, 4)}, {"a": 2}, 0)
    with pytest.raises(FimloraError, match="at least 3 texts"):
        choose_num_heads(["a b", "c d"])
