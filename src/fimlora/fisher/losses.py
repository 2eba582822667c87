"""Per-example losses, and labels drawn from the model itself for the Monte-Carlo ("true") Fisher.

Conventions (those of Hugging Face models):
- classification: logits ``(B, C)``, labels ``(B,)``; ℓ_n is the cross-entropy of example n's label.
- causal LM: logits ``(B, T, V)``, labels ``(B, T)`` token ids with -100 on ignored positions; the label at
  position t+1 is predicted by the logits at position t. ℓ_n is the **sum** (not the mean) of the token
  NLLs of sequence n, so a sequence's Fisher contribution is that of its own log-likelihood.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ℓ_n for every example of the batch, shape ``(B,)``, computed in float32."""
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), labels, reduction="none")
    if logits.dim() != 3:
        raise ValueError(f"expected logits of shape (B, C) or (B, T, V), got {tuple(logits.shape)}")
    batch, length, vocab = logits.shape
    shifted_logits = logits[:, :-1, :].float().reshape(-1, vocab)
    shifted_labels = labels[:, 1:].reshape(-1)
    token_nll = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="none")
    return token_nll.view(batch, length - 1).sum(dim=1)


@torch.no_grad()
def sample_model_labels(
    logits: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Labels drawn from the model's predictive distribution, one draw per labelled position.

    For causal LMs each labelled position gets its own draw from the logits of the position before it;
    ignored positions (-100) stay ignored, so the Monte-Carlo Fisher sees the same tokens as the empirical
    one.
    """
    if logits.dim() == 2:
        probs = torch.softmax(logits.float(), dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    sampled = labels.clone()
    target = sampled[:, 1:]
    mask = target != IGNORE_INDEX
    if mask.any():
        probs = torch.softmax(logits[:, :-1, :][mask].float(), dim=-1)
        target[mask] = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return sampled
