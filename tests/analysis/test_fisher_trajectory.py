"""The Fisher over training: snapshots through the adapted model (brute force per example), training left
unchanged, the comparisons with init and hindsight, the CLI and the report section."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from method_runs import calibration_examples, tiny_config
from safetensors.torch import load_file

from fimlora.analysis.fisher_trajectory import (
    JSON_FILE,
    RUN_DIR,
    VERSUS_HINDSIGHT,
    VERSUS_INIT,
    fisher_trajectory,
    load_fisher_trajectory,
    snapshot_steps,
)
from fimlora.cli import main
from fimlora.errors import FimloraError
from fimlora.experiment import prepare, run_experiment, run_method
from fimlora.runs import RunDirectory

STEPS = 4


def _config(tiny_bert_dir, reviews_csv, out, methods=("lora",), **extra):
    train = {"steps": STEPS, "batch_size": 8, "learning_rate": 5e-2, "max_length": 16, "report_to": []}
    return tiny_config(
        tiny_bert_dir, reviews_csv, out, list(methods), train={**train, **extra.pop("train", {})}, **extra
    )


@pytest.fixture(scope="module")
def traced(tiny_bert_dir, reviews_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("trajectory")
    prepared = prepare(_config(tiny_bert_dir, reviews_csv, out / "runs"))
    result = fisher_trajectory(prepared, out / "analysis")
    return prepared, result, out / "analysis"


def _brute_force_trace(model, prepared, targets):
    """(1/N) Σ_n ‖∂ℓ_n/∂W‖² per target, one example at a time, W the frozen weight inside the model."""
    model = model.eval()
    modules = dict(model.named_modules())
    weights = {}
    for name in targets:
        module = modules.get(f"base_model.model.{name}.base_layer") or modules[name]
        weights[name] = module.weight
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    sums = dict.fromkeys(targets, 0.0)
    examples = calibration_examples(prepared)
    try:
        for batch in examples:
            loss = model(**batch).loss
            grads = torch.autograd.grad(loss, list(weights.values()))
            for name, grad in zip(weights, grads, strict=True):
                sums[name] += float(grad.double().square().sum())
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    return {n: s / len(examples) for n, s in sums.items()}


def test_snapshot_steps():
    assert snapshot_steps((0, 0.1, 0.5, 1), 100) == [0, 10, 50, 100]
    assert snapshot_steps((0, 0.1, 0.5, 1), 4) == [0, 2, 4]  # 10 % of 4 steps rounds to step 0
    for bad, message in (((0.1, 1.0), "must include 0"), ((0, 1.5), r"\[0, 1\]"), ((0,), "one snapshot")):
        with pytest.raises(FimloraError, match=message):
            snapshot_steps(bad, 10)


def test_the_snapshots_are_the_fisher_through_the_adapter_trained_so_far(traced):
    prepared, result, out = traced
    assert sorted(result.snapshots) == [0, 2, STEPS]
    base = _brute_force_trace(prepared.loaded.model, prepared, prepared.targets)
    init = result.snapshots[0]["trace"]
    assert init == pytest.approx(base, rel=1e-4)
    # The last snapshot is the Fisher of W through the trained model (B ≠ 0), not through the base.
    from fimlora.deploy import load_run

    trained = load_run(out / RUN_DIR / "lora").model
    final = result.snapshots[STEPS]["trace"]
    assert final == pytest.approx(_brute_force_trace(trained, prepared, prepared.targets), rel=1e-4)
    assert final != pytest.approx(init, rel=1e-2)
    shapes = prepared.shapes
    assert result.snapshots[STEPS]["mean"] == pytest.approx(
        {n: v / (shapes[n][0] * shapes[n][1]) for n, v in final.items()}
    )


def test_taking_snapshots_does_not_change_the_training(traced, tmp_path):
    prepared, result, out = traced
    plain = run_method(prepared, "lora", RunDirectory(tmp_path / "lora"), progress=False)
    traced_state = load_file(str(out / RUN_DIR / "lora" / "adapter" / "adapter_model.safetensors"))
    plain_state = load_file(str(tmp_path / "lora" / "adapter" / "adapter_model.safetensors"))
    assert traced_state.keys() == plain_state.keys()
    assert all(torch.equal(traced_state[k], plain_state[k]) for k in plain_state)
    assert result.info["final_metrics"]["accuracy"] == plain.result["metrics"]["accuracy"]


def test_comparisons_with_init_and_with_the_runs_own_update(traced):
    prepared, result, out = traced
    by = {(r["step"], r["aggregation"], r["versus"]): r for r in result.records}
    assert by[(0, "mean", VERSUS_INIT)]["kendall_tau"] == pytest.approx(1.0)
    assert len(result.records) == 3 * 2 * 2
    # Default hindsight: this run's own update s·B·A, per-module energy ‖ΔW‖².
    state = load_file(str(out / RUN_DIR / "lora" / "adapter" / "adapter_model.safetensors"))
    adapter = json.loads((out / RUN_DIR / "lora" / "adapter" / "adapter_config.json").read_text())
    scaling = adapter["lora_alpha"] / adapter["r"]
    for name in prepared.targets:
        a = state[f"base_model.model.{name}.lora_A.weight"]
        b = state[f"base_model.model.{name}.lora_B.weight"]
        energy = float((scaling * b @ a).double().square().sum())
        assert result.hindsight["trace"][name] == pytest.approx(energy, rel=1e-5)
    from fimlora.analysis import kendall_tau

    record = by[(STEPS, "trace", VERSUS_HINDSIGHT)]
    assert record["kendall_tau"] == pytest.approx(
        kendall_tau(result.snapshots[STEPS]["trace"], result.hindsight["trace"])
    )
    assert 0 <= record["kendall_p"] <= 1


def test_a_full_ft_source_gives_the_hindsight_ranking_and_a_bad_one_is_refused(
    tiny_bert_dir, reviews_csv, tmp_path
):
    runs = tmp_path / "runs"
    run_experiment(_config(tiny_bert_dir, reviews_csv, runs, ["full-ft"]), progress=False, log=lambda _: None)
    prepared = prepare(_config(tiny_bert_dir, reviews_csv, runs))
    result = fisher_trajectory(prepared, tmp_path / "analysis", source=runs / "full-ft")
    assert result.info["hindsight_source"]["kind"] == "full-ft"
    trained = load_file(str(runs / "full-ft" / "adapter" / "model.safetensors"))
    modules = dict(prepared.loaded.model.named_modules())
    name = prepared.targets[0]
    energy = float((trained[f"{name}.weight"] - modules[name].weight.detach()).double().square().sum())
    assert result.hindsight["trace"][name] == pytest.approx(energy, rel=1e-5)
    longer = prepare(_config(tiny_bert_dir, reviews_csv, tmp_path / "other", train={"steps": STEPS + 1}))
    with pytest.raises(FimloraError, match=r"train\.steps 4, not 5"):
        fisher_trajectory(longer, tmp_path / "refused", source=runs / "full-ft")
    assert not (tmp_path / "refused" / RUN_DIR).exists()  # refused before anything trained


def test_only_fixed_rank_lora_is_followed(tiny_bert_dir, reviews_csv, tmp_path):
    prepared = prepare(_config(tiny_bert_dir, reviews_csv, tmp_path, ["dora"]))
    with pytest.raises(FimloraError, match="plain LoRA adapter of fixed ranks"):
        fisher_trajectory(prepared, tmp_path / "analysis")


def test_cli_and_report(tiny_bert_dir, reviews_csv, tmp_path, capsys):
    config = _config(tiny_bert_dir, reviews_csv, tmp_path / "runs")
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    run_experiment(config, progress=False, log=lambda _: None)  # a run for the report to be about
    with pytest.raises(SystemExit) as exit_info:
        main(["fisher-trajectory", str(path), "--fractions", "0,0.5,1"])
    printed = capsys.readouterr().out
    assert exit_info.value.code == 0, printed
    assert "vs init" in printed and "vs hindsight" in printed and "Kendall τ" in printed
    written = tmp_path / "runs" / "fisher-trajectory" / JSON_FILE
    loaded = load_fisher_trajectory(written)
    assert loaded is not None and sorted(loaded.snapshots) == [0, 2, STEPS]
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "runs")])
    assert exit_info.value.code == 0
    report = (tmp_path / "runs" / "report.md").read_text()
    assert "Does the Fisher move during training?" in report
    assert "fisher-trajectory-" in report and "vs the Fisher at init" in report
    # The source (here the analysis's own run) is named below the report's root, not by its absolute path.
    assert f"hindsight source `fisher-trajectory/{RUN_DIR}/lora`." in report, report
    # The analysis's own training run is hidden: the report counts only the experiment's run.
    assert "1 finished run(s)" in report
    with pytest.raises(SystemExit) as exit_info:
        main(["fisher-trajectory", str(path), "--fractions", "0.5,1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: The fractions must include 0")
    assert yaml.safe_load(path.read_text())["methods"] == ["lora"]


def test_tuned_settings_train_the_final_runs_rate(tiny_bert_dir, reviews_csv, tmp_path, capsys):
    from tune_runs import cell, tuned_file

    config = _config(tiny_bert_dir, reviews_csv, tmp_path / "runs", ["fim-lora", "lora"])
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    budget = config.budget.model_dump(mode="json")

    def entry(method, rate):
        return {
            **cell(method, {"train.learning_rate": rate}, model=config.model, dataset=config.dataset),
            "budget": budget,
        }

    tuned = tuned_file(tmp_path / "tuned.yaml", [entry("fim-lora", 3e-2), entry("lora", 1.23e-2)])
    argv = ["fisher-trajectory", str(path), "--method", "lora", "--fractions", "0,1", "--tuned", str(tuned)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0, capsys.readouterr().out
    loaded = load_fisher_trajectory(tmp_path / "runs" / "fisher-trajectory" / JSON_FILE)
    assert loaded is not None
    assert loaded.info["learning_rate"] == 1.23e-2  # lora's tuned rate, not the config's or fim-lora's
    assert loaded.info["tuning"]["params"] == {"train.learning_rate": 1.23e-2}
    trained = yaml.safe_load(
        (tmp_path / "runs" / "fisher-trajectory" / RUN_DIR / "lora" / "config.yaml").read_text()
    )
    assert trained["train"]["learning_rate"] == 1.23e-2
    assert trained["train"]["eval_split"] == config.train.eval_split  # an analysis, not a final number
    only_fim = tuned_file(tmp_path / "fim.yaml", [entry("fim-lora", 3e-2)])
    with pytest.raises(SystemExit) as exit_info:
        main([*argv[:-1], str(only_fim)])
    assert exit_info.value.code == 2
    assert "has no tuned settings for lora" in capsys.readouterr().err
