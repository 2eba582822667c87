"""Every method runs, at the same budget, and reloads to the logits it trained; one defining test each."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import pytest
import torch
from method_runs import BUDGET_RANK, SELF_CONTAINED_PRESETS, tiny_config
from peft import PeftModel, get_peft_model
from peft.optimizers import create_riemannian_optimizer

from fimlora.config import parse_config
from fimlora.errors import FimloraError
from fimlora.experiment import build_method, calibrate, prepare, run_method
from fimlora.methods import PRESETS, get_adapter, get_allocation, resolve_method
from fimlora.methods.base import NEEDS_DIAGONAL, NEEDS_GRADIENTS, NEEDS_KFAC
from fimlora.models import load_model
from fimlora.runs import RunDirectory


def _config(model_dir, dataset, out, methods, **extra):
    """method_runs' tiny config trained 6 steps, AdaLoRA pruning from 20 % to 70 % of them."""
    train = tiny_config(model_dir, dataset, out, methods).train.model_dump(mode="json")
    options = {
        "adalora": {"tinit_ratio": 0.2, "tfinal_ratio": 0.3},
        "delta_lora": {"warmup_ratio": 0.3},
        "hydralora": {"num_heads": 2},
    }
    extra = {"train": {**train, "steps": 6}, "method_options": options, **extra}
    return tiny_config(model_dir, dataset, out, methods, **extra)


@pytest.fixture(scope="module")
def prepared(tiny_bert_dir, sentiment_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("methods")
    prepared = prepare(_config(tiny_bert_dir, sentiment_csv, out, SELF_CONTAINED_PRESETS))
    calibrate(prepared, {NEEDS_DIAGONAL, NEEDS_GRADIENTS, NEEDS_KFAC}, progress=False, log=lambda _: None)
    return prepared


def _run(prepared, name):
    out = Path(prepared.config.output_dir)
    return run_method(prepared, name, RunDirectory(out / name), progress=False)


def _inputs(prepared):
    batch = prepared.collator([prepared.tokenized["test"][i] for i in range(6)])
    return {k: v for k, v in batch.items() if k != "labels"}


def _fresh_base(prepared):
    # A different seed, so the task head starts different: the saved adapter must restore it.
    torch.manual_seed(1234)
    return load_model(prepared.config.model, "classification", num_labels=2).model


@pytest.fixture(scope="module")
def outcomes(prepared):
    return {name: _run(prepared, name) for name in SELF_CONTAINED_PRESETS}


def test_every_preset_resolves_to_real_components():
    for name, spec in PRESETS.items():
        assert resolve_method(name) == spec
        assert spec.description
        assert get_allocation(spec.allocation).name == spec.allocation
        assert get_adapter(spec.adapter).name == spec.adapter


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "x", "allocation": "adalora", "adapter": "dora"}, "only works with adapter"),
        ({"name": "x", "allocation": "fisher", "adapter": "vera"}, "VeRA shares one rank"),
        ({"name": "x", "allocation": "fisher", "adapter": "full"}, "takes no rank allocation"),
        ({"name": "x", "adapter": "hydralora", "optimizer": "lora-fa"}, "cannot train adapter"),
        ({"name": "x", "allocation": "adalora", "optimizer": "loraplus"}, "trains only with"),
        ({"name": "x", "adapter": "qlora"}, "unknown adapter 'qlora'"),
        ("fim-lora-v2", "Unknown method"),
    ],
)
def test_invalid_combinations_fail_when_the_config_is_read(entry, message, tmp_path):
    with pytest.raises(FimloraError, match=message):
        parse_config({"model": "minilm", "dataset": "movie-reviews", "methods": ["lora", entry]})


def test_method_names_must_be_unique():
    with pytest.raises(FimloraError, match="must not repeat"):
        parse_config({"model": "minilm", "dataset": "x.csv", "methods": ["lora", {"name": "lora"}]})


def test_a_custom_combination_needs_no_code(prepared):
    data = prepared.config.model_dump(mode="json", by_alias=True)
    data["methods"] = [{"name": "fim-dora", "allocation": "fisher", "adapter": "dora"}]
    config = parse_config(data)
    built = build_method(_with_config(prepared, config), "fim-dora")
    assert built.allocation is not None and built.allocation.strategy == "proportional"
    assert any("lora_magnitude_vector" in n for n, _ in built.model.named_parameters())


