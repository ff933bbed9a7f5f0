"""Runs the Triton kernels on CPU under triton's interpreter (tests/_triton_interpret_cases.py).

TRITON_INTERPRET must be set before triton is first imported, so the cases run in a
child pytest process with the variable in its environment; this session stays as it is.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

CASES = pathlib.Path(__file__).with_name("_triton_interpret_cases.py")


def test_triton_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(CASES), "-q", "-p", "no:cacheprovider", "-x"],
        cwd=CASES.parent.parent, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"interpreter cases failed:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1], result.stdout[-2000:]
