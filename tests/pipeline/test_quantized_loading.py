"""A quantised load (``load_model(..., quantization=...)``) reads the checkpoint tensor by tensor: the same
quantised model as transformers' own memory-mapped load, from one file or from shards, while the
checkpoint file is never mapped into the process (so its float weights are never resident together).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fimlora.models import load_model
from fimlora.quantization import bnb_config, prepare_quantized_model

pytest.importorskip("bitsandbytes")
MAPS = Path("/proc/self/maps")
pytestmark = pytest.mark.skipif(not MAPS.is_file(), reason="reads /proc/self/maps (Linux)")


@pytest.fixture(scope="module")
def sharded_llama_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama saved in shards of at most 1 MB (an index and several files)."""
    directory = tmp_path_factory.mktemp("sharded-llama")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model.save_pretrained(directory, max_shard_size="1MB")
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(directory)
    assert (
        len(list(directory.glob("*.safetensors"))) > 1
        and (directory / "model.safetensors.index.json").is_file()
    )
    return directory


def _transformers_load(directory: Path, quantization: str):
    """transformers' own load (memory-mapped) of the same model, quantised and prepared as fimlora does."""
    model = AutoModelForCausalLM.from_pretrained(
        directory,
        dtype=torch.float32,
        quantization_config=bnb_config(quantization, [re.escape("lm_head")]),  # its one linear outside blocks
    )
    return prepare_quantized_model(model)


def _mapped_checkpoints(directory: Path) -> list[str]:
    return [
        line for line in MAPS.read_text().splitlines() if str(directory) in line and "safetensors" in line
    ]


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
@pytest.mark.parametrize("layout", ["one file", "shards"])
def test_the_quantised_model_is_transformers_own(
    quantization,
    layout,
    tiny_llama_dir,
    sharded_llama_dir,
) -> None:
    directory = (tiny_llama_dir if layout == "one file" else sharded_llama_dir).resolve()
    ours = load_model(str(directory), "causal-lm", quantization=quantization).model
    reference = _transformers_load(directory, quantization)
    ours_state, reference_state = ours.state_dict(), reference.state_dict()
    assert ours_state.keys() == reference_state.keys()
    for key, tensor in reference_state.items():
        assert torch.equal(ours_state[key], tensor), key
    assert ours.name_or_path == reference.name_or_path == str(directory)
    assert ours.generation_config.to_dict() == reference.generation_config.to_dict()
    ids = torch.arange(1, 13).view(2, 6)
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, reference(input_ids=ids).logits)


@pytest.mark.parametrize("load", ["fimlora", "transformers"])
def test_the_checkpoint_is_never_mapped_during_a_quantised_load(load, tiny_llama_dir) -> None:
    """Sampled every millisecond while loading; transformers' own load is the look-alike that maps it."""
    directory = tiny_llama_dir.resolve()
    seen: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.001):
            seen.extend(_mapped_checkpoints(directory))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        if load == "fimlora":
            model = load_model(str(directory), "causal-lm", quantization="nf4").model
        else:
            model = _transformers_load(directory, "nf4")
    finally:
        done.set()
        watcher.join()
    seen.extend(_mapped_checkpoints(directory))  # and after: nothing still views the file
    assert model is not None
    assert (not seen) if load == "fimlora" else seen