def _with_config(prepared, config):
    clone = copy.copy(prepared)
    clone.config = config
    return clone


def _max_rank_cost(prepared):
    return max(d_in + d_out for d_out, d_in in prepared.shapes.values())


def test_budget_parity_across_every_allocation(prepared, outcomes):
    """Same targets: every budget-matched method trains at most the budget, within one module-rank."""
    budget = prepared.budget
    uniform = outcomes["lora"].result["effective_adapter_params"]
    assert uniform == budget  # uniform rank 2 on every module is exactly the budget
    heads = {o.result["head_params"] for o in outcomes.values()}
    assert len(heads) == 1 and heads.pop() > 0  # the task head is identical and counted apart
    for name, outcome in outcomes.items():
        result = outcome.result
        if not result["budget_matched"]:
            continue
        params = result["effective_adapter_params"]
        assert params <= budget, name
        assert abs(params - uniform) < _max_rank_cost(prepared) + 1, name


def test_unmatched_methods_record_their_own_size(prepared, outcomes):
    vera = outcomes["vera"].result
    assert not vera["budget_matched"] and 0 < vera["adapter_params"] < prepared.budget
    full = outcomes["full-ft"].result
    total = sum(p.numel() for p in prepared.loaded.model.parameters())
    assert full["adapter_params"] + full["head_params"] == total


