"""Methods on a quantised base (QLoRA): what runs trains, saves and reloads onto a freshly quantised base
with plain PEFT to the trained logits; what cannot run is refused when the config is read, with the reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from method_runs import SELF_CONTAINED_PRESETS
from peft import PeftModel
from tiny_models import NO_DEPLOYMENT_FIGURES

from fimlora.config import parse_config
from fimlora.errors import FimloraError
from fimlora.experiment import build_method, calibrate, prepare, run_method
from fimlora.methods import get_allocation, resolve_method
from fimlora.methods.allocations.gora_score import gora_module_importance
from fimlora.models import linear_modules, load_model
from fimlora.quantization import dequantized_weight, is_quantized_linear
from fimlora.runs import RunDirectory

pytest.importorskip("bitsandbytes")

# Methods that rewrite or move W, train W, or are not PEFT adapters (see each adapter's reason).
REFUSED = ("pissa", "olora", "lora-ga", "delta-lora", "hydralora", "full-ft")
SUPPORTED = tuple(name for name in SELF_CONTAINED_PRESETS if name not in REFUSED)
# Every allocation rule runs on NF4 in the fast suite (one preset each, plain LoRA adapter), the ones that
# read the weights or the Fisher on int8 too; the other adapters and optimizers run with the slow tests.
ALLOCATIONS = ("lora", "fim-lora", "random-rank", "gora-score", "spectral-lora", "whitened-spectral-lora")
FAST = {
    "nf4": (*ALLOCATIONS, "adalora", "eva", "gora", "fim-lora-dynamic"),
    "int8": ("lora", "fim-lora", "gora-score"),
}


def _config(model_dir, dataset, out, methods, quantization, **extra):
    data = {
        "model": str(model_dir),
        "dataset": str(dataset),
        "output_dir": str(out),
        "methods": list(methods),
        "quantization": quantization,
        "budget": {"uniform_rank": 2},
        "fisher": {"num_examples": 8, "batch_size": 4},
        "train": {
            "steps": 3,
            "batch_size": 4,
            "learning_rate": 2e-2,
            "max_length": 16,
            "eval_examples": 8,
            "eval_batch_size": 8,
            "report_to": [],
        },
        "method_options": {
            "adalora": {"tinit_ratio": 0.0, "tfinal_ratio": 0.0},
            "fisher_online": {"reallocate_at": [0.3]},  # three steps: one re-allocation
        },
        # Deployment figures are tested in tests/deploy; here they would only cost time.
        "evaluate": NO_DEPLOYMENT_FIGURES,
    }
    data.update(extra)
    return parse_config(data)


class _Runs:
    """One prepared experiment per quantisation; each method is trained once, when first asked for."""

    def __init__(self, prepared) -> None:
        self.prepared = prepared
        self.outcomes: dict = {}

    def outcome(self, name):
        if name not in self.outcomes:
            out = Path(self.prepared.config.output_dir)
            self.outcomes[name] = run_method(self.prepared, name, RunDirectory(out / name), progress=False)
        return self.outcomes[name]


@pytest.fixture(scope="module", params=["nf4", "int8"])
def runs(request, tiny_llama_dir, text_jsonl, tmp_path_factory):
    kind = request.param
    methods = [m for m in SUPPORTED if not (kind == "int8" and m == "dora")]  # see test_dora_on_int8…
    config = _config(
        tiny_llama_dir,
        text_jsonl,
        tmp_path_factory.mktemp(f"quantized-{kind}"),
        methods,
        kind,
        dataset_options={"text_column": "body"},
    )
    prepared = prepare(config)
    needs: set[str] = set()
    for name in methods:
        needs |= get_allocation(resolve_method(name).allocation).needs
    calibrate(prepared, needs, progress=False, log=lambda _: None)
    return _Runs(prepared)


def _inputs(prepared):
    batch = prepared.collator([prepared.tokenized["test"][i] for i in range(4)])
    return {k: v for k, v in batch.items() if k != "labels"}


def _reload_matches(runs, name):
    prepared = runs.prepared
    kind = prepared.config.quantization
    outcome = runs.outcome(name)
    assert outcome.result["quantization"] == kind and outcome.result["gradient_checkpointing"] is False
    trainable = [p for p in outcome.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # adapters train in float32
    inputs = _inputs(prepared)
    fresh = load_model(prepared.config.model, "causal-lm", quantization=kind).model
    assert all(is_quantized_linear(linear_modules(fresh)[n]) for n in prepared.targets)
    with torch.no_grad():
        untrained = fresh(**inputs).logits
        trained = outcome.model.eval()(**inputs).logits
        adapter = Path(prepared.config.output_dir) / name / "adapter"
        reloaded = PeftModel.from_pretrained(fresh, str(adapter)).eval()  # plain PEFT, nothing of ours
        again = reloaded(**inputs).logits
    assert not torch.equal(trained, untrained), f"{name}: training did not change the model"
    if name == "adalora":
        # PEFT reloads the pruned adapter at the kept ranks only: the same sum over fewer (nonzero) terms,
        # by another kernel shape, so equal to round-off (as on a float32 base).
        torch.testing.assert_close(again, trained, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(again, trained), name


def _cases():
    for kind in ("nf4", "int8"):
        for name in SUPPORTED:
            if kind == "int8" and name == "dora":
                continue  # refused on CPU: test_dora_on_int8_is_refused_on_cpu
            marks = () if name in FAST[kind] else (pytest.mark.slow,)
            yield pytest.param(kind, name, marks=marks, id=f"{kind}-{name}")


@pytest.mark.parametrize(("runs", "name"), list(_cases()), indirect=["runs"])
def test_trained_adapter_reloads_onto_a_freshly_quantised_base(runs, name):
    _reload_matches(runs, name)


def test_the_shared_base_stays_quantised_and_frozen(runs):
    """Every method trained a deep copy; the experiment's base keeps its packed weights, all frozen."""
    runs.outcome("lora")
    model = runs.prepared.loaded.model
    linears = linear_modules(model)
    assert all(is_quantized_linear(linears[n]) for n in runs.prepared.targets)
    assert not any(p.requires_grad for p in model.parameters())


