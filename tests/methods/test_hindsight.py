"""The hindsight rule: the spectral knapsack on a finished run's trained updates, full-FT and LoRA sources,
the source record, and every refusal (another model, data, split, length, method; unfinished runs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from method_runs import tiny_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_runs import write_sentiment_csv

from fimlora.allocation import allocate_ranks, allocate_spectral
from fimlora.config import parse_config
from fimlora.errors import FimloraError
from fimlora.experiment import build_method, calibrate, prepare, run_experiment
from fimlora.methods.base import NEEDS_GRADIENTS

SOURCE_LORA_RANK = 8
HINDSIGHT_FROM_LORA = {"name": "hindsight-from-lora", "allocation": "hindsight"}


def _config(model_dir, dataset, out, methods, *, rank=2, hindsight=None, **extra):
    if hindsight is not None:
        extra["method_options"] = {"hindsight": hindsight}
    config = tiny_config(model_dir, "x.csv", out, methods, budget={"uniform_rank": rank}, **extra)
    # A split mapping stays a mapping (tiny_config writes the dataset as a string).
    return config.model_copy(update={"dataset": dataset if isinstance(dataset, dict) else str(dataset)})


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def lora_source(tiny_bert_dir, sentiment_csv, tmp_path_factory) -> Path:
    """Uniform LoRA at rank 8, the same model, data and steps as the hindsight runs below."""
    out = tmp_path_factory.mktemp("lora-source")
    run_experiment(
        _config(tiny_bert_dir, sentiment_csv, out, ["lora"], rank=SOURCE_LORA_RANK),
        progress=False,
        log=_quiet,
    )
    return out / "lora"


@pytest.fixture(scope="module")
def experiment(tiny_bert_dir, sentiment_csv, lora_source, tmp_path_factory):
    """One experiment: full-ft first, then a hindsight method on it (selected from this output_dir) and
    one on the LoRA source (by path), next to the gradient's spectral allocation and uniform LoRA."""
    out = tmp_path_factory.mktemp("hindsight")
    methods = ["full-ft", "hindsight-lora", HINDSIGHT_FROM_LORA, "spectral-lora", "lora"]
    hindsight = {"source": {"method": "full-ft"}, "sources": {"hindsight-from-lora": str(lora_source)}}
    config = _config(tiny_bert_dir, sentiment_csv, out, methods, hindsight=hindsight)
    prepared, results = run_experiment(config, progress=False, log=_quiet)
    return prepared, {r["method"]: r for r in results}


def _base_weights(prepared) -> dict[str, torch.Tensor]:
    modules = dict(prepared.loaded.model.named_modules())
    return {n: modules[n].weight.detach().clone() for n in prepared.targets}


def _full_ft_updates(run_dir: Path, prepared) -> dict[str, torch.Tensor]:
    trained = load_file(str(run_dir / "adapter" / "model.safetensors"))
    return {n: trained[f"{n}.weight"] - w for n, w in _base_weights(prepared).items()}


def _lora_updates(run_dir: Path) -> dict[str, torch.Tensor]:
    """s·B·A from the saved tensors and adapter_config.json (uniform rank: s = lora_alpha / r)."""
    state = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert not config["rank_pattern"] and not config["use_rslora"]
    scaling = config["lora_alpha"] / config["r"]
    out = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = state[key.replace("lora_A", "lora_B")]
            out[name] = scaling * (b @ a)
    return out


def _allocation(run_dir: Path) -> dict:
    return json.loads((run_dir / "allocation.json").read_text())


# --------------------------------------------------------------------------------------------------
# What it allocates
# --------------------------------------------------------------------------------------------------