@pytest.mark.parametrize("name", SELF_CONTAINED_PRESETS)
def test_saved_method_reloads_into_a_fresh_base_model_with_the_trained_logits(prepared, outcomes, name):
    outcome = outcomes[name]
    run = Path(prepared.config.output_dir) / name
    inputs = _inputs(prepared)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # e.g. PEFT's false alarm on AdaLoRA's lora_E masks
        trained = outcome.model.eval()(**inputs).logits
        reloaded = get_adapter(resolve_method(name).adapter).load(_fresh_base(prepared), run / "adapter")
        again = reloaded(**inputs).logits
    if name in ("pissa", "olora", "lora-ga"):
        # PEFT converts these to a plain LoRA of rank 2r on the unmodified base: equal up to round-off.
        torch.testing.assert_close(again, trained, rtol=1e-5, atol=1e-5)
    elif name == "adalora":
        # PEFT reloads AdaLoRA with the pruned triplets removed, not masked: a shorter sum, same function.
        torch.testing.assert_close(again, trained, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(again, trained), name


def test_plain_peft_loads_every_peft_native_adapter(prepared, outcomes):
    inputs = _inputs(prepared)
    for name in ("lora", "fim-lora", "gora-score", "dora", "rslora", "loraplus", "eva", "adalora"):
        adapter_dir = Path(prepared.config.output_dir) / name / "adapter"
        with torch.no_grad():
            model = PeftModel.from_pretrained(_fresh_base(prepared), str(adapter_dir)).eval()
            again, trained = model(**inputs).logits, outcomes[name].model(**inputs).logits
        if name == "adalora":  # pruned triplets removed on reload (see above): equal up to round-off
            torch.testing.assert_close(again, trained, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(again, trained), name


def test_adalora_prunes_every_step_down_to_the_parameter_budget(prepared, outcomes):
    record = outcomes["adalora"].result["records"]["adalora"]
    steps = prepared.config.train.steps
    assert record["update_and_allocate_calls"] == steps
    n = len(prepared.targets)
    assert record["init_r"] == math.ceil(1.5 * BUDGET_RANK)
    assert record["peak_params"] == sum(
        record["init_r"] * (d_in + d_out + 1) for d_out, d_in in prepared.shapes.values()
    )
    ranks = record["final_ranks"]
    assert len(ranks) == n and sum(ranks.values()) < record["init_r"] * n
    assert record["final_params"] <= prepared.budget < record["peak_params"]
    assert outcomes["adalora"].result["effective_adapter_params"] == record["final_params"]
    # The rank pattern over training, for the report: init_r everywhere, then one snapshot per step (6
    # steps < 50 points), ending at the kept triplets.
    history = record["rank_history"]
    assert history[0] == {"step": 0, "ranks": dict.fromkeys(ranks, record["init_r"])}
    assert [h["step"] for h in history] == list(range(steps + 1))
    assert history[-1]["ranks"] == ranks
    assert any(set(h["ranks"].values()) != {record["init_r"]} for h in history[1:-1])


def test_adalora_with_peft_rank_budget_keeps_exactly_target_r_per_module_on_average(prepared):
    data = prepared.config.model_dump(mode="json", by_alias=True)
    data["method_options"]["adalora"]["budget_unit"] = "ranks"
    config = parse_config(data)
    outcome = run_method(
        _with_config(prepared, config), "adalora", RunDirectory(Path(config.output_dir) / "adalora-ranks"),
        progress=False,
    )  # fmt: skip
    ranks = outcome.result["records"]["adalora"]["final_ranks"]
    assert sum(ranks.values()) == BUDGET_RANK * len(prepared.targets)


def test_adalora_ends_within_the_budget_even_when_the_final_phase_rounds_to_zero_steps(prepared):
    data = prepared.config.model_dump(mode="json", by_alias=True)
    data["train"]["steps"] = 3  # tfinal_ratio 0.3 × 3 steps rounds to 0 final steps
    config = parse_config(data)
    outcome = run_method(
        _with_config(prepared, config), "adalora", RunDirectory(Path(config.output_dir) / "adalora-short"),
        progress=False,
    )  # fmt: skip
    assert outcome.result["records"]["adalora"]["final_params"] <= prepared.budget
    data["train"]["steps"] = 1
    with pytest.raises(FimloraError, match=r"AdaLoRA needs train\.steps > tinit \+ tfinal"):
        build_method(_with_config(prepared, parse_config(data)), "adalora")


def test_eva_really_initialises_a_from_the_data_and_records_ranks(prepared):
    eva = build_method(prepared, "eva")
    lora = build_method(prepared, "lora")
    eva_a = {n: p for n, p in eva.model.named_parameters() if ".lora_A." in n}
    lora_a = dict(lora.model.named_parameters())
    changed = [n for n, p in eva_a.items() if p.shape != lora_a[n].shape or not torch.equal(p, lora_a[n])]
    assert len(changed) == len(eva_a) > 0
    record = eva.ctx.record["eva"]
    assert record["initialized"] and set(record["redistributed_ranks"]) == set(prepared.targets)
    # EVA's A rows are orthonormal right singular vectors of the layer inputs.
    a = next(iter(eva_a.values())).detach()
    torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["pissa", "olora", "lora-ga"])
def test_weight_rewriting_inits_start_at_the_base_models_function(prepared, name):
    built = build_method(prepared, name)
    inputs = _inputs(prepared)
    with torch.no_grad():
        base = copy.deepcopy(prepared.loaded.model).eval()(**inputs).logits
        adapted = built.model.eval()(**inputs).logits
    torch.testing.assert_close(adapted, base, rtol=1e-4, atol=1e-4)
    # ...and, unlike LoRA's B = 0, both factors carry the init.
    b = [p for n, p in built.model.named_parameters() if ".lora_B." in n]
    assert all(p.abs().sum() > 0 for p in b)


def test_dora_trains_a_magnitude_vector_per_output_feature(prepared):
    built = build_method(prepared, "dora")
    magnitudes = {
        n.split(".lora_magnitude_vector")[0].removeprefix("base_model.model."): p
        for n, p in built.model.named_parameters()
        if "lora_magnitude_vector" in n
    }
    assert set(magnitudes) == set(prepared.targets)
    for name, p in magnitudes.items():
        assert p.requires_grad and p.shape == (prepared.shapes[name][0],)


def test_rslora_scales_by_alpha_over_sqrt_r(prepared):
    built = build_method(prepared, "rslora")
    alpha = prepared.config.lora_alpha
    for name, module in built.model.named_modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict) and "default" in module.scaling:
            r = module.r["default"]
            assert module.scaling["default"] == pytest.approx(alpha / math.sqrt(r)), name


