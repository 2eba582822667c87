"""Shared by the Fisher tests: padded batches, MC labels, and brute-force per-example references."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fimlora.fisher.losses import sample_model_labels
from fimlora.models import linear_modules


def padded_batches(lengths, *, vocab=60, num_labels=None, batch_size=3, seed=0, mask_prefix=0):
    """Right-padded batches of random sequences; LM labels mask padding and the first tokens."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for length in lengths:
        ids = torch.randint(1, vocab, (length,), generator=g)
        if num_labels is not None:
            label = torch.randint(0, num_labels, (), generator=g)
        else:
            label = ids.clone()
            label[: min(mask_prefix, length)] = -100
        examples.append((ids, label))
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        labels = (
            torch.stack([lab for _, lab in chunk])
            if num_labels is not None
            else torch.full((len(chunk), width), -100)
        )
        for i, (ids, lab) in enumerate(chunk):
            input_ids[i, : len(ids)] = ids
            mask[i, : len(ids)] = 1
            if num_labels is None:
                labels[i, : len(ids)] = lab
        batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return batches


def with_sampled_labels(model, batches, seed):
    """The labels the MC estimator draws: same generator, same order, same logits."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            out.append({**batch, "labels": sample_model_labels(logits, batch["labels"], generator)})
    return out


@dataclass
class PerExample:
    """Per example n and module: G_n = ∂ℓ_n/∂W, and the layer's inputs a (T_n, d_in) and output
    gradients δ (T_n, d_out) at the real tokens; all float64."""

    grads: list[dict[str, torch.Tensor]] = field(default_factory=list)
    inputs: list[dict[str, torch.Tensor]] = field(default_factory=list)
    deltas: list[dict[str, torch.Tensor]] = field(default_factory=list)


def brute_force_per_example(model, batches, names) -> PerExample:
    """One unpadded forward/backward per example, using the model's own loss (ℓ_n as the estimator's)."""
    linears = linear_modules(model)
    weights = [linears[n].weight for n in names]
    out = PerExample()
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            keep = batch["attention_mask"][i].bool()
            ids = batch["input_ids"][i][keep].unsqueeze(0)
            captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            handles = [
                linears[n].register_forward_hook(
                    lambda m, args, y, n=n, store=captured: store.__setitem__(n, (args[0].detach(), y))
                )
                for n in names
            ]
            try:
                if batch["labels"].dim() == 1:
                    loss = model(input_ids=ids, labels=batch["labels"][i : i + 1]).loss
                else:
                    label = batch["labels"][i][keep].unsqueeze(0)
                    n_tokens = int((label[:, 1:] != -100).sum())
                    # HF's LM loss is the mean over labelled tokens; ℓ_n is their sum.
                    loss = None if n_tokens == 0 else model(input_ids=ids, labels=label).loss * n_tokens
                    if loss is None:
                        model(input_ids=ids)
            finally:
                for h in handles:
                    h.remove()
            d_in = {n: captured[n][0].reshape(-1, captured[n][0].shape[-1]).double() for n in names}
            if loss is None:
                grads = [torch.zeros_like(w) for w in weights]
                deltas = [torch.zeros_like(captured[n][1]) for n in names]
            else:
                outputs = [captured[n][1] for n in names]
                (*grads,) = torch.autograd.grad(loss, weights + outputs)
                grads, deltas = grads[: len(names)], grads[len(names) :]
            out.grads.append({n: g.double() for n, g in zip(names, grads, strict=True)})
            out.inputs.append(d_in)
            out.deltas.append(
                {n: d.reshape(-1, d.shape[-1]).double() for n, d in zip(names, deltas, strict=True)}
            )
    return out


def brute_force_fisher(model, batches, names):
    """(1/N) Σ_n (∂ℓ_n/∂W)² from :func:`brute_force_per_example`."""
    per = brute_force_per_example(model, batches, names)
    return {n: (sum(g[n] ** 2 for g in per.grads) / len(per.grads)).float() for n in names}


def assert_close_relative(actual, expected, tol=1e-4):
    assert set(actual) == set(expected)
    for name in expected:
        a, e = torch.as_tensor(actual[name]).double(), torch.as_tensor(expected[name]).double()
        err = (a - e).norm() / e.norm()
        assert err <= tol, f"{name}: relative error {err:.2e}"
