"""Compiles, for an H100/H200 (sm_90), the Triton kernels that the launchers of
lora_ext.kernels.triton_lora would launch on a GPU — on a machine without one.

The interpreter tests (test_triton_interpret.py) check the kernels' numbers but not
that they compile: the interpreter accepts code the compiler rejects (for example a
global that is not a tl.constexpr). Here the launchers run on CPU tensors with the
kernels replaced by recorders; every recorded launch (its argument types, constexprs,
num_warps/num_stages, with the GPU tile configuration) is then compiled to a cubin
with triton.compile for target cuda sm_90. Integers equal to 1 are passed as
constexprs, as triton's specialisation does at launch (except do_not_specialize ones).

By default a few scenarios cover every constexpr branch; LORA_EXT_COMPILE_ALL=1 adds
every rank class and dropout variant (several minutes).
"""
from __future__ import annotations

import os
import re

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compiles for the GPU; not under the interpreter", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import lora_ext  # noqa: E402,F401
from lora_ext.kernels import fused_forward, philox, replay, triton_lora  # noqa: E402

TensorDescriptor = fused_forward.TensorDescriptor

SM90 = GPUTarget("cuda", 90, 32)
POINTER_TYPES = {
    torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
    torch.int64: "*i64", torch.uint8: "*u8",
}
KERNELS = [
    (triton_lora, "_lora_down_kernel"),
    (triton_lora, "_lora_down_reduce_kernel"),
    (triton_lora, "_lora_up_kernel"),
    (triton_lora, "_sum_partials_kernel"),
    (philox, "_keep_mask_kernel"),
]