def test_gora_scores_use_the_dequantised_weight(runs):
    prepared = runs.prepared
    built = build_method(prepared, "gora-score")
    modules = linear_modules(prepared.loaded.model)
    original = linear_modules(load_model(prepared.config.model, "causal-lm").model)
    differs = 0
    for name, score in built.allocation.scores.items():
        gradient = prepared.fisher.gradients[name]
        assert score == pytest.approx(
            gora_module_importance(dequantized_weight(modules[name]), gradient), rel=1e-9
        )
        differs += score != pytest.approx(
            gora_module_importance(original[name].weight.detach(), gradient), rel=1e-6
        )
    assert differs > 0  # the dequantised weight, not the float32 checkpoint's


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
@pytest.mark.parametrize("name", REFUSED)
def test_methods_that_need_a_float_w_are_refused_when_the_config_is_read(name, quantization):
    data = {"model": "smollm2", "dataset": "brown-fiction", "methods": ["lora", name]}
    parse_config(data)  # fine on a float32 base
    refused = rf"Method '{name}' cannot run on a quantised \({quantization}\) base"
    with pytest.raises(FimloraError, match=refused):
        parse_config({**data, "quantization": quantization})


def test_dora_on_int8_is_refused_on_cpu():
    data = {"model": "smollm2", "dataset": "brown-fiction", "methods": ["dora"]}
    parse_config({**data, "quantization": "nf4"})
    if torch.cuda.is_available():
        pytest.skip("the refusal concerns PEFT's CPU path only")
    with pytest.raises(FimloraError, match="fails on an int8 base on CPU"):
        parse_config({**data, "quantization": "int8"})


def test_a_quantised_classifier_trains_its_float_head_and_reloads(tiny_bert_dir, sentiment_csv, tmp_path):
    """Classification on NF4: the fresh head stays float32 (trained via modules_to_save) and reloads."""
    config = _config(
        tiny_bert_dir,
        sentiment_csv,
        tmp_path,
        ["lora"],
        "nf4",
        dataset_options={"text_column": "review", "label_column": "sentiment"},
    )
    prepared = prepare(config)
    assert type(prepared.loaded.model.classifier) is torch.nn.Linear
    outcome = run_method(prepared, "lora", RunDirectory(tmp_path / "lora"), progress=False)
    assert outcome.result["head_params"] > 0
    inputs = _inputs(prepared)
    torch.manual_seed(1234)  # another head init: the adapter must restore the trained head
    fresh = load_model(config.model, "classification", num_labels=2, quantization="nf4").model
    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "lora" / "adapter")).eval()
        assert torch.equal(reloaded(**inputs).logits, outcome.model.eval()(**inputs).logits)


def test_the_fisher_cache_is_keyed_by_the_quantisation():
    from fimlora.experiment import _fisher_fingerprint

    data = {"model": "smollm2", "dataset": "brown-fiction", "methods": ["fim-lora"]}
    prints = {
        kind: _fisher_fingerprint(parse_config({**data, "quantization": kind}), ["a"], "diagonal", False)
        for kind in ("none", "int8", "nf4")
    }
    assert len(set(prints.values())) == 3
