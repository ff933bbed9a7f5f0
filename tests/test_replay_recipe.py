"""lora_ext.kernels.replay: what a recorded masked piece becomes for the C++ replay.

The replay itself needs a GPU (tests/test_cuda.py checks it against the Python route);
here the recipe builder runs on CPU tensors with stand-ins for Triton's compiled kernels,
so the classification of every argument and each refusal is checked on every machine.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lora_ext.kernels import replay


def compiled_kernel(signature, **metadata):
    meta = dict(num_warps=4, shared=1024, num_ctas=1, global_scratch_size=0, cluster_dims=(1, 1, 1))
    meta.update(metadata)
    return SimpleNamespace(metadata=SimpleNamespace(**meta), src=SimpleNamespace(signature=signature),
                           kernel=b"cubin", name="kernel_name")


def jit_kernel(names):
    return SimpleNamespace(arg_names=list(names))


NAMES = ["inp_ptr", "out_ptr", "tmp_ptr", "M", "stride", "big", "scale", "BLOCK"]
SIGNATURE = {"inp_ptr": "*bf16", "out_ptr": "*bf16", "tmp_ptr": "*fp32", "M": "i32", "stride": "constexpr",
             "big": "i64", "scale": "fp32", "BLOCK": "constexpr"}


def test_arguments_are_classified_and_constexprs_dropped():
    x, seed = torch.randn(8, 4), torch.tensor([3])
    out, tmp = torch.empty(8, 2), torch.empty(3, 8, 2)
    launches = [
        (jit_kernel(NAMES), compiled_kernel(SIGNATURE), (2, 3), (x, out, tmp, 8, 1, 2**40, 0.5)),
        (jit_kernel(NAMES), compiled_kernel(SIGNATURE, shared=0), (5,), (tmp, out, seed, 9, 1, 7, 2.0)),
    ]
    temps, specs = replay._recipe((x, 1.5, seed, True), (out,), launches)
    assert len(temps) == 1 and temps[0] is tmp
    cubin, name, warps, shared, grid, args = specs[0]
    assert (cubin, name, warps, shared, grid) == (b"cubin", "kernel_name", 4, 1024, (2, 3, 1))
    assert args == [("input", 0), ("output", 0), ("temp", 0), ("i32", 8), ("i64", 2**40), ("fp32", 0.5)]
    assert specs[1][4] == (5, 1, 1)
    assert specs[1][5] == [("temp", 0), ("output", 0), ("input", 2), ("i32", 9), ("i64", 7), ("fp32", 2.0)]


def _refused(inputs, outputs, launches):
    with pytest.raises(replay._NotReplayable):
        replay._recipe(inputs, outputs, launches)


@pytest.mark.parametrize("metadata", [dict(global_scratch_size=64), dict(num_ctas=2), dict(cluster_dims=(2, 1, 1)),
                                      dict(profile_scratch_size=8), dict(launch_pdl=True)], ids=str)
def test_kernels_needing_more_than_a_plain_launch_are_refused(metadata):
    x, out, tmp = torch.randn(8, 4), torch.empty(8, 2), torch.empty(3)
    _refused((x,), (out,), [(jit_kernel(NAMES), compiled_kernel(SIGNATURE, **metadata), (1,),
                              (x, out, tmp, 8, 1, 7, 0.5))])


def test_unknown_argument_types_and_missing_signatures_are_refused():
    x, out, tmp = torch.randn(8, 4), torch.empty(8, 2), torch.empty(3)
    args = (x, out, tmp, 8, 1, 7, 0.5)
    _refused((x,), (out,), [(jit_kernel(NAMES), compiled_kernel({**SIGNATURE, "M": "u1"}), (1,), args)])
    no_signature = compiled_kernel(SIGNATURE)
    no_signature.src = None
    _refused((x,), (out,), [(jit_kernel(NAMES), no_signature, (1,), args)])
    # The interpreter returns no compiled kernel.
    _refused((x,), (out,), [(jit_kernel(NAMES), None, (1,), args)])


def test_pointers_that_are_not_inputs_outputs_or_fresh_temporaries_are_refused():
    x, out = torch.randn(8, 4), torch.empty(8, 2)
    kernel, compiled = jit_kernel(NAMES), compiled_kernel(SIGNATURE)
    # A view into an input (at another address): not a temporary C++ could allocate.
    _refused((x,), (out,), [(kernel, compiled, (1,), (x, out, x[1:], 8, 1, 7, 0.5))])
    # A temporary that is a strided view.
    base = torch.empty(4, 6)
    _refused((x,), (out,), [(kernel, compiled, (1,), (x, out, base[:, ::2], 8, 1, 7, 0.5))])
    # An output that is an input.
    _refused((x,), (x,), [(kernel, compiled, (1,), (x, x, out, 8, 1, 7, 0.5))])
    # Two inputs at one address.
    _refused((x, x), (out,), [(kernel, compiled, (1,), (x, out, torch.empty(2), 8, 1, 7, 0.5))])


def test_record_gives_the_outputs_and_refuses_outputs_no_launch_wrote():
    """A piece whose output comes from a torch op instead of a recorded launch (here: no
    launch at all) cannot be replayed: C++ would hand back an uninitialised tensor."""
    x = torch.randn(4, 3)
    outputs, recipe = replay.record(lambda t, factor: (t * factor, t + factor), (x, 2.0))
    assert torch.equal(outputs[0], x * 2.0) and torch.equal(outputs[1], x + 2.0)
    assert recipe is None
    # Empty outputs need no launch.
    outputs, recipe = replay.record(lambda t: t.new_empty(0), (x,))
    assert outputs[0].numel() == 0 and recipe == ([], [])


def test_recordings_do_not_nest():
    x = torch.randn(2)
    with pytest.raises(RuntimeError, match="cannot nest"):
        replay.record(lambda t: replay.record(lambda u: u * 2, (t,)), (x,))
