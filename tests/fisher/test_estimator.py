"""The hook-based Fisher equals a brute-force per-example autograd loop."""

from __future__ import annotations

import pytest
import torch
from fisher.fisher_testing import (
    assert_close_relative,
    brute_force_fisher,
    padded_batches,
    with_sampled_labels,
)
from tiny_models import make_tiny_bert, make_tiny_llama

from fimlora import estimate_fisher
from fimlora.errors import FimloraError
from fimlora.fisher import estimator as estimator_module
from fimlora.models import default_target_modules, transformer_blocks


@pytest.mark.parametrize("estimator", ["empirical", "mc"])
def test_bert_matches_brute_force(estimator):
    model = make_tiny_bert(num_labels=3)
    batches = padded_batches([5, 9, 3, 12, 7, 4, 8], num_labels=3)
    result = estimate_fisher(model, batches, estimator=estimator, seed=7, progress=False)
    names = default_target_modules(model)
    assert len(names) == 12 and sorted(result.diagonal) == sorted(names)
    if estimator == "mc":
        batches = with_sampled_labels(model, batches, seed=7)
    expected = brute_force_fisher(model, batches, names)
    assert_close_relative(result.diagonal, expected)
    assert result.num_examples == 7


@pytest.mark.parametrize("estimator", ["empirical", "mc"])
def test_llama_matches_brute_force_with_padding_and_masked_labels(estimator):
    model = make_tiny_llama()
    batches = padded_batches([6, 11, 4, 9, 13], batch_size=2, mask_prefix=3)
    result = estimate_fisher(model, batches, estimator=estimator, seed=3, progress=False)
    names = default_target_modules(model)
    assert len(names) == 14
    if estimator == "mc":
        batches = with_sampled_labels(model, batches, seed=3)
    expected = brute_force_fisher(model, batches, names)
    assert_close_relative(result.diagonal, expected)


def test_mc_labels_differ_from_data_and_keep_ignored_positions():
    model = make_tiny_llama()
    batch = padded_batches([10, 10], batch_size=2, mask_prefix=4)[0]
    sampled = with_sampled_labels(model, [batch], seed=0)[0]["labels"]
    ignored = batch["labels"] == -100
    assert torch.equal(sampled == -100, ignored)
    assert not torch.equal(sampled[~ignored], batch["labels"][~ignored])


def test_chunking_and_max_examples_give_the_same_answer():
    model = make_tiny_bert()
    batches = padded_batches([5, 9, 3, 12, 7, 4, 8], num_labels=3)
    full = estimate_fisher(model, batches, progress=False)
    chunked = estimate_fisher(model, batches, max_chunk_elements=1, progress=False)
    assert_close_relative(chunked.diagonal, full.diagonal, tol=1e-6)
    first4 = estimate_fisher(model, batches, max_examples=4, progress=False)
    assert first4.num_examples == 4
    names = default_target_modules(model)
    expected = brute_force_fisher(model, [batches[0], {k: v[:1] for k, v in batches[1].items()}], names)
    assert_close_relative(first4.diagonal, expected)


def test_model_state_is_restored_and_no_grad_is_accumulated():
    model = make_tiny_bert()
    model.train()
    model.classifier.weight.requires_grad_(True)
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    estimate_fisher(model, padded_batches([4, 5, 6], num_labels=3), progress=False)
    assert model.training
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())


def test_target_module_subset_and_errors():
    model = make_tiny_bert()
    batches = padded_batches([4, 5, 6], num_labels=3)
    result = estimate_fisher(model, batches, target_modules=["query", "value"], progress=False)
    assert len(result.diagonal) == 4 and all(n.endswith(("query", "value")) for n in result.diagonal)
    with pytest.raises(FimloraError, match="available"):
        estimate_fisher(model, batches, target_modules=["q_proj"], progress=False)
    with pytest.raises(FimloraError, match="estimator"):
        estimate_fisher(model, batches, estimator="kfac-typo", progress=False)
    with pytest.raises(FimloraError, match="no examples"):
        estimate_fisher(model, [], progress=False)


def test_nan_loss_is_a_clear_error():
    model = make_tiny_bert()
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    with pytest.raises(FimloraError, match="Non-finite"):
        estimate_fisher(model, padded_batches([4, 5], num_labels=3), progress=False)


def test_save_load_round_trip(tmp_path):
    model = make_tiny_bert()
    result = estimate_fisher(model, padded_batches([4, 5, 6], num_labels=3), progress=False)
    result.save(tmp_path)
    loaded = type(result).load(tmp_path)
    assert loaded.num_examples == result.num_examples and loaded.estimator == "empirical"
    for name, diag in result.diagonal.items():
        assert torch.equal(loaded.diagonal[name], diag)
    assert loaded.scores("trace") == pytest.approx(result.scores("trace"))
    mean = result.scores("mean")
    name = next(iter(mean))
    assert mean[name] == pytest.approx(float(result.diagonal[name].double().mean()))
    with pytest.raises(FimloraError, match="aggregation"):
        result.scores("median")