class RecordingKernel:
    """Stands in for a @triton.jit function: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, fn, launches):
        self.fn = fn
        self.launches = launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            assert all(isinstance(g, int) and g > 0 for g in grid), f"{self.fn.__name__}: bad grid {grid}"
            self.launches.append((self.fn, args, kwargs))
        return launch


def compile_launch(fn, args, kwargs):
    """Compiles one recorded launch for sm_90; returns a key that identifies the variant."""
    return compile_for_sm90(fn, args, kwargs)[0]


def compile_for_sm90(fn, args, kwargs):
    """(a key that identifies the variant, the compiled kernel) of one recorded launch."""
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(fn.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k not in options})
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        value = values[param.name]
        # Triton's launch also marks pointers and integers divisible by 16 (unless
        # do_not_specialize): the compiled variant then has 16-byte vector loads. Mirrored here
        # so that the variant the GPU runs is the one compiled.
        specialisable = not param.is_constexpr and not getattr(param, "do_not_specialize", False)
        if specialisable and isinstance(value, torch.Tensor) and value.data_ptr() % 16 == 0:
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif specialisable and type(value) is int and value % 16 == 0:
            attrs[(index,)] = [["tt.divisibility", 16]]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = POINTER_TYPES[value.dtype]
        elif isinstance(value, TensorDescriptor):  # as triton's launch types a host descriptor
            block = ", ".join(str(b) for b in value.block_shape)
            signature[param.name] = f"tensordesc<{POINTER_TYPES[value.base.dtype][1:]}[{block}]>"
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int) and value == 1 and not getattr(param, "do_not_specialize", False):
            signature[param.name] = "constexpr"  # triton specialises 1 at launch
            constexprs[param.name] = 1
        elif isinstance(value, int):
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {param.name} of type {type(value)}")
    key = (fn.__name__, tuple(sorted(signature.items())), tuple(sorted((k, str(v)) for k, v in constexprs.items())),
           tuple(sorted(options.items())), tuple(sorted(attrs)))
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=SM90, options=options)
    assert compiled.asm.get("cubin"), f"{fn.__name__}: no cubin"
    return key, compiled


def scenario_inputs(M, K, N, r, dtype, lora_dtype=None, bias=True, weight=True):
    lora_dtype = lora_dtype or dtype
    return (
        torch.randn(M, K, dtype=dtype),
        torch.randn(N, K, dtype=dtype) if weight else None,
        torch.randn(N, dtype=dtype) if bias else None,
        torch.randn(r, K, dtype=lora_dtype),
        torch.randn(N, r, dtype=lora_dtype),
    )


def record(monkeypatch, scenarios):
    launches = []
    for module, name in KERNELS:
        monkeypatch.setattr(module, name, RecordingKernel(getattr(module, name), launches))
    for (M, K, N, r, dtype, lora_dtype, bias, weight), p, position, masks in scenarios:
        x, w, b, A, B = scenario_inputs(M, K, N, r, dtype, lora_dtype, bias, weight)
        seed = torch.tensor([3], dtype=torch.int64) if p > 0 else None
        y, xa = triton_lora.linear_forward(x, w, b, A, B, 0.5, p, position, seed)
        for mask in masks:
            mask = [mask[0], mask[1] and w is not None, *mask[2:]]
            triton_lora.linear_backward(torch.randn_like(y), x, w, A, B, xa, 0.5, p, position, seed, mask)
    return launches


ALL = [True] * 5
DEFAULT_SCENARIOS = [
    # (M, K, N, r, dtype, lora dtype, bias, weight), dropout p, position, backward output masks
    ((64, 96, 96, 16, torch.bfloat16, None, True, True), 0.0, "post", [ALL]),
    ((64, 96, 96, 16, torch.bfloat16, None, True, True), 0.1, "post", [ALL, [False, False, False, False, True]]),
    ((1, 96, 40, 3, torch.float16, torch.float32, True, True), 0.1, "pre", [ALL]),
    ((5, 17, 24, 1, torch.float32, None, False, False), 0.0, "post", [[True, False, False, True, False]]),
    ((5, 17, 24, 4, torch.float64, None, True, True), 0.2, "pre", [ALL]),  # composition: the mask kernel
]
ALL_SCENARIOS = DEFAULT_SCENARIOS + [
    ((256, 96, 96, r, dtype, None, True, True), p, position, [ALL, [True, False, False, False, False]])
    for r in (32, 64, 128, 256)
    for dtype in (torch.bfloat16, torch.float32)
    for p, position in ((0.0, "post"), (0.1, "pre"), (0.1, "post"))
]


def test_launched_kernels_compile_for_sm90(monkeypatch):
    scenarios = ALL_SCENARIOS if os.environ.get("LORA_EXT_COMPILE_ALL") == "1" else DEFAULT_SCENARIOS
    launches = record(monkeypatch, scenarios)
    monkeypatch.undo()
    names = {fn.__name__ for fn, _, _ in launches}
    assert names == {name for _, name in KERNELS}, f"scenarios launched only {sorted(names)}"
    compiled = set()
    for fn, args, kwargs in launches:
        compiled.add(compile_launch(fn, args, kwargs))
    assert len(compiled) >= 8


@pytest.mark.skipif(TensorDescriptor is None, reason="this triton has no host-side tensor descriptors")
@pytest.mark.parametrize("product", ["forward", "forward_post", "grad_input", "grad_input_given_xa"])
def test_fused_gemm_compiles_for_sm90_into_a_launch_the_replay_understands(monkeypatch, product):
    """The fused GEMM (TMA descriptors), forward (without and with 'post' dropout) and input
    gradient (computing g B, or given grad_xa), compiled for sm_90 as on the H200, and the recipe
    the native path would replay: its argument expansion must match the compiled kernel's PTX
    parameter list (replay._recipe checks it), the descriptors become tensor maps over the right
    tensors, every output is written by the launch, with dropout the kernel reads the seed the op
    was given (the callback's 8th input), and a given grad_xa is read from the caller's tensor."""
    launches = []
    monkeypatch.setattr(fused_forward, "_lora_gemm_kernel",
                        RecordingKernel(fused_forward._lora_gemm_kernel, launches))
    x, w, b, A, B = scenario_inputs(300, 192, 264, 16, torch.bfloat16)
    if product.startswith("forward"):
        p, seed = (0.1, torch.tensor([3], dtype=torch.int64)) if product == "forward_post" else (0.0, None)
        inputs = (x, w, b, A, B, 0.5, p, seed)  # as csrc/lora.cpp triton_fused_forward passes them
        outputs = fused_forward.linear_forward(x, w, b, A, B, 0.5, p, seed)
        # x, W, A, B, y; (rows, columns) innermost first
        expected_maps = [("input", 0, [192, 300]), ("input", 1, [192, 264]), ("input", 3, [192, 16]),
                         ("input", 4, [16, 264]), ("output", 0, [264, 300])]
    else:
        g = torch.randn(300, 264, dtype=torch.bfloat16)
        if product == "grad_input":
            inputs = (g, w, A, B, 0.5)
            outputs = fused_forward.grad_input(g, w, A, B, 0.5)
        else:
            grad_xa = torch.randn(300, 16, dtype=torch.bfloat16)
            inputs = (g, w, A, B, grad_xa)  # as csrc/lora.cpp triton_fused_grad_input_given_xa passes them
            outputs = (fused_forward.grad_input_given_xa(g, w, A, B, grad_xa),)
        # g, then W, B, A as stored (reduction-major), dx
        expected_maps = [("input", 0, [264, 300]), ("input", 1, [192, 264]), ("input", 3, [16, 264]),
                         ("input", 2, [192, 16]), ("output", 0, [192, 300])]
    monkeypatch.undo()
    (fn, args, kwargs), = launches
    _, compiled = compile_for_sm90(fn, args, kwargs)
    assert compiled.metadata.tensordesc_meta, "no descriptor metadata: the replay could not encode the maps"
    temps, specs = replay._recipe(inputs, outputs, [(fn, compiled, (3, 1), args)])
    assert temps == []
    maps = [arg for arg in specs[0][5] if arg[0] == "tensormap"]
    assert [(kind, index, encoding[1]) for _, kind, index, encoding in maps] == expected_maps
    if product == "grad_input_given_xa":
        assert ("input", 4) in specs[0][5] and ("output", 1) not in specs[0][5]  # grad_xa read, not written
    else:
        assert ("output", 1) in specs[0][5]  # xa (g B) as a pointer
    assert (("input", 7) in specs[0][5]) == (product == "forward_post")  # the seed


@pytest.mark.skipif(TensorDescriptor is None, reason="this triton has no host-side tensor descriptors")
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["no_dropout", "post"])
def test_fused_forward_at_a_narrow_rank_replays_with_its_padded_round_trip(monkeypatch, p):
    """At r = 8 (narrower than the 16 it is padded to) the forward's xa goes through an (M, 16) scratch
    (benchmarks/NOTES.md #61): the recipe the native path replays allocates it per call as a temporary,
    the kernel gets it as a pointer beside xa (still written: the op's output), and the compile keeps
    its wgmmas in flight (test_fused_gemm_main_loop_keeps_its_wgmmas_in_flight's r = 8 cases)."""
    launches = []
    monkeypatch.setattr(fused_forward, "_lora_gemm_kernel",
                        RecordingKernel(fused_forward._lora_gemm_kernel, launches))
    x, w, b, A, B = scenario_inputs(300, 192, 264, 8, torch.bfloat16)
    seed = torch.tensor([3], dtype=torch.int64) if p else None
    inputs = (x, w, b, A, B, 0.5, p, seed)  # as csrc/lora.cpp triton_fused_forward passes them
    outputs = fused_forward.linear_forward(x, w, b, A, B, 0.5, p, seed)
    monkeypatch.undo()
    (fn, args, kwargs), = launches
    assert kwargs["XA_PADDED"] and kwargs["R_PAD"] == 16
    _, compiled = compile_for_sm90(fn, args, kwargs)
    temps, specs = replay._recipe(inputs, outputs, [(fn, compiled, (3, 1), args)])
    assert [(tuple(t.shape), t.dtype) for t in temps] == [((300, 16), torch.bfloat16)]
    assert ("temp", 0) in specs[0][5] and ("output", 1) in specs[0][5]


HOPPER_SHARED_BYTES = 232448  # the most shared memory one block may use on sm_90 (227 KiB)


def record_fused_launch(monkeypatch, product, N, r):
    """The one launch of the fused GEMM for `product` ("forward", "forward_post": with 'post'
    dropout, "grad_input" or "grad_input_given_xa") at M = 256, K = 512, with the tiles it picks
    for itself."""
    launches = []
    monkeypatch.setattr(fused_forward, "_lora_gemm_kernel",
                        RecordingKernel(fused_forward._lora_gemm_kernel, launches))
    x, w, b, A, B = scenario_inputs(256, 512, N, r, torch.bfloat16)
    if product == "forward":
        fused_forward.linear_forward(x, w, b, A, B, 0.5)
    elif product == "forward_post":
        fused_forward.linear_forward(x, w, b, A, B, 0.5, 0.1, torch.tensor([3], dtype=torch.int64))
    elif product == "grad_input_given_xa":
        fused_forward.grad_input_given_xa(torch.randn(256, N, dtype=torch.bfloat16), w, A, B,
                                          torch.randn(256, r, dtype=torch.bfloat16))
    else:
        fused_forward.grad_input(torch.randn(256, N, dtype=torch.bfloat16), w, A, B, 0.5)
    monkeypatch.undo()
    (launch,) = launches
    return launch


@pytest.mark.skipif(TensorDescriptor is None, reason="this triton has no host-side tensor descriptors")
@pytest.mark.parametrize("product,N,r", [("forward", 1024, 16), ("forward", 1024, 24), ("forward", 1024, 64),
                                         ("forward", 4096, 64), ("forward_post", 1024, 16),
                                         ("forward_post", 1024, 64), ("grad_input", 1024, 16),
                                         ("grad_input", 1024, 64), ("grad_input", 4096, 64),
                                         ("grad_input_given_xa", 1024, 16)], ids=str)
def test_fused_gemm_configurations_fit_in_hopper_shared_memory(monkeypatch, product, N, r):
    """The tile configuration each fused GEMM picks for itself must fit an H100/H200 block's shared
    memory at every rank it accepts (r <= 64): a 4-stage input gradient at r = 64 needed 262 KB,
    and the launch failed on the H200 (OutOfResources) before the stages rule took the rank in.
    The k/v-sized cases at r <= 16 are the 4-stage ones; with 'post' dropout B's epilogue chunks
    are loaded before the main loop too (+8 KiB at r = 16: 225 312 of 232 448 bytes)."""
    fn, args, kwargs = record_fused_launch(monkeypatch, product, N, r)
    assert kwargs["num_stages"] == (4 if N <= 2048 and r <= 16 else 3)
    _, compiled = compile_for_sm90(fn, args, kwargs)
    assert compiled.metadata.shared <= HOPPER_SHARED_BYTES, f"{compiled.metadata.shared} bytes of shared memory"


@pytest.mark.skipif(TensorDescriptor is None, reason="this triton has no host-side tensor descriptors")
@pytest.mark.parametrize("product,N,r", [("forward", 1024, 16), ("forward", 4096, 16), ("forward_post", 1024, 16),
                                         ("forward_post", 4096, 64), ("grad_input", 1024, 16),
                                         ("grad_input_given_xa", 1024, 16), ("forward", 1024, 8),
                                         ("forward_post", 4096, 8), ("grad_input", 1024, 8)], ids=str)
def test_fused_gemm_main_loop_keeps_its_wgmmas_in_flight(monkeypatch, product, N, r):
    """The fused GEMM's speed rests on its main loop issuing several asynchronous wgmmas before
    waiting for them (sm_90). When ptxas cannot prove that safe it serialises every wgmma of the
    kernel, each waited for right after it is issued (warnings C7511 / C7515, not errors: the
    kernel still runs, slower). Counted in the SASS: fewer waits (WARPGROUP.DEPBAR) than wgmmas
    (HGMMA) means some wgmmas are in flight together; serialised, there is one wait per wgmma.
    The 'post' variant was serialised with triton 3.6 until the main loop's trip count was
    visibly >= 1 (NOTES.md #33): its zero-trip path zeroed the accumulators with plain moves
    just before the loop's final wait. At r = 8 the forward's xa, stored from the accumulator into its
    8-wide rows, serialised them too until it went through a scratch of padded rows (ptxas C7514;
    benchmarks/NOTES.md #61). Nor may it spill registers (none does, triton 3.6 or 3.9)."""
    fn, args, kwargs = record_fused_launch(monkeypatch, product, N, r)
    _, compiled = compile_for_sm90(fn, args, kwargs)
    sass = compiled.asm["sass"]
    wgmmas, waits = sass.count("HGMMA."), sass.count("WARPGROUP.DEPBAR")
    assert wgmmas > 0, "no wgmma in the SASS"
    assert waits < wgmmas, f"{wgmmas} wgmmas, {waits} waits: every wgmma is serialised"
    assert local_memory_accesses(sass) == 0, "registers spilled to local memory"


def local_memory_accesses(sass: str) -> int:
    """Loads and stores of thread-local memory (LDL / STL) in SASS: register spills, which would cost
    these bandwidth-lean kernels a memory round trip per spilled value."""
    return len(re.findall(r"\b(?:LDL|STL)\b", sass))


def adapter_grads_operands(r, M=300, K=192, N=264):
    """grad_xa, x, xa, g of an odd-sized adapter-gradient launch (bfloat16, CPU: recorded, not run)."""
    return (torch.randn(M, r, dtype=torch.bfloat16), torch.randn(M, K, dtype=torch.bfloat16),
            torch.randn(M, r, dtype=torch.bfloat16), torch.randn(M, N, dtype=torch.bfloat16))


def record_adapter_grads_launch(monkeypatch, call, inputs):
    """((kernel, args, kwargs) of the one launch `call(*inputs)` makes, call's result)."""
    from lora_ext.kernels import adapter_grads

    launches = []
    monkeypatch.setattr(adapter_grads, "_adapter_grads_kernel",
                        RecordingKernel(adapter_grads._adapter_grads_kernel, launches))
    result = call(*inputs)
    monkeypatch.undo()
    launch, = launches
    return launch, result


@pytest.mark.parametrize("r", [8, 16, 64])
@pytest.mark.parametrize("which", ["dA_and_dB", "dA_only", "dB_only"])
def test_adapter_grads_compile_for_sm90_into_a_launch_the_replay_understands(monkeypatch, r, which):
    """The one-launch adapter gradients (adapter_grads.py) at its default tiles, compiled for sm_90 as
    on the H200: it fits a block's shared memory at every rank it accepts, and the recipe the native
    path replays writes both outputs from the one launch (no temporaries); dA alone (grad_A_only) and
    dB alone (grad_B_only) launch their own programs only and write just their output."""
    from lora_ext.kernels import adapter_grads

    grad_xa, x, xa, g = adapter_grads_operands(r)
    K, N = x.shape[1], g.shape[1]
    # as csrc/lora.cpp's triton_adapter_grads / triton_grad_A_only / triton_grad_B_only pass them
    call, inputs, columns = {
        "dA_and_dB": (adapter_grads.adapter_grads, (grad_xa, x, xa, g, 0.5, 2.0), (K, N)),
        "dA_only": (adapter_grads.grad_A_only, (grad_xa, x, 0.5), (K,)),
        "dB_only": (adapter_grads.grad_B_only, (xa, g, 2.0), (N,)),
    }[which]
    (fn, args, kwargs), outputs = record_adapter_grads_launch(monkeypatch, call, inputs)
    if which != "dA_and_dB":
        outputs = (outputs,)
    _, compiled = compile_for_sm90(fn, args, kwargs)
    assert compiled.metadata.shared <= HOPPER_SHARED_BYTES, f"{compiled.metadata.shared} bytes of shared memory"
    assert local_memory_accesses(compiled.asm["sass"]) == 0, "registers spilled to local memory"
    block_c = kwargs["BLOCK_C"]
    grid = (sum(-(-c // block_c) for c in columns),)
    temps, specs = replay._recipe(inputs, outputs, [(fn, compiled, grid, args)])
    assert temps == []
    assert ("output", 0) in specs[0][5] and (("output", 1) in specs[0][5]) == (which == "dA_and_dB")


@pytest.mark.parametrize("r", [8, 16, 24])
@pytest.mark.parametrize("which", ["dA_and_dB", "dA_only"])
def test_adapter_grads_load_the_small_operand_16_bytes_at_a_time(monkeypatch, r, which):
    """grad_xa and xa (M, r) reach the adapter-gradient programs as 16-byte loads issued with the big
    operand's tiles (LDGSTS), not as one 2-byte load per element: at r = 8 the launch marked neither r
    nor the row stride as a multiple of 16, and the small tile was 64 synchronous LDG.E.U16 per thread
    and tile (sm_90 SASS), and the launch took 77.6 us at 4096 x 1024 against 40.8 with 16-byte loads (H100,
    NOTES.md #63).
    Compiled at the k/v layer's tiles (132 SMs)."""
    from lora_ext.kernels import adapter_grads

    monkeypatch.setattr(adapter_grads, "_device_limits", lambda device: (132, HOPPER_SHARED_BYTES))
    grad_xa, x, xa, g = adapter_grads_operands(r, M=8192, K=4096, N=1024)
    call, inputs = {"dA_and_dB": (adapter_grads.adapter_grads, (grad_xa, x, xa, g, 0.5, 2.0)),
                    "dA_only": (adapter_grads.grad_A_only, (grad_xa, x, 0.5))}[which]
    (fn, args, kwargs), _ = record_adapter_grads_launch(monkeypatch, call, inputs)
    _, compiled = compile_for_sm90(fn, args, kwargs)
    sass = compiled.asm["sass"]
    assert "LDG.E.U16" not in sass, f"r = {r}: {sass.count('LDG.E.U16')} 2-byte loads"
    assert "LDGSTS.E.BYPASS.128" in sass


def layer_sass(r, p, position):
    """{(kernel, its n-th launch): sm_90 SASS} of the triton_lora kernels one forward and backward of a
    512 x 256 layer launches (512 tokens, bfloat16, no bias; the sums of partials left out)."""
    with pytest.MonkeyPatch.context() as patches:  # its own: undone here, the caller's patches untouched
        launches = record(patches, [((512, 512, 256, r, torch.bfloat16, None, False, True), p, position, [ALL])])
    sass, seen = {}, []
    for fn, args, kwargs in launches:
        if fn is not triton_lora._sum_partials_kernel:
            seen.append(fn.__name__)
            sass[(fn.__name__, seen.count(fn.__name__))] = compile_for_sm90(fn, args, kwargs)[1].asm["sass"]
    return sass


@pytest.mark.parametrize("r, r_marked", [(8, 16), (24, 32)])
@pytest.mark.parametrize("p, position", [(0.1, "pre"), (0.0, "post"), (0.1, "post")])
def test_triton_lora_load_rank_rows_16_bytes_at_a_time(r, r_marked, p, position):
    """The Triton backend's thin kernels (the masked pieces of the native path) at r = 8 and 24 issue no
    more 2-byte loads or stores (LDG.E.U16 / STG.E.U16, sm_90 SASS) than at the next power of two, whose r
    and row strides triton's launch marks as multiples of 16: the rows of xa / dxa, B and out take the
    RANK_ALIGN / PANEL_ALIGN hints (rank_hint.rank_alignment, NOTES.md #63, #66). Without it, at r = 8 the pass over dY
    (_lora_down_reduce_kernel) had 16 LDG.E.U16 ('pre' and p = 0; 8 with 'post') against 0 at r = 16, the
    forward's _lora_up_kernel 24 against 8; at r = 24, 32 (16) and 48 against 0 and 16 at r = 32 (triton 3.9).
    The r = 16 and 32 variants are the same with or without the change (the hint is 1 there)."""
    marked = layer_sass(r_marked, p, position)
    sass = layer_sass(r, p, position)
    assert sass.keys() == marked.keys()
    more = [f"{key}: {code.count(op)} {op} at r = {r} against {marked[key].count(op)} at r = {r_marked}"
            for key, code in sass.items() for op in ("LDG.E.U16", "STG.E.U16")
            if code.count(op) > marked[key].count(op)]
    assert not more, more
    # None at all but in the 'pre' backward's _lora_up_kernel, where its 16 x 16 tile of dxa (8 warps) is one
    # element per thread at either rank.
    loads = {key: code.count("LDG.E.U16") for key, code in sass.items()
             if "LDG.E.U16" in code and (key != ("_lora_up_kernel", 2) or position != "pre")}
    assert not loads, f"LDG.E.U16 at r = {r}: {loads}"
    # Nor 2-byte stores of xa in the forward's _lora_down_kernel (out's rows: 2 / 8 / 8 STG.E.U16 without the
    # hint at r = 8, as many as at r = 16, so the comparison above would not see them).
    stores = {key: code.count("STG.E.U16") for key, code in sass.items()
              if key[0] == "_lora_down_kernel" and "STG.E.U16" in code}
    assert not stores, f"STG.E.U16 at r = {r}: {stores}"


def test_adapter_grads_rank_alignment():
    """The RANK_ALIGN hint: 8 where r and the small operands' row strides are all multiples of 8 and not all
    of 16 (the launch marks those itself); 1 otherwise, where the hint would be false. An override that does
    not divide them is refused (the kernel would read other rows)."""
    from lora_ext.kernels.adapter_grads import rank_alignment

    # (r, the row strides of the operands)
    assert rank_alignment(8, 8, 8) == 8
    assert rank_alignment(24, 24, 32) == 8
    assert rank_alignment(8, 8, 12) == 1     # a row stride of 12: not 16-byte rows
    assert rank_alignment(16, 16, 16) == 1  # marked by triton's launch already
    assert rank_alignment(16, 16, 24) == 8  # r = 16 in rows of 24: the launch marks neither
    assert rank_alignment(4, 8, 8) == 1
    from lora_ext.kernels import adapter_grads

    grad_xa, x, xa, g = adapter_grads_operands(8)
    with pytest.raises(ValueError, match="rank_align=16 must divide r"):
        adapter_grads.adapter_grads(grad_xa, x, xa, g, 1.0, 1.0, rank_align=16)


@pytest.mark.parametrize("r", [16, 32, 64])
@pytest.mark.parametrize("shape", [("dA_alone", 4096, 1024), ("both", 4096, 1024), ("both", 4096, 14336)],
                         ids=["dA_alone_4096", "both_kv", "both_gate_up"])
def test_adapter_grads_default_tiles_fit_in_hopper_shared_memory(monkeypatch, r, shape):
    """The tiles the launch picks for itself (adapter_grads.tile_config with the H200's 132 SMs and
    227 KiB, as for CPU tensors), at k/v- and gate/up-sized widths (64, 80 and 288 blocks of 64
    columns: the rule's three branches), compiled for sm_90 at every padded rank: each fits a block's
    shared memory once the rule has taken stages off (r = 64 at 256 x 64: 4 x 64 KiB would not),
    without register spills."""
    from lora_ext.kernels import adapter_grads

    which, K, N = shape
    grad_xa, x, xa, g = adapter_grads_operands(r, M=96, K=K, N=N)
    if which == "both":
        (fn, args, kwargs), _ = record_adapter_grads_launch(monkeypatch, adapter_grads.adapter_grads,
                                                            (grad_xa, x, xa, g, 0.5, 2.0))
    else:
        (fn, args, kwargs), _ = record_adapter_grads_launch(monkeypatch, adapter_grads.grad_A_only, (grad_xa, x, 0.5))
    expected = {("dA_alone", 1024): (256, 32), ("both", 1024): (256, 64), ("both", 14336): (128, 64)}[(which, N)]
    assert (kwargs["BLOCK_M"], kwargs["BLOCK_C"]) == expected
    _, compiled = compile_for_sm90(fn, args, kwargs)
    assert compiled.metadata.shared <= HOPPER_SHARED_BYTES, f"{kwargs}: {compiled.metadata.shared} bytes"
    assert local_memory_accesses(compiled.asm["sass"]) == 0, f"{kwargs}: registers spilled"


def test_adapter_grads_tile_rule_follows_the_program_count():
    """The three branches of adapter_grads.tile_config at 132 SMs (NOTES.md #40), and the stages it
    takes off at r = 64 where the 4-stage ring would pass a block's shared memory."""
    from lora_ext.kernels import adapter_grads

    def tiles(columns, r_pad):
        c = adapter_grads.tile_config(columns, r_pad, 132)
        return c["block_m"], c["block_c"], c["num_stages"]

    assert tiles(4096 + 14336, 16) == (128, 64, 3)   # gate/up, down: 288 blocks of 64 columns
    assert tiles(4096 + 4096, 16) == (256, 64, 4)    # q/o: 128
    assert tiles(4096 + 1024, 16) == (256, 64, 4)    # k/v: 80
    assert tiles(4096, 16) == (256, 32, 4)           # dA alone over 4096 columns: 64
    assert tiles(4096 + 1024, 64) == (256, 64, 3)    # 4 x (256 x 64 + 64 x 256) x 2 B > 232 448
    assert tiles(4096, 64) == (256, 32, 4)
    # A block with less shared memory (sm_120's 99 KiB): stages, then rows come off until it fits.
    small = adapter_grads.tile_config(4096 + 1024, 64, 132, 101376)
    assert (small["block_m"], small["block_c"], small["num_stages"]) == (128, 64, 2)
    # CPU tensors (the interpreter) take the H200's limits, so that its tests run the GPU's choices.
    assert adapter_grads._device_limits(torch.device("cpu")) == (132, 232448)


def test_fused_forward_small_m_rule():
    """small_m_config at 132 SMs (NOTES.md #44): one row block of M rounded up to 16 .. 64 rows;
    column blocks for about one program per SM (16 .. 128 wide); 256-wide K steps where the column
    block and the padded rank are <= 32; stages within the budget (2 to 4); four warps."""
    from lora_ext.kernels import fused_forward

    def tiles(M, N, r):
        c = fused_forward.small_m_config(M, N, r, 132)
        return c["block_m"], c["block_n"], c["block_k"], c["num_stages"], c["num_warps"], c["epilogue_chunks"]

    assert tiles(1, 4096, 16) == (16, 32, 256, 4, 4, 1)     # q/o, decode: 128 programs
    assert tiles(16, 1024, 16) == (16, 16, 256, 4, 4, 1)    # k/v: 64
    assert tiles(16, 14336, 16) == (16, 128, 128, 4, 4, 1)  # gate/up: 112
    assert tiles(16, 4096, 64) == (16, 32, 128, 4, 4, 1)    # r = 64: A's 64 x 256 tile would crowd W out
    assert tiles(17, 4096, 8) == (32, 32, 256, 4, 4, 1)
    assert tiles(64, 14336, 64) == (64, 128, 128, 2, 4, 1)  # 2 x 128 x (64 + 128 + 64) B per stage
    assert fused_forward.SMALL_M_MAX_ROWS == 64


# (M, K, N, r) at the H200's shapes: decode at q/o, k/v, gate/up and down, r = 16 and 64, and 64 rows.
SMALL_M_SM90_CASES = [(1, 4096, 4096, 16), (16, 4096, 1024, 16), (16, 4096, 14336, 16), (16, 14336, 4096, 16),
                      (16, 4096, 4096, 64), (64, 4096, 14336, 64), (16, 4096, 1024, 8), (64, 4096, 4096, 8)]


@pytest.mark.skipif(TensorDescriptor is None, reason="this triton has no host-side tensor descriptors")
@pytest.mark.parametrize("M,K,N,r", SMALL_M_SM90_CASES, ids=str)
def test_fused_forward_small_m_tiles_compile_for_sm90_into_a_launch_the_replay_understands(monkeypatch, M, K, N, r):
    """The few-row forward's launch with the tiles it picks at 132 SMs, compiled for sm_90: within a
    block's shared memory, no register spills, tensor-core products (mma.sync below 64 rows, wgmma
    at 64), and a recipe the native path replays (x, W, A, B and y as tensor maps, xa written)."""
    from lora_ext.kernels import device_facts

    monkeypatch.setattr(device_facts, "sm_count", lambda device, on_cpu: 132)
    launches = []
    monkeypatch.setattr(fused_forward, "_lora_gemm_kernel", RecordingKernel(fused_forward._lora_gemm_kernel, launches))
    # Values do not matter for the compile: empty tensors (W is up to 112 MiB here).
    x, w, A, B = (torch.empty(*shape, dtype=torch.bfloat16) for shape in ((M, K), (N, K), (r, K), (N, r)))
    outputs = fused_forward.linear_forward(x, w, None, A, B, 0.5)
    monkeypatch.undo()
    (fn, args, kwargs), = launches
    _, compiled = compile_for_sm90(fn, args, kwargs)
    sass = compiled.asm["sass"]
    assert compiled.metadata.shared <= HOPPER_SHARED_BYTES, f"{compiled.metadata.shared} bytes of shared memory"
    assert local_memory_accesses(sass) == 0, "registers spilled to local memory"
    assert ("HGMMA." in sass) == (M > 32) and ("HMMA.16816" in sass) == (M <= 32)
    temps, specs = replay._recipe((x, w, None, A, B, 0.5, 0.0, None), outputs, [(fn, compiled, (3, 1), args)])
    maps = [(kind, index) for _, kind, index, _ in (arg for arg in specs[0][5] if arg[0] == "tensormap")]
    # At r = 8 xa's round trip goes through an (M, 16) scratch: a temporary the replay allocates per call.
    assert [tuple(t.shape) for t in temps] == ([(M, 16)] if r < 16 else [])
    assert maps == [("input", 0), ("input", 1), ("input", 3), ("input", 4), ("output", 0)]
    assert ("output", 1) in specs[0][5]


@pytest.mark.parametrize("shape, config", [("kv_dx", "pp128"), ("kv_fwd", "pp128s5"), ("qo_dx", "pp64x256"),
                                           ("kv_dx", "dx_lora"), ("kv_dx", "dx_lora_gw"), ("kv_dx", "dx_lora_x8")])
def test_gluon_gemm_probe_compiles_for_sm90(shape, config):
    """benchmarks/gluon_gemm_probe.py (NOTES.md #67) is a Gluon kernel, an experimental API whose spelling moves
    between triton versions (3.6 on the GPU image, newer here): it must still compile for sm_90 with this one,
    within a block's shared memory, without spilling, and with its wgmmas in flight (fewer waits than wgmmas).
    config "dx_lora": the probe's second kernel, _ws_dx_lora_kernel (dx = g W + grad_xa A and dA's partials, r <= 16;
    first run 12-06 10:12), at its tiles (DX_LORA_TILES); "dx_lora_gw": the same kernel as the ablation that leaves out
    the LoRA step, dA and x's loads (--dx-lora-parts' first row); "dx_lora_x8": the whole kernel with x's tile loaded
    in 8 row slices over the K steps (X_CHUNKS, its loader's unrolled path)."""
    import sys

    pytest.importorskip("triton.experimental.gluon._runtime")
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import gluon_gemm_probe as probe

    assert probe.GLUON_ERROR is None, probe.GLUON_ERROR
    M, K, N, b_transposed = probe.SHAPES[shape]
    tiles = probe.DX_LORA_TILES if config.startswith("dx_lora") else probe.CONFIGS[config]
    bm, bn, bk, stages = tiles["block_m"], tiles["block_n"], tiles["block_k"], tiles["stages"]

    def descriptor(block):  # the signature of a host tensor descriptor, as the probe makes them
        layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)
        return f"tensordesc<bf16[{','.join(map(str, block))}],{layout!r}>"

    if config.startswith("dx_lora"):
        whole = config != "dx_lora_gw"
        x_chunks = 8 if config == "dx_lora_x8" else 1
        constexprs = {"STAGES": stages, "LOAD_REGS": probe.LOAD_REGS, "CONSUMER_REGS": probe.CONSUMER_REGS,
                      "WITH_LORA": whole, "WITH_DA": whole, "LOAD_X": whole, "X_CHUNKS": x_chunks, "X_SPAN": 1}
        signature = {"g_desc": descriptor([bm, bk]), "w_desc": descriptor([bk, bn]),
                     "lora_a_desc": descriptor([16, bn]), "x_desc": descriptor([bm // x_chunks, bn]),
                     "gxa_desc": descriptor([bm, 16]), "dx_desc": descriptor([bm, bn]),
                     "partial_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "rows_per_run": "i32", "runs": "i32",
                     **{name: "constexpr" for name in constexprs}}
        fn, counted = probe._ws_dx_lora_kernel, probe.dx_lora_smem_bytes(bm, bn, bk, stages)
    else:
        constexprs = {"GROUP_M": 8, "STAGES": stages, "B_TRANSPOSED": b_transposed, "LOAD_REGS": probe.LOAD_REGS,
                      "CONSUMER_REGS": probe.CONSUMER_REGS}
        signature = {"a_desc": descriptor([bm, bk]), "b_desc": descriptor([bn, bk] if b_transposed else [bk, bn]),
                     "c_desc": descriptor([bm, bn]), "M": "i32", "N": "i32", "K": "i32",
                     **{name: "constexpr" for name in constexprs}}
        fn, counted = probe._ws_gemm_kernel, probe.smem_bytes(bm, bn, bk, stages)
    assert set(signature) == set(fn.arg_names), fn.arg_names
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in ("M", "N", "K")}
    compiled = triton.compile(GluonASTSource(fn, signature, constexprs, attrs), target=SM90, options=dict(probe.LAUNCH))
    sass = compiled.asm["sass"]
    assert compiled.metadata.shared <= HOPPER_SHARED_BYTES, compiled.metadata.shared
    assert compiled.metadata.shared >= counted  # its buffers, allocated as counted
    wgmmas, waits = sass.count("HGMMA."), sass.count("WARPGROUP.DEPBAR")
    assert wgmmas > 0 and waits < wgmmas, f"{wgmmas} wgmmas, {waits} waits"
    assert local_memory_accesses(sass) == 0, "registers spilled to local memory"


@pytest.mark.parametrize("num_parts, n_rows, r_pad", [(32, 1024, 16), (4, 8192, 16), (16, 4096, 64), (8, 14336, 256),
                                                      (2, 14336, 64), (1, 4096, 16), (100, 300, 32), (3, 5, 16)])
def test_sum_partials_block_rule_and_its_sm90_compile(num_parts, n_rows, r_pad):
    """_sum_blocks: every partial loaded at once up to SUM_MAX_BLOCK_PARTS (the one-partial-per-step kernel ran
    k/v's dB, 32 partials, on 4 programs as a chain of round trips: 36 µs), at least ~one program per SM where
    there are rows for it, a tile within SUM_TILE_VALUES; 2 partials or fewer: both at once on rows for ~8
    programs per SM (NOTES.md #85). The tile compiles for sm_90 without spilling (the GPU's variant: not the
    interpreter's), its loads 16 bytes wide."""
    sms = 132
    block_parts, block_rows = triton_lora._sum_blocks(num_parts, n_rows, r_pad, sms)
    if num_parts <= 2:
        # Both partials at once, rows for ~SUM_FEW_PARTS_PROGRAMS_PER_SM programs per SM, within the tile's bounds.
        assert block_parts == num_parts
        assert block_parts * block_rows * r_pad >= min(triton_lora.SUM_MIN_TILE_VALUES, triton_lora.SUM_TILE_VALUES)
        programs = triton.cdiv(n_rows, block_rows)
        assert (programs >= triton_lora.SUM_FEW_PARTS_PROGRAMS_PER_SM * sms // 2
                or block_parts * block_rows * r_pad <= 2 * triton_lora.SUM_MIN_TILE_VALUES), (block_rows, programs)
    else:
        assert block_parts == min(triton.next_power_of_2(num_parts), triton_lora.SUM_MAX_BLOCK_PARTS,
                                  triton_lora.SUM_TILE_VALUES // (2 * r_pad))
        assert triton.cdiv(n_rows, block_rows) >= min(sms, n_rows // 2) // 2, (block_parts, block_rows)
    assert block_parts * block_rows * r_pad <= triton_lora.SUM_TILE_VALUES
    partials = torch.empty(num_parts, n_rows, r_pad)
    out = torch.empty(n_rows, r_pad, dtype=torch.bfloat16)
    args = (partials, out, n_rows, r_pad, num_parts, *partials.stride(), *out.stride(), 0.5)
    _, compiled = compile_for_sm90(triton_lora._sum_partials_kernel, args,
                                   dict(BLOCK_PARTS=block_parts, BLOCK_ROWS=block_rows, BLOCK_COLS=r_pad))
    assert local_memory_accesses(compiled.asm["sass"]) == 0, "registers spilled to local memory"
    # 16-byte loads of the partials (the column mask made them 4-byte loads, 4 times the instructions), where
    # the tile gives each of the 128 threads 4 values or more (3 x 5 rows is 4 x 2 x 16: one each).
    loads = re.findall(r"\bLDG\.E(\.\w+)?\s", compiled.asm["sass"])
    if block_parts * block_rows * r_pad >= 4 * 128:
        assert loads and set(loads) == {".128"}, sorted(set(loads))
