"""Text generation with a causal-LM run's model: greedy, or sampled from a seed.

Prompts are plain text, tokenized with the run's tokenizer and its own special tokens (as the training
text was, :mod:`fimlora.data.tokenize`), one prompt at a time, so a continuation never depends on what
else was generated with it (no padding). Generation stops at the tokenizer's EOS or after
``max_new_tokens``; only the new tokens are decoded, special tokens dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig

from fimlora.errors import FimloraError


def generation_config(
    tokenizer: Any,
    *,
    max_new_tokens: int,
    sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    min_new_tokens: int = 0,
) -> GenerationConfig:
    """A complete ``GenerationConfig`` (nothing inherited from the checkpoint's, whose sampling defaults
    would otherwise leak into "greedy")."""
    if max_new_tokens < 1:
        raise FimloraError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    if sample and not (temperature > 0 and 0 < top_p <= 1):
        raise FimloraError(f"Sampling needs temperature > 0 and 0 < top_p ≤ 1, got {temperature}, {top_p}.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": min_new_tokens,
        "do_sample": sample,
        "pad_token_id": pad,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if sample:
        options.update(temperature=temperature, top_p=top_p, top_k=0)
    return GenerationConfig(**options)


@torch.no_grad()
def continue_prompts(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    sample: bool = False,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> list[str]:
    """The continuation of each prompt (new text only). Greedy unless ``sample``; a sampled continuation
    is a function of ``seed`` (the torch RNG is seeded before each prompt)."""
    config = generation_config(
        tokenizer, max_new_tokens=max_new_tokens, sample=sample, temperature=temperature, top_p=top_p
    )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for prompt in prompts:
            if not prompt:
                raise FimloraError("A prompt must not be empty.")
            encoded = tokenizer(prompt, return_tensors="pt").to(device)
            if sample:
                torch.manual_seed(seed)
            generated = model.generate(  # type: ignore[operator]
                input_ids=encoded["input_ids"],
                attention_mask=encoded["attention_mask"],
                generation_config=config,
            )
            new = generated[0, encoded["input_ids"].shape[1] :]
            out.append(tokenizer.decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out
