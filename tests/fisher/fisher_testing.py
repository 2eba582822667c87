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
    gradients δ (T_n, d_out) at the real tokens, the tokens of every call of the layer stacked; all
    float64."""

    grads: list[dict[str, torch.Tensor]] = field(default_factory=list)
    inputs: list[dict[str, torch.Tensor]] = field(default_factory=list)
    deltas: list[dict[str, torch.Tensor]] = field(default_factory=list)


def brute_force_per_example(model, batches, names) -> PerExample:
    """One unpadded forward/backward per example, using the model's own loss (ℓ_n as the estimator's).

    G_n is autograd's gradient of the weight, which sums over every call of a layer that runs more than
    once; a and δ are recorded for each call and stacked along the token axis.
    """
    linears = linear_modules(model)
    weights = [linears[n].weight for n in names]
    flags = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    out = PerExample()
    try:
        for batch in batches:
            for i in range(batch["input_ids"].shape[0]):
                _one_example(model, batch, i, names, linears, weights, out)
    finally:
        for w, flag in zip(weights, flags, strict=True):
            w.requires_grad_(flag)
    return out


def _one_example(model, batch, i, names, linears, weights, out: PerExample) -> None:
    keep = batch["attention_mask"][i].bool()
    ids = batch["input_ids"][i][keep].unsqueeze(0)
    captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in names}
    handles = [
        linears[n].register_forward_hook(
            lambda m, args, y, n=n, store=captured: store[n].append((args[0].detach(), y))
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
    outputs = [y for n in names for _, y in captured[n]]
    if loss is None:
        grads = [torch.zeros_like(w) for w in weights]
        deltas = [torch.zeros_like(y) for y in outputs]
    else:
        found = torch.autograd.grad(loss, weights + outputs, allow_unused=True)
        found = [
            torch.zeros_like(x) if g is None else g for g, x in zip(found, weights + outputs, strict=True)
        ]
        grads, deltas = found[: len(names)], found[len(names) :]
    flat = iter(deltas)
    out.grads.append({n: g.double() for n, g in zip(names, grads, strict=True)})
    out.inputs.append({n: torch.cat([_rows(x) for x, _ in captured[n]]) for n in names})
    out.deltas.append({n: torch.cat([_rows(next(flat)) for _ in captured[n]]) for n in names})


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).double()


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
