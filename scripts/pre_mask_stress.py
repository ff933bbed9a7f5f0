"""Stress the 'pre' dropout mask of the native path's masked x A^T (triton_lora.masked_down).

test_cuda.py::test_pre_dropout_mask_is_the_reference_mask[0.1-native] failed once on an H100
(2026-12-06 03:10, xdist with 8 workers; it had passed in every earlier run). This repeats that
test's call with fresh inputs, and on a mismatch prints where, x there, xa there and whether a
rerun on the same x gives the same xa. Its answer (H200, 2026-12-06 03:17): 14 mismatches in
2,900 trials, each one element where x was exactly 0 (CUDA's float32 randn gives an exact 0 about
once in 10^7 draws) and the mask kept it; the kernel's mask was right. The test now draws x
without zeros.
Usage: python scripts/pre_mask_stress.py [trials] [M] [K] [p]"""
import sys

import torch

import lora_ext  # noqa: F401  (registers torch.ops.lora)
from lora_ext.kernels.philox import dropout_keep_mask as gpu_keep_mask
from lora_ext.reference import dropout_keep_mask

trials = int(sys.argv[1]) if len(sys.argv) > 1 else 200
M = int(sys.argv[2]) if len(sys.argv) > 2 else 512
K = int(sys.argv[3]) if len(sys.argv) > 3 else 64
p = float(sys.argv[4]) if len(sys.argv) > 4 else 0.1
seed_value = -77
seed = torch.tensor([seed_value], dtype=torch.int64, device="cuda")
expected = dropout_keep_mask(seed_value, M, K, p)
assert torch.equal(gpu_keep_mask(seed, M, K, p).cpu(), expected), "GPU mask kernel differs from the reference"
eye = torch.eye(K, device="cuda")
bad = 0
for trial in range(trials):
    torch.backends.cuda.matmul.allow_tf32 = bool(trial % 2)
    # Garbage in the allocator's cached blocks, as other tests leave it.
    junk = torch.randn(4 * M * K, device="cuda")
    del junk
    x = torch.randn(M, K, device="cuda")
    _, xa = torch.ops.lora.linear(x, None, None, eye, torch.randn(8, K, device="cuda"), 1.0, p, "pre", seed, "native")
    kept = (xa != 0).cpu()
    if not torch.equal(kept, expected):
        bad += 1
        where = (kept != expected).nonzero()
        _, again = torch.ops.lora.linear(x, None, None, eye, torch.randn(8, K, device="cuda"), 1.0, p, "pre", seed,
                                         "native")
        print(f"trial {trial} (allow_tf32={trial % 2}): {len(where)} mismatches; rerun equal: {torch.equal(xa, again)}")
        for m, k in where[:8].tolist():
            print(f"  [{m},{k}] x {x[m, k].item():.6g} xa {xa[m, k].item():.6g} rerun {again[m, k].item():.6g} "
                  f"expected keep {bool(expected[m, k])}")
print(f"pre mask stress M={M} K={K} p={p}: {bad} of {trials} trials mismatched")
