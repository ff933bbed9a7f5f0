"""lora_ext: LoRA linear layers built on the torch.ops.lora custom operators.

Importing the package loads the C++ extension (the op schemas and CPU kernels),
then the Python registrations (fake kernels, autograd, the CUDA kernels). It does
not initialise CUDA and does not need triton.
"""
import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

from . import _C  # noqa: F401  (registers torch.ops.lora.* and the CPU kernels)
from . import ops  # noqa: F401  (fake kernels and autograd)
from .kernels import cuda_dispatch  # noqa: F401  (CUDA kernels: Triton or native)

from .apply import apply_lora_to_linear_modules
from .config import PeftConfig
from .modules import LinearLoRA, LoRATritonFunction, TritonLinearLoRA, patch_linear_module

__all__ = [
    "PeftConfig",
    "LinearLoRA",
    "TritonLinearLoRA",
    "LoRATritonFunction",
    "patch_linear_module",
    "apply_lora_to_linear_modules",
]

# Ecosystem (issue 5): merging adapters into the base weights.
from .merge import merge_adapters, merge_and_unload, unmerge_adapters

__all__ += ["merge_adapters", "unmerge_adapters", "merge_and_unload"]

# Ecosystem (issue 5): adapters in the Hugging Face PEFT format.
from .adapters import AdapterMismatchError, load_adapter, read_adapter_config, save_adapter

__all__ += ["save_adapter", "load_adapter", "read_adapter_config", "AdapterMismatchError"]

# Ecosystem (issue 5): the meta-device flow's last step.
from .meta import materialize

__all__ += ["materialize"]
