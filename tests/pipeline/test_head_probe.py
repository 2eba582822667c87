"""``fisher.head: probe``: the head is fitted on frozen training features before the Fisher, it beats the
random head on its training rows, every method starts from it, and it is recorded and cached apart."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch
from tiny_models import make_tiny_llama
from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

from fimlora.assets import smollm2_path
from fimlora.config import parse_config
from fimlora.data import calibration_subset, make_collator
from fimlora.errors import FimloraError
from fimlora.experiment import _fisher_fingerprint, build_method, compute_fisher, prepare, run_method
from fimlora.head_probe import fit_head_probe
from fimlora.runs import RunDirectory

OPTIONS = {"text_column": "review", "label_column": "sentiment"}


def _config(model_dir, dataset, out, head: str, **extra):
    data = {
        "model": str(model_dir),
        "dataset": str(dataset),
        "dataset_options": OPTIONS,
        "output_dir": str(out),
        "methods": ["lora", "fim-lora", "pissa"],
        "budget": {"uniform_rank": 2},
        "fisher": {"num_examples": 24, "batch_size": 8, "head": head},
        "train": {"steps": 2, "batch_size": 8, "max_length": 24, "eval_batch_size": 16, "report_to": []},
    }
    data.update(extra)
    return parse_config(data)


@pytest.fixture(scope="module")
def probed(tiny_bert_dir, sentiment_csv, tmp_path_factory):
    return prepare(_config(tiny_bert_dir, sentiment_csv, tmp_path_factory.mktemp("probe"), "probe"))


@pytest.fixture(scope="module")
def random_head(tiny_bert_dir, sentiment_csv, tmp_path_factory):
    return prepare(_config(tiny_bert_dir, sentiment_csv, tmp_path_factory.mktemp("random"), "random"))


def _head(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.classifier.state_dict().items()}


def test_the_probe_fits_the_head_better_than_its_random_init(probed, random_head):
    record = probed.head_probe
    assert record is not None and record.module == "classifier"
    assert record.num_examples == len(probed.tokenized["train"])  # fewer rows than the default 1024
    assert record.train_accuracy_after > record.train_accuracy_before
    assert record.train_loss_after < record.train_loss_before
    # It started from the seeded random head and moved it; nothing else of the model moved.
    assert random_head.head_probe is None
    fitted, initial = _head(probed.loaded.model), _head(random_head.loaded.model)
    assert not torch.equal(fitted["weight"], initial["weight"])
    body = {k: v for k, v in random_head.loaded.model.state_dict().items() if not k.startswith("classifier")}
    assert all(torch.equal(probed.loaded.model.state_dict()[k], v) for k, v in body.items())


def _objective_gradient(prepared, head_name: str, pool) -> tuple[float, float, float]:
    """(max |∇| of the probe's objective at the fitted head, that objective, the same at a zero head),
    from the head's inputs captured here independently, pooled by ``pool(inputs, batch)``."""
    model, probe = prepared.loaded.model, prepared.config.fisher.probe
    rows = calibration_subset(prepared.tokenized["train"], probe.num_examples, seed=prepared.config.seed)
    batch = prepared.collator([rows[i] for i in range(len(rows))])
    head = model.get_submodule(head_name)
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})
    handle.remove()
    features = pool(captured[0], batch).double()
    weight = head.weight.detach().double().requires_grad_(True)
    bias = head.bias.detach().double().requires_grad_(True) if head.bias is not None else None

    def objective(w: torch.Tensor) -> torch.Tensor:
        logits = features @ w.T + (bias if bias is not None else 0.0)
        return torch.nn.functional.cross_entropy(logits, batch["labels"]) + 0.5 * probe.l2 * w.pow(2).sum()

    loss = objective(weight)
    loss.backward()
    grads = [weight.grad] + ([bias.grad] if bias is not None else [])
    with torch.no_grad():
        at_zero = objective(torch.zeros_like(weight))
    return max(float(g.abs().max()) for g in grads), float(loss.detach()), float(at_zero)


def test_the_fitted_linear_head_is_the_regularised_logistic_regression_optimum(probed):
    """A single Linear head makes the probe's objective convex: a zero gradient certifies the optimum."""
    gradient, loss, at_zero = _objective_gradient(probed, "classifier", lambda x, _: x)
    assert gradient < 1e-4
    assert loss < at_zero


def test_the_probe_is_deterministic(probed, tiny_bert_dir, sentiment_csv, tmp_path):
    again = prepare(_config(tiny_bert_dir, sentiment_csv, tmp_path, "probe"))
    timeless = [{**p.head_probe.to_dict(), "seconds": None} for p in (probed, again)]
    assert timeless[0] == timeless[1]
    first, second = _head(probed.loaded.model), _head(again.loaded.model)
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("method", ["lora", "fim-lora", "pissa"])
def test_every_method_starts_from_the_fitted_head(probed, method, tmp_path):
    probed.fisher = compute_fisher(probed, tmp_path / "fisher")  # fim-lora allocates from it
    built = build_method(probed, method)
    start = built.model.base_model.model.classifier.modules_to_save["default"]
    fitted = _head(probed.loaded.model)
    assert all(torch.equal(v, fitted[k]) for k, v in start.state_dict().items())


