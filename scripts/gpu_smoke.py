"""Quick GPU check of both CUDA backends against the float64 reference (device tool, first call).

Prints one line per case: backend, dtype, dropout, forward and gradient errors relative to the
reference norm. Exits non-zero if any error is over its dtype's bound.
"""
import itertools
import sys

import torch

import lora_ext
from lora_ext.reference import lora_linear_reference

BOUND = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def main():
    torch.manual_seed(0)
    dev = "cuda"
    backends = ["triton"] + (["native"] if lora_ext._C.has_cuda() else [])
    failures = 0
    shapes = [((3, 37, 129), 65, 5), ((2, 300, 256), 1000, 16), ((0, 64), 32, 8), ((1, 4096), 1024, 64)]
    for backend, dtype, (p, pos), (xshape, N, r) in itertools.product(
        backends, [torch.float32, torch.float16, torch.bfloat16], [(0.0, "post"), (0.25, "post"), (0.25, "pre")], shapes
    ):
        K = xshape[-1]
        x = torch.randn(xshape, device=dev, dtype=dtype, requires_grad=True)
        W = (torch.randn(N, K, device=dev, dtype=dtype) / K**0.5).requires_grad_()
        b = torch.randn(N, device=dev, dtype=dtype, requires_grad=True)
        A = (torch.randn(r, K, device=dev, dtype=dtype) / K**0.5).requires_grad_()
        B = torch.randn(N, r, device=dev, dtype=dtype, requires_grad=True)
        seed = torch.tensor([1234567], device=dev)
        y = lora_ext.ops.linear(x, W, b, A, B, 2.0, p, pos, seed, backend=backend)
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, W, b, A, B), g)
        ref_x, ref_W, ref_b, ref_A, ref_B = (t.detach().double().requires_grad_() for t in (x, W, b, A, B))
        ref = lora_linear_reference(ref_x, ref_W, ref_b, ref_A, ref_B, 2.0, p, pos, seed)
        ref_grads = torch.autograd.grad(ref, (ref_x, ref_W, ref_b, ref_A, ref_B), g.double()) if ref.numel() else None
        errs = [rel_err(y, ref)] if ref.numel() else [0.0]
        if ref_grads is not None:
            errs += [rel_err(a, b_) for a, b_ in zip(grads, ref_grads)]
        ok = all(e <= BOUND[dtype] for e in errs) and all(torch.isfinite(t).all() for t in (y, *grads))
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {backend:6s} {str(dtype):15s} p={p} {pos:4s} x={xshape} N={N} r={r} "
              + " ".join(f"{e:.1e}" for e in errs))
    print(f"{failures} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
