"""What the launch rules need to know of the CUDA device a kernel runs on: its compute capability,
SM count and the shared memory one block may use, looked up once per device (torch.cuda.get_device_properties
costs host time on every call). CPU tensors (the Triton interpreter) have no such device: each
rule says what it assumes there, for the choice it wants the tests to exercise."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _properties(index: int):
    return torch.cuda.get_device_properties(index)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def sm_count(device: torch.device, on_cpu: int) -> int:
    """Streaming multiprocessors of a CUDA device; `on_cpu` for any other."""
    if device.type != "cuda":
        return on_cpu
    return _properties(_cuda_index(device)).multi_processor_count


def shared_bytes_per_block(device: torch.device, on_cpu: int) -> int:
    """The shared memory one block may opt into on a CUDA device; `on_cpu` for any other (and where
    torch does not report it)."""
    if device.type != "cuda":
        return on_cpu
    return getattr(_properties(_cuda_index(device)), "shared_memory_per_block_optin", on_cpu)


def major_capability(device: torch.device) -> int:
    """The compute capability's major number of a CUDA device (9 for Hopper)."""
    return _properties(_cuda_index(device)).major
