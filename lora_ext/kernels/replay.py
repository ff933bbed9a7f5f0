"""Recording the Triton launches of one piece so that C++ can replay them.

The native CUDA path calls Triton pieces: the masked pieces (triton_lora.masked_*) for its
dropout steps and the fused GEMMs (fused_forward.py: forward, input gradient) for dropout-free
k/v layers. Called through Python on every layer call they cost ~100-150 µs of host time each
(GIL, plan lookups, Triton's launcher; benchmarks/NOTES.md #6, #27). Everything a piece launches is
fixed by its inputs' shapes, strides, dtypes and alignment and by the scalars (scale, p):
only the tensors' addresses change from call to call. So the first call with a new such key
runs in Python with the launches recorded, and csrc/triton_replay.cu replays the recipe for
every later call with that key: it allocates the outputs and temporaries and launches the
same compiled kernels (cubins) with cuLaunchKernel, without Python.

A recipe is only made when every launch is understood (no scratch memory, no clusters, each
pointer argument an input, an output or a fresh temporary of the call, the kernel's parameter
list as expected); otherwise None and the piece stays on the Python route.

Host-side tensor descriptors (TMA): Triton's launcher passes each as a CUtensorMap (128 bytes,
encoded on the host from the tensor's address, shape and strides and the block shape and
swizzle the compiler chose, `metadata.tensordesc_meta`) followed by the shape (i32 each) and
strides (i64 each). The recipe keeps the encoding's parameters and which tensor is the base;
C++ encodes the map for each call's address with cuTensorMapEncodeTiled, as Triton's launcher
does. The kernel's PTX parameter list is checked against that expansion, so a Triton that
passes descriptors differently gives no recipe rather than a wrong launch.
"""
from __future__ import annotations

import re
import threading

import torch

# Per thread (torch releases the GIL inside its ops, so two threads may record at once):
# while a piece is recorded, `launches` is a list of (jit function, compiled kernel, grid, args).
_state = threading.local()


def launch(kernel, grid, *args, **meta):
    """kernel[grid](*args, **meta), recorded while a masked piece is being recorded.

    The constexpr parameters must be passed as keywords (meta), the others positionally."""
    compiled = kernel[grid](*args, **meta)
    launches = getattr(_state, "launches", None)
    if launches is not None:
        launches.append((kernel, compiled, tuple(grid), args))
    return compiled


def record(piece, inputs):
    """(piece(*inputs) as a tuple of tensors, its recipe or None); (None, None) when the piece
    returned None.

    Everything the piece writes into its outputs must come from Triton launches (C++ only
    asks for recordings when every tensor input is non-empty, where that holds)."""
    if getattr(_state, "launches", None) is not None:
        raise RuntimeError("lora: masked piece recordings cannot nest")
    _state.launches = launches = []
    try:
        result = piece(*inputs)
    finally:
        _state.launches = None
    if result is None:  # the piece declined these inputs (the fused GEMMs' callbacks); so will it for the key
        return None, None
    outputs = result if isinstance(result, tuple) else (result,)
    try:
        recipe = _recipe(inputs, outputs, launches)
    except _NotReplayable:
        recipe = None
    return outputs, recipe


class _NotReplayable(Exception):
    pass


def _require(condition: bool) -> None:
    if not condition:
        raise _NotReplayable


