"""Shared test set-up: offline mode, two torch threads, tiny-model fixtures."""

from __future__ import annotations

import os

# Before any Hugging Face import: the hub libraries read these once, at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a shared CPU a thread
# spinning at a barrier for its descheduled sibling made small-model passes many times slower (SmolLM2
# generation 8x; benchmarks/_common.py sets the same for the same reason).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch
from tiny_models import make_tiny_bert, make_tiny_llama
from transformers import BertForSequenceClassification, LlamaForCausalLM

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_bert() -> BertForSequenceClassification:
    return make_tiny_bert()


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture(scope="session", autouse=True)
def _bitsandbytes_as_on_an_avx512_bf16_cpu():
    """Every machine, CI included, takes bitsandbytes' AVX512-BF16 path: its NF4 layers are built to
    repack their weights at the first eval-mode forward (tests/methods/test_quantized_on_every_cpu.py)."""
    from fimlora import lazy_bitsandbytes

    try:
        lazy_bitsandbytes.load()
    except ImportError:
        yield
        return
    import bitsandbytes.nn.modules as bnb_modules

    patch = pytest.MonkeyPatch()
    patch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    yield
    patch.undo()
