"""A wheel holds every module: setuptools' ``packages.find`` (pyproject.toml) skips a folder without
``__init__.py``, which an editable install would still import."""

from __future__ import annotations

from pathlib import Path

from setuptools import find_packages

SRC = Path(__file__).resolve().parents[1] / "src"


def test_every_source_folder_is_a_package_the_wheel_includes():
    found = set(find_packages(str(SRC)))
    folders = {
        ".".join(path.parent.relative_to(SRC).parts)
        for path in (SRC / "fimlora").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert folders and folders <= found, sorted(folders - found)
