"""Per-example losses, and labels drawn from the model itself for the Monte-Carlo ("true") Fisher.

Conventions (those of Hugging Face models):
- classification: logits ``(B, C)``, labels ``(B,)``; ℓ_n is the cross-entropy of example n's label.
- causal LM: logits ``(B, T, V)``, labels ``(B, T)`` token ids with -100 on ignored positions; the label at
  position t+1 is predicted by the logits at position t. ℓ_n is the **sum** (not the mean) of the token
  NLLs of sequence n, so a sequence's Fisher contribution is that of its own log-likelihood.

The causal-LM loss without the batch's full logits (:class:`CausalLMHead`, used by the Fisher pass,
training and evaluation alike): a causal LM's logits are B × T × V floats (V: SmolLM2 49,152, Llama 3
128,256). At 4 × 128 tokens of a 128k vocabulary that is 263 MB, and the loss adds as much again for its
log-softmax, the backward pass for the logits' gradient: on a quantised 1B model, more than its
transformer blocks' weights. The model's forward pass returns its final hidden states instead (its output
head is swapped for an identity while it runs, :meth:`CausalLMHead.hidden_states`), and the head and the
cross-entropy run on at most ``max_logit_elements`` logits at a time. With gradients, each chunk is
checkpointed (non-reentrant ``torch.utils.checkpoint``): its logits are recomputed in the backward pass
rather than kept, so the pass never holds more than one chunk's logits and their gradient. The price is
one more head multiplication per token in the backward pass, and only when there is more than one chunk.
Only labelled positions reach the head; the values equal :func:`per_example_loss` and
:func:`sample_model_labels` on the full logits (to float round-off, and the same draws).

:meth:`CausalLMHead.of` returns a head only for a model whose logits are exactly its head applied to
the hidden states it returns: it checks that once on a short input. Architectures that scale or
soft-cap the logits after the head fail the check and keep the full-logits path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Label of a position the loss ignores (padding, a prompt), Hugging Face's convention.
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


# Bound on the logits one chunk holds (elements): 2**21 float32 = 8 MiB, i.e. 42 tokens of SmolLM2's
# vocabulary, 16 of Llama 3's. Its log-softmax and gradient are of the same size; the head's matmul on
# this many tokens still runs at full speed.
MAX_LOGIT_ELEMENTS = 2**21

# The check input: a few token ids every vocabulary has.
_CHECK_TOKENS = 8


@dataclass(frozen=True)
class CausalLMHead:
    """The output head of a causal LM (``holder.<attribute>`` is ``head``), applied chunk by chunk."""

    holder: nn.Module
    attribute: str
    head: nn.Module
    vocab_size: int
    max_logit_elements: int = MAX_LOGIT_ELEMENTS

    @classmethod
    def of(cls, model: nn.Module, *, max_logit_elements: int | None = None) -> CausalLMHead | None:
        """The head of ``model`` (a transformers causal LM, possibly wrapped by PEFT), or None.

        ``max_logit_elements``: the chunk bound (default :data:`MAX_LOGIT_ELEMENTS`).

        None when ``model`` has no output head (a classifier) or when its logits are not the head
        applied to its final hidden states (checked on one short input, eval mode, no gradients; the
        model's mode and the random state are restored).
        """
        from transformers import PreTrainedModel

        holder = next(
            (
                m
                for m in model.modules()
                if isinstance(m, PreTrainedModel) and m.get_output_embeddings() is not None
            ),
            None,
        )
        if holder is None:
            return None
        head = holder.get_output_embeddings()
        attribute = next((name for name, child in holder.named_children() if child is head), None)
        if attribute is None:
            return None
        bound = MAX_LOGIT_ELEMENTS if max_logit_elements is None else max_logit_elements
        vocab_size = cls(holder, attribute, head, 0, bound)._reproduced_vocab_size(model)
        if vocab_size is None:
            return None
        return cls(holder, attribute, head, vocab_size, bound)

    def _reproduced_vocab_size(self, model: nn.Module) -> int | None:
        """V if the head applied to the hidden states gives ``model``'s own logits, else None."""
        device = next(model.parameters()).device
        ids = torch.arange(_CHECK_TOKENS, device=device).unsqueeze(0)
        mask = torch.ones_like(ids)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                logits = model(input_ids=ids, attention_mask=mask).logits
                with self.hidden_states():
                    hidden = model(input_ids=ids, attention_mask=mask).logits
                if hidden.dim() != 3 or hidden.shape[:2] != logits.shape[:2]:
                    return None
                ours = self.head(hidden)
        except (RuntimeError, TypeError, ValueError, AttributeError):
            return None  # e.g. an architecture whose forward needs the head's output shape
        finally:
            model.train(was_training)
        if ours.shape != logits.shape or not torch.allclose(
            ours.float(), logits.float(), rtol=1e-5, atol=1e-6
        ):
            return None
        return int(logits.shape[-1])

    @contextlib.contextmanager
    def hidden_states(self) -> Iterator[None]:
        """While active, the model's forward pass returns its final hidden states as ``logits``."""
        setattr(self.holder, self.attribute, nn.Identity())
        try:
            yield
        finally:
            setattr(self.holder, self.attribute, self.head)

    def _rows(self) -> int:
        return max(1, self.max_logit_elements // max(self.vocab_size, 1))

    def _chunk_nll(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(hidden).float(), targets, reduction="none")

    def token_nll(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Per example, the summed NLL of its labelled next tokens, shape (B,), float32; and their count.

        ``hidden`` (B, T, d): what the model returned under :meth:`hidden_states`; ``labels`` (B, T).
        Example n's value equals :func:`per_example_loss` on the model's logits.
        """
        batch, length, width = hidden.shape
        targets = labels[:, 1:].reshape(-1)
        rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        inputs = hidden[:, :-1].reshape(-1, width).index_select(0, rows)
        targets = targets.index_select(0, rows)
        step = self._rows()
        keep_graph = torch.is_grad_enabled() and (
            inputs.requires_grad or any(p.requires_grad for p in self.head.parameters())
        )
        parts = []
        for start in range(0, inputs.shape[0], step):
            chunk = (inputs[start : start + step], targets[start : start + step])
            if keep_graph and inputs.shape[0] > step:
                # Recomputed in the backward pass: no chunk's logits outlive its forward.
                parts.append(checkpoint(self._chunk_nll, *chunk, use_reentrant=False))
            else:
                parts.append(self._chunk_nll(*chunk))
        nll = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
        # Written into the (B, T-1) grid and summed over positions: the order the full-logits loss sums in.
        grid = torch.zeros(batch * (length - 1), dtype=torch.float32, device=hidden.device)
        grid = grid.index_put((rows,), nll)
        return grid.view(batch, length - 1).sum(dim=1), int(rows.numel())

    @torch.no_grad()
    def sample_labels(
        self, hidden: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """:func:`sample_model_labels` from the hidden states, chunk by chunk.

        The draws are made in the same order from the same generator, one per labelled position.
        """
        sampled = labels.clone()
        target = sampled[:, 1:]
        mask = target != IGNORE_INDEX
        if not mask.any():
            return sampled
        inputs = hidden[:, :-1][mask]
        step = self._rows()
        draws = [
            torch.multinomial(
                torch.softmax(self.head(inputs[i : i + step]).float(), dim=-1), 1, generator=generator
            ).squeeze(-1)
            for i in range(0, inputs.shape[0], step)
        ]
        target[mask] = torch.cat(draws)
        return sampled

    def trainer_loss(
        self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """The Trainer's ``compute_loss_func``: transformers' causal-LM loss from hidden states.

        The sum of the batch's token NLLs divided by ``num_items_in_batch`` when the Trainer gives it
        (the labelled tokens of the whole accumulated batch), else their mean, as ``ForCausalLMLoss``.
        """
        hidden = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        per_example, count = self.token_nll(hidden, labels.to(hidden.device))
        total = per_example.sum()
        if num_items_in_batch is None:
            return total / count
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