def test_full_ft_source_ranks_are_the_spectral_knapsack_of_the_trained_updates(experiment):
    prepared, results = experiment
    out = Path(prepared.config.output_dir)
    allocation = _allocation(out / "hindsight-lora")
    expected = allocate_spectral(
        _full_ft_updates(out / "full-ft", prepared), prepared.shapes, budget=prepared.budget
    )
    assert allocation["strategy"] == "hindsight"
    assert allocation["ranks"] == expected.ranks
    assert allocation["scores"] == pytest.approx(expected.scores)
    assert allocation["num_params"] <= prepared.budget
    assert results["hindsight-lora"]["adapter_params"] == allocation["num_params"]
    # Not a look-alike: the gradient's spectral allocation and uniform LoRA put the ranks elsewhere.
    assert allocation["ranks"] != _allocation(out / "spectral-lora")["ranks"]
    assert allocation["ranks"] != _allocation(out / "lora")["ranks"]


def test_lora_source_ranks_are_the_knapsack_of_s_b_a_capped_at_the_source_rank(experiment, lora_source):
    prepared, results = experiment
    out = Path(prepared.config.output_dir)
    allocation = _allocation(out / "hindsight-from-lora")
    updates = _lora_updates(lora_source)
    assert set(updates) == set(prepared.targets)
    expected = allocate_spectral(updates, prepared.shapes, budget=prepared.budget, r_max=SOURCE_LORA_RANK)
    assert allocation["ranks"] == expected.ranks
    assert max(allocation["ranks"].values()) <= SOURCE_LORA_RANK
    assert allocation["r_max"] == SOURCE_LORA_RANK
    assert results["hindsight-from-lora"]["adapter_params"] == allocation["num_params"]


def test_the_source_run_is_recorded_in_allocation_json_and_result_json(experiment, lora_source):
    prepared, results = experiment
    out = Path(prepared.config.output_dir)
    source = _allocation(out / "hindsight-lora")["source"]
    assert source["path"] == str((out / "full-ft").resolve())
    assert source["method"] == "full-ft" and source["kind"] == "full-ft" and source["rank"] is None
    assert source["selected_by"] == {"method": "full-ft", "seed": "same", "store": None, "where": {}}
    assert source["seed"] == prepared.config.seed and source["tuned"] is False
    assert len(source["config_sha256"]) == 64 and len(source["result_sha256"]) == 64
    assert results["hindsight-lora"]["allocation"]["source"] == source
    lora = results["hindsight-from-lora"]["allocation"]["source"]
    assert lora["kind"] == "lora" and lora["rank"] == SOURCE_LORA_RANK and lora["selected_by"] == "path"
    assert lora["path"] == str(lora_source.resolve())
    # Every run records what it trained on, by content.
    assert set(results["full-ft"]["data_fingerprint"]) == {"train", "validation", "test"}


def test_ranks_follow_a_planted_update_where_the_gradient_and_uniform_do_not(experiment, tmp_path):
    """A constructed full-FT source: rank-3 updates on two modules, round-off everywhere else."""
    prepared, _ = experiment
    out = Path(prepared.config.output_dir)
    planted = tmp_path / "planted"
    shutil.copytree(out / "full-ft", planted)
    weights_path = planted / "adapter" / "model.safetensors"
    state = load_file(str(weights_path))
    base = _base_weights(prepared)
    generator = torch.Generator().manual_seed(0)
    chosen = sorted(prepared.targets)[1::7][:2]
    for name, weight in base.items():
        update = 1e-5 * torch.randn(weight.shape, generator=generator)
        if name in chosen:
            d_out, d_in = weight.shape
            u = torch.linalg.qr(torch.randn(d_out, 3, generator=generator))[0]
            v = torch.linalg.qr(torch.randn(d_in, 3, generator=generator))[0]
            update = update + u @ v.T
        state[f"{name}.weight"] = weight + update
    save_file(state, str(weights_path), metadata={"format": "pt"})
    config = _config(
        prepared.config.model, prepared.config.dataset, tmp_path / "out", ["hindsight-lora"],
        hindsight={"source": str(planted)},
        dataset_options=prepared.config.dataset_options.model_dump(),
    )  # fmt: skip
    clone = _with_config(prepared, config)
    built = build_method(clone, "hindsight-lora")
    ranks = built.allocation.ranks
    assert all(ranks[n] >= 3 for n in chosen), {n: ranks[n] for n in chosen}
    assert (
        ranks
        == allocate_spectral(
            _full_ft_updates(planted, prepared), prepared.shapes, budget=prepared.budget
        ).ranks
    )
    # Look-alikes: ranks ∝ update energy (no SVD), the calibration gradient's knapsack, uniform ranks.
    energy = {n: float((w - base[n]).square().sum()) for n, w in _full_ft_updates(planted, prepared).items()}
    energy_ranks = allocate_ranks(energy, prepared.shapes, budget=prepared.budget).ranks
    calibrate(clone, {NEEDS_GRADIENTS}, progress=False, log=_quiet)
    gradient_ranks = allocate_spectral(
        dict(clone.fisher.gradients), prepared.shapes, budget=prepared.budget
    ).ranks
    for other in (energy_ranks, gradient_ranks, dict.fromkeys(ranks, 2)):
        assert ranks != other


