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


PTX_DECLARATION = {"ptr": ".u64 .ptr .global .align 1 {}", "u32": ".u32 {}", "u64": ".u64 {}", "f32": ".f32 {}",
                   "u8": ".u8 {}", "map": ".align 64 .b8 {}[128]"}
SIGNATURE_PARAMETER = {"i32": "u32", "i64": "u64", "fp32": "f32", "u1": "u8"}


def ptx_entry(parameters, name="kernel_name"):
    """A PTX kernel entry with these parameters (keys of PTX_DECLARATION), as Triton writes them."""
    listed = ",\n".join("\t.param " + PTX_DECLARATION[p].format(f"{name}_param_{i}") for i, p in enumerate(parameters))
    return f".visible .entry {name}(\n{listed}\n)\n.reqntid 128\n{{\n\tret;\n}}\n"


def signature_parameters(signature):
    """The PTX parameters Triton declares for a signature: one per non-constexpr argument (a
    tensor descriptor: the CUtensorMap block, then its shape and strides), then two scratch pointers."""
    parameters = []
    for kind in signature.values():
        if kind.startswith("tensordesc<"):
            rank = kind.split("[")[1].count(",") + 1
            parameters += ["map"] + ["u32"] * rank + ["u64"] * rank
        elif kind.startswith("*"):
            parameters.append("ptr")
        elif kind != "constexpr":
            parameters.append(SIGNATURE_PARAMETER[kind])
    return parameters + ["ptr", "ptr"]


def compiled_kernel(signature, parameters=None, **metadata):
    meta = dict(num_warps=4, shared=1024, num_ctas=1, global_scratch_size=0, cluster_dims=(1, 1, 1))
    meta.update(metadata)
    ptx = ptx_entry(signature_parameters(signature) if parameters is None else parameters)
    return SimpleNamespace(metadata=SimpleNamespace(**meta), src=SimpleNamespace(signature=signature),
                           kernel=b"cubin", name="kernel_name", asm={"ptx": ptx})


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


def test_the_kernel_parameter_list_must_match_the_arguments():
    """The PTX entry is the ground truth of what the kernel reads: a Triton that lays the
    parameters out otherwise (one more, one fewer, another type) gives no recipe."""
    x, out, tmp = torch.randn(8, 4), torch.empty(8, 2), torch.empty(3)
    args = (x, out, tmp, 8, 1, 7, 0.5)
    expected = signature_parameters(SIGNATURE)
    assert replay._recipe((x,), (out,), [(jit_kernel(NAMES), compiled_kernel(SIGNATURE, expected), (1,), args)])
    for parameters in (expected[:-1], expected + ["ptr"], expected[:3] + ["u64"] + expected[4:],
                       expected[:3] + ["u8"] + expected[4:]):
        _refused((x,), (out,), [(jit_kernel(NAMES), compiled_kernel(SIGNATURE, parameters), (1,), args)])
    no_ptx = compiled_kernel(SIGNATURE)
    no_ptx.asm = {}
    _refused((x,), (out,), [(jit_kernel(NAMES), no_ptx, (1,), args)])


DESC_NAMES = ["x_desc", "y_desc", "scale", "BLOCK"]
DESC_SIGNATURE = {"x_desc": "tensordesc<bf16[16, 16]>", "y_desc": "tensordesc<bf16[8, 32]>", "scale": "fp32",
                  "BLOCK": "constexpr"}
# What Triton 3.6 (H200) and 3.9 record per descriptor: swizzle mode, element bytes, the device's
# data-type number (10: bfloat16), the block shape the compiler chose.
DESC_META = [dict(swizzle=3, elem_size=2, elem_type=10, block_size=[16, 16], fp4_padded=False),
             dict(swizzle=1, elem_size=2, elem_type=10, block_size=[8, 32], fp4_padded=False)]


def descriptor_launch(x, y, meta=DESC_META, signature=DESC_SIGNATURE):
    descriptor = pytest.importorskip("triton.tools.tensor_descriptor").TensorDescriptor
    compiled = compiled_kernel(signature, tensordesc_meta=meta)
    return (jit_kernel(DESC_NAMES), compiled, (4, 2),
            (descriptor.from_tensor(x, [16, 16]), descriptor.from_tensor(y, [8, 32]), 0.25))


def test_tensor_descriptors_become_tensor_maps_with_shape_and_strides():
    x = torch.randn(40, 64, dtype=torch.bfloat16)[:, :48]  # rows of 64 elements, 48 used
    y = torch.empty(40, 96, dtype=torch.bfloat16)
    temps, specs = replay._recipe((x,), (y,), [descriptor_launch(x, y)])
    assert temps == [] and specs[0][4] == (4, 2, 1)
    assert specs[0][5] == [
        # host data type 9 (bfloat16), dims and box innermost first, byte strides of the outer dims
        ("tensormap", "input", 0, (9, [48, 40], [128], [16, 16], 3, 0)), ("i32", 40), ("i32", 48), ("i64", 64),
        ("i64", 1),
        ("tensormap", "output", 0, (9, [96, 40], [192], [32, 8], 1, 0)), ("i32", 40), ("i32", 96), ("i64", 96),
        ("i64", 1),
        ("fp32", 0.25),
    ]


def test_tensor_descriptors_the_recipe_cannot_encode_are_refused():
    x = torch.randn(40, 48, dtype=torch.bfloat16)
    y = torch.empty(40, 96, dtype=torch.bfloat16)
    _refused((x,), (y,), [descriptor_launch(x, y, meta=None)])  # a Triton without descriptor metadata
    _refused((x,), (y,), [descriptor_launch(x, y, meta=DESC_META[:1])])
    _refused((x,), (y,), [descriptor_launch(x, y, meta=[DESC_META[0], {**DESC_META[1], "fp4_padded": True}])])
    _refused((x,), (y,), [descriptor_launch(x, y, meta=[DESC_META[0], {**DESC_META[1], "elem_size": 4}])])
    # A descriptor over a tensor that is neither an input, an output nor a fresh temporary.
    _refused((x,), (y,), [descriptor_launch(x[8:], y)])


def test_a_piece_that_declines_gives_no_outputs_and_no_recipe():
    assert replay.record(lambda t: None, (torch.randn(3),)) == (None, None)


def test_a_descriptor_data_type_the_launcher_does_not_know_is_refused():
    x = torch.randn(40, 48, dtype=torch.bfloat16)
    y = torch.empty(40, 96, dtype=torch.bfloat16)
    _refused((x,), (y,), [descriptor_launch(x, y, meta=[DESC_META[0], {**DESC_META[1], "elem_type": 99}])])
