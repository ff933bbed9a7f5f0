"""The one question about torch.distributed that merge, adapters and meta ask."""
from __future__ import annotations

import torch


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether t is a DTensor (an FSDP2 / tensor-parallel shard); False where torch has no distributed."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)
