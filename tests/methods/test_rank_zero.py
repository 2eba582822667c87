"""``allocation.r_min: 0``: a module at rank 0 gets no adapter. Every allocator at a budget of average
rank 1 (where r_min = 1 forces uniform rank 1), exact counts, PEFT configs, fresh-process reload, and
the methods that refuse it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from method_runs import prepared_experiment, tiny_config
from pipeline.test_experiment import _fresh_process_logits

from fimlora.errors import FimloraError
from fimlora.experiment import build_method, run_experiment, run_method
from fimlora.methods.base import NEEDS_DIAGONAL, NEEDS_GRADIENTS, NEEDS_KFAC
from fimlora.methods.resize import lora_layers
from fimlora.runs import RunDirectory

STATIC = ["lora", "fim-lora", "random-rank", "gora-score", "spectral-lora", "whitened-spectral-lora"]
# Rules whose scores differ between modules by orders of magnitude here: at average rank 1, some module is
# left out (hindsight's full-FT updates after 3 steps are too even for that; its counts are tested still).
SCORED = ["fim-lora", "random-rank", "gora-score", "spectral-lora", "whitened-spectral-lora"]


def _quiet(_: str) -> None:
    pass


def _config(tiny_bert_dir, sentiment_csv, out, methods, **extra):
    return tiny_config(
        tiny_bert_dir,
        sentiment_csv,
        out,
        methods,
        budget={"uniform_rank": 1},
        allocation={"r_min": 0},
        **extra,
    )


@pytest.fixture(scope="module")
def prepared(tiny_bert_dir, sentiment_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("rank-zero")
    # The hindsight source: full fine-tuning of the same model, data and steps, in this output_dir.
    run_experiment(_config(tiny_bert_dir, sentiment_csv, out, ["full-ft"]), progress=False, log=_quiet)
    methods = [*STATIC, "eva", "gora", "adalora", "hindsight-lora"]
    options = {"hindsight": {"source": {"method": "full-ft"}}}
    config = _config(tiny_bert_dir, sentiment_csv, out, methods, method_options=options)
    return prepared_experiment(config, {NEEDS_DIAGONAL, NEEDS_GRADIENTS, NEEDS_KFAC})


@pytest.fixture(scope="module")
def built(prepared):
    return {name: build_method(prepared, name) for name in prepared.config.method_names}


@pytest.mark.parametrize("name", [*STATIC, "eva", "gora", "hindsight-lora"])
def test_every_allocator_counts_exactly_with_modules_left_out(prepared, built, name):
    method = built[name]
    allocation = method.allocation
    assert allocation is not None
    assert allocation.r_min == 0 or name == "gora"  # GoRA records its own smallest rank
    assert method.counts["adapter_params"] == allocation.num_params <= prepared.budget
    adapted = {n for n, r in allocation.ranks.items() if r > 0}
    layers = lora_layers(method.model)
    assert set(layers) == adapted  # a rank-0 module has no LoRA layer at all
    assert all(layers[n].r["default"] == allocation.ranks[n] for n in adapted)
    assert allocation.summary()["num_adapted_modules"] == len(adapted)
    if name in SCORED:
        assert len(adapted) < len(prepared.targets), f"{name}: every module kept an adapter"
        assert max(allocation.ranks.values()) > 1
    if name == "lora":
        assert set(allocation.ranks.values()) == {1}  # uniform: nothing to leave out at average rank 1


def test_random_rank_shuffles_fisher_ranks_zeros_included(prepared, built):
    fisher, shuffled = built["fim-lora"].allocation, built["random-rank"].allocation
    assert fisher.ranks != shuffled.ranks

    def histogram(ranks):
        groups: dict[tuple[int, int], Counter] = {}
        for n, r in ranks.items():
            groups.setdefault(prepared.shapes[n], Counter())[r] += 1
        return groups

    assert histogram(fisher.ranks) == histogram(shuffled.ranks)
    assert 0 in fisher.ranks.values()


def test_adalora_ignores_r_min_and_prunes_to_the_budget_as_before(built, prepared):
    adalora = built["adalora"]
    layers = lora_layers(adalora.model)
    assert len(layers) == len(prepared.targets)  # starts uniform at init_r, prunes while it trains


def test_lora_config_lists_only_the_adapted_modules(built):
    allocation = built["fim-lora"].allocation
    config = built["fim-lora"].model.peft_config["default"]
    adapted = {n for n, r in allocation.ranks.items() if r > 0}
    assert set(config.target_modules) == adapted
    assert all(allocation.ranks[k] > 0 for k in config.rank_pattern)


@pytest.mark.parametrize("name", ["fim-lora", "hindsight-lora"])
def test_rank_zero_adapters_reload_in_plain_peft_in_a_fresh_process(prepared, name, tmp_path):
    outcome = run_method(prepared, name, RunDirectory(tmp_path / name), progress=False)
    adapter_dir = tmp_path / name / "adapter"
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    ranks = json.loads((tmp_path / name / "allocation.json").read_text())["ranks"]
    assert sorted(saved["target_modules"]) == sorted(n for n, r in ranks.items() if r > 0)
    assert outcome.result["adapter_params"] == sum(r * sum(prepared.shapes[n]) for n, r in ranks.items())
    batch = prepared.collator([prepared.tokenized["test"][i] for i in range(6)])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        want = outcome.model.eval()(**inputs).logits
    got = _fresh_process_logits(
        "AutoModelForSequenceClassification", prepared.loaded.source, adapter_dir, inputs, tmp_path
    )
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("method", "reason"),
    [
        ("dora", "magnitude vector"),
        ("hydralora", "router"),
    ],
)
def test_methods_that_cannot_leave_a_module_out_refuse_r_min_0(
    tiny_bert_dir, sentiment_csv, tmp_path, method, reason
):
    with pytest.raises(FimloraError, match=f"cannot run with allocation.r_min: 0: .*{reason}"):
        _config(tiny_bert_dir, sentiment_csv, tmp_path, [method])


def test_a_budget_below_one_rank_of_any_module_is_refused(tiny_bert_dir, sentiment_csv, tmp_path):
    from fimlora.experiment import prepare

    config = tiny_config(
        tiny_bert_dir, sentiment_csv, tmp_path, ["lora"], budget={"params": 10}, allocation={"r_min": 0}
    )
    with pytest.raises(FimloraError, match="cannot pay one rank of any module"):
        prepare(config)


def test_the_allocation_json_of_a_rank_zero_run_round_trips(prepared, built, tmp_path):
    from fimlora.allocation import Allocation

    allocation = built["fim-lora"].allocation
    path = allocation.save(tmp_path / "allocation.json")
    again = Allocation.load(path)
    assert again.ranks == allocation.ranks and again.num_params == allocation.num_params
    assert Path(path).read_text().count('": 0') >= 1
