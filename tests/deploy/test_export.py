"""``fimlora export``: every mergeable preset round-trips to a plain transformers model with the run's
logits, loaded where neither fimlora nor PEFT can be imported; HydraLoRA exports adapter + loader;
``--adapter-only`` writes what serving engines can use; bad targets are refused."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import yaml
from deploy.trained import load_without_fimlora_or_peft, logits_of, relative_error, tiny_config, train_runs
from method_runs import SELF_CONTAINED_PRESETS
from peft import PeftModel
from safetensors.torch import load_file

from fimlora.cli import main
from fimlora.deploy import export_run
from fimlora.deploy.export import EXPORT_FILE, LOADER_FILE, SERVING_FILE, fold_scalings
from fimlora.errors import FimloraError
from fimlora.methods import PRESETS, get_adapter
from fimlora.models import load_model

MERGEABLE = [n for n in SELF_CONTAINED_PRESETS if get_adapter(PRESETS[n].adapter).unmergeable_reason is None]
UNMERGEABLE = [n for n in SELF_CONTAINED_PRESETS if n not in MERGEABLE]
# Causal LM (tied embeddings, no task head): PEFT LoRA with uneven ranks, Delta-LoRA's drift, full weights
# and HydraLoRA's loader; the other PEFT variants merge through the same code as on BERT.
LLAMA_PRESETS = ["fim-lora", "delta-lora", "full-ft", "hydralora"]


@pytest.fixture(scope="module")
def bert(tiny_bert_dir, sentiment_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("bert-runs")
    prepared, models = train_runs(tiny_config(tiny_bert_dir, sentiment_csv, out, SELF_CONTAINED_PRESETS))
    return out, prepared, models


@pytest.fixture(scope="module")
def llama(tiny_llama_dir, text_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("llama-runs")
    prepared, models = train_runs(tiny_config(tiny_llama_dir, text_jsonl, out, LLAMA_PRESETS))
    return out, prepared, models


def unmerged_look_alike(model, prepared):
    """What an export that forgot the adapter would hold: the base weights with the trained task head
    (PEFT's ``unload``: adapters dropped, ``modules_to_save`` kept), or the untouched base model."""
    if isinstance(model, PeftModel):
        return copy.deepcopy(model).unload()
    return prepared.loaded.model


@pytest.fixture(scope="module")
def exported(bert, llama, tmp_path_factory):
    """Every run of both fixtures exported, then loaded in one fresh process without fimlora or PEFT."""
    root = tmp_path_factory.mktemp("exports")
    results, jobs = {}, []
    for task, (runs_dir, prepared, _) in (("classification", bert), ("causal-lm", llama)):
        for name in prepared.config.method_names:
            result = export_run(runs_dir / name, root / task / name)
            results[(task, name)] = result
            jobs.append({"dir": str(result.out), "kind": result.kind, "task": task})
    plain = load_without_fimlora_or_peft(jobs, tmp_path_factory.mktemp("plain-process"))
    return results, plain


def test_presets_cover_both_kinds_of_export():
    assert "hydralora" in UNMERGEABLE and len(MERGEABLE) >= 18  # presets added later are picked up too
    assert {"lora", "fim-lora", "dora", "rslora", "vera", "delta-lora", "pissa", "full-ft"} <= set(MERGEABLE)


@pytest.mark.parametrize("name", SELF_CONTAINED_PRESETS)
def test_every_preset_exports_and_loads_without_fimlora_or_peft_with_the_runs_logits(bert, exported, name):
    _, prepared, models = bert
    results, plain = exported
    result = results[("classification", name)]
    tokenizer = prepared.loaded.tokenizer
    trained = logits_of(models[name], tokenizer)
    reloaded = plain[str(result.out)]
    assert relative_error(reloaded, trained) <= 1e-4, name
    # ...and the check is not vacuous: an export without the trained update would fail it.
    look_alike = logits_of(unmerged_look_alike(models[name], prepared), tokenizer)
    assert relative_error(look_alike, trained) > 1e-3, name
    assert plain[str(result.out) + ":id2label"] == {"0": "neg", "1": "pos"}
    info = json.loads((result.out / EXPORT_FILE).read_text())
    assert info["check"]["max_rel_diff"] <= 1e-4 and info["method"]["name"] == name
    if name in MERGEABLE:
        assert result.kind == "merged"
        assert (result.out / "model.safetensors").is_file() and (result.out / "config.json").is_file()
        assert not list(result.out.glob("*.bin")) and not (result.out / "adapter_config.json").exists()
        state = load_file(str(result.out / "model.safetensors"))
        assert not [k for k in state if "lora" in k or "vera" in k or "base_layer" in k]
    else:
        assert result.kind == "adapter+loader"


@pytest.mark.parametrize("name", LLAMA_PRESETS)
def test_causal_lm_exports_reproduce_the_runs_logits(llama, exported, name):
    _, prepared, models = llama
    results, plain = exported
    result = results[("causal-lm", name)]
    trained = logits_of(models[name], prepared.loaded.tokenizer)
    assert relative_error(plain[str(result.out)], trained) <= 1e-4, name
    assert relative_error(logits_of(prepared.loaded.model, prepared.loaded.tokenizer), trained) > 1e-3


def test_hydralora_is_refused_a_merge_and_exported_with_its_loader(bert, exported):
    result = exported[0][("classification", "hydralora")]
    assert any("cannot be merged" in note and "router" in note for note in result.notes)
    files = set(result.files)
    assert {LOADER_FILE, "adapter/hydralora_config.json", "adapter/hydralora.safetensors"} <= files
    assert "base/config.json" in files and "base/model.safetensors" in files
    info = json.loads((result.out / EXPORT_FILE).read_text())
    assert info["kind"] == "adapter+loader" and "router" in info["not_merged"]
    with pytest.raises(FimloraError, match="cannot be merged"):
        get_adapter("hydralora").merge(bert[2]["hydralora"])


def test_delta_lora_export_contains_the_weight_drift(bert, exported):
    """The merged Delta-LoRA model holds W_0 + drift + s·BA: without the drift its logits differ."""
    runs_dir, prepared, models = bert
    base = load_model(prepared.config.model, "classification", num_labels=2).model
    adapter_only = PeftModel.from_pretrained(base, str(runs_dir / "delta-lora" / "adapter"))
    trained = logits_of(models["delta-lora"], prepared.loaded.tokenizer)
    assert relative_error(logits_of(adapter_only, prepared.loaded.tokenizer), trained) > 1e-3
    assert (
        relative_error(exported[1][str(exported[0][("classification", "delta-lora")].out)], trained) <= 1e-4
    )


def test_adapter_only_folds_uneven_scalings_so_one_scaling_serves_every_module(bert, tmp_path):
    """fim-lora's ranks under alpha_over_r scale each module by α/r_i; an engine that applies the config's
    α/r to every module (vLLM) computes the trained update from the folded adapter."""
    runs_dir, prepared, models = bert
    result = export_run(runs_dir / "fim-lora", tmp_path / "fim-lora", adapter_only=True)
    config = json.loads((result.out / "adapter" / "adapter_config.json").read_text())
    tensors = load_file(str(result.out / "adapter" / "adapter_model.safetensors"))
    engine_scaling = config["lora_alpha"] / config["r"]
    trained = models["fim-lora"].get_base_model()
    ranks = set()
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        b = tensors[key.replace("lora_A", "lora_B")]
        layer = trained.get_submodule(module)
        expected = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(engine_scaling * b @ a, expected.detach(), rtol=1e-5, atol=1e-7)
        ranks.add(a.shape[0])
    assert len(ranks) > 1  # uneven ranks, so the unfolded adapter would have been served wrong
    serving = json.loads((result.out / SERVING_FILE).read_text())
    assert serving["max_rank"] == max(ranks) and serving["vllm_max_lora_rank"] >= max(ranks)
    assert serving["scaling"]["folded_modules"] > 0
    assert set(serving["target_modules"]) == {k.rsplit(".", 1)[-1] for k in prepared.targets}
    assert any("modules_to_save" in r for r in serving["engine_refusals"])  # the classifier head
    assert any("largest rank" in n for n in result.notes) and result.check["max_rel_diff"] <= 1e-4


def test_folding_changes_nothing_when_every_module_already_shares_one_scaling(bert):
    import copy

    model = copy.deepcopy(bert[2]["lora"])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    assert fold_scalings(model)["folded_modules"] == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize(
    ("name", "message"),
    [("delta-lora", "moved the base weights"), ("full-ft", "no adapter"), ("hydralora", "not a PEFT")],
)
def test_adapter_only_is_refused_where_the_adapter_alone_is_not_the_model(bert, tmp_path, name, message):
    with pytest.raises(FimloraError, match=message):
        export_run(bert[0] / name, tmp_path / name, adapter_only=True)
    assert not (tmp_path / name).exists()


def test_adapter_only_notes_what_engines_refuse(bert, tmp_path):
    dora = json.loads(
        (export_run(bert[0] / "dora", tmp_path / "d", adapter_only=True).out / SERVING_FILE).read_text()
    )
    assert any("DoRA" in r for r in dora["engine_refusals"])
    vera = json.loads(
        (export_run(bert[0] / "vera", tmp_path / "v", adapter_only=True).out / SERVING_FILE).read_text()
    )
    assert vera["peft_type"] == "VERA" and any("not plain LoRA" in r for r in vera["engine_refusals"])


def test_export_replaces_a_previous_export_but_never_a_foreign_directory(bert, tmp_path):
    run = bert[0] / "lora"
    target = tmp_path / "export"
    export_run(run, target)
    export_run(run, target)  # a previous export is replaced
    assert (target / EXPORT_FILE).is_file()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FimloraError, match="not a fimlora export"):
        export_run(run, foreign)
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(FimloraError, match="replace the run itself"):
        export_run(run, bert[0])


def test_unfinished_runs_and_quantised_bases_are_refused(bert, tmp_path):
    copy_dir = tmp_path / "lora"
    shutil.copytree(bert[0] / "lora", copy_dir)
    config = yaml.safe_load((copy_dir / "config.yaml").read_text())
    config["quantization"] = {"bits": 4}
    (copy_dir / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(FimloraError, match="quantised base"):
        export_run(copy_dir, tmp_path / "q")
    (copy_dir / "result.json").unlink()
    with pytest.raises(FimloraError, match="not a finished run"):
        export_run(copy_dir, tmp_path / "q")
    with pytest.raises(FimloraError, match=r"holds runs: .*lora"):
        export_run(bert[0], tmp_path / "q")


def test_cli_export(capsys, bert, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(bert[0] / "fim-lora"), "--out", str(tmp_path / "merged")])
    out = capsys.readouterr().out
    assert exit_info.value.code in (0, None)
    assert "merged export" in out and "model.safetensors" in out and "check:" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and "Traceback" not in err