def test_vera_trains_only_its_scaling_vectors(prepared, outcomes):
    model = outcomes["vera"].model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    adapter = [n for n in trainable if "modules_to_save" not in n]
    assert adapter and all("vera_lambda_b" in n or "vera_lambda_d" in n for n in adapter)
    rank = outcomes["vera"].result["records"]["vera"]["rank"]
    expected = sum(rank + d_out for d_out, _ in prepared.shapes.values())
    assert outcomes["vera"].result["adapter_params"] == expected


def test_loraplus_param_groups_have_the_ratio_and_the_users_weight_decay(prepared):
    built = build_method(prepared, "loraplus")
    optimizer = built.optimizer_kind.build(built.model, built.ctx)
    names = {id(p): n for n, p in built.model.named_parameters()}
    lr = prepared.config.train.learning_rate
    ratio = prepared.config.method_options.loraplus.lr_ratio
    seen = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            seen.add(name)
            expected_lr = lr * ratio if "lora_B" in name else lr
            assert group["lr"] == pytest.approx(expected_lr), name
            if "lora_A" in name:
                assert group["weight_decay"] == prepared.config.train.weight_decay
    assert seen == {n for n, p in built.model.named_parameters() if p.requires_grad}


def test_lora_fa_never_changes_a(prepared, outcomes):
    start = build_method(prepared, "lora-fa").model
    initial = {n: p.detach().clone() for n, p in start.named_parameters() if ".lora_A." in n}
    trained = dict(outcomes["lora-fa"].model.named_parameters())
    assert initial and all(torch.equal(trained[n], a) for n, a in initial.items())
    b_moved = [n for n, p in trained.items() if ".lora_B." in n and p.abs().sum() > 0]
    assert b_moved


def test_riemannian_sgd_step_matches_the_closed_form():
    from peft import LoraConfig

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(6, 5))
    config = LoraConfig(r=3, lora_alpha=3, target_modules=["0"], init_lora_weights=False)
    model = get_peft_model(layer, config)
    a_param = model.base_model.model[0].lora_A["default"].weight
    b_param = model.base_model.model[0].lora_B["default"].weight
    lr, reg = 0.1, 0.05
    optimizer = create_riemannian_optimizer(model, torch.optim.SGD, lr=lr, reg=reg)
    x = torch.randn(7, 6)
    loss = model(x).pow(2).sum()
    loss.backward()
    a, b = a_param.detach().clone(), b_param.detach().clone()
    ga, gb = a_param.grad.clone(), b_param.grad.clone()
    eye = torch.eye(3)
    expected_a = a - lr * torch.linalg.inv(b.T @ b + reg * eye) @ ga
    expected_b = b - lr * gb @ torch.linalg.inv(a @ a.T + reg * eye)
    optimizer.step()
    torch.testing.assert_close(a_param.detach(), expected_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b_param.detach(), expected_b, rtol=1e-5, atol=1e-6)


def test_riemannian_method_builds_the_preconditioned_optimizer(prepared):
    built = build_method(prepared, "riemannian")
    optimizer = built.optimizer_kind.build(built.model, built.ctx)
    assert type(optimizer).__name__ == "RiemannianPreconditionedOptimizer"
    assert isinstance(optimizer, torch.optim.AdamW)


def test_full_fine_tuning_trains_every_weight_at_a_scaled_rate(prepared, outcomes):
    model = outcomes["full-ft"].model
    assert all(p.requires_grad for p in model.parameters())
    result = outcomes["full-ft"].result
    assert result["learning_rate"] == pytest.approx(prepared.config.train.learning_rate * 0.1)


def test_gora_score_scores_are_mean_abs_weight_times_gradient(prepared):
    built = build_method(prepared, "gora-score")
    assert NEEDS_GRADIENTS in built.rule.needs
    modules = dict(prepared.loaded.model.named_modules())
    for name, score in built.allocation.scores.items():
        weight = modules[name].weight.detach().double()
        expected = (weight * prepared.fisher.gradients[name].double()).abs().mean()
        assert score == pytest.approx(float(expected), rel=1e-9)
