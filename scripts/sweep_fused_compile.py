"""Compiles the fused GEMM launches the GPU would make at a list of layer shapes, for sm_90, on a machine
without a GPU, and flags those whose SASS serialises its wgmmas (as many waits as wgmmas: ptxas
C7514/C7515), loads an operand 2 bytes at a time (more than 16 `LDG.E.U16`: NOTES.md #63), spills
registers or needs more shared memory than a Hopper block has. (Several launches
compile to one kernel; some shapes listed are not ones the op routes to the fused kernel, e.g. the
dropout-free forward at 4096 x 4096: they are compiled anyway, as the kernel may be asked for them.)

Why: at r = 8 the fused forward compiled with every wgmma serialised and ran 15-19 points slower than
at r = 16 on the GPU (benchmarks/NOTES.md #61); nothing failed, it was only slow. The variant depends
on how the launch splits each row block into runs, which follows the GPU's SM count: this script
records the launches with the H200's 132 SMs (the CPU tests use the interpreter's few programs, a
different variant). Products: forward, forward with 'post' dropout, input gradient, input gradient
with grad_xa given; the forwards with and without bias; shapes: the Llama-3-8B layers at 8192 tokens,
the end-to-end model's at 4096, and few-row (decode) forwards at 16 and 64 rows (small_m_config's tiles:
mma.sync below 64 rows, so no wgmma to serialise there; checked for spills and shared memory).

    python scripts/sweep_fused_compile.py [--ranks 8 16 24 32 64] [--products forward ...] [--adapter-grads]

--adapter-grads also compiles the one-launch adapter gradients (adapter_grads.py: dA and dB together,
each alone) at the same large shapes, with the tiles its rule picks at 132 SMs.

Run it with the triton the GPU machine has (3.6 there, 3.9 in CI; after eb8504f's mends both were clean,
2026-12-06). Exit status 1 when a launch is flagged. Not under TRITON_INTERPRET=1 (it compiles).
"""
from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("sweep_fused_compile.py compiles for the GPU: run it without TRITON_INTERPRET=1")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import triton  # noqa: E402

import test_triton_compile as compile_helpers  # noqa: E402  (sm_90 compile of a recorded launch)
from lora_ext.kernels import adapter_grads, device_facts, fused_forward  # noqa: E402

SHAPES = [(8192, 4096, 1024), (8192, 4096, 4096), (8192, 4096, 14336), (8192, 14336, 4096),
          (4096, 2048, 512), (4096, 2048, 5632), (4096, 5632, 2048), (4096, 2048, 32000)]  # (M, K, N)
FEW_ROW_SHAPES = [(16, 4096, 1024), (16, 4096, 14336), (64, 4096, 4096)]  # forwards only
PRODUCTS = ("forward", "forward_post", "grad_input", "grad_input_given_xa")
H200_SMS = 132


def record(product: str, M: int, K: int, N: int, r: int, bias: bool):
    """(kernel, args, kwargs) of the one launch `product` makes at these sizes, recorded on CPU tensors
    (empty: values do not matter for a compile)."""
    launches = []
    real = fused_forward._lora_gemm_kernel
    fused_forward._lora_gemm_kernel = compile_helpers.RecordingKernel(real, launches)
    x, w, A, B = (torch.empty(*shape, dtype=torch.bfloat16) for shape in ((M, K), (N, K), (r, K), (N, r)))
    b = torch.empty(N, dtype=torch.bfloat16) if bias else None
    try:
        if product == "forward":
            fused_forward.linear_forward(x, w, b, A, B, 0.5)
        elif product == "forward_post":
            fused_forward.linear_forward(x, w, b, A, B, 0.5, 0.1, torch.tensor([3], dtype=torch.int64))
        elif product == "grad_input":
            fused_forward.grad_input(torch.empty(M, N, dtype=torch.bfloat16), w, A, B, 0.5)
        else:
            fused_forward.grad_input_given_xa(torch.empty(M, N, dtype=torch.bfloat16), w, A, B,
                                              torch.empty(M, r, dtype=torch.bfloat16))
    finally:
        fused_forward._lora_gemm_kernel = real
    (launch,) = launches
    return launch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 24, 32, 64])
    parser.add_argument("--products", nargs="+", default=list(PRODUCTS), choices=PRODUCTS)
    parser.add_argument("--adapter-grads", action="store_true", help="also the one-launch adapter gradients")
    args = parser.parse_args()
    bad_ranks = [r for r in args.ranks if r % 8 or not 8 <= r <= fused_forward.MAX_FUSED_RANK]
    if bad_ranks:  # B (N x r) is read by TMA: its rows must be 16-byte multiples
        parser.error(f"--ranks: the fused GEMMs take multiples of 8 up to {fused_forward.MAX_FUSED_RANK}, got {bad_ranks}")
    # The GPU's split of each row block into runs (fused_forward.runs_per_row), not the interpreter's.
    device_facts.sm_count = lambda device, on_cpu=None: H200_SMS
    flagged = []
    for product in args.products:
        forward = product.startswith("forward")
        for M, K, N in SHAPES + (FEW_ROW_SHAPES if forward else []):
            for r in args.ranks:
                for bias in ((False, True) if forward else (False,)):
                    flagged += check(product, M, K, N, r, bias)
    if args.adapter_grads:
        adapter_grads._device_limits = lambda device: (H200_SMS, compile_helpers.HOPPER_SHARED_BYTES)
        for M, K, N in SHAPES:
            for r in args.ranks:
                for which in ("dA and dB", "dA", "dB"):
                    flagged += check_adapter_grads(which, M, K, N, r)
    print(f"triton {triton.__version__}: {len(flagged)} flagged" + "".join(f"\n  {line}" for line in flagged))
    return 1 if flagged else 0


