"""Tiny models built from configs in code (no downloads), seeded: BERT-shaped and Llama-shaped."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM


def make_tiny_bert(num_labels: int = 3, layers: int = 2, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=60,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=num_labels,
        pad_token_id=0,
        initializer_range=0.2,
    )
    return BertForSequenceClassification(config).eval()


def make_tiny_llama(layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=60,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
        initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval()


# A run's deployment figures (inference timing, general-text forgetting, prompt continuations) as
# config settings that turn them off: tested in tests/deploy, elsewhere they would only cost time.
NO_DEPLOYMENT_FIGURES = {"inference": False, "prompts": [], "forgetting_dataset": None}
