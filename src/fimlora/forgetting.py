"""Forgetting: how much a causal-LM fine-tune raised the loss on general text it did not target.

The definition is PEFT's method comparison's (``method_comparison/MetaMathQA/run.py`` in
huggingface/peft: ``forgetting = wiki_loss_after - wiki_loss_before``, both the mean per-token
cross-entropy on a fixed sample of Wikipedia text, "before" measured on the base model with the adapter
disabled; ``method_comparison/processing.py`` ranks it lower-is-better)::

    forgetting = L_tuned − L_base

``L`` is the mean next-token negative log-likelihood in nats per predicted token over the same general
text, for the trained model and for the untouched base model. Positive means the fine-tune made the model
worse on text it was not trained for. Each is what :func:`fimlora.evaluate.evaluate` reports as ``loss``
on that text (so ``exp(L)`` is its perplexity).

General text (``evaluate.forgetting_dataset``), always the **test split** of a dataset other than the
fine-tune's, loaded with seed 0 and sampled with seed 0 whatever the run's seed, so that every run of a
model is measured on the same tokens and the base loss is shared:

* ``auto`` picks per dataset: ``brown-fiction`` → ``brown-nonfiction`` (the nine non-fiction genres,
  disjoint from fiction file by file), ``brown-nonfiction`` → ``brown-fiction``, any other causal-LM
  dataset (a local file, a hub corpus) → ``brown-nonfiction``. ``brown`` itself covers every genre of
  the only general corpus fimlora ships, so ``auto`` measures nothing for it and says why; name a
  dataset to measure it anyway.
* a dataset name (built-in, local file or hub id) → its test split; the fine-tune's own dataset is
  refused (its test split is the target, not general text).
* ``null`` → no measure.

The text is cut into blocks of ``train.max_length`` tokens as every causal-LM split is
(:func:`fimlora.data.tokenize.tokenize_task_data`); ``evaluate.forgetting_blocks`` of them, a seeded
sample spread over the split's documents, are scored. PEFT truncates each Wikipedia row at 768 tokens
instead; the quantity per token is the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from torch import nn

from fimlora.errors import FimloraError

AUTO = "auto"
SPLIT = "test"
# The general text of each built-in causal-LM dataset under ``auto``; None: nothing general is left.
_AUTO_GENERAL: dict[str, str | None] = {
    "brown-fiction": "brown-nonfiction",
    "brown-nonfiction": "brown-fiction",
    "brown": None,
}
_DEFAULT_GENERAL = "brown-nonfiction"
_TEXT_SEED = 0


def general_dataset(dataset: str, setting: str | None) -> tuple[str | None, str]:
    """The general-text dataset for a fine-tune on ``dataset`` under ``evaluate.forgetting_dataset``, and
    why (a sentence for the run record). ``None``: nothing is measured."""
    if setting is None:
        return None, "turned off (evaluate.forgetting_dataset: null)"
    if setting == AUTO:
        if dataset in _AUTO_GENERAL:
            chosen = _AUTO_GENERAL[dataset]
            if chosen is None:
                return None, (
                    f"{dataset!r} covers every genre of the Brown corpus, the general text fimlora ships; "
                    "set evaluate.forgetting_dataset to measure forgetting on another dataset"
                )
            return chosen, f"auto: {chosen!r}, disjoint from {dataset!r}"
        return _DEFAULT_GENERAL, f"auto: {_DEFAULT_GENERAL!r} for a fine-tune outside the Brown corpus"
    if setting == dataset:
        raise FimloraError(
            f"evaluate.forgetting_dataset is the fine-tune's own dataset {dataset!r}; forgetting is measured "
            "on general text the fine-tune does not target."
        )
    return setting, "chosen in the config"


@dataclass
class GeneralText:
    """The tokenized general text: ``blocks`` rows of ``input_ids``/``attention_mask``/``labels``."""

    dataset: str
    split: str
    why: str
    blocks: datasets.Dataset

    @property
    def num_tokens(self) -> int:
        """Predicted tokens per pass: (block length − 1) per block."""
        return sum(len(ids) - 1 for ids in self.blocks["input_ids"][:])


def load_general_text(
    dataset: str,
    setting: str | None,
    tokenizer: Any,
    *,
    max_length: int,
    num_blocks: int,
    trust_remote_code: bool = False,
) -> tuple[GeneralText | None, str]:
    """The general text of a causal-LM fine-tune on ``dataset`` (module docstring), tokenized with the
    run's tokenizer into at most ``num_blocks`` blocks of ``max_length`` tokens; or ``None`` and why."""
    from fimlora.data import load_task_data
    from fimlora.data.tokenize import tokenize_causal_lm_split

    name, why = general_dataset(dataset, setting)
    if name is None:
        return None, why
    data = load_task_data(name, seed=_TEXT_SEED, task="causal-lm", trust_remote_code=trust_remote_code)
    blocks = tokenize_causal_lm_split(data.splits[SPLIT], tokenizer, max_length=max_length, name=name)
    blocks = blocks.shuffle(seed=_TEXT_SEED).select(range(min(num_blocks, len(blocks))))
    return GeneralText(dataset=name, split=SPLIT, why=why, blocks=blocks), why


def general_loss(
    model: nn.Module,
    text: GeneralText,
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    *,
    batch_size: int,
) -> float:
    """Mean next-token NLL of ``model`` on ``text``, nats per predicted token (eval mode, no gradients)."""
    from fimlora.evaluate import evaluate

    return float(
        evaluate(model, text.blocks, collator, "causal-lm", batch_size=batch_size, progress=False)["loss"]
    )


def forgetting_record(text: GeneralText, base_loss: float, tuned_loss: float) -> dict[str, Any]:
    """``result.json["metrics"]["forgetting"]``: the losses and ``delta`` = tuned − base (nats/token)."""
    return {
        "dataset": text.dataset,
        "split": text.split,
        "chosen": text.why,
        "num_blocks": len(text.blocks),
        "num_tokens": text.num_tokens,
        "base_loss": base_loss,
        "tuned_loss": tuned_loss,
        "delta": tuned_loss - base_loss,
        "definition": "mean per-token NLL on general text, tuned − base (PEFT method comparison)",
    }