def test_the_fisher_is_taken_through_the_fitted_head_and_cached_apart(probed, random_head, tmp_path):
    config_probe, config_random = probed.config, random_head.config
    assert _fisher_fingerprint(config_probe, probed.targets, "diagonal", False) != _fisher_fingerprint(
        config_random, random_head.targets, "diagonal", False
    )
    through_random = compute_fisher(random_head, tmp_path)
    through_probe = compute_fisher(probed, tmp_path)  # same directory: the cached one must not be reused
    a, b = through_random.scores("mean"), through_probe.scores("mean")
    assert a.keys() == b.keys() and any(abs(a[k] - b[k]) > 1e-3 * abs(a[k]) for k in a)


def test_result_json_records_the_head(probed, tmp_path):
    outcome = run_method(probed, "lora", RunDirectory(Path(tmp_path) / "lora"), progress=False)
    head = outcome.result["task_head"]
    assert head["init"] == "probe"
    assert head["probe"]["train_accuracy_after"] == probed.head_probe.train_accuracy_after
    assert head["probe"]["num_examples"] == probed.head_probe.num_examples
    assert head["probe"]["l2"] == probed.config.fisher.probe.l2
    assert RunDirectory(Path(tmp_path) / "lora").read_result()["task_head"] == head


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama with SmolLM2's tokenizer and random embeddings for every token (resizing alone gives
    the new tokens near-identical embeddings, hence near-identical features)."""
    directory = tmp_path_factory.mktemp("tiny-llama-cls")
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_path()))
    model = make_tiny_llama()
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    torch.nn.init.normal_(
        model.get_input_embeddings().weight, std=0.2, generator=torch.Generator().manual_seed(0)
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_a_per_token_score_head_is_fitted_at_the_pooled_position(llama_dir, sentiment_csv, tmp_path):
    """Llama's ``score`` maps every token; the model reads it at the last non-pad token. The fit is the
    optimum on the hidden states at exactly those positions (here: the last attended token)."""
    prepared = prepare(_config(llama_dir, sentiment_csv, tmp_path, "probe", methods=["lora"]))
    record = prepared.head_probe
    assert record is not None and record.module == "score"
    assert record.train_loss_after < record.train_loss_before
    assert record.train_accuracy_after > record.train_accuracy_before

    def attended(back: int):
        def pool(hidden: torch.Tensor, batch: dict) -> torch.Tensor:
            return hidden[torch.arange(hidden.shape[0]), batch["attention_mask"].sum(1) - 1 - back]

        return pool

    gradient, _, _ = _objective_gradient(prepared, "score", attended(0))
    assert gradient < 1e-4
    # One token earlier (a wrong pooling), the same head is not the optimum.
    wrong, _, _ = _objective_gradient(prepared, "score", attended(1))
    assert wrong > 1e-3


class _Pad:
    pad_token_id = 0
    eos_token_id = None


def test_a_two_layer_head_on_token_features_is_fitted():
    """RoBERTa's head (dense → tanh → out_proj on the first token) takes the whole sequence."""
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=40, num_labels=2, pad_token_id=1, initializer_range=0.2,
    )  # fmt: skip
    model = RobertaForSequenceClassification(config).eval()
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(96):
        length = int(torch.randint(4, 12, (1,), generator=g))
        ids = torch.randint(5, 40, (length,), generator=g).tolist()
        label = int(ids[-1] >= 22)  # a token the head can find only through the body's features
        rows.append({"input_ids": [2, *ids], "attention_mask": [1] * (length + 1), "labels": label})
    train = datasets.Dataset.from_list(rows)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    record = fit_head_probe(
        model, "classifier", train, make_collator(_Pad(), "classification"),
        num_examples=96, max_iter=50, l2=1e-4, seed=0, batch_size=16,
    )  # fmt: skip
    assert record.train_loss_after < record.train_loss_before
    assert record.train_accuracy_after > record.train_accuracy_before
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all(k.startswith("classifier.") for k in moved)
    assert {"classifier.dense.weight", "classifier.out_proj.weight"} <= moved


def test_a_causal_lm_refuses_the_probe(tiny_llama_dir, text_jsonl, tmp_path):
    with pytest.raises(FimloraError, match="causal LM's output head is pretrained"):
        parse_config({"model": "m", "dataset": "d", "task": "causal-lm", "fisher": {"head": "probe"}})
    config = parse_config(
        {
            "model": str(tiny_llama_dir),
            "dataset": str(text_jsonl),
            "dataset_options": {"text_column": "body"},
            "output_dir": str(tmp_path),
            "fisher": {"head": "probe"},
            "train": {"max_length": 16},
        }
    )
    with pytest.raises(FimloraError, match="causal LM's output head is pretrained"):
        prepare(config)
