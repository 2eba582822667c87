"""A saved Fisher records the SHA-256 of its tensor file, and loading refuses a file that differs."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from fimlora.errors import FimloraError
from fimlora.fisher import FisherResult
from fimlora.fisher.result import META_FILE, TENSORS_FILE


def _result() -> FisherResult:
    g = torch.Generator().manual_seed(0)
    diagonal = {f"layer.{i}.dense": torch.rand(8, 4, generator=g) for i in range(3)}
    gradients = {name: torch.randn(8, 4, generator=g) for name in diagonal}
    return FisherResult(diagonal, num_examples=16, estimator="empirical", gradients=gradients)


def test_the_checksum_is_the_files_sha256_and_a_clean_file_loads(tmp_path):
    result = _result()
    result.save(tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    digest = hashlib.sha256((tmp_path / TENSORS_FILE).read_bytes()).hexdigest()
    assert meta["checksums"] == {TENSORS_FILE: {"sha256": digest}}
    loaded = FisherResult.load(tmp_path)
    for name, tensor in result.diagonal.items():
        assert loaded.diagonal[name].equal(tensor) and loaded.gradients[name].equal(result.gradients[name])


def test_one_flipped_bit_is_refused(tmp_path):
    _result().save(tmp_path)
    path = tmp_path / TENSORS_FILE
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01  # in the last tensor's data: the file still parses, one value changed
    path.write_bytes(bytes(raw))
    with pytest.raises(FimloraError, match="does not match the SHA-256"):
        FisherResult.load(tmp_path)


def test_files_written_before_checksums_still_load_and_bad_ones_are_one_line(tmp_path):
    _result().save(tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    del meta["checksums"]
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    assert FisherResult.load(tmp_path).num_examples == 16
    (tmp_path / TENSORS_FILE).write_bytes(b"\x00" * 7)
    with pytest.raises(FimloraError, match="not a readable safetensors file") as info:
        FisherResult.load(tmp_path)
    assert "\n" not in str(info.value)
    (tmp_path / META_FILE).write_text("{ not json")
    with pytest.raises(FimloraError, match="not readable JSON"):
        FisherResult.load(tmp_path)
