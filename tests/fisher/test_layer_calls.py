"""Layers that run more than once per forward pass, or see flattened tokens, against brute force.

ALBERT shares one layer across depth: each of its linear layers runs once per layer of depth, and
G_n = ∂ℓ_n/∂W sums over every call before it is squared. ``FlatModel`` runs its token-wise layers on
tokens flattened to (B·T, d) inside the block, reuses one of them on a pooled (B, d) vector, and can
route only the real tokens to an "expert" layer (which cannot be attributed to examples in general).
Every statistic, with its gradient, under both estimators, on padded batches.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from fisher.fisher_testing import (
    assert_close_relative,
    brute_force_per_example,
    padded_batches,
    with_sampled_labels,
)
from torch import nn
from transformers import AlbertConfig, AlbertForSequenceClassification

from fimlora import estimate_fisher
from fimlora.errors import FimloraError
from fimlora.models import resolve_target_modules

SEED = 11
LAYERS = 3


def make_tiny_albert(num_labels: int = 3, seed: int = 0) -> AlbertForSequenceClassification:
    torch.manual_seed(seed)
    config = AlbertConfig(
        vocab_size=60,
        embedding_size=8,
        hidden_size=16,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=num_labels,
        pad_token_id=0,
        initializer_range=0.2,
    )
    return AlbertForSequenceClassification(config).eval()


class FlatBlock(nn.Module):
    """Token-wise layers on the tokens flattened to (B·T, d), as some blocks do inside."""

    def __init__(self, width: int, expert: bool) -> None:
        super().__init__()
        self.mix = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.expert = nn.Linear(width, width) if expert else None

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, width = h.shape
        x = torch.tanh(self.mix(h.reshape(batch * length, width))).reshape(batch, length, width)
        # A masked mean over the example's tokens: its tokens interact, padding does not reach them.
        m = mask.unsqueeze(-1).to(x.dtype)
        context = (x * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)
        y = self.out(x + context)
        if self.expert is not None:
            # Only the real tokens reach the expert, as an MoE layer sees the tokens routed to it.
            routed = mask.reshape(-1).bool()
            flat = y.reshape(batch * length, width)
            extra = torch.zeros_like(flat).index_put((routed,), self.expert(flat[routed]))
            y = y + extra.reshape(batch, length, width)
        return h + y


class FlatModel(nn.Module):
    """Classification over masked-mean-pooled states; ``blocks.0.mix`` runs again on the pooled vector.

    ``unused_call``: ``blocks.1.out`` also runs on the pooled vector, but that output is discarded (its
    δ never arrives).
    """

    def __init__(self, *, expert: bool = False, unused_call: bool = False, width: int = 8, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(60, width)
        self.blocks = nn.ModuleList([FlatBlock(width, expert) for _ in range(2)])
        self.classifier = nn.Linear(width, 3)
        self.unused_call = unused_call

    def forward(self, input_ids, attention_mask=None, labels=None):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h, mask)
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = torch.tanh(self.blocks[0].mix((h * m).sum(1) / m.sum(1)))
        if self.unused_call:
            self.blocks[1].out(pooled)
        logits = self.classifier(pooled)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SimpleNamespace(logits=logits, loss=loss)


def classification_batches():
    # Batches of 3, 3 and 1 right-padded sequences: B·T ≠ B, and a last batch with B = 1.
    return padded_batches([5, 9, 3, 12, 7, 4, 8], num_labels=3)


MODELS = {"albert": make_tiny_albert, "flat": FlatModel}


@pytest.fixture(scope="module", params=[(m, e) for m in MODELS for e in ("empirical", "mc")], ids=str)
def case(request):
    """Every statistic with its gradient, and the brute-force references, for one model and estimator."""
    model_name, estimator = request.param
    model, batches = MODELS[model_name](), classification_batches()
    names = resolve_target_modules(model, None)
    results = {
        statistic: estimate_fisher(
            model,
            batches,
            estimator=estimator,
            statistic=statistic,
            with_gradient=True,
            seed=SEED,
            progress=False,
        )
        for statistic in ("diagonal", "trace", "kfac")
    }
    data = brute_force_per_example(model, batches, names)
    labelled = (
        data
        if estimator == "empirical"
        else brute_force_per_example(model, with_sampled_labels(model, batches, SEED), names)
    )
    return {"model": model_name, "names": names, "results": results, "data": data, "labelled": labelled}


def test_the_layers_run_more_than_once(case):
    """What the cases exercise: ALBERT's six layers run once per layer of depth; ``blocks.0.mix`` runs
    on flattened tokens and on the pooled vector, ``blocks.1.mix`` on flattened tokens only."""
    per, names = case["labelled"], case["names"]
    lengths = [5, 9, 3, 12, 7, 4, 8]
    rows = {n: [int(x[n].shape[0]) for x in per.inputs] for n in names}
    if case["model"] == "albert":
        assert len(names) == 6 and all(".albert_layers.0." in n for n in names)
        assert all(rows[n] == [LAYERS * t for t in lengths] for n in names)
    else:
        assert rows["blocks.0.mix"] == [t + 1 for t in lengths] and rows["blocks.1.mix"] == lengths


def test_diagonal_matches_brute_force(case):
    per, names = case["labelled"], case["names"]
    expected = {n: sum(g[n] ** 2 for g in per.grads) / len(per.grads) for n in names}
    assert_close_relative(case["results"]["diagonal"].diagonal, expected)


def test_trace_matches_brute_force(case):
    per, names = case["labelled"], case["names"]
    expected = {n: sum(float((g[n] ** 2).sum()) for g in per.grads) / len(per.grads) for n in names}
    assert_close_relative(case["results"]["trace"].traces, expected)


def test_kfac_factors_match_brute_force(case):
    """A over every real token of every call, S summed over them and averaged over examples."""
    per, names = case["labelled"], case["names"]
    tokens = {n: sum(x[n].shape[0] for x in per.inputs) for n in names}
    expected_a = {n: sum(x[n].T @ x[n] for x in per.inputs) / tokens[n] for n in names}
    expected_s = {n: sum(d[n].T @ d[n] for d in per.deltas) / len(per.deltas) for n in names}
    result = case["results"]["kfac"]
    assert_close_relative({n: a for n, (a, _) in result.kfac.items()}, expected_a)
    assert_close_relative({n: s for n, (_, s) in result.kfac.items()}, expected_s)
    assert result.metadata["num_tokens"] == max(tokens.values())


@pytest.mark.parametrize("statistic", ["diagonal", "trace", "kfac"])
def test_gradient_is_the_mean_data_gradient(case, statistic):
    per, names = case["data"], case["names"]
    expected = {n: sum(g[n] for g in per.grads) / len(per.grads) for n in names}
    assert_close_relative(case["results"][statistic].gradients, expected)


def test_albert_takes_explicit_targets():
    model, batches = make_tiny_albert(), classification_batches()
    result = estimate_fisher(model, batches, target_modules=["query", "ffn"], progress=False)
    names = sorted(result.diagonal)
    assert sorted(n.rsplit(".", 1)[-1] for n in names) == ["ffn", "query"]
    per = brute_force_per_example(model, batches, names)
    assert_close_relative(
        result.diagonal, {n: sum(g[n] ** 2 for g in per.grads) / len(per.grads) for n in names}
    )


def test_a_call_whose_output_is_unused_adds_nothing():
    """``blocks.1.out``'s second call never gets a δ: the layer is still squared, once its pass ends."""
    model, batches = FlatModel(unused_call=True), classification_batches()
    names = resolve_target_modules(model, None)
    per = brute_force_per_example(model, batches, names)
    diagonal = estimate_fisher(model, batches, with_gradient=True, progress=False)
    trace = estimate_fisher(model, batches, statistic="trace", progress=False)
    expected = {n: sum(g[n] ** 2 for g in per.grads) / len(per.grads) for n in names}
    assert_close_relative(diagonal.diagonal, expected)
    assert_close_relative(trace.traces, {n: float(v.sum()) for n, v in expected.items()})
    assert_close_relative(
        diagonal.gradients, {n: sum(g[n] for g in per.grads) / len(per.grads) for n in names}
    )