def check(product: str, M: int, K: int, N: int, r: int, bias: bool) -> list[str]:
    """Compiles one launch; prints its line; returns it in a list when something is flagged."""
    fn, fn_args, kwargs = record(product, M, K, N, r, bias)
    return report(f"{product:20s} M={M} K={K} N={N} r={r} bias={bias}", fn, fn_args, kwargs)


def check_adapter_grads(which: str, M: int, K: int, N: int, r: int) -> list[str]:
    """check() for one launch of the adapter gradients (`which`: "dA and dB", "dA" or "dB")."""
    inputs = tuple(torch.empty(*shape, dtype=torch.bfloat16) for shape in ((M, r), (M, K), (M, r), (M, N)))
    calls = {"dA and dB": lambda grad_xa, x, xa, g: adapter_grads.adapter_grads(grad_xa, x, xa, g, 1.0, 2.0),
             "dA": lambda grad_xa, x, xa, g: adapter_grads.grad_A_only(grad_xa, x, 1.0),
             "dB": lambda grad_xa, x, xa, g: adapter_grads.grad_B_only(xa, g, 2.0)}
    (fn, fn_args, kwargs), _ = compile_helpers.record_adapter_grads_launch(pytest.MonkeyPatch(), calls[which], inputs)
    return report(f"adapter grads {which:9s} M={M} K={K} N={N} r={r}", fn, fn_args, kwargs)


def report(label: str, fn, fn_args, kwargs) -> list[str]:
    """Compiles a recorded launch for sm_90, prints what it found, and returns [label] when flagged."""
    _, compiled = compile_helpers.compile_for_sm90(fn, fn_args, kwargs)
    sass = compiled.asm["sass"]
    wgmmas, waits = sass.count("HGMMA."), sass.count("WARPGROUP.DEPBAR")
    # One 2-byte global load per element: more than a per-run handful means a loop's operand lost its
    # 16-byte vectors (the adapter gradients at r = 8 had 64 per tile, and their launch ran at half speed:
    # NOTES.md #63); the fused GEMMs' once-per-run xa load at r = 8 is 8.
    narrow_loads = sass.count("LDG.E.U16")
    problems = [name for name, bad in (
        ("2-byte loads", narrow_loads > 16),
        ("serialised", wgmmas > 0 and waits >= wgmmas),
        ("no tensor-core product", wgmmas == 0 and "HMMA." not in sass),
        ("spills", compile_helpers.local_memory_accesses(sass) > 0),
        ("shared memory", compiled.metadata.shared > compile_helpers.HOPPER_SHARED_BYTES)) if bad]
    line = f"{label}: {wgmmas} wgmmas, {waits} waits, {narrow_loads} 2-byte loads"
    print(line + (f"  <- {', '.join(problems)}" if problems else ""), flush=True)
    return [line] if problems else []


if __name__ == "__main__":
    sys.exit(main())