def _with_config(prepared, config):
    import copy

    clone = copy.copy(prepared)
    clone.config = config
    return clone


# --------------------------------------------------------------------------------------------------
# Naming the source: sweeps, seeds, stores
# --------------------------------------------------------------------------------------------------


def test_a_config_must_name_a_source_for_every_hindsight_method(tiny_bert_dir, sentiment_csv, tmp_path):
    with pytest.raises(FimloraError, match=r"method_options\.hindsight\.source"):
        _config(tiny_bert_dir, sentiment_csv, tmp_path, ["hindsight-lora"])
    config = _config(
        tiny_bert_dir,
        sentiment_csv,
        tmp_path,
        ["hindsight-lora"],
        hindsight={"sources": {"hindsight-lora": "x"}},
    )
    assert config.method_options.hindsight.source_for("hindsight-lora") == "x"


def _hindsight_spec(model_dir, dataset, tmp_path, store, methods):
    from fimlora.sweep import parse_spec

    base = tiny_config(model_dir, dataset, tmp_path, ["lora"]).model_dump(mode="json", by_alias=True)
    defaults = {k: base[k] for k in ("fisher", "train", "evaluate", "dataset_options")}
    defaults["method_options"] = {
        "hindsight": {"source": {"method": "full-ft", "seed": "same", "store": str(store)}}
    }
    return parse_spec(
        {
            "name": "hindsight",
            "output_dir": str(store),
            "defaults": defaults,
            "grid": {
                "model": [str(model_dir)],
                "dataset": [str(dataset)],
                "method": methods,  # method innermost: each seed's source runs first
                "budget": [{"uniform_rank": 2}],
                "seed": [0, 1],
            },
        }
    )


def test_a_sweep_points_each_hindsight_run_at_its_seed_matched_source(tiny_bert_dir, sentiment_csv, tmp_path):
    from fimlora.sweep import run_sweep

    store = tmp_path / "store"
    spec = _hindsight_spec(tiny_bert_dir, sentiment_csv, tmp_path, store, ["full-ft", "hindsight-lora"])
    # Preflight lets the hindsight runs through: their sources are pending runs of the same sweep.
    report = run_sweep(spec, progress=False, log=_quiet)
    assert not report.failed, [o.error for o in report.failed]
    sources = {}
    for run in report.runs:
        if run.method == "hindsight-lora":
            sources[run.config.seed] = run.run_directory.read_result()["allocation"]["source"]
    assert {seed: s["seed"] for seed, s in sources.items()} == {0: 0, 1: 1}
    assert sources[0]["path"] != sources[1]["path"]
    # A later sweep of hindsight runs alone finds the finished sources.
    later = _hindsight_spec(tiny_bert_dir, sentiment_csv, tmp_path, tmp_path / "later", ["hindsight-lora"])
    later = later.model_copy(update={"defaults": spec.defaults})
    run_sweep(later, progress=False, log=_quiet, dry_run=True)


def test_preflight_refuses_hindsight_runs_whose_source_is_missing(tiny_bert_dir, sentiment_csv, tmp_path):
    from fimlora.sweep import run_sweep

    empty = tmp_path / "sources"
    empty.mkdir()
    spec = _hindsight_spec(tiny_bert_dir, sentiment_csv, tmp_path, empty, ["lora", "hindsight-lora"])
    with pytest.raises(FimloraError, match=r"2 of 4 run\(s\) would fail before training") as refused:
        run_sweep(spec, progress=False, log=_quiet)
    assert "no finished run of method 'full-ft', seed 0" in str(refused.value)
    assert not any(empty.iterdir())  # refused before any run started, the lora runs included


