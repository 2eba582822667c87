"""The chunked causal-LM loss: the same losses, gradients, Fisher, training steps and evaluation as the
full-logits path (to float round-off), while no B·T·V logits are held and no chunk's logits are kept for
the backward pass; models whose logits are not their head's output keep the full path.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from tiny_models import NO_DEPLOYMENT_FIGURES, make_tiny_bert, make_tiny_llama
from transformers import LlamaForCausalLM, TrainerCallback

import fimlora.fisher.losses as fisher_losses
from fimlora.config import parse_config
from fimlora.evaluate import evaluate
from fimlora.experiment import build_method, prepare
from fimlora.fisher import estimate_fisher
from fimlora.fisher.losses import CausalLMHead, per_example_loss, sample_model_labels
from fimlora.train import train

VOCAB = 60  # tiny_llama's; its hidden size is 16, so a saved (…, 60) tensor can only be logits
ROWS = 4  # tokens per chunk in these tests: every batch below takes several chunks
BOUND = ROWS * VOCAB


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, 11), generator=generator)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[2, 8:] = -100  # padding
    return ids, labels


def _full_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference: every caller finds no head, as for a model that fails the check."""
    monkeypatch.setattr(CausalLMHead, "of", classmethod(lambda cls, model, **_: None))


def test_token_nll_and_its_gradients_equal_the_full_logits_loss() -> None:
    model = make_tiny_llama().train()
    head = CausalLMHead.of(model, max_logit_elements=BOUND)
    assert head is not None and head.attribute == "lm_head" and head.vocab_size == VOCAB
    ids, labels = _batch()
    reference = per_example_loss(model(input_ids=ids).logits, labels)
    reference.sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with head.hidden_states():
        hidden = model(input_ids=ids).logits
    ours, count = head.token_nll(hidden, labels)
    ours.sum().backward()
    assert count == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-5)
    # The tied embedding/head weight too: its gradient arrives through the recomputed chunks.
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert model.lm_head.weight.grad is not None
    assert isinstance(model.lm_head, torch.nn.Linear)  # the head is back after the forward pass


def test_no_chunk_keeps_its_logits_for_the_backward_pass_nor_sees_more_than_its_bound() -> None:
    model = make_tiny_llama().train()
    head = CausalLMHead.of(model, max_logit_elements=BOUND)
    assert head is not None
    ids, labels = _batch()
    rows_seen: list[int] = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: rows_seen.append(out.shape[0]))
    saved: list[tuple[int, ...]] = []
    with head.hidden_states():
        hidden = model(input_ids=ids).logits
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        loss = head.token_nll(hidden, labels)[0].sum()
    loss.backward()
    handle.remove()
    labelled = int((labels[:, 1:] != -100).sum())
    # Forward and recomputation: each chunk twice, never more than ROWS tokens, only labelled ones.
    assert max(rows_seen) <= ROWS and sum(rows_seen) == 2 * labelled
    assert not [shape for shape in saved if shape and shape[-1] == VOCAB]


def test_a_model_that_post_processes_its_logits_keeps_the_full_path() -> None:
    class SoftCapped(LlamaForCausalLM):
        def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            out = super().forward(*args, **kwargs)
            out.logits = 0.5 * torch.tanh(out.logits / 0.5)  # Gemma 2's final_logit_softcapping
            return out

    plain = make_tiny_llama()
    capped = SoftCapped(plain.config).eval()
    capped.load_state_dict(plain.state_dict())
    assert CausalLMHead.of(plain) is not None
    assert CausalLMHead.of(capped) is None
    assert CausalLMHead.of(make_tiny_bert()) is None  # a classifier has no output head


def test_sampled_labels_are_the_full_paths_draws() -> None:
    model = make_tiny_llama()
    head = CausalLMHead.of(model, max_logit_elements=BOUND)
    assert head is not None
    ids, labels = _batch(1)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        with head.hidden_states():
            hidden = model(input_ids=ids).logits
    expected = sample_model_labels(logits, labels, torch.Generator().manual_seed(3))
    assert torch.equal(head.sample_labels(hidden, labels, torch.Generator().manual_seed(3)), expected)


def _fisher_batches() -> list[dict[str, torch.Tensor]]:
    out = []
    for seed in range(2):
        ids, labels = _batch(seed)
        mask = (labels != -100).long()
        mask[0] = 1  # the prompt is attended to, only not predicted
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


