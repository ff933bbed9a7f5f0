"""Runs one masked dropout piece (benchmarks/masked_pieces.py) a few times, for Nsight Compute.

    ncu --clock-control none --set full -k regex:_lora_down_reduce --launch-skip 2 --launch-count 1 \
        python3 scripts/ncu_piece.py [piece] [shape] [rank]

piece: grad_y (default; grad_y_native: csrc/cuda/masked_grad_y.cu), down, up, adapter_grads (the dropout-free
backward's dA and dB in one launch, lora_ext/kernels/adapter_grads.py: -k regex:_adapter_grads_kernel; at any
shape, including those where the op's rule would not take the one launch);
shape: qo (default), kv, gate_up, down.
NCU_SUM_BLOCKS="P,R[;P,R...]": the Triton pieces' partial sums (_sum_partials_kernel) launched with these
(BLOCK_PARTS, BLOCK_ROWS) instead of _sum_blocks' choice, the i-th pair for the i-th sum of each call (the 'post'
piece sums dxa's partials, then dB's): to profile a rule other than the library's (benchmarks/NOTES.md #70).
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import masked_pieces  # noqa: E402  (imports lora_ext)

piece = sys.argv[1] if len(sys.argv) > 1 else "grad_y"
shape = sys.argv[2] if len(sys.argv) > 2 else "qo"
rank = int(sys.argv[3]) if len(sys.argv) > 3 else 16
K, N = masked_pieces.SHAPES[shape]
inputs = masked_pieces.make_inputs(8192, K, N, rank)
names = {"grad_y": "post_bwd masked_grad_y", "down": "pre_fwd masked_down", "up": "pre_bwd masked_up"}
if os.environ.get("NCU_SUM_BLOCKS"):
    from lora_ext.kernels import triton_lora

    forced = [tuple(int(v) for v in pair.split(",")) for pair in os.environ["NCU_SUM_BLOCKS"].split(";")]
    if any(len(pair) != 2 or min(pair) < 1 or any(v & (v - 1) for v in pair) for pair in forced):
        raise SystemExit(f"NCU_SUM_BLOCKS: pairs of powers of two 'P,R' separated by ';', got {forced}")
    sums_launched = []

    def forced_blocks(num_parts, n_rows, r_pad, sms):
        blocks = forced[len(sums_launched) % len(forced)]
        sums_launched.append(blocks)
        return blocks

    triton_lora._sum_blocks = forced_blocks
if piece == "adapter_grads":
    from lora_ext.kernels import adapter_grads

    x2, g2, A, B, xa, seed = inputs
    grad_xa = torch.randn_like(xa)

    def fn():
        adapter_grads.adapter_grads(grad_xa, x2, xa, g2, 1.0, 2.0)
elif piece == "grad_y_native":
    x2, g2, A, B, xa, seed = inputs
    # As the op calls it (LORA_EXT_MASKED_GRAD_Y_GRID=sqrt: the first grid rule).
    fn = masked_pieces.native_step(x2, g2, B, xa, seed)
else:
    fn, _ = masked_pieces.pieces(*inputs)[names[piece]]
for _ in range(4):
    fn()
torch.cuda.synchronize()