def test_a_selector_refuses_ambiguity_and_where_resolves_it(experiment, lora_source, tmp_path):
    prepared, _ = experiment
    store = tmp_path / "store"
    for rank in (SOURCE_LORA_RANK, 16):
        out = store / f"r{rank}"
        run_experiment(
            _config(prepared.config.model, prepared.config.dataset, out, ["lora"], rank=rank,
                    dataset_options=prepared.config.dataset_options.model_dump()),
            progress=False, log=_quiet,
        )  # fmt: skip
    selector = {"method": "lora", "store": str(store)}

    def allocation_with(source):
        config = _config(
            prepared.config.model, prepared.config.dataset, tmp_path / "h", ["hindsight-lora"],
            hindsight={"source": source}, dataset_options=prepared.config.dataset_options.model_dump(),
        )  # fmt: skip
        return build_method(_with_config(prepared, config), "hindsight-lora").allocation

    with pytest.raises(FimloraError, match=r"2 finished runs of method 'lora', seed 0.*narrow the selector"):
        allocation_with(selector)
    chosen = allocation_with({**selector, "where": {"budget.uniform_rank": 16}})
    assert chosen.source["path"] == str((store / "r16" / "lora").resolve()) and chosen.source["rank"] == 16
    with pytest.raises(FimloraError, match="no finished run of method 'lora', seed 3"):
        allocation_with({**selector, "seed": 3})


def test_tuning_trials_are_never_selected(experiment, tmp_path):
    prepared, _ = experiment
    store = tmp_path / "store"
    shutil.copytree(Path(prepared.config.output_dir) / "full-ft", store / "trial" / "full-ft")
    result_path = store / "trial" / "full-ft" / "result.json"
    result = json.loads(result_path.read_text())
    result_path.write_text(json.dumps({**result, "tuning_trial": {"study": "s", "number": 0}}))
    config = _config(
        prepared.config.model, prepared.config.dataset, tmp_path / "h", ["hindsight-lora"],
        hindsight={"source": {"method": "full-ft", "store": str(store)}},
        dataset_options=prepared.config.dataset_options.model_dump(),
    )  # fmt: skip
    with pytest.raises(FimloraError, match="no finished run of method 'full-ft'"):
        build_method(_with_config(prepared, config), "hindsight-lora")


# --------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------


def _source_error(prepared, source_dir: Path, tmp_path: Path, **changes) -> str:
    data = prepared.config.model_dump(mode="json", by_alias=True)
    data.update(methods=["hindsight-lora"], output_dir=str(tmp_path / "h"), **changes)
    data["method_options"]["hindsight"] = {"source": str(source_dir)}
    config = parse_config(data)
    clone = prepare(config) if changes else _with_config(prepared, config)
    with pytest.raises(FimloraError) as info:
        build_method(clone, "hindsight-lora")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_an_unfinished_source_is_refused(experiment, tmp_path):
    prepared, _ = experiment
    copy = tmp_path / "unfinished"
    shutil.copytree(Path(prepared.config.output_dir) / "full-ft", copy)
    (copy / "result.json").unlink()
    assert "is not a finished run" in _source_error(prepared, copy, tmp_path)


def test_a_source_of_another_method_kind_is_refused(experiment, tmp_path):
    prepared, _ = experiment
    message = _source_error(prepared, Path(prepared.config.output_dir) / "spectral-lora", tmp_path)
    assert "neither full fine-tuning nor uniform plain LoRA" in message


def test_a_source_of_other_steps_split_or_data_is_refused(experiment, tmp_path):
    prepared, _ = experiment
    source = Path(prepared.config.output_dir) / "full-ft"
    train = prepared.config.train.model_dump(mode="json")
    assert "train.steps 3, not 4" in _source_error(prepared, source, tmp_path, train={**train, "steps": 4})
    assert "data_seed 0 (another split of the data), not 1" in _source_error(
        prepared, source, tmp_path, data_seed=1
    )
    other = write_sentiment_csv(tmp_path / "other.csv", seed=5)
    assert "training split holds other examples" in _source_error(
        prepared, source, tmp_path, dataset=str(other)
    )


