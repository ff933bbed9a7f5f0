"""Recording the Triton launches of one masked piece so that C++ can replay them.

The native CUDA path calls the Triton masked pieces (triton_lora.masked_*) for its dropout
steps. Called through Python on every layer call they cost ~100-150 µs of host time each
(GIL, plan lookups, Triton's launcher; benchmarks/NOTES.md #6). Everything a piece launches is
fixed by its inputs' shapes, strides, dtypes and alignment and by the scalars (scale, p):
only the tensors' addresses change from call to call. So the first call with a new such key
runs in Python with the launches recorded, and csrc/triton_replay.cu replays the recipe for
every later call with that key: it allocates the outputs and temporaries and launches the
same compiled kernels (cubins) with cuLaunchKernel, without Python.

A recipe is only made when every launch is understood (no scratch memory, no clusters, each
pointer argument an input, an output or a fresh temporary of the call); otherwise None and
the piece stays on the Python route.
"""
from __future__ import annotations

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
    """(piece(*inputs) as a tuple of tensors, its recipe or None).

    Everything the piece writes into its outputs must come from Triton launches (C++ only
    asks for recordings when every tensor input is non-empty, where that holds)."""
    if getattr(_state, "launches", None) is not None:
        raise RuntimeError("lora: masked piece recordings cannot nest")
    _state.launches = launches = []
    try:
        result = piece(*inputs)
    finally:
        _state.launches = None
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
    ("input", i) / ("output", j) / ("temp", k) for a pointer, or ("i32" | "i64" | "fp32", value).
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
    for kernel, compiled, grid, args in launches:
        meta = getattr(compiled, "metadata", None)  # None under the interpreter
        _require(meta is not None and isinstance(getattr(compiled, "kernel", None), bytes))
        _require(getattr(meta, "num_ctas", 1) == 1)
        _require(not getattr(meta, "global_scratch_size", 0) and not getattr(meta, "profile_scratch_size", 0))
        _require(not getattr(meta, "launch_cooperative_grid", False) and not getattr(meta, "launch_pdl", False))
        _require(all(d in (0, 1) for d in getattr(meta, "cluster_dims", (1, 1, 1))))
        signature = getattr(getattr(compiled, "src", None), "signature", None)
        _require(isinstance(signature, dict) and len(args) <= len(kernel.arg_names))
        kernel_args = []
        for name, value in zip(kernel.arg_names, args):
            kind = signature.get(name)
            _require(isinstance(kind, str))
            if kind == "constexpr":  # specialised away (e.g. a stride equal to 1)
                continue
            if kind.startswith("*"):
                _require(isinstance(value, torch.Tensor))
                address = value.data_ptr()
                if address in input_at:
                    kernel_args.append(("input", input_at[address]))
                elif address in output_at:
                    kernel_args.append(("output", output_at[address]))
                else:
                    _require(_fresh(value) and value.untyped_storage().data_ptr() not in storages)
                    if address not in temp_at:
                        temp_at[address] = len(temps)
                        temps.append(value)
                    kernel_args.append(("temp", temp_at[address]))
            elif kind in ("i32", "i64"):
                kernel_args.append((kind, int(value)))
            elif kind == "fp32":
                kernel_args.append((kind, float(value)))
            else:
                raise _NotReplayable
        grid3 = tuple(grid) + (1,) * (3 - len(grid))
        specs.append((bytes(compiled.kernel), compiled.name, int(meta.num_warps), int(meta.shared), grid3,
                      kernel_args))
    # Every output must be a pointer argument of some launch: one that a torch op filled
    # (e.g. zero_()) would come back from C++ uninitialised.
    written = {value for spec in specs for kind, value in spec[5] if kind == "output"}
    _require(all(j in written for j, t in enumerate(outputs) if t.numel() > 0))
    return temps, specs