def _fresh(t: torch.Tensor) -> bool:
    """A tensor that owns its whole storage, contiguous from offset 0 (what at::empty gives)."""
    return (t._base is None and t.storage_offset() == 0 and t.is_contiguous()
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def _recipe(inputs, outputs, launches):
    """(temporaries, launches) for csrc/triton_replay.cu; raises _NotReplayable.

    temporaries: tensors whose sizes and options C++ allocates anew per call.
    launches: (cubin bytes, kernel name, num_warps, shared bytes, grid (3), args), each arg
    ("input", i) / ("output", j) / ("temp", k) for a pointer, ("i32" | "i64" | "fp32", value),
    or ("tensormap", base, encoding) for a tensor descriptor (see _tensor_map).
    """
    input_at, storages = {}, set()
    for i, t in enumerate(inputs):
        if isinstance(t, torch.Tensor):
            _require(t.data_ptr() not in input_at)  # two inputs at one address: ambiguous
            input_at[t.data_ptr()] = i
            storages.add(t.untyped_storage().data_ptr())
    output_at = {}
    for j, t in enumerate(outputs):
        _require(isinstance(t, torch.Tensor))
        if t.numel() > 0:
            _require(_fresh(t) and t.data_ptr() not in input_at)
            output_at[t.data_ptr()] = j
    temps, temp_at, specs = [], {}, []

    def pointer(value):
        """("input", i) / ("output", j) / ("temp", k) for the tensor a pointer argument points at."""
        _require(isinstance(value, torch.Tensor))
        address = value.data_ptr()
        if address in input_at:
            return ("input", input_at[address])
        if address in output_at:
            return ("output", output_at[address])
        _require(_fresh(value) and value.untyped_storage().data_ptr() not in storages)
        if address not in temp_at:
            temp_at[address] = len(temps)
            temps.append(value)
        return ("temp", temp_at[address])

    for kernel, compiled, grid, args in launches:
        meta = getattr(compiled, "metadata", None)  # None under the interpreter
        _require(meta is not None and isinstance(getattr(compiled, "kernel", None), bytes))
        _require(getattr(meta, "num_ctas", 1) == 1)
        _require(not getattr(meta, "global_scratch_size", 0) and not getattr(meta, "profile_scratch_size", 0))
        _require(not getattr(meta, "launch_cooperative_grid", False) and not getattr(meta, "launch_pdl", False))
        _require(all(d in (0, 1) for d in getattr(meta, "cluster_dims", (1, 1, 1))))
        signature = getattr(getattr(compiled, "src", None), "signature", None)
        _require(isinstance(signature, dict) and len(args) <= len(kernel.arg_names))
        descriptor_meta = list(getattr(meta, "tensordesc_meta", None) or [])
        kernel_args = []
        for name, value in zip(kernel.arg_names, args):
            kind = signature.get(name)
            _require(isinstance(kind, str))
            if kind == "constexpr":  # specialised away (e.g. a stride equal to 1)
                continue
            if kind.startswith("*"):
                kernel_args.append(pointer(value))
            elif kind.startswith("tensordesc<"):
                _require(bool(descriptor_meta))
                kernel_args.append(("tensormap", *pointer(getattr(value, "base", None)),
                                    _tensor_map(value, descriptor_meta.pop(0))))
                kernel_args += [("i32", int(size)) for size in value.shape]
                kernel_args += [("i64", int(stride)) for stride in value.strides]
            elif kind in ("i32", "i64"):
                kernel_args.append((kind, int(value)))
            elif kind == "fp32":
                kernel_args.append((kind, float(value)))
            else:
                raise _NotReplayable
        _require(not descriptor_meta)
        _require(_parameter_types(compiled) == [_PARAMETER_TYPE[arg[0]] for arg in kernel_args] + _SCRATCH_PARAMETERS)
        grid3 = tuple(grid) + (1,) * (3 - len(grid))
        specs.append((bytes(compiled.kernel), compiled.name, int(meta.num_warps), int(meta.shared), grid3,
                      kernel_args))
    # Every output must be written by some launch (a pointer argument or a descriptor's base):
    # one that a torch op filled (e.g. zero_()) would come back from C++ uninitialised.
    written = {arg[1] for spec in specs for arg in spec[5] if arg[0] == "output"}
    written |= {arg[2] for spec in specs for arg in spec[5] if arg[:2] == ("tensormap", "output")}
    _require(all(j in written for j, t in enumerate(outputs) if t.numel() > 0))
    return temps, specs


# What each recipe argument is in the kernel's PTX parameter list; Triton kernels end with two
# scratch pointers (global, profile), passed as null by the replay.
_PARAMETER_TYPE = {"input": "u64", "output": "u64", "temp": "u64", "i32": "u32", "i64": "u64", "fp32": "f32",
                   "tensormap": "b8[128]"}
_SCRATCH_PARAMETERS = ["u64", "u64"]


def _parameter_types(compiled) -> list[str]:
    """The kernel's parameters from its PTX entry: "u32", "u64", "f32", or "b8[128]" for a
    64-byte aligned 128-byte block (a CUtensorMap)."""
    ptx = (getattr(compiled, "asm", None) or {}).get("ptx")
    _require(isinstance(ptx, str))
    entry = re.search(r"\.entry\s+" + re.escape(compiled.name) + r"\s*\((.*?)\)", ptx, re.S)
    _require(entry is not None)
    types = []
    for parameter in entry.group(1).split(","):
        if not parameter.strip():
            continue
        block = re.fullmatch(r"\s*\.param\s+\.align\s+64\s+\.b8\s+\w+\[128\]\s*", parameter)
        scalar = re.fullmatch(r"\s*\.param\s+\.(u32|u64|f32)\b.*", parameter, re.S)
        _require(block is not None or scalar is not None)
        types.append("b8[128]" if block is not None else scalar.group(1))
    return types


def _tensor_map(descriptor, meta: dict) -> tuple:
    """The arguments of cuTensorMapEncodeTiled for a host tensor descriptor, as Triton's launcher
    passes them (tiled, element strides 1, no interleave, L2 promotion 128 B): (data type,
    dims, byte strides of dims 1.., box dims, swizzle, out-of-bounds fill), innermost dimension
    first."""
    _require(not meta.get("fp4_padded") and not meta.get("is_im2col"))
    _require(not getattr(descriptor, "round_f32_to_tf32", False))
    shape, strides, block = list(descriptor.shape), list(descriptor.strides), list(meta["block_size"])
    _require(1 <= len(shape) <= 5 and len(strides) == len(shape) == len(block) and strides[-1] == 1)
    try:  # the encoding's data-type numbers, as Triton's launcher maps them (absent: no recipe)
        from triton.backends.nvidia.driver import TMA_DTYPE_DEVICE_TO_HOST
        data_type = int(TMA_DTYPE_DEVICE_TO_HOST[meta["elem_type"]])
    except (ImportError, KeyError):
        raise _NotReplayable from None
    elem_size = int(meta["elem_size"])
    _require(elem_size == descriptor.base.element_size())
    return (data_type, [int(d) for d in reversed(shape)],
            [int(s) * elem_size for s in reversed(strides[:-1])], [int(b) for b in reversed(block)],
            int(meta["swizzle"]), 1 if descriptor.padding == "nan" else 0)