def test_a_source_that_trained_on_this_runs_test_split_is_refused(experiment, tmp_path):
    """The source's training split is this run's test split (its weights saw the test data)."""
    prepared, _ = experiment
    files = {}
    for split in ("train", "validation", "test"):
        path = tmp_path / f"{split}.csv"
        prepared.data.splits[split].to_pandas()[["text", "label"]].assign(
            label=lambda f: [prepared.data.label_names[i] for i in f["label"]]
        ).to_csv(path, index=False)
        files[split] = str(path)
    swapped = {"train": files["test"], "validation": files["validation"], "test": files["train"]}
    source_out = tmp_path / "swapped"
    source_config = _config(prepared.config.model, swapped, source_out, ["full-ft"], dataset_options={})
    run_experiment(source_config, progress=False, log=_quiet)
    message = _source_error(prepared, source_out / "full-ft", tmp_path, dataset=files, dataset_options={})
    assert "training split holds other examples" in message


def test_a_source_predating_data_fingerprints_is_refused(experiment, tmp_path):
    prepared, _ = experiment
    copy = tmp_path / "old"
    shutil.copytree(Path(prepared.config.output_dir) / "full-ft", copy)
    result = json.loads((copy / "result.json").read_text())
    del result["data_fingerprint"]
    (copy / "result.json").write_text(json.dumps(result))
    assert "records no data_fingerprint" in _source_error(prepared, copy, tmp_path)


def test_a_lora_source_too_small_for_the_budget_is_refused(experiment, lora_source, tmp_path):
    prepared, _ = experiment
    budget = {"uniform_rank": 9}  # a rank-8 source caps every module at 8: it cannot spend rank 9's budget
    message = _source_error(prepared, lora_source, tmp_path, budget=budget)
    assert "has rank 8, which caps every module at 8" in message


def test_a_source_with_periodic_validation_is_accepted(experiment, tmp_path):
    """Periodic validation only measures (tests/pipeline: the trajectory is the same without it)."""
    prepared, _ = experiment
    train = {**prepared.config.train.model_dump(mode="json"), "eval_every": 1}
    out = tmp_path / "validated"
    run_experiment(
        _config(prepared.config.model, prepared.config.dataset, out, ["full-ft"], train=train,
                dataset_options=prepared.config.dataset_options.model_dump()),
        progress=False, log=_quiet,
    )  # fmt: skip
    assert (out / "full-ft" / "validation.jsonl").is_file()
    config = _config(
        prepared.config.model, prepared.config.dataset, tmp_path / "h", ["hindsight-lora"],
        hindsight={"source": str(out / "full-ft")},
        dataset_options=prepared.config.dataset_options.model_dump(),
    )  # fmt: skip
    allocation = build_method(_with_config(prepared, config), "hindsight-lora").allocation
    assert allocation.source["path"] == str((out / "full-ft").resolve())


def test_the_report_names_both_sources(experiment, tmp_path):
    from fimlora.reporting import build_report

    prepared, _ = experiment
    files = build_report(prepared.config.output_dir, tmp_path, n_resamples=10_000)
    report = files.markdown.read_text()
    assert "Hindsight sources" in report
    assert "full-ft (full-ft)" in report and "lora (lora r=8)" in report


def test_the_report_names_sources_below_its_root_relatively(experiment, tmp_path, monkeypatch):
    from fimlora.reporting import build_report

    prepared, _ = experiment
    out = Path(prepared.config.output_dir)
    monkeypatch.chdir(out.parent)  # a relative root, as `fimlora report runs/` is usually called
    report = build_report(out.name, tmp_path, n_resamples=1_000).markdown.read_text()
    assert "| `full-ft` |" in report
    assert str(out.resolve()) not in report  # no absolute path of this machine in a committed report


