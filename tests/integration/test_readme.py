"""The README's Python API example runs as written and does what the README says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_readme_python_example_runs():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    api = readme[readme.index("## Python API") :]
    code = re.search(r"```python\n(.*?)```", api, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    allocation, lora_config = namespace["allocation"], namespace["lora_config"]
    assert allocation.num_params <= allocation.budget == 165_888
    assert sorted(lora_config.target_modules) == sorted(allocation.ranks)
    assert all(lora_config.rank_pattern.get(n, lora_config.r) == r for n, r in allocation.ranks.items())
