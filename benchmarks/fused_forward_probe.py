"""The fused LoRA forward (lora_ext/kernels/fused_forward.py) against cuBLAS, per shape (H200, bf16).

For each Llama-3-8B shape at M tokens, in one run (METHOD.md: same-run ratios only), the do_bench
median (L2 flushed) of:
  base        F.linear(x, W): the frozen layer, the floor
  op p=0      torch.ops.lora.linear, dropout 0 (the op's current path)
  op p=0 composed   the same with the op's fused forward turned off (set_fused_forward(False))
  op p=0.1    the same, 'post' dropout 0.1 (with the fused 'post' forward turned off and on, which is
              the default since NOTES.md #39: set_fused_post_dropout, NOTES.md #33)
  gemm[cfg]   the fused kernel without the LoRA term (HAS_LORA=False): Triton's GEMM alone
  fused[cfg]  the fused kernel, p=0 and p=0.1
for a few tile configurations; each fused result is first checked against float64.
--grad-input: the input gradient instead (grad_input_probe); --host: host time at k/v (host_probe).

    python benchmarks/fused_forward_probe.py [--shapes qo kv ...] [--rank 16] [--tokens 8192]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import triton.testing

import bench_common as common
from bench_common import random_bf16

common.ensure_repo_on_path()
import lora_ext  # noqa: E402,F401  (registers torch.ops.lora.*)
from lora_ext.kernels import fused_forward  # noqa: E402
from lora_ext.reference import lora_linear_reference  # noqa: E402

SHAPES = {"qo": (4096, 4096), "kv": (4096, 1024), "gate_up": (4096, 14336), "down": (14336, 4096)}
SHAPES.update(common.E2E_SHAPES)  # the end-to-end model's layers (run them with --tokens 4096)
CONFIGS = {
    "default": {},  # fused_forward's own choice (DEFAULT_CONFIG and its stages rule, _pipeline_stages)
    "256x3": dict(block_m=128, block_n=256, block_k=64, epilogue_chunks=4, num_stages=3, num_warps=8),
    "256x4": dict(block_m=128, block_n=256, block_k=64, epilogue_chunks=4, num_stages=4, num_warps=8),
    "128x4": dict(block_m=128, block_n=128, block_k=64, epilogue_chunks=2, num_stages=4, num_warps=8),
    "m256x3": dict(block_m=256, block_n=128, block_k=64, epilogue_chunks=2, num_stages=3, num_warps=8),
    # One warpgroup per 64-row tile: at k/v the auto split is then one run per row block (128
    # programs), so each row's x A^T is computed once instead of twice (NOTES.md #37: its cost is
    # the count of small wgmmas). 180 KB of shared memory at r = 16 (sm_90 compile, triton 3.6).
    "m64x4": dict(block_m=64, block_n=256, block_k=64, epilogue_chunks=4, num_stages=4, num_warps=4),
    # 128-deep K steps (NOTES.md #60): half the K steps, so half the per-step waits and CTA barriers,
    # in every tile and in the first tile's x A^T. Predicted even with the 3-stage GEMM (two stages of
    # 100 KiB hold as many bytes as three of 48 KiB); measured 1.6-1.8x cuBLAS on an H100 (12-06): one
    # load issued ahead is too few. 217-225 KB of shared memory at r = 16 (sm_90, triton 3.9); r <= 16 only.
    "k128x2": dict(block_m=128, block_n=256, block_k=128, epilogue_chunks=4, num_stages=2, num_warps=8),
    "n128k128x3": dict(block_m=128, block_n=128, block_k=128, epilogue_chunks=2, num_stages=3, num_warps=8),
}


def bench_us(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")) * 1e3


def host_probe(tokens: int, rank: int) -> None:
    """Where the op's time goes with the fused forward on and off at k/v (4096 x 1024): host issue
    time per call (no waiting for the device) of the op and of the fused launch's Python pieces,
    and fwd+bwd through autograd (do_bench median, and back to back between CUDA events)."""
    from lora_ext.kernels.cuda_dispatch import fused_forward_callback
    from lora_ext.kernels.fused_forward import TensorDescriptor

    dtype, device, scale = torch.bfloat16, "cuda", 2.0
    K, N = SHAPES["kv"]
    x = torch.randn(tokens, K, device=device, dtype=dtype, requires_grad=True)
    W = torch.randn(N, K, device=device, dtype=dtype) / K**0.5
    A = (torch.randn(rank, K, device=device, dtype=dtype) / K**0.5).requires_grad_()
    B = (torch.randn(N, rank, device=device, dtype=dtype) / rank**0.5).requires_grad_()
    gy = torch.randn(tokens, N, device=device, dtype=dtype)

    def forward(p=0.0):
        # A fresh seed per call at p > 0, as LinearLoRA draws one (lora_ext.ops.draw_seed).
        seed = lora_ext.ops.draw_seed(x.device) if p else None
        return torch.ops.lora.linear(x, W, None, A, B, scale, p, "post", seed)

    def fwd_bwd_times(p=0.0):
        """(host issue, do_bench, back to back) µs per fwd+bwd through autograd at 'post' dropout p."""
        def fwd_bwd():
            y, _ = forward(p)
            torch.autograd.grad(y, (x, A, B), gy)

        issue = common.wall_us_per_call(fwd_bwd, 100, device, warmup=10, repeats=3, wait_for_device=False)
        return issue, bench_us(fwd_bwd), common.cuda_events_ms(fwd_bwd, 100) * 1e3

    print(f"host probe, kv {K}x{N} M={tokens} r={rank}: us per call")
    base = bench_us(lambda: torch.nn.functional.linear(x, W))
    # (fused forward, fused input gradient)
    for fused, fused_grad in ((False, False), (True, False), (True, True)):
        with common.switched((lora_ext._C.set_fused_forward, fused), (lora_ext._C.set_fused_grad_input, fused_grad)):
            with torch.no_grad():
                issue = common.wall_us_per_call(forward, 200, device, warmup=20, repeats=3, wait_for_device=False)
            issue_grad = common.wall_us_per_call(forward, 200, device, warmup=20, repeats=3, wait_for_device=False)
            issue_fb, fb, fb_events = fwd_bwd_times()
        print(f"  fused forward={fused} grad_input={fused_grad}: host issue fwd no_grad {issue:.1f}, fwd grad {issue_grad:.1f}, fwd+bwd {issue_fb:.1f}; "
              f"device fwd+bwd do_bench {fb:.1f} ({fb / base:.2f}x base fwd), back to back {fb_events:.1f}", flush=True)
    # 'post' dropout 0.1 with the defaults (the fused 'post' GEMMs, the native masked step, dA alone):
    # bench_linear's k/v fwd+bwd at p = 0.1 read ~450 µs against ~297 of kernel time (NOTES.md #40).
    issue_fb, fb, fb_events = fwd_bwd_times(0.1)
    print(f"  dropout 0.1 'post', defaults: host issue fwd+bwd {issue_fb:.1f}; device fwd+bwd do_bench {fb:.1f} "
          f"({fb / base:.2f}x base fwd), back to back {fb_events:.1f}", flush=True)
    x2 = x.detach()
    pieces = {
        "supports()": lambda: fused_forward.supports(x2, W, None, A, B),
        "TensorDescriptor.from_tensor x1": lambda: TensorDescriptor.from_tensor(x2, [128, 64]),
        "linear_forward (5 descriptors + launch)": lambda: fused_forward.linear_forward(x2, W, None, A.detach(),
                                                                                        B.detach(), scale),
        "the C++ callback's body": lambda: fused_forward_callback(x2, W, None, A.detach(), B.detach(), scale),
    }
    for name, fn in pieces.items():
        t = common.wall_us_per_call(fn, 200, device, warmup=20, repeats=3, wait_for_device=False)
        print(f"  host {name}: {t:.1f}", flush=True)


def grad_input_probe(shapes, configs, tokens: int, rank: int) -> None:
    """The dropout-free input gradient per shape: cuBLAS's g W (the floor), the native path's composed
    dx (s g B, then (s g B) A written and g W accumulated onto it, as csrc/lora_aten.cpp), and
    fused_forward.grad_input per tile configuration, with Triton's GEMM alone (no LoRA term). Then
    the 'post' dropout form, grad_xa given (the masked step computes it): composed grad_xa A + g W
    against fused_forward.grad_input_given_xa, so that its width rule can be read per shape too."""
    torch.manual_seed(0)
    scale = 2.0
    print(f"input gradient, M={tokens} r={rank} bf16; us = do_bench median; ratio to g W in the same run")
    for shape in shapes:
        K, N = SHAPES[shape]
        g, W = random_bf16(tokens, N), random_bf16(N, K, std=N**-0.5)
        A, B = random_bf16(rank, K, std=K**-0.5), random_bf16(N, rank, std=rank**-0.5)

        def composed():
            grad_xa = torch.mm(g, B).mul_(scale)
            dx = torch.mm(grad_xa, A)
            return dx.addmm_(g, W)

        base = bench_us(lambda: torch.mm(g, W))
        comp = bench_us(composed)
        line = [f"{shape} {K}x{N}: g W {base:.1f} us", f"composed dx {comp:.1f} ({comp / base:.3f})"]
        ref = g.double() @ W.double() + scale * (g.double() @ B.double()) @ A.double()
        for cfg_name in configs:
            cfg = CONFIGS[cfg_name]
            try:
                dx, _ = fused_forward.grad_input(g, W, A, B, scale, **cfg)
                err = common.max_relative_error(dx, ref)
                gemm = bench_us(lambda: fused_forward.grad_input(g, W, A, B, scale, has_lora=False, **cfg))
                fused = bench_us(lambda: fused_forward.grad_input(g, W, A, B, scale, **cfg))
                line.append(f"[{cfg_name}] gemm {gemm:.1f} ({gemm / base:.3f}) fused {fused:.1f} ({fused / base:.3f})"
                            f"{' WRONG' if err > 2e-2 else ''} err {err:.1e}")
            except Exception as exc:  # a config that does not compile or fit: report, go on
                line.append(f"[{cfg_name}] failed: {type(exc).__name__}: {str(exc)[:200]}")
        grad_xa = (torch.mm(g, B) * scale).to(torch.bfloat16)

        def composed_given():
            return torch.mm(grad_xa, A).addmm_(g, W)

        comp_given = bench_us(composed_given)
        line.append(f"'post' given grad_xa: composed {comp_given:.1f} ({comp_given / base:.3f})")
        ref_given = g.double() @ W.double() + grad_xa.double() @ A.double()
        for cfg_name in configs:
            cfg = CONFIGS[cfg_name]
            try:
                dx = fused_forward.grad_input_given_xa(g, W, A, B, grad_xa, **cfg)
                err = common.max_relative_error(dx, ref_given)
                fused = bench_us(lambda: fused_forward.grad_input_given_xa(g, W, A, B, grad_xa, **cfg))
                line.append(f"[{cfg_name}] given {fused:.1f} ({fused / base:.3f}){' WRONG' if err > 2e-2 else ''}"
                            f" err {err:.1e}")
            except Exception as exc:  # a config that does not compile or fit: report, go on
                line.append(f"[{cfg_name}] given failed: {type(exc).__name__}: {str(exc)[:200]}")
        print("; ".join(line), flush=True)
        del g, W, A, B, grad_xa
        torch.cuda.empty_cache()


# Block rows x columns x pipeline stages x warps (16 columns: twice the programs of 32 where a layer's
# columns leave SMs idle, e.g. 80 programs at the end-to-end k/v; NOTES.md #40). Per program, BLOCK_M x BLOCK_C of the big operand
# per stage: (stages - 1) tiles in flight (NOTES #40: the 12-05 default, 128 x 32 x 4, keeps ~24 KiB
# in flight per program, about half what the HBM's latency needs). Configs that do not fit shared
# memory fail to compile and are reported as such.
ADAPTER_GRAD_CONFIGS = {
    "rule": {},  # adapter_grads.tile_config's choice for the launch (the default since #40)
    # the rule's tiles without the 16-byte rank hint (RANK_ALIGN = 1): r = 8's small operand as 2-byte
    # loads, as before NOTES.md #63 (the same variant as "rule" at multiples of 16)
    "rule_unaligned": dict(rank_align=1),
    **{f"m{bm}c{bc}s{st}w{nw}": dict(block_m=bm, block_c=bc, num_stages=st, num_warps=nw)
       for bm in (128, 256, 512) for bc in (16, 32, 64) for st in (3, 4, 6) for nw in (4, 8)
       if bm * bc * 2 * st <= 160 * 1024},
}


def adapter_grads_probe(shapes, tokens: int, rank: int, config_names) -> None:
    """The two adapter gradients of the dropout-free backward per shape: base fwd+bwd's two GEMMs
    for scale (x W^T, g W), cuBLAS's dA = grad_xa^T x and dB = s g^T xa as the native path runs
    them (csrc/lora_aten.cpp reduce_over_tokens) and cuBLAS's dA alone (what the 'post' dropout backward
    runs with the one launch off, or past its rank rule), adapter_grads.py's one launch and its dA alone per
    config, and the op's fwd+bwd (dropout 0, native) with the one launch off and on (set_fused_adapter_grads).
    The pieces are timed on the device (common.gpu_us: CUDA graph, L2 flushed), since a Triton
    launch from Python costs more host time than the k/v pieces take (12-05 02:37: every config
    read ~70 µs at k/v, the profiler's kernel time was 38.6); the op both ways (do_bench, as
    bench_linear, and device time)."""
    from lora_ext.kernels import adapter_grads

    torch.manual_seed(0)
    scale = 2.0
    print(f"adapter gradients, M={tokens} r={rank} bf16; us = device time (CUDA graph, L2 flushed) unless "
          "marked do_bench; ratio to cuBLAS's pair in the same run")
    for shape in shapes:
        K, N = SHAPES[shape]
        x, g, W = random_bf16(tokens, K), random_bf16(tokens, N), random_bf16(N, K, std=K**-0.5)
        xa, grad_xa = random_bf16(tokens, rank), random_bf16(tokens, rank)

        def cublas_pair():
            grad_A = torch.mm(grad_xa.t(), x)
            grad_B = torch.addmm(xa.new_empty(N, rank), g.t(), xa, beta=0, alpha=scale)
            return grad_A, grad_B

        base = common.gpu_us(lambda: F.linear(x, W)) + common.gpu_us(lambda: torch.mm(g, W))
        pair = common.gpu_us(cublas_pair)
        # dA alone as the native path runs it where the one launch does not take the size ('post' dropout
        # past r = 16 at more than 2048 outputs, or the switch off: reduce_over_tokens, cuBLAS's split-K with
        # its reduce), beside grad_A_only below (NOTES.md #94: the rule up to r = 16 at any width)
        cublas_A = common.gpu_us(lambda: torch.mm(grad_xa.t(), x))
        r_pad = max(16, triton.next_power_of_2(rank))
        limits = adapter_grads._device_limits(x.device)
        rule = [adapter_grads.tile_config(cols, r_pad, *limits) for cols in (K + N, K)]
        line = [f"{shape} {K}x{N} r={rank}: base fwd+bwd GEMMs {base:.1f} us",
                f"cuBLAS dA+dB {pair:.1f} ({pair / base:.3f} of base), dA alone {cublas_A:.1f}",
                "rule: " + ", ".join(f"m{c['block_m']}c{c['block_c']}s{c['num_stages']}w{c['num_warps']}"
                                     for c in rule) + " (both, dA alone)"]
        ref_A = grad_xa.double().t() @ x.double()
        ref_B = scale * g.double().t() @ xa.double()
        for name in config_names:
            cfg = ADAPTER_GRAD_CONFIGS[name]
            try:
                grad_A, grad_B = adapter_grads.adapter_grads(grad_xa, x, xa, g, 1.0, scale, **cfg)
                err = max(common.max_relative_error(grad_A, ref_A),
                          common.max_relative_error(grad_B, ref_B))
                t = common.gpu_us(lambda: adapter_grads.adapter_grads(grad_xa, x, xa, g, 1.0, scale, **cfg))
                t_A = common.gpu_us(lambda: adapter_grads.grad_A_only(grad_xa, x, 1.0, **cfg))
                line.append(f"[{name}] {t:.1f} ({t / pair:.3f}){' WRONG' if err > 2e-2 else ''} dA alone {t_A:.1f}")
            except Exception as exc:  # a config that does not compile or fit: report, go on
                line.append(f"[{name}] failed: {type(exc).__name__}: {str(exc)[:80]}")
        A = random_bf16(rank, K, std=K**-0.5).requires_grad_()
        B = random_bf16(N, rank, std=rank**-0.5).requires_grad_()
        x.requires_grad_()

        def op_fwd_bwd():
            y, _ = torch.ops.lora.linear(x, W, None, A, B, scale, 0.0, "post", None, "native")
            torch.autograd.grad(y, (x, A, B), g)

        # (one launch, its any-width rank limit): off; on as by default; above r = 16, on with the limit
        # raised to this rank, so that past 2048 outputs the one launch runs too (a wider rule's A/B).
        variants = [(False, 16, "off"), (True, 16, "on")]
        variants += [(True, rank, "on, any width")] if rank > 16 else []
        for on, any_width_rank, label in variants:
            with common.switched((lora_ext._C.set_fused_adapter_grads, on),
                                 (lora_ext._C.set_fused_adapter_grads_any_width_max_rank, any_width_rank)):
                t = bench_us(op_fwd_bwd)
                try:
                    t_dev = f"{common.gpu_us(op_fwd_bwd):.1f}"
                except Exception as exc:  # autograd under graph capture: report, go on
                    t_dev = f"failed ({type(exc).__name__})"
            line.append(f"op fwd+bwd one launch {label}: do_bench {t:.1f}, device {t_dev}")
        print("; ".join(line), flush=True)
        del x, g, W, A, B
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), help="none: the op's timings only")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--runs", type=int, nargs="*", default=[None], help="forced runs per row (default: auto)")
    parser.add_argument("--time-budget", type=float, default=400.0)
    parser.add_argument("--host", action="store_true", help="the host-time probe at k/v only (host_probe)")
    parser.add_argument("--grad-input", action="store_true", help="the input-gradient GEMM (grad_input_probe)")
    parser.add_argument("--adapter-grads", action="store_true", help="dA and dB of the backward (adapter_grads_probe)")
    parser.add_argument("--adapter-ranks", type=int, nargs="+", default=None, help="--adapter-grads: ranks (default --rank)")
    parser.add_argument("--adapter-configs", nargs="+", default=list(ADAPTER_GRAD_CONFIGS),
                        choices=list(ADAPTER_GRAD_CONFIGS), help="--adapter-grads: tiles to time")
    args = parser.parse_args()
    if args.adapter_grads:
        for rank in args.adapter_ranks or [args.rank]:
            adapter_grads_probe(args.shapes, args.tokens, rank, args.adapter_configs)
        return
    if args.host:
        host_probe(args.tokens, args.rank)
        return
    if args.grad_input:
        grad_input_probe(args.shapes, args.configs, args.tokens, args.rank)
        return
    torch.manual_seed(0)
    dtype, device, scale, p = torch.bfloat16, "cuda", 2.0, 0.1
    seed = torch.tensor([20261129], dtype=torch.int64, device=device)
    start = time.time()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} "
          f"M={args.tokens} r={args.rank} bf16; us = do_bench median; ratio to base in the same run")
    for shape in args.shapes:
        K, N = SHAPES[shape]
        M, r = args.tokens, args.rank
        x = torch.randn(M, K, device=device, dtype=dtype)
        W = torch.randn(N, K, device=device, dtype=dtype) / K**0.5
        A = torch.randn(r, K, device=device, dtype=dtype) / K**0.5
        B = torch.randn(N, r, device=device, dtype=dtype) / r**0.5
        base = bench_us(lambda: F.linear(x, W))
        line = [f"{shape} {K}x{N}: base {base:.1f} us"]
        for name, dp, fused, post in (("op p=0", 0.0, True, False), ("op p=0 composed", 0.0, False, False),
                                      ("op p=0.1", p, True, False), ("op p=0.1 fused-post on", p, True, True)):
            # the op's own choice when True (use_fused_forward, use_fused_post_dropout_forward: NOTES.md #33)
            with common.switched((lora_ext._C.set_fused_forward, fused), (lora_ext._C.set_fused_post_dropout, post)):
                t = bench_us(lambda: torch.ops.lora.linear(x, W, None, A, B, scale, dp, "post", seed))
            line.append(f"{name} {t:.1f} ({t / base:.3f})")
        # fwd+bwd with 'post' dropout (x requiring grad, as in a middle layer): the fused GEMMs with
        # 'post' dropout (set_fused_post_dropout: the forward and the input gradient, #33, #34) off
        # and on, then also dA in one launch (set_fused_adapter_grads: dA alone here, #35)
        g = torch.randn(M, N, device=device, dtype=dtype)
        leaves = [t.detach().requires_grad_() for t in (x, A, B)]
        base_bwd = base + bench_us(lambda: torch.mm(g, W))

        def fwd_bwd():
            y, _ = torch.ops.lora.linear(leaves[0], W, None, leaves[1], leaves[2], scale, p, "post", seed)
            torch.autograd.grad(y, leaves, g)

        for post, one_launch in ((False, False), (True, False), (True, True)):
            with common.switched((lora_ext._C.set_fused_post_dropout, post),
                                 (lora_ext._C.set_fused_adapter_grads, one_launch)):
                t = bench_us(fwd_bwd)
            line.append(f"op p=0.1 fwd+bwd fused-post {'on' if post else 'off'} dA-launch {'on' if one_launch else 'off'} "
                        f"{t:.1f} ({t / base_bwd:.3f} of base fwd+bwd)")
        print("; ".join(line), flush=True)
        for cfg_name in args.configs:
            cfg = CONFIGS[cfg_name]
            for runs in args.runs:
                if time.time() - start > args.time_budget:
                    print("time budget spent")
                    return
                tag = f"{cfg_name}" + (f" runs={runs}" if runs else "")
                try:
                    for dp in (0.0, p):  # float64 check first
                        y, xa = fused_forward.linear_forward(x, W, None, A, B, scale, dp, seed, runs=runs, **cfg)
                        ref = lora_linear_reference(x, W, None, A, B, scale, dp, "post", seed)
                        err = common.max_relative_error(y, ref)
                        xa_ref = x.double() @ A.double().t()
                        xa_err = common.max_relative_error(xa, xa_ref)
                        ok = err < 2e-2 and xa_err < 2e-2
                        if not ok:
                            print(f"  {tag} p={dp}: WRONG rel err y {err:.2e} xa {xa_err:.2e}")
                    gemm = bench_us(lambda: fused_forward.linear_forward(x, W, None, A, B, scale, has_lora=False,
                                                                         runs=runs, **cfg))
                    f0 = bench_us(lambda: fused_forward.linear_forward(x, W, None, A, B, scale, runs=runs, **cfg))
                    f1 = bench_us(lambda: fused_forward.linear_forward(x, W, None, A, B, scale, p, seed, runs=runs,
                                                                       **cfg))
                    print(f"  {tag}: gemm {gemm:.1f} ({gemm / base:.3f}) fused p=0 {f0:.1f} ({f0 / base:.3f}) "
                          f"p=0.1 {f1:.1f} ({f1 / base:.3f}); check err y {err:.1e} xa {xa_err:.1e}", flush=True)
                except Exception as exc:  # a config that does not compile or fit: report, go on
                    print(f"  {tag}: failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        if r % 16:
            padded_adapters_line(x, W, A, B, scale, p, seed, base)
        del x, W, A, B
        torch.cuda.empty_cache()


def padded_adapters_line(x, W, A, B, scale, p, seed, base) -> None:
    """The fused forward at a rank that is not a multiple of 16, as given and with the adapters
    zero-padded to the kernel's padded rank (same y; xa gains zero columns). At r = 8 the H100
    measured the op's forward 15-19 points slower than at r = 16 wherever the fused kernel runs
    (NOTES.md #61): its compile serialised every wgmma (xa stored from the accumulator into 8-wide
    rows), fixed since by the padded round trip (XA_PADDED). Padded adapters give r = 16's variant
    (xa's rows 16 wide, TMA boxes within the tensors): the as-given line should now read the same."""
    r, K = A.shape
    r_pad = max(16, triton.next_power_of_2(r))
    A_pad = torch.zeros(r_pad, K, device=A.device, dtype=A.dtype)
    A_pad[:r] = A
    B_pad = torch.zeros(B.shape[0], r_pad, device=B.device, dtype=B.dtype)
    B_pad[:, :r] = B
    line = []
    for name, (a, b) in (("as given", (A, B)), (f"padded to {r_pad}", (A_pad, B_pad))):
        f0 = bench_us(lambda: fused_forward.linear_forward(x, W, None, a, b, scale))
        f1 = bench_us(lambda: fused_forward.linear_forward(x, W, None, a, b, scale, p, seed))
        line.append(f"{name}: fused p=0 {f0:.1f} ({f0 / base:.3f}) p=0.1 {f1:.1f} ({f1 / base:.3f})")
    y, _ = fused_forward.linear_forward(x, W, None, A_pad, B_pad, scale)
    ref = lora_linear_reference(x, W, None, A, B, scale, 0.0, "post", None)
    err = common.max_relative_error(y, ref)
    print(f"  r={r} adapters {'; '.join(line)}; padded check err y {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
