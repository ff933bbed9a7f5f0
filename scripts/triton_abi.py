"""Prints how this machine's Triton passes host tensor descriptors to a kernel: the launcher's
expansion code, the fused forward kernel's tensordesc metadata, signature and PTX parameters.
For the C++ replay of tensor-descriptor launches (lora_ext/kernels/replay.py); needs a GPU."""
import inspect
import re

import torch
import triton

import triton.backends.driver as common_driver
from triton.backends.nvidia import driver as nvidia_driver

from lora_ext.kernels import fused_forward

print("triton", triton.__version__, "torch", torch.__version__)
for module, names in ((nvidia_driver, ("make_tensordesc_arg",)), (common_driver, ("_expand_descriptor", "expand_signature"))):
    for name in names:
        fn = getattr(module, name, None)
        print(f"--- {module.__name__}.{name}:", "absent" if fn is None else "\n" + inspect.getsource(fn))
x = torch.randn(4096, 512, device="cuda", dtype=torch.bfloat16)
w = torch.randn(1024, 512, device="cuda", dtype=torch.bfloat16)
a = torch.randn(16, 512, device="cuda", dtype=torch.bfloat16)
b = torch.randn(1024, 16, device="cuda", dtype=torch.bfloat16)
fused_forward.linear_forward(x, w, None, a, b, 0.5)
caches = fused_forward._lora_gemm_kernel.device_caches
for device, cache in caches.items():
    for key, compiled in cache[0].items():
        meta = compiled.metadata
        print("tensordesc_meta:", getattr(meta, "tensordesc_meta", "absent"))
        print("signature:", compiled.src.signature)
        print("metadata fields:", sorted(meta._asdict()) if hasattr(meta, "_asdict") else meta)
        ptx = compiled.asm["ptx"]
        entry = re.search(r"\.entry\s+(\w+)\s*\((.*?)\)", ptx, re.S)
        print("entry", entry.group(1))
        print("\n".join(line.strip() for line in entry.group(2).splitlines() if line.strip()))