@pytest.mark.parametrize(
    ("estimator", "statistic"),
    [("empirical", "diagonal"), ("empirical", "trace"), ("empirical", "kfac"), ("mc", "diagonal")],
)
def test_the_fisher_is_the_full_paths(estimator, statistic, monkeypatch) -> None:
    model = make_tiny_llama()
    options = {"estimator": estimator, "statistic": statistic, "with_gradient": True, "progress": False}
    monkeypatch.setattr(fisher_losses, "MAX_LOGIT_ELEMENTS", BOUND)
    ours = estimate_fisher(model, _fisher_batches(), **options)
    with monkeypatch.context() as patch:
        _full_path(patch)
        reference = estimate_fisher(model, _fisher_batches(), **options)
    for name, score in reference.scores("mean").items():
        assert ours.scores("mean")[name] == pytest.approx(score, rel=1e-5), name
    assert reference.gradients is not None and ours.gradients is not None
    for name, gradient in reference.gradients.items():
        torch.testing.assert_close(ours.gradients[name], gradient, rtol=1e-4, atol=1e-7, msg=name)
    if statistic == "kfac":
        assert reference.kfac is not None and ours.kfac is not None
        for name, (a, s) in reference.kfac.items():
            torch.testing.assert_close(ours.kfac[name][1], s, rtol=1e-4, atol=1e-7, msg=name)
            torch.testing.assert_close(ours.kfac[name][0], a, rtol=1e-5, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def prepared_llama(tiny_llama_dir, text_jsonl, tmp_path_factory):
    config = parse_config(
        {
            "model": str(tiny_llama_dir),
            "dataset": str(text_jsonl),
            "dataset_options": {"text_column": "body"},
            "output_dir": str(tmp_path_factory.mktemp("chunked")),
            "methods": ["lora", "full-ft"],
            "budget": {"uniform_rank": 2},
            "train": {"steps": 2, "batch_size": 4, "max_length": 16, "learning_rate": 1e-2, "report_to": []},
            "evaluate": NO_DEPLOYMENT_FIGURES,
        }
    )
    return prepare(config)


class _FirstGradients(TrainerCallback):
    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.grads = model, {}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if not self.grads:
            self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}


def _train(prepared, name, work: Path):
    """Losses logged per step, gradients of the first step, and the shapes the output head saw."""
    built = build_method(copy.copy(prepared), name)
    capture = _FirstGradients(built.model)
    head = built.model.get_output_embeddings()
    shapes: list[tuple[int, ...]] = []
    # Calls with gradients: the training steps' (not the no-grad check CausalLMHead.of makes first).
    handle = head.register_forward_hook(
        lambda m, a, out: shapes.append(tuple(out.shape)) if torch.is_grad_enabled() else None
    )
    metrics = work / f"{name}.jsonl"
    train(
        built.model,
        prepared.tokenized["train"],
        prepared.collator,
        prepared.config.train,
        seed=prepared.config.seed,
        work_dir=work,
        metrics_path=metrics,
        progress=False,
        optimizer=built.optimizer,
        callbacks=[capture],
        loss_per_token=True,
    )
    handle.remove()
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    return losses, capture.grads, shapes


@pytest.mark.parametrize("name", ["lora", "full-ft"])  # full-ft trains the tied embedding/head weight
def test_training_steps_are_the_full_paths(prepared_llama, name, tmp_path, monkeypatch) -> None:
    # In float64: a chunk of 3 rows makes the head's backward a (3 × V)·(V × d) product, which the BLAS
    # sums over V = 49,152 with a kernel of its choice per CPU; in float32 its round-off reached 0.2 % of
    # the gradient on an AMD EPYC (1e-6 on a Xeon), and Adam's first step turns that into loss
    # differences. The comparison is of the two paths, not of the CPU's kernels.
    prepared = copy.copy(prepared_llama)
    prepared.loaded = dataclasses.replace(
        prepared_llama.loaded, model=copy.deepcopy(prepared_llama.loaded.model).double()
    )
    monkeypatch.setattr(fisher_losses, "MAX_LOGIT_ELEMENTS", 3 * prepared.loaded.model.config.vocab_size)
    losses, grads, shapes = _train(prepared, name, tmp_path / "chunked")
    with monkeypatch.context() as patch:
        _full_path(patch)
        reference_losses, reference_grads, full_shapes = _train(prepared, name, tmp_path / "full")
    assert all(len(shape) == 3 for shape in full_shapes)  # the batch's (B, T, V) logits at once
    assert shapes and all(len(shape) == 2 and shape[0] <= 3 for shape in shapes)
    assert losses == pytest.approx(reference_losses, rel=1e-5)
    assert grads.keys() == reference_grads.keys() and grads
    for key, grad in reference_grads.items():
        torch.testing.assert_close(grads[key], grad, rtol=1e-4, atol=1e-7, msg=key)


def test_evaluation_is_the_full_paths(prepared_llama, monkeypatch) -> None:
    monkeypatch.setattr(
        fisher_losses, "MAX_LOGIT_ELEMENTS", 3 * prepared_llama.loaded.model.config.vocab_size
    )
    split = prepared_llama.tokenized["test"]
    args = (prepared_llama.loaded.model, split, prepared_llama.collator, "causal-lm")
    ours = evaluate(*args, batch_size=4, progress=False)
    with monkeypatch.context() as patch:
        _full_path(patch)
        reference = evaluate(*args, batch_size=4, progress=False)
    assert ours["num_tokens"] == reference["num_tokens"] > 0
    assert ours["loss"] == pytest.approx(reference["loss"], rel=1e-6)
