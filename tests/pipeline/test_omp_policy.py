"""Every fimlora command sleeps idle OpenMP threads (OMP_WAIT_POLICY=PASSIVE) unless told otherwise, and
sets it before torch (and so OpenMP) is loaded."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = """
import os, sys
import fimlora.cli
assert "torch" not in sys.modules, "torch loaded before main() could set the OpenMP policy"
try:
    fimlora.cli.main(["methods"])
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
print("POLICY=" + os.environ["OMP_WAIT_POLICY"])
"""


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_cli_sets_a_passive_openmp_wait_policy_unless_one_is_given(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True)
    assert f"POLICY={expected}" in out.stdout