# --------------------------------------------------------------------------------------------------
# A source without its weights: the update spectrum (weights are not committed)
# --------------------------------------------------------------------------------------------------


def _update_spectrum_cli(capsys, *runs: Path) -> str:
    from fimlora.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["update-spectrum", *map(str, runs)])
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err
    return captured.out


def _allocation_from(prepared, tmp_path: Path, method, source: Path):
    data = prepared.config.model_dump(mode="json", by_alias=True)
    name = method if isinstance(method, str) else method["name"]
    data.update(methods=[method], output_dir=str(tmp_path / "h"))
    data["method_options"]["hindsight"] = {"source": str(source), "sources": {name: str(source)}}
    return build_method(_with_config(prepared, parse_config(data)), name).allocation


def test_a_source_gives_the_same_ranks_from_its_update_spectrum_once_its_weights_are_gone(
    experiment, lora_source, tmp_path, capsys
):
    prepared, _ = experiment
    out = Path(prepared.config.output_dir)
    for source, method, made in (
        (out / "full-ft", "hindsight-lora", out / "hindsight-lora"),
        (lora_source, HINDSIGHT_FROM_LORA, out / "hindsight-from-lora"),
    ):
        clone = tmp_path / source.name
        shutil.copytree(source, clone)
        assert "wrote update-spectrum.safetensors" in _update_spectrum_cli(capsys, clone)
        shutil.rmtree(clone / "adapter")  # what a fresh clone of a study has: records, no weights
        allocation = _allocation_from(prepared, tmp_path, method, clone)
        made_with_weights = _allocation(made)
        assert allocation.ranks == made_with_weights["ranks"]
        assert allocation.scores == made_with_weights["scores"]  # the very same σ², not approximately
        assert allocation.source["result_sha256"] == made_with_weights["source"]["result_sha256"]
        assert allocation.r_max == made_with_weights["r_max"]  # the LoRA source's rank, from the file
    # Written once; a second call leaves it alone.
    assert "has update-spectrum.safetensors" in _update_spectrum_cli(capsys, tmp_path / "full-ft")


def test_a_source_with_neither_weights_nor_spectrum_is_refused_before_anything_trains(experiment, tmp_path):
    prepared, _ = experiment
    clone = tmp_path / "bare"
    shutil.copytree(Path(prepared.config.output_dir) / "full-ft", clone)
    shutil.rmtree(clone / "adapter")
    message = _source_error(prepared, clone, tmp_path)
    assert "neither update-spectrum.safetensors nor its weights" in message
    assert "fimlora update-spectrum" in message


def test_a_spectrum_of_other_modules_is_refused(experiment, tmp_path, capsys):
    prepared, _ = experiment
    clone = tmp_path / "other"
    shutil.copytree(Path(prepared.config.output_dir) / "full-ft", clone)
    _update_spectrum_cli(capsys, clone)
    path = clone / "update-spectrum.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    spectrum = load_file(str(path))
    dropped = sorted(spectrum)[0]
    del spectrum[dropped]
    save_file(spectrum, str(path), metadata=metadata)
    with pytest.raises(FimloraError, match=f"no spectrum for '{dropped}'"):
        _allocation_from(prepared, tmp_path, "hindsight-lora", clone)


def test_a_spectrum_written_for_another_record_of_the_run_is_refused(experiment, tmp_path, capsys):
    # e.g. a run trained again after its spectrum was written: the spectrum is of the other weights
    prepared, _ = experiment
    clone = tmp_path / "retrained"
    shutil.copytree(Path(prepared.config.output_dir) / "full-ft", clone)
    _update_spectrum_cli(capsys, clone)
    shutil.rmtree(clone / "adapter")
    _allocation_from(prepared, tmp_path, "hindsight-lora", clone)  # read as written
    result = json.loads((clone / "result.json").read_text())
    result["metrics"]["accuracy"] = 0.5
    (clone / "result.json").write_text(json.dumps(result))
    with pytest.raises(FimloraError, match="written for another record of this run"):
        _allocation_from(prepared, tmp_path, "hindsight-lora", clone)
