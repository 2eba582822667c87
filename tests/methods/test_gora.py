"""GoRA: parameters (not ranks) in proportion to normalised mean |W ⊙ Ḡ|; B₀ from Ḡ through A's
pseudo-inverse; W untouched; a plain PEFT adapter on save. gora-score keeps the old rule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from method_runs import brute_force_mean_gradient, lora_factors, prepared_experiment, tiny_config
from peft import PeftModel

from fimlora.allocation import allocate_ranks
from fimlora.experiment import build_method, run_method
from fimlora.methods.base import NEEDS_GRADIENTS
from fimlora.models import load_model
from fimlora.runs import RunDirectory

GAMMA = 0.05  # method_options.gora.init_lr's default (the official scripts' --gora-lr)


@pytest.fixture(scope="module")
def prepared(tiny_bert_dir, sentiment_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("gora")
    config = tiny_config(tiny_bert_dir, sentiment_csv, out, ["gora", "gora-score", "lora"])
    return prepared_experiment(config, {NEEDS_GRADIENTS})  # gora-score's Ḡ comes from the Fisher pass


@pytest.fixture(scope="module")
def brute(prepared):
    return brute_force_mean_gradient(prepared, prepared.targets)


def _importance(prepared, brute):
    modules = dict(prepared.loaded.model.named_modules())
    return {n: float((modules[n].weight.detach().double() * brute[n]).abs().mean()) for n in prepared.targets}


def test_equal_importance_buys_equal_parameters_not_equal_ranks():
    """Two modules of equal importance, one three times as costly per rank: GoRA gives them the same
    parameters (ranks 8 and 2 of 256 each), our proportional allocator (gora-score) the same ranks."""
    from fimlora.methods.allocations.gora import gora_ranks

    shapes = {"narrow": (16, 16), "wide": (80, 16)}
    costs = {"narrow": 32, "wide": 96}
    importance = {"narrow": 1.0, "wide": 1.0}
    ranks, gora = gora_ranks(importance, costs, {"narrow": 16, "wide": 16}, budget=512, r_lo=1)
    assert gora == {"narrow": 256 // 32, "wide": 256 // 96}
    assert sum(ranks[n] * costs[n] for n in ranks) <= 512
    assert 512 - sum(ranks[n] * costs[n] for n in ranks) < min(costs.values())
    score_rule = allocate_ranks(importance, shapes, budget=512, strategy="proportional")
    assert score_rule.ranks == {"narrow": 4, "wide": 4}
    assert score_rule.ranks != gora


def test_over_budget_after_the_clamp_ranks_come_off_the_module_furthest_above_its_target():
    from fimlora.methods.allocations.gora import gora_ranks

    costs = dict.fromkeys("abcd", 10)
    importance = {"a": 97.0, "b": 1.0, "c": 1.0, "d": 1.0}
    # a: round(60 · 0.97) // 10 = 5; b, c, d: round(0.6) // 10 = 0, clamped to 1: 80 > 60 parameters.
    ranks, gora = gora_ranks(importance, costs, dict.fromkeys("abcd", 16), budget=60, r_lo=1)
    assert gora == {"a": 5, "b": 1, "c": 1, "d": 1}
    assert sum(ranks.values()) * 10 <= 60
    assert ranks == {"a": 3, "b": 1, "c": 1, "d": 1}


def test_allocation_follows_gora_formula_on_the_brute_force_gradient(prepared, brute):
    from fimlora.methods.allocations.gora import gora_ranks

    built = build_method(prepared, "gora")
    importance = _importance(prepared, brute)
    for name, value in built.allocation.scores.items():
        assert value == pytest.approx(importance[name], rel=1e-5)
    budget, reference = prepared.budget, prepared.config.budget.reference_rank
    total = sum(importance.values())
    r_lo, r_hi = max(1, math.floor(0.5 * reference)), math.floor(4 * reference)
    expected = {}
    for name, (d_out, d_in) in prepared.shapes.items():
        rank = round(budget * importance[name] / total) // (d_in + d_out)
        expected[name] = min(max(rank, r_lo), min(r_hi, d_in, d_out))
    record = built.ctx.record["gora_allocation"]
    assert record["gora_ranks"] == expected
    costs = {n: d_in + d_out for n, (d_out, d_in) in prepared.shapes.items()}
    caps = {n: min(r_hi, *prepared.shapes[n]) for n in costs}
    assert built.allocation.ranks == gora_ranks(importance, costs, caps, budget=budget, r_lo=r_lo)[0]
    assert built.counts["adapter_params"] == built.allocation.num_params <= budget
    # Not the control's rule: gora-score makes ranks, not parameters, proportional to the score.
    assert build_method(prepared, "gora-score").allocation.ranks != built.allocation.ranks


def test_b_is_a_compressed_gradient_descent_step_and_w_is_untouched(prepared, brute):
    built = build_method(prepared, "gora")
    base = dict(prepared.loaded.model.named_modules())
    alpha = prepared.config.lora_alpha
    for name, f in lora_factors(built.model).items():
        a, b, s = f["A"], f["B"], f["s"]
        r, d_in = a.shape
        assert s == pytest.approx(alpha / math.sqrt(r))  # rank-stabilised, each module's own rank
        expected = -GAMMA * math.sqrt(d_in / r) * brute[name] @ torch.linalg.pinv(a) @ a
        torch.testing.assert_close(s * b @ a, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
        assert float(b.abs().max()) > 0
        assert torch.equal(f["W"], base[name].weight.detach().double())
    assert built.ctx.record["gora_init"]["init_lr"] == GAMMA


def test_saved_adapter_is_plain_peft_and_reloads_the_trained_model(prepared):
    out = Path(prepared.config.output_dir)
    outcome = run_method(prepared, "gora", RunDirectory(out / "gora"), progress=False)
    ranks = outcome.result["records"]["gora_allocation"]["ranks"]
    spent = sum(r * sum(prepared.shapes[n]) for n, r in ranks.items())
    assert outcome.result["adapter_params"] == spent <= prepared.budget
    assert outcome.result["records"]["gora_init"]["base_weights"] == "unchanged"
    batch = prepared.collator([prepared.tokenized["test"][i] for i in range(6)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    torch.manual_seed(1234)  # another head init: the adapter must restore the trained head
    fresh = load_model(prepared.config.model, "classification", num_labels=2).model
    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(fresh, str(out / "gora" / "adapter")).eval()
        assert torch.equal(reloaded(**inputs).logits, outcome.model.eval()(**inputs).logits)
