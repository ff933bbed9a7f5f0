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


def run_under_interpreter(cases: pathlib.Path, what: str, timeout: int) -> None:
    """Runs the pytest file `cases` in a child process with TRITON_INTERPRET=1 and asserts that
    it passed with nothing skipped (also used by test_fuzz.py for its interpreter fuzz)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(cases), "-q", "-p", "no:cacheprovider", "-x"],
        cwd=cases.parent.parent, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, f"{what} failed:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1], result.stdout[-2000:]


def test_triton_kernels_under_the_interpreter():
    run_under_interpreter(CASES, "interpreter cases", timeout=600)
