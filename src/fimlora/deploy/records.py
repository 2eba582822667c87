"""What a run records after training besides its held-out metric (``evaluate`` section of the config).

* ``labels``: the class names, for classification (an export writes them as ``id2label``);
* ``adapter_size_bytes``: the size of ``adapter/`` on disk as the run saved it (PEFT's files; HydraLoRA's;
  Delta-LoRA's adapter and drift; full fine-tuning's whole model);
* ``inference`` (``evaluate.inference``): throughput and peak memory of the trained model unmerged, merged
  (for methods that merge) and of the base model on one fixed workload (:mod:`fimlora.deploy.inference`),
  ``evaluate.inference_examples`` inputs drawn from the evaluation split with the run's seed;
  ``merged_over_base`` / ``unmerged_over_base`` are throughput ratios;
* ``generations`` (causal LM, ``evaluate.prompts``): greedy continuations of fixed prompts by the trained
  and by the base model, so a report can show them without loading a model;
* ``forgetting`` (causal LM, goes into ``metrics``): :mod:`fimlora.forgetting`.

Everything about the base model that does not depend on the method (its general-text loss and
continuations) is computed once per experiment and reused by every method.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fimlora.deploy.generate import continue_prompts
from fimlora.deploy.inference import (
    classification_workload,
    directory_bytes,
    generation_workload,
    measure,
    ratios,
)
from fimlora.forgetting import forgetting_record, general_loss, load_general_text

PROMPT_TOKENS = 16  # prompt length of the generation-speed workload (causal LM)


def deployment_records(prepared: Any, model: nn.Module, adapter: Any, adapter_dir: Path) -> dict[str, Any]:
    """The records above for the trained ``model`` of one method (``prepared``: the experiment's
    :class:`fimlora.experiment.Prepared`; ``adapter``: the method's AdapterKind)."""
    config = prepared.config
    settings = config.evaluate
    task = prepared.data.task
    out: dict[str, Any] = {"adapter_size_bytes": directory_bytes(adapter_dir)}
    if task == "classification":
        out["labels"] = list(prepared.data.label_names or [])
    if settings.inference:
        out["inference"] = inference_record(prepared, model, adapter)
    if task == "causal-lm":
        if settings.prompts:
            out["generations"] = generations_record(prepared, model)
        out["forgetting"] = forgetting_of(prepared, model)
    return out


def _eval_subset(prepared: Any, n: int) -> Any:
    split = prepared.tokenized[prepared.config.train.eval_split]
    return split.shuffle(seed=prepared.config.seed).select(range(min(n, len(split))))


def inference_record(prepared: Any, model: nn.Module, adapter: Any) -> dict[str, Any]:
    """``result.json["inference"]`` (module docstring)."""
    config = prepared.config
    rows = _eval_subset(prepared, config.evaluate.inference_examples)
    if prepared.data.task == "classification":
        size = config.train.eval_batch_size
        batches = [
            prepared.collator([rows[j] for j in range(i, min(i + size, len(rows)))])
            for i in range(0, len(rows), size)
        ]
        workload = classification_workload(batches)
    else:
        length = min(PROMPT_TOKENS, config.train.max_length)
        prompts = torch.tensor([ids[:length] for ids in rows["input_ids"][:]], dtype=torch.long)
        tokenizer = prepared.loaded.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        workload = generation_workload(
            prompts, new_tokens=config.evaluate.inference_new_tokens, pad_token_id=pad
        )
    models: dict[str, nn.Module] = {"unmerged": model}
    not_merged = adapter.unmergeable_reason
    if config.quantization != "none":
        # Folding ΔW into a quantised W re-quantises the sum: not the trained model (export refuses it).
        not_merged = f"a {config.quantization} base is not merged: W + ΔW would be quantised again"
    if not_merged is None:
        models["merged"] = adapter.merge(copy.deepcopy(model))
    base = prepared.loaded.model
    device = next(model.parameters()).device
    if next(base.parameters()).device != device:  # trained on a GPU: time the base model there too
        base = copy.deepcopy(base).to(device)
    models["base"] = base
    record = measure(models, workload)
    del models
    record.update(ratios(record))
    if not_merged is not None:
        record["not_merged"] = not_merged
    return record


def generations_record(prepared: Any, model: nn.Module) -> dict[str, Any]:
    """``result.json["generations"]``: greedy continuations of ``evaluate.prompts``, trained and base."""
    settings = prepared.config.evaluate
    tokenizer = prepared.loaded.tokenizer
    key = ("generations", tuple(settings.prompts), settings.continuation_tokens)
    if key not in prepared.cache:
        prepared.cache[key] = continue_prompts(
            prepared.loaded.model, tokenizer, settings.prompts, max_new_tokens=settings.continuation_tokens
        )
    return {
        "decoding": "greedy",
        "max_new_tokens": settings.continuation_tokens,
        "prompts": list(settings.prompts),
        "continuations": continue_prompts(
            model, tokenizer, settings.prompts, max_new_tokens=settings.continuation_tokens
        ),
        "base": list(prepared.cache[key]),
    }


def forgetting_of(prepared: Any, model: nn.Module) -> dict[str, Any]:
    """``result.json["metrics"]["forgetting"]``, or ``{"skipped": why}`` when nothing is measured."""
    config = prepared.config
    settings = config.evaluate
    key = ("forgetting", settings.forgetting_dataset, settings.forgetting_blocks, config.train.max_length)
    if key not in prepared.cache:
        text, why = load_general_text(
            config.dataset,
            settings.forgetting_dataset,
            prepared.loaded.tokenizer,
            max_length=config.train.max_length,
            num_blocks=settings.forgetting_blocks,
            trust_remote_code=config.trust_remote_code,
        )
        base = (
            None
            if text is None
            else general_loss(
                prepared.loaded.model, text, prepared.collator, batch_size=config.train.eval_batch_size
            )
        )
        prepared.cache[key] = (text, why, base)
    text, why, base_loss = prepared.cache[key]
    if text is None:
        return {"skipped": why}
    tuned = general_loss(model, text, prepared.collator, batch_size=config.train.eval_batch_size)
    return forgetting_record(text, base_loss, tuned)
