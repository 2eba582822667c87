"""Atomic writes: complete files with ordinary permissions, and no debris when the writer fails."""

from __future__ import annotations

import os
import stat

import pytest

from fimlora.io import atomic_write, atomic_write_json


def test_written_file_has_umask_permissions(tmp_path):
    path = atomic_write_json(tmp_path / "sub" / "x.json", {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n'
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("old")

    def explode(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, explode)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]
