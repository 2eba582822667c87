"""Trace, K-FAC factors and mean gradient equal brute-force per-example references.

Tiny BERT (classification) and tiny Llama (causal LM), right-padded batches, -100 labels, both
estimators. The references run one unpadded forward/backward per example with the model's own loss.
"""

from __future__ import annotations

import pytest
import torch
from fisher.fisher_testing import (
    assert_close_relative,
    brute_force_per_example,
    padded_batches,
    with_sampled_labels,
)
from tiny_models import make_tiny_bert, make_tiny_llama

from fimlora import estimate_fisher
from fimlora.errors import FimloraError
from fimlora.fisher import FisherResult
from fimlora.models import default_target_modules

SEED = 5
MODELS = {
    "bert": (
        lambda: make_tiny_bert(num_labels=3),
        lambda: padded_batches([5, 9, 3, 12, 7, 4, 8], num_labels=3),
    ),
    "llama": (make_tiny_llama, lambda: padded_batches([6, 11, 4, 9, 13, 2], batch_size=2, mask_prefix=3)),
}


@pytest.fixture(scope="module", params=[(m, e) for m in MODELS for e in ("empirical", "mc")], ids=str)
def case(request):
    """Every statistic with its gradient, and the brute-force references, for one model and estimator."""
    model_name, estimator = request.param
    make_model, make_batches = MODELS[model_name]
    model, batches = make_model(), make_batches()
    names = default_target_modules(model)
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
    return {"names": names, "results": results, "data": data, "labelled": labelled, "batches": batches}


def test_trace_matches_per_example_squared_norms(case):
    per, names = case["labelled"], case["names"]
    expected = {n: sum(float((g[n] ** 2).sum()) for g in per.grads) / len(per.grads) for n in names}
    result = case["results"]["trace"]
    assert result.diagonal is None and result.kfac is None and result.traces is not None
    assert_close_relative(result.traces, expected)
    # The exact diagonal's trace is the same number.
    assert_close_relative(case["results"]["diagonal"].module_traces(), expected)


def test_kfac_factors_match_per_token_activations_and_output_gradients(case):
    per, names = case["labelled"], case["names"]
    tokens = sum(int(b["attention_mask"].sum()) for b in case["batches"])
    expected_a = {n: sum(x[n].T @ x[n] for x in per.inputs) / tokens for n in names}
    expected_s = {n: sum(d[n].T @ d[n] for d in per.deltas) / len(per.deltas) for n in names}
    result = case["results"]["kfac"]
    assert result.kfac is not None and result.metadata["num_tokens"] == tokens
    assert_close_relative({n: a for n, (a, _) in result.kfac.items()}, expected_a)
    assert_close_relative({n: s for n, (_, s) in result.kfac.items()}, expected_s)


@pytest.mark.parametrize("statistic", ["diagonal", "trace", "kfac"])
def test_gradient_is_the_mean_data_gradient_under_either_estimator(case, statistic):
    per, names = case["data"], case["names"]
    expected = {n: sum(g[n] for g in per.grads) / len(per.grads) for n in names}
    gradients = case["results"][statistic].gradients
    assert gradients is not None
    assert_close_relative(gradients, expected)
    # G_n = Σ_t δ_t a_tᵀ: the brute-force references agree with each other.
    first = per.grads[0][names[0]]
    assert torch.allclose(per.deltas[0][names[0]].T @ per.inputs[0][names[0]], first, atol=1e-6)


def test_scores_of_every_statistic(case):
    diag, trace, kfac = (case["results"][s] for s in ("diagonal", "trace", "kfac"))
    for result in (diag, trace, kfac):
        traces, means = result.scores("trace"), result.scores("mean")
        for name, (d_out, d_in) in result.shapes.items():
            assert means[name] == pytest.approx(traces[name] / (d_out * d_in), rel=1e-12)
    assert trace.scores("trace") == trace.traces
    for name, (a, s) in kfac.kfac.items():
        # The K-FAC diagonal diag(S) diag(A)ᵀ, summed.
        approx = torch.outer(torch.diagonal(s).double(), torch.diagonal(a).double())
        assert kfac.scores("trace")[name] == pytest.approx(float(approx.sum()), rel=1e-9)
        assert kfac.scores("mean")[name] == pytest.approx(float(approx.mean()), rel=1e-9)


@pytest.mark.parametrize("statistic", ["diagonal", "trace", "kfac"])
def test_save_load_round_trip(case, statistic, tmp_path):
    result = case["results"][statistic]
    result.save(tmp_path)
    loaded = FisherResult.load(tmp_path)
    assert (loaded.statistic, loaded.estimator, loaded.num_examples) == (
        statistic,
        result.estimator,
        result.num_examples,
    )
    assert loaded.shapes == result.shapes and loaded.metadata == result.metadata
    assert loaded.traces == result.traces
    for name in result.shapes:
        assert torch.equal(loaded.gradients[name], result.gradients[name])
        if statistic == "diagonal":
            assert torch.equal(loaded.diagonal[name], result.diagonal[name])
        if statistic == "kfac":
            assert all(torch.equal(x, y) for x, y in zip(loaded.kfac[name], result.kfac[name], strict=True))
    assert loaded.scores("mean") == result.scores("mean")


def test_without_gradient_nothing_extra_is_kept(tmp_path):
    model = make_tiny_llama()
    result = estimate_fisher(model, padded_batches([5, 7], batch_size=2), statistic="trace", progress=False)
    assert result.gradients is None and result.diagonal is None and set(result.traces) == set(result.shapes)
    result.save(tmp_path)
    loaded = FisherResult.load(tmp_path)
    assert loaded.gradients is None and loaded.traces == result.traces


def test_unknown_statistic_is_a_clear_error():
    model = make_tiny_bert()
    with pytest.raises(FimloraError, match="statistic"):
        estimate_fisher(model, padded_batches([4, 5], num_labels=3), statistic="full", progress=False)


def test_a_result_holds_exactly_its_own_statistic():
    with pytest.raises(ValueError, match="exactly its own"):
        FisherResult(
            diagonal={"w": torch.ones(2, 3)}, num_examples=1, estimator="empirical", traces={"w": 1.0}
        )
    with pytest.raises(ValueError, match="shapes"):
        FisherResult(
            diagonal=None, num_examples=1, estimator="empirical", statistic="trace", traces={"w": 1.0}
        )
