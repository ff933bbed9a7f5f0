"""Hypothesis fuzz of the Triton kernels (lora_ext.kernels.triton_lora) under triton's interpreter.

Not collected by the main pytest session (no test_ prefix): tests/test_fuzz.py runs this file
in a child pytest process with TRITON_INTERPRET=1, which must be set before triton is imported.

The problems are tests/_fuzz_problems.py's, small and in float32/float16 only (the
interpreter's bfloat16 arithmetic is wrong). Each is checked by run_case of
tests/_triton_interpret_cases.py: y, xa and the requested gradients of the Triton kernels
against the float64 reference, within twice the CPU op's error plus a dtype slack.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported (run via test_fuzz.py)", allow_module_level=True)

from _fuzz_problems import DERANDOMIZE, TENSOR_NAMES, fuzz_examples, problems  # noqa: E402
from _triton_interpret_cases import run_case  # noqa: E402

# In the interpreter the blocks are 32 wide: these sizes give one, two and three blocks
# with partial last blocks, and the degenerate 0 and 1.
INTERPRETER_SIZES = (0, 1, 2, 5, 13, 17, 31, 32, 33, 63, 65)


@given(problem=problems(budget=3_000, sizes=INTERPRETER_SIZES, dtypes=(torch.float32, torch.float16)))
@settings(max_examples=fuzz_examples(100), deadline=None, print_blob=True, derandomize=DERANDOMIZE,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
def test_triton_kernels_match_reference(problem):
    # run_case uses its own scale (0.75) and grad_y; the problem gives everything else.
    tensors = problem.build("cpu")
    inputs = {name: None if tensors[name] is None else tensors[name].detach() for name in TENSOR_NAMES}
    output_mask = [problem.present(name) and problem.requires_grad[i] for i, name in enumerate(TENSOR_NAMES)]
    run_case(inputs, problem.dropout_p, problem.dropout_position, problem.seed, output_mask)