@pytest.mark.parametrize("statistic", ["diagonal", "trace", "kfac"])
@pytest.mark.parametrize("estimator", ["empirical", "mc"])
def test_backpropagating_fewer_examples_at_a_time_gives_the_same_statistics(
    statistic, estimator, monkeypatch
):
    """The whole batch or slices of it per backward pass: the same statistics (float round-off) and the
    same Monte-Carlo draws, while each forward and backward pass sees only its slice (what bounds the
    activations it holds)."""
    model = make_tiny_llama()
    batches = padded_batches([6, 11, 4, 9, 13], batch_size=3, mask_prefix=3)
    run = {
        "statistic": statistic,
        "estimator": estimator,
        "with_gradient": True,
        "seed": 5,
        "progress": False,
    }
    whole = estimate_fisher(model, batches, **run)
    for per_backward in (1, 2):
        seen: list[int] = []
        start_batch = estimator_module._Accumulator.start_batch

        def recording(self, batch_size, *args, _start=start_batch, _seen=seen):
            _seen.append(batch_size)
            return _start(self, batch_size, *args)

        monkeypatch.setattr(estimator_module._Accumulator, "start_batch", recording)
        sliced = estimate_fisher(model, batches, examples_per_backward=per_backward, **run)
        monkeypatch.undo()
        assert max(seen) == per_backward and sum(seen) == 5
        assert sliced.num_examples == whole.num_examples == 5
        assert_close_relative(sliced.gradients, whole.gradients, tol=1e-5)
        if statistic == "diagonal":
            assert_close_relative(sliced.diagonal, whole.diagonal, tol=1e-5)
        elif statistic == "trace":
            assert sliced.traces == pytest.approx(whole.traces, rel=1e-5)
        else:
            assert sliced.metadata["num_tokens"] == whole.metadata["num_tokens"]
            for name, (a, s) in whole.kfac.items():
                assert_close_relative({name: sliced.kfac[name][0]}, {name: a}, tol=1e-5)
                assert_close_relative({name: sliced.kfac[name][1]}, {name: s}, tol=1e-5)
    with pytest.raises(FimloraError, match="examples_per_backward"):
        estimate_fisher(model, batches, examples_per_backward=0, progress=False)


@pytest.mark.parametrize("statistic", ["diagonal", "trace", "kfac"])
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_checkpointed_blocks_give_the_same_statistics_from_recomputed_activations(
    statistic, family, monkeypatch
):
    """With ``checkpoint_blocks`` each block's layers run again in the backward pass (its activations were
    not kept) and the statistics and gradients are the same; a recomputed call is not a second call of
    its layer (whose inputs and output gradients would be held to the end of the backward pass); the
    model is left as it was."""
    if family == "llama":
        model = make_tiny_llama()
        batches = padded_batches([6, 11, 4, 9, 13], batch_size=3, mask_prefix=3)
    else:
        model = make_tiny_bert(num_labels=3)
        batches = padded_batches([5, 9, 3, 12, 7], num_labels=3)
    run = {"statistic": statistic, "with_gradient": True, "progress": False}
    plain = estimate_fisher(model, batches, **run)
    first = default_target_modules(model)[0]
    calls: list[int] = []
    held: list[int] = []
    end_backward = estimator_module._Accumulator.end_backward

    def recording(self, _end=end_backward):
        held.append(len(self._waiting))
        return _end(self)

    monkeypatch.setattr(estimator_module._Accumulator, "end_backward", recording)
    handle = model.get_submodule(first).register_forward_hook(lambda *_: calls.append(1))
    try:
        checkpointed = estimate_fisher(model, batches, checkpoint_blocks=True, **run)
    finally:
        handle.remove()
    assert held == [0] * len(batches)
    forwards = len(batches) + (2 if family == "llama" else 0)  # the LM head check runs the model twice
    assert len(calls) == forwards + len(batches)  # once more per batch: recomputed in the backward pass
    assert not any("forward" in vars(block) for block in transformer_blocks(model)[1])
    assert_close_relative(checkpointed.gradients, plain.gradients, tol=1e-6)
    if statistic == "diagonal":
        assert_close_relative(checkpointed.diagonal, plain.diagonal, tol=1e-6)
    elif statistic == "trace":
        assert checkpointed.traces == pytest.approx(plain.traces, rel=1e-6)
    else:
        for name, (a, s) in plain.kfac.items():
            assert_close_relative({name: checkpointed.kfac[name][0]}, {name: a}, tol=1e-6)
            assert_close_relative({name: checkpointed.kfac[name][1]}, {name: s}, tol=1e-6)
