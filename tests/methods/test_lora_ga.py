"""LoRA-GA: the gradient is the brute-force mean gradient with dropout off; A, B are its singular vectors."""

from __future__ import annotations

import pytest
import torch
from method_runs import (
    brute_force_mean_gradient,
    lora_factors,
    prepared_experiment,
    tiny_config,
    with_options,
)

from fimlora.allocation import uniform_rank_budget
from fimlora.errors import FimloraError
from fimlora.experiment import build_method, method_context
from fimlora.methods import resolve_method

GAMMA = 16.0


@pytest.fixture(scope="module")
def prepared(tiny_bert_dir, sentiment_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-ga")
    return prepared_experiment(tiny_config(tiny_bert_dir, sentiment_csv, out, ["lora-ga", "pissa"]))


@pytest.fixture(scope="module")
def brute(prepared):
    return brute_force_mean_gradient(prepared, prepared.targets)


def test_the_model_has_dropout_so_train_mode_would_change_the_gradient(prepared):
    assert prepared.loaded.model.config.hidden_dropout_prob > 0


def test_the_gradient_is_the_brute_force_mean_gradient_with_dropout_off(prepared, brute):
    from fimlora.methods.gradients import training_loss_gradient

    ctx = method_context(prepared, resolve_method("lora-ga"))
    model = prepared.loaded.model
    was_training = model.training
    model.train()  # the pass must switch dropout off itself
    try:
        gradients = training_loss_gradient(model, ctx.calibration_batches(), ctx.targets)
        assert model.training  # restored
    finally:
        model.train(was_training)
    for name in prepared.targets:
        torch.testing.assert_close(gradients[name].double(), brute[name], rtol=1e-5, atol=1e-7)
    # Nothing is left behind on the shared base model.
    assert all(p.grad is None for p in model.parameters())


def _svd(gradient):
    return torch.linalg.svd(gradient, full_matrices=False)


def _defined(sigma, k):
    """Whether singular vector k is well defined: above round-off and apart from its neighbours.

    The classification gradient of the tiny BERT's last layer has rank 2-4 (only the first token's path
    reaches the head): its other singular vectors are round-off, any orthonormal completion is right.
    """
    gap = 0.05
    above = sigma[k] > 1e-4 * sigma[0]
    before = k == 0 or sigma[k - 1] - sigma[k] > gap * sigma[k - 1]
    after = k + 1 == len(sigma) or sigma[k] - sigma[k + 1] > gap * sigma[k]
    return bool(above and before and after)


def _same_up_to_sign(x, y, tol):
    return min(float((x - y).norm()), float((x + y).norm())) <= tol


def test_official_init_takes_the_gradients_singular_vectors_scaled_by_d_out_to_the_quarter(prepared, brute):
    built = build_method(prepared, "lora-ga")
    factors = lora_factors(built.model)
    base = dict(prepared.loaded.model.named_modules())
    assert set(factors) == set(prepared.targets)
    checked = 0
    for name, f in factors.items():
        a, b, s = f["A"], f["B"], f["s"]
        r, d_out = a.shape[0], b.shape[0]
        u, sigma, vh = _svd(brute[name])
        scale = d_out**0.25 / GAMMA**0.5
        for k in range(r):
            # A's row k is ±scale × Ḡ's k-th right-singular vector (PiSSA's would be W's).
            if _defined(sigma, k):
                assert _same_up_to_sign(a[k], scale * vh[k], 1e-3 * scale), (name, k)
                checked += 1
            # B's column k is ±scale × the (r+k)-th left-singular vector, without its singular value
            # (PEFT's U·diag(S) variant has norm σ_{r+k}·scale).
            if _defined(sigma, r + k):
                assert _same_up_to_sign(b[:, k], scale * u[:, r + k], 1e-3 * scale), (name, r + k)
                checked += 1
            assert float(a[k].norm()) == pytest.approx(scale, rel=1e-5)
            assert float(b[:, k].norm()) == pytest.approx(scale, rel=1e-5)
        # W keeps the residual, so the adapted model starts at the base model's function.
        w0 = base[name].weight.detach().double()
        torch.testing.assert_close(f["W"], w0 - s * b @ a, atol=1e-6, rtol=0)
    assert checked >= 40  # of 96 factor vectors; the rest belong to round-off singular values
    assert built.ctx.record["lora_ga"]["variant"] == "official"


def test_peft_variant_scales_b_by_the_singular_values_of_the_true_mean_gradient(prepared, brute):
    variant = with_options(prepared, method_options={"lora_ga": {"variant": "peft"}})
    built = build_method(variant, "lora-ga")
    checked = 0
    for name, f in lora_factors(built.model).items():
        a, b = f["A"], f["B"]
        r, d_out = a.shape[0], b.shape[0]
        u, sigma, vh = _svd(brute[name])
        scale = d_out**0.25 / GAMMA**0.5
        for k in range(r):
            if _defined(sigma, k):
                assert _same_up_to_sign(a[k], vh[k], 1e-3), (name, k)
            # B's scale is that of the mean gradient itself: a gradient divided by the number of batches,
            # or taken with dropout on, has other singular values.
            if _defined(sigma, r + k):
                expected = scale * sigma[r + k] * u[:, r + k]
                assert _same_up_to_sign(b[:, k], expected, 1e-3 * float(expected.norm())), (name, r + k)
                checked += 1
    assert checked >= 20
    assert built.ctx.record["lora_ga"]["variant"] == "peft"


def test_official_and_peft_variants_differ_and_pissa_is_not_lora_ga(prepared, brute):
    official = lora_factors(build_method(prepared, "lora-ga").model)
    peft_variant = with_options(prepared, method_options={"lora_ga": {"variant": "peft"}})
    peft = lora_factors(build_method(peft_variant, "lora-ga").model)
    pissa = lora_factors(build_method(prepared, "pissa").model)
    name = "bert.encoder.layer.0.intermediate.dense"  # a full-rank gradient
    r = official[name]["A"].shape[0]
    _, sigma, vh = _svd(brute[name])
    assert all(_defined(sigma, k) for k in range(r))
    assert not torch.allclose(official[name]["B"].abs(), peft[name]["B"].abs(), atol=1e-3)
    # PiSSA's A spans W's top singular directions, not the gradient's.
    rows = pissa[name]["A"] / pissa[name]["A"].norm(dim=1, keepdim=True)
    assert not all(_same_up_to_sign(rows[k], vh[k], 1e-2) for k in range(r))


def test_a_rank_above_half_the_layer_width_is_refused(prepared):
    wide = with_options(prepared, budget={"uniform_rank": 9})  # 2r = 18 > 16 singular vectors
    wide.budget = uniform_rank_budget(prepared.shapes, 9)
    with pytest.raises(FimloraError, match="LoRA-GA takes 2r = 18 singular vectors"):
        build_method(wide, "lora-ga")
