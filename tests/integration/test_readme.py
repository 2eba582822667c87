"""The Python API page's example (docs/reference/api.md) runs as written and does what the page says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_the_python_api_example_runs():
    page = (Path(__file__).resolve().parents[2] / "docs" / "reference" / "api.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "docs/reference/api.md", "exec"), namespace)
    allocation, lora_config = namespace["allocation"], namespace["lora_config"]
    assert allocation.num_params <= allocation.budget == 165_888
    assert sorted(lora_config.target_modules) == sorted(allocation.ranks)
    assert all(lora_config.rank_pattern.get(n, lora_config.r) == r for n, r in allocation.ranks.items())
