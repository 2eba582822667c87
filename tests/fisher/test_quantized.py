"""The Fisher of a quantised (NF4, int8) base equals the brute-force Fisher of its dequantised weights.

The hooks need only each layer's input and output gradient, so the pass runs on the quantised model as
it is. The reference is the per-example autograd loop on a float32 copy of the model whose target
weights are the dequantised ones. NF4 computes in float32 on dequantised blocks: equal to round-off.
LLM.int8() in eval mode also rounds each token's activations to int8 (outlier columns aside), so there
the statistics agree only up to that rounding (measured: ≤ 4 % relative on these batches, the logits
1 %); the tolerance says so.
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
from tiny_models import make_tiny_llama
from transformers import AutoModelForCausalLM

from fimlora import estimate_fisher
from fimlora.models import default_target_modules, linear_modules
from fimlora.quantization import bnb_config, dequantized_weight, is_quantized_linear, prepare_quantized_model

pytest.importorskip("bitsandbytes")

SEED = 5
TOLERANCE = {"nf4": 1e-5, "int8": 0.1}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama-vocab60")
    make_tiny_llama().save_pretrained(directory)
    return directory


def _quantised_and_dequantised(directory, kind):
    quantised = AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=bnb_config(kind, ["lm_head"]), dtype=torch.float32
    )
    quantised = prepare_quantized_model(quantised).eval()
    names = default_target_modules(quantised)
    dequantised = make_tiny_llama()
    q_linears, f_linears = linear_modules(quantised), linear_modules(dequantised)
    assert all(is_quantized_linear(q_linears[n]) for n in names)
    with torch.no_grad():
        for name in names:
            f_linears[name].weight.copy_(dequantized_weight(q_linears[name]))
    return quantised, dequantised, names


@pytest.fixture(scope="module", params=[("nf4", "empirical"), ("nf4", "mc"), ("int8", "empirical")], ids=str)
def case(request, llama_dir):
    kind, estimator = request.param
    quantised, dequantised, names = _quantised_and_dequantised(llama_dir, kind)
    batches = padded_batches([6, 11, 4, 9, 13, 2], batch_size=2, mask_prefix=3)
    results = {
        statistic: estimate_fisher(
            quantised,
            batches,
            estimator=estimator,
            statistic=statistic,
            with_gradient=True,
            seed=SEED,
            progress=False,
        )
        for statistic in ("diagonal", "trace", "kfac")
    }
    labelled = batches if estimator == "empirical" else with_sampled_labels(quantised, batches, SEED)
    return {
        "kind": kind,
        "names": names,
        "results": results,
        "data": brute_force_per_example(dequantised, batches, names),
        "labelled": brute_force_per_example(dequantised, labelled, names),
        "batches": batches,
        "quantised": quantised,
    }


def test_the_quantised_model_stays_quantised(case):
    """No float32 weight was attached to the model: its targets still hold packed 4-bit / int8 codes."""
    linears = linear_modules(case["quantised"])
    dtypes = {linears[n].weight.dtype for n in case["names"]}
    assert dtypes == ({torch.uint8} if case["kind"] == "nf4" else {torch.int8})


def test_diagonal_and_trace_match_the_dequantised_brute_force(case):
    per, names, tol = case["labelled"], case["names"], TOLERANCE[case["kind"]]
    expected = {n: sum(g[n] ** 2 for g in per.grads) / len(per.grads) for n in names}
    assert_close_relative(case["results"]["diagonal"].diagonal, expected, tol=tol)
    traces = {n: sum(float((g[n] ** 2).sum()) for g in per.grads) / len(per.grads) for n in names}
    assert_close_relative(case["results"]["trace"].traces, traces, tol=tol)


def test_kfac_factors_match_the_dequantised_brute_force(case):
    per, names, tol = case["labelled"], case["names"], TOLERANCE[case["kind"]]
    tokens = sum(int(b["attention_mask"].sum()) for b in case["batches"])
    expected_a = {n: sum(x[n].T @ x[n] for x in per.inputs) / tokens for n in names}
    expected_s = {n: sum(d[n].T @ d[n] for d in per.deltas) / len(per.deltas) for n in names}
    kfac = case["results"]["kfac"].kfac
    assert_close_relative({n: a for n, (a, _) in kfac.items()}, expected_a, tol=tol)
    assert_close_relative({n: s for n, (_, s) in kfac.items()}, expected_s, tol=tol)


def test_mean_gradient_matches_the_dequantised_brute_force(case):
    """Ḡ always uses the data's labels, whatever the estimator."""
    per, names, tol = case["data"], case["names"], TOLERANCE[case["kind"]]
    expected = {n: sum(g[n] for g in per.grads) / len(per.grads) for n in names}
    for statistic in ("diagonal", "trace", "kfac"):
        assert_close_relative(case["results"][statistic].gradients, expected, tol=tol)


def test_nf4_fisher_is_that_of_the_dequantised_not_the_original_weights(llama_dir):
    """The reference above is sharp: the original float32 weights give a measurably different Fisher."""
    quantised, _, names = _quantised_and_dequantised(llama_dir, "nf4")
    batches = padded_batches([6, 11, 4, 9], batch_size=2)
    result = estimate_fisher(quantised, batches, progress=False)
    original = estimate_fisher(make_tiny_llama(), batches, progress=False)
    errors = [
        float((result.diagonal[n] - original.diagonal[n]).norm() / original.diagonal[n].norm()) for n in names
    ]
    assert max(errors) > 100 * TOLERANCE["nf4"]


def test_the_training_loss_gradient_of_a_quantised_base_is_that_of_its_dequantised_weights(case):
    """LoRA-GA's and GoRA's Ḡ (``methods.gradients``): from hooks on a quantised base, whose packed weight
    cannot require a gradient; from autograd on the float32 model holding the dequantised weights."""
    from fimlora.methods.gradients import training_loss_gradient

    names, tol = case["names"], TOLERANCE[case["kind"]]
    hooks = training_loss_gradient(case["quantised"], case["batches"], names)
    dequantised, _ = _quantised_and_dequantised_float(case)
    reference = training_loss_gradient(dequantised, case["batches"], names)
    assert_close_relative(hooks, reference, tol=tol)
    assert all(not p.requires_grad for p in case["quantised"].parameters())


def _quantised_and_dequantised_float(case):
    """The float32 model holding the case's dequantised weights (built again: the brute force used it)."""
    dequantised = make_tiny_llama()
    q_linears, f_linears = linear_modules(case["quantised"]), linear_modules(dequantised)
    with torch.no_grad():
        for name in case["names"]:
            f_linears[name].weight.copy_(dequantized_weight(q_linears[name]))
    return dequantised.eval(), case["names"]
