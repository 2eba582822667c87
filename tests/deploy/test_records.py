"""What a run records after training: forgetting (PEFT's definition), inference figures unmerged / merged /
base, adapter size, greedy continuations; ``fimlora generate``; the results table and report show them."""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import DatasetDict
from deploy.trained import tiny_config, train_runs

from fimlora.cli import main
from fimlora.data import TaskData, load_task_data, make_collator, tokenize_task_data
from fimlora.deploy import continue_prompts, load_run
from fimlora.deploy.inference import directory_bytes, weights_bytes
from fimlora.errors import FimloraError
from fimlora.evaluate import evaluate
from fimlora.forgetting import general_dataset
from fimlora.models import load_model
from fimlora.reporting import build_report
from fimlora.results import collect_results

PROMPTS = ["the film was", "really quite boring and"]
SMALL = {
    "inference_examples": 4,
    "inference_new_tokens": 6,
    "forgetting_blocks": 8,
    "prompts": PROMPTS,
    "continuation_tokens": 6,
}


@pytest.fixture(scope="module")
def llama(tiny_llama_dir, text_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("llama-records")
    settings = {**SMALL, "inference": True, "forgetting_dataset": "auto"}
    config = tiny_config(
        tiny_llama_dir, text_jsonl, out, ["lora", "fim-lora", "hydralora"], evaluate=settings
    )
    prepared, models = train_runs(config)
    results = {name: json.loads((out / name / "result.json").read_text()) for name in config.method_names}
    return out, prepared, models, results


@pytest.fixture(scope="module")
def bert(tiny_bert_dir, sentiment_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("bert-records")
    config = tiny_config(
        tiny_bert_dir, sentiment_csv, out, ["lora", "hydralora"], evaluate={**SMALL, "inference": True}
    )
    prepared, models = train_runs(config)
    results = {name: json.loads((out / name / "result.json").read_text()) for name in config.method_names}
    return out, prepared, models, results


# ------------------------------------------------------------------------------------------------ forgetting


def test_general_text_is_chosen_per_dataset():
    assert general_dataset("brown-fiction", "auto")[0] == "brown-nonfiction"
    assert general_dataset("brown-nonfiction", "auto")[0] == "brown-fiction"
    assert general_dataset("my-corpus.jsonl", "auto")[0] == "brown-nonfiction"
    name, why = general_dataset("brown", "auto")
    assert name is None and "every genre" in why
    assert general_dataset("brown", "brown-fiction")[0] == "brown-fiction"
    assert general_dataset("brown-fiction", None)[0] is None
    with pytest.raises(FimloraError, match="own dataset"):
        general_dataset("brown-fiction", "brown-fiction")


def test_forgetting_is_the_general_text_loss_of_the_tuned_minus_the_base_model(llama):
    """PEFT's definition: mean per-token loss on general text after training minus before (base model),
    recomputed here from the Brown non-fiction test split and the saved run."""
    out, prepared, _, results = llama
    record = results["fim-lora"]["metrics"]["forgetting"]
    assert record["dataset"] == "brown-nonfiction" and record["split"] == "test"
    tokenizer = prepared.loaded.tokenizer
    test_split = load_task_data("brown-nonfiction", seed=0).splits["test"]
    only_test = TaskData(
        "brown-nonfiction", "causal-lm", DatasetDict(train=test_split, validation=test_split, test=test_split)
    )
    general = tokenize_task_data(only_test, tokenizer, max_length=24)["test"]
    blocks = general.shuffle(seed=0).select(range(SMALL["forgetting_blocks"]))
    collator = make_collator(tokenizer, "causal-lm")

    def loss(model):
        return evaluate(model, blocks, collator, "causal-lm", progress=False)["loss"]

    base = load_model(prepared.config.model, "causal-lm").model
    tuned = load_run(out / "fim-lora").model
    assert record["base_loss"] == pytest.approx(loss(base), rel=1e-6)
    assert record["tuned_loss"] == pytest.approx(loss(tuned), rel=1e-6)
    assert record["delta"] == pytest.approx(record["tuned_loss"] - record["base_loss"], abs=1e-12)
    assert record["num_tokens"] == SMALL["forgetting_blocks"] * 23
    # Not the fine-tune's own held-out text: the target's test loss is another number.
    target = evaluate(tuned, prepared.tokenized["test"], collator, "causal-lm", progress=False)["loss"]
    assert not math.isclose(target, record["tuned_loss"], rel_tol=1e-3)
    # Every method is measured on the same text against the same base loss.
    assert results["lora"]["metrics"]["forgetting"]["base_loss"] == record["base_loss"]
    assert results["lora"]["metrics"]["forgetting"]["tuned_loss"] != record["tuned_loss"]


def test_classification_runs_record_labels_and_no_forgetting(bert):
    result = bert[3]["lora"]
    assert "forgetting" not in result["metrics"] and "generations" not in result
    assert result["labels"] == ["neg", "pos"]


# ------------------------------------------------------------------------------------------------ inference


@pytest.mark.parametrize("fixture", ["bert", "llama"])
def test_inference_figures_cover_unmerged_merged_and_base(request, fixture):
    out, prepared, _, results = request.getfixturevalue(fixture)
    unit = "examples/s" if fixture == "bert" else "tokens/s"
    record = results["lora"]["inference"]
    assert record["unit"] == unit and set(record["models"]) == {"unmerged", "merged", "base"}
    for entry in record["models"].values():
        assert entry["per_s"] > 0 and entry["peak_memory_bytes"] >= entry["weights_bytes"] > 0
    expected_units = 4 if fixture == "bert" else 4 * SMALL["inference_new_tokens"]
    assert all(entry["units"] == expected_units for entry in record["models"].values())
    models_ = record["models"]
    assert record["merged_over_base"] == pytest.approx(models_["merged"]["per_s"] / models_["base"]["per_s"])
    # Merged, the model is the base model's modules again: the adapter's weights are gone.
    base_bytes = weights_bytes(prepared.loaded.model)
    assert models_["merged"]["weights_bytes"] == models_["base"]["weights_bytes"] == base_bytes
    assert models_["unmerged"]["weights_bytes"] > base_bytes
    hydra = results["hydralora"]["inference"]
    assert set(hydra["models"]) == {"unmerged", "base"} and "router" in hydra["not_merged"]
    assert hydra["merged_over_base"] is None
    for name, result in results.items():
        assert result["adapter_size_bytes"] == directory_bytes(out / name / "adapter") > 0


def test_inference_can_be_turned_off(tiny_bert_dir, sentiment_csv, tmp_path):
    config = tiny_config(tiny_bert_dir, sentiment_csv, tmp_path, ["lora"], train={"steps": 1})
    train_runs(config)
    result = json.loads((tmp_path / "lora" / "result.json").read_text())
    assert "inference" not in result and result["adapter_size_bytes"] > 0


# ----------------------------------------------------------------------------------------------- generation


def test_runs_store_greedy_continuations_of_the_trained_and_the_base_model(llama):
    _, prepared, models, results = llama
    record = results["fim-lora"]["generations"]
    tokenizer = prepared.loaded.tokenizer
    assert record["prompts"] == PROMPTS and record["decoding"] == "greedy"
    assert record["continuations"] == continue_prompts(
        models["fim-lora"], tokenizer, PROMPTS, max_new_tokens=6
    )
    base = load_model(prepared.config.model, "causal-lm").model
    assert record["base"] == continue_prompts(base, tokenizer, PROMPTS, max_new_tokens=6)


def test_cli_generate_continues_a_prompt_with_the_runs_model(capsys, llama):
    out, _, _, results = llama
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(out / "fim-lora"), "--prompt", PROMPTS[0], "--max-new-tokens", "6"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert exit_info.value.code in (0, None)
    assert printed == [PROMPTS[0] + results["fim-lora"]["generations"]["continuations"][0]]


def test_sampling_is_reproducible_from_its_seed(llama):
    _, prepared, models, _ = llama
    tokenizer = prepared.loaded.tokenizer

    def sample(seed):
        return continue_prompts(models["lora"], tokenizer, PROMPTS, max_new_tokens=8, sample=True, seed=seed)

    first = sample(3)
    assert sample(3) == first
    assert sample(4) != first


def test_generate_refuses_a_classification_run(capsys, bert):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(bert[0] / "lora"), "--prompt", "hello"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "classification run" in err and "Traceback" not in err


def test_hydralora_generates_too(llama):
    _, prepared, models, results = llama
    assert results["hydralora"]["generations"]["continuations"] == continue_prompts(
        models["hydralora"], prepared.loaded.tokenizer, PROMPTS, max_new_tokens=6
    )


# ------------------------------------------------------------------------------------- results and report


def test_results_table_and_report_show_forgetting_inference_and_continuations(llama, tmp_path):
    out, _, _, results = llama
    frame = collect_results(out).frame.set_index("method")
    assert frame.loc["fim-lora", "forgetting"] == results["fim-lora"]["metrics"]["forgetting"]["delta"]
    assert frame.loc["lora", "inference_unit"] == "tokens/s"
    assert frame.loc["lora", "inference_merged_per_s"] > 0
    assert math.isnan(frame.loc["hydralora", "inference_merged_per_s"])
    assert frame.loc["lora", "adapter_size_mb"] * 2**20 == results["lora"]["adapter_size_bytes"]
    files = build_report(out, tmp_path / "report", n_resamples=10_000)
    text = files.markdown.read_text()
    assert "forgetting: mean per-token loss on general text" in text and "lower is better" in text
    assert "### Inference" in text and "merged / base" in text
    assert "perplexity against peak memory" in text and "pareto-memory-" in text
    assert "### Continuations of fixed prompts" in text and "| base model |" in text
    continuation = " ".join(results["fim-lora"]["generations"]["continuations"][1].split())
    assert continuation[:40] in text
    assert any(p.name.startswith("pareto-memory-") for p in files.images)


def test_printed_results_table_has_the_deployment_columns(llama):
    from fimlora.reporting.tables import results_table

    table = results_table(list(llama[3].values()))
    header = table.splitlines()[0]
    assert "forgetting (Δ loss)" in header and "adapter (MB)" in header and "tokens/s" in header
    hydra_row = next(line for line in table.splitlines() if line.startswith("| hydralora"))
    assert " / — / " in hydra_row  # no merged model


def test_loaded_run_reproduces_the_trained_model(llama):
    out, prepared, models, _ = llama
    batch = prepared.collator([prepared.tokenized["test"][i] for i in range(2)])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        for name in ("fim-lora", "hydralora"):
            assert torch.equal(
                load_run(out / name).model(**inputs).logits, models[name].eval()(**inputs).logits
            )