def test_inputs_that_cannot_be_attributed_to_examples_are_a_clear_error():
    model, batches = FlatModel(expert=True), classification_batches()
    with pytest.raises(FimloraError, match=r"'blocks\.0\.expert'.*target_modules"):
        estimate_fisher(model, batches, progress=False)
    # Left out, the rest is exact.
    names = resolve_target_modules(model, ["mix", "out"])
    result = estimate_fisher(model, batches, target_modules=["mix", "out"], progress=False)
    per = brute_force_per_example(model, batches, names)
    assert_close_relative(
        result.diagonal, {n: sum(g[n] ** 2 for g in per.grads) / len(per.grads) for n in names}
    )
    # Without padding the real tokens are all B·T of them, in order: attributable and exact.
    unpadded = [{k: v[:, :3] if v.dim() == 2 else v for k, v in batch.items()} for batch in batches[:2]]
    names = resolve_target_modules(model, None)
    result = estimate_fisher(model, unpadded, progress=False)
    per = brute_force_per_example(model, unpadded, names)
    assert_close_relative(
        result.diagonal, {n: sum(g[n] ** 2 for g in per.grads) / len(per.grads) for n in names}
    )
    # Without an attention mask, B and T come from the input ids: the same numbers.
    no_mask = [{k: v for k, v in batch.items() if k != "attention_mask"} for batch in unpadded]
    assert_close_relative(estimate_fisher(model, no_mask, progress=False).diagonal, result.diagonal, tol=1e-6)
