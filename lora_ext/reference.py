"""Plain-PyTorch reference of the lora ops, shared by the tests and the benchmarks.

It is written from the math in SPEC.md, independently of the kernels: the dropout
mask comes from a numpy implementation of the Philox counter RNG that every backend
uses (csrc/philox.h), so comparing a kernel with this reference checks the kernel's
mask too.
"""
from __future__ import annotations

import math

import numpy as np
import torch

_MASK32 = np.uint64(0xFFFFFFFF)
_PHILOX_KEY_A = np.uint64(0x9E3779B9)
_PHILOX_KEY_B = np.uint64(0xBB67AE85)
_PHILOX_ROUND_A = np.uint64(0xD2511F53)
_PHILOX_ROUND_B = np.uint64(0xCD9E8D57)


def philox4(seed: int, counter: np.ndarray) -> tuple:
    """Philox-4x32-10 of counter (lo(counter), hi(counter), 0, 0) and key (lo(seed), hi(seed)).

    Returns the four output words, each as uint64 values in [0, 2**32). All arithmetic is
    on uint64 holding 32-bit values, so products are exact.
    """
    counter = np.asarray(counter, dtype=np.uint64)
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    c0 = counter & _MASK32
    c1 = counter >> np.uint64(32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0 = np.uint64(seed & 0xFFFFFFFF)
    k1 = np.uint64(seed >> 32)
    for _ in range(10):
        prod_b = _PHILOX_ROUND_B * c2
        prod_a = _PHILOX_ROUND_A * c0
        c0, c1, c2, c3 = (
            (prod_b >> np.uint64(32)) ^ c1 ^ k0,
            prod_b & _MASK32,
            (prod_a >> np.uint64(32)) ^ c3 ^ k1,
            prod_a & _MASK32,
        )
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox_mask_bits(seed: int, index: np.ndarray) -> np.ndarray:
    """The 16-bit random number of element `index`: half (index % 2; low half first) of word
    (index // 2) % 4 of philox4(seed, index // 8). One Philox evaluation covers eight elements."""
    index = np.asarray(index, dtype=np.uint64)
    words = np.stack(philox4(seed, index >> np.uint64(3)))
    word = np.take_along_axis(words, ((index >> np.uint64(1)) & np.uint64(3)).astype(np.int64)[None], axis=0)[0]
    return (word >> ((index & np.uint64(1)) * np.uint64(16))) & np.uint64(0xFFFF)


def dropout_threshold(p: float) -> int:
    """An element is dropped when its 16-bit random number is below this: floor(p * 2**16)."""
    return int(p * 65536.0)


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float) -> torch.Tensor:
    """Boolean (rows, cols) mask of kept elements, element (i, j) at linear index i*cols + j."""
    index = np.arange(rows * cols, dtype=np.uint64)
    keep = philox_mask_bits(seed, index) >= np.uint64(dropout_threshold(p))
    return torch.from_numpy(keep.reshape(rows, cols))


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    dropout_position: str = "post",
    seed: int | torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """y = x W^T + b + drop(s (x A^T) B^T)  ('post')  or  x W^T + b + s (drop(x) A^T) B^T  ('pre').

    Everything is computed in `compute_dtype` (float64 by default) and returned in
    that dtype; the result is differentiable with respect to every tensor argument.
    """
    if dropout_position not in ("pre", "post"):
        raise ValueError(f"dropout_position must be 'pre' or 'post', got {dropout_position!r}")
    if isinstance(seed, torch.Tensor):
        seed = int(seed.reshape(()).item())
    in_features = x.shape[-1]
    out_features = lora_B.shape[0]
    rows = math.prod(x.shape[:-1])
    # Both sizes given: reshape(-1, 0) of an empty x (in_features 0) is ambiguous.
    x2 = x.reshape(rows, in_features).to(compute_dtype)

    def keep_scale(cols: int) -> torch.Tensor:
        mask = dropout_keep_mask(seed, rows, cols, dropout_p).to(x2.device)
        return mask.to(compute_dtype) / (1.0 - dropout_p)

    dropping = dropout_p > 0.0
    x_lora = x2 * keep_scale(in_features) if dropping and dropout_position == "pre" else x2
    lora_term = scale * (x_lora @ lora_A.to(compute_dtype).t()) @ lora_B.to(compute_dtype).t()
    if dropping and dropout_position == "post":
        lora_term = lora_term * keep_scale(out_features)
    y = lora_term
    if weight is not None:
        y = y + x2 @ weight.to(compute_dtype).t()
    if bias is not None:
        y = y + bias.to(compute_dtype)
    return y.reshape(*x.shape[:-1], out_features)
