"""Compiles every fused GEMM variant the GPU would launch, for sm_90, on a machine without a GPU, and
flags the ones whose SASS serialises its wgmmas (as many waits as wgmmas: ptxas C7514/C7515), spills
registers or needs more shared memory than a Hopper block has.

Why: at r = 8 the fused forward compiled with every wgmma serialised and ran 15-19 points slower than
at r = 16 on the GPU (benchmarks/NOTES.md #61); nothing failed, it was only slow. The variant depends
on how the launch splits each row block into runs, which follows the GPU's SM count: this script
records the launches with the H200's 132 SMs (the CPU tests use the interpreter's few programs, a
different variant). Products: forward, forward with 'post' dropout, input gradient, input gradient
with grad_xa given; shapes: the Llama-3-8B layers at 8192 tokens and the end-to-end model's at 4096.

    python scripts/sweep_fused_compile.py [--ranks 8 16 32 64] [--products forward ...]

Run it with the triton the GPU machine has (3.6 there, 3.9 in CI: both were clean on 2026-12-06
after eb8504f, 128 variants each). Exit status 1 when a variant is flagged.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import triton  # noqa: E402

import test_triton_compile as compile_helpers  # noqa: E402  (sm_90 compile of a recorded launch)
from lora_ext.kernels import device_facts, fused_forward  # noqa: E402

SHAPES = [(8192, 4096, 1024), (8192, 4096, 4096), (8192, 4096, 14336), (8192, 14336, 4096),
          (4096, 2048, 512), (4096, 2048, 5632), (4096, 5632, 2048), (4096, 2048, 32000)]  # (M, K, N)
PRODUCTS = ("forward", "forward_post", "grad_input", "grad_input_given_xa")
H200_SMS = 132


def record(product: str, M: int, K: int, N: int, r: int):
    """(kernel, args, kwargs) of the one launch `product` makes at these sizes, recorded on CPU tensors."""
    launches = []
    real = fused_forward._lora_gemm_kernel
    fused_forward._lora_gemm_kernel = compile_helpers.RecordingKernel(real, launches)
    x, w, b, A, B = compile_helpers.scenario_inputs(M, K, N, r, torch.bfloat16, bias=product.startswith("forward"))
    try:
        if product == "forward":
            fused_forward.linear_forward(x, w, b, A, B, 0.5)
        elif product == "forward_post":
            fused_forward.linear_forward(x, w, b, A, B, 0.5, 0.1, torch.tensor([3], dtype=torch.int64))
        elif product == "grad_input":
            fused_forward.grad_input(torch.randn(M, N, dtype=torch.bfloat16), w, A, B, 0.5)
        else:
            fused_forward.grad_input_given_xa(torch.randn(M, N, dtype=torch.bfloat16), w, A, B,
                                              torch.randn(M, r, dtype=torch.bfloat16))
    finally:
        fused_forward._lora_gemm_kernel = real
    (launch,) = launches
    return launch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--products", nargs="+", default=list(PRODUCTS), choices=PRODUCTS)
    args = parser.parse_args()
    # The GPU's split of each row block into runs (fused_forward.runs_per_row), not the interpreter's.
    device_facts.sm_count = lambda device, on_cpu=None: H200_SMS
    flagged = []
    for product in args.products:
        for M, K, N in SHAPES:
            for r in args.ranks:
                fn, fn_args, kwargs = record(product, M, K, N, r)
                _, compiled = compile_helpers.compile_for_sm90(fn, fn_args, kwargs)
                sass = compiled.asm["sass"]
                wgmmas, waits = sass.count("HGMMA."), sass.count("WARPGROUP.DEPBAR")
                problems = [name for name, bad in (
                    ("serialised", waits >= wgmmas),
                    ("spills", compile_helpers.local_memory_accesses(sass) > 0),
                    ("shared memory", compiled.metadata.shared > compile_helpers.HOPPER_SHARED_BYTES)) if bad]
                line = f"{product:20s} M={M} K={K} N={N} r={r}: {wgmmas} wgmmas, {waits} waits"
                print(line + (f"  <- {', '.join(problems)}" if problems else ""), flush=True)
                if problems:
                    flagged.append(line)
    print(f"triton {triton.__version__}: {len(flagged)} flagged" + "".join(f"\n  {line}" for line in flagged))
    return 1 if flagged else 0


if __name__ == "__main__":
    sys.exit(main())
