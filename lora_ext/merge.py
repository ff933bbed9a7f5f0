"""Merging LoRA adapters into the base weight for inference, and taking them out again.

merge_adapters(model)     W <- W + s * B @ A in every LoRA layer; the layer then skips the LoRA path.
unmerge_adapters(model)   restores every merged W bit for bit; the layer applies the LoRA path again.
merge_and_unload(model)   merges for good and turns the LoRA layers back into plain nn.Linear modules.

How W + s*B@A is formed: the product s * (B @ A) is computed in float32 (float64 for a
float64 weight) from the adapters, added to W in that precision, and the sum is rounded
once to W's dtype. The adapters' own dtype does not matter.

How unmerge is exact. Subtracting the same product again, (round(W + D) - D) rounded to
W's dtype, gives W back for most entries but not all: when W + D has a larger exponent
than W (|D| comparable to or larger than |W|, e.g. near-zero weights), the rounding of
the sum loses low bits of W. Measured on 1024x1024 weights ~ N(0, 0.02) with rank-8
updates whose RMS is 1% / 10% / 100% of W's: 1.2% / 6.9% / 30% of the entries in
bfloat16 and 2.1% / 10% / 33% in float32 do not round-trip. merge_adapters finds exactly
those entries (it does the subtraction itself and compares bits) and keeps their
original values with their flat indices (a "patch"); unmerge subtracts, then writes the
patch back, so W is restored bitwise. The patch costs (index bytes + W's element size)
per entry; when it would be larger than a copy of W, a copy is kept instead, so the
memory held per merged layer is at most one copy of W and typically a few percent of it.
The adapters are copied too (they are small), so changing lora_A/lora_B while merged
does not break the restore. Exactness assumes the same device and matmul settings: the
product is recomputed with the same shapes on the weight's current device (CPU and CUDA
matmuls are deterministic for a given device, shape and setting such as
torch.backends.cuda.matmul.allow_tf32); if the weight's dtype changed while merged
(e.g. model.half()), unmerge falls back to subtraction and warns.

Not part of the state dict: a merged layer's state_dict holds the merged weight; whether
a layer is merged is not saved. Save adapters (lora_ext.save_adapter) or unmerged models.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ._distributed import is_dtensor as _is_dtensor
from .modules import LinearLoRA

__all__ = ["merge_adapters", "unmerge_adapters", "merge_and_unload"]

# Rows of W processed at once: bounds the float32 temporaries (the product, W in
# float32, the rounded sum) to about 3 * 2**24 elements (192 MiB), whatever the layer size.
_CHUNK_ELEMENTS = 1 << 24

# Same-size integer views, to compare floats bit for bit (-0.0 vs 0.0 and NaN payloads included).
_BITS_DTYPE = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}

# Attributes merge_and_unload removes so that an unloaded layer is a plain nn.Linear.
_LORA_ATTRIBUTES = ("dim", "scale", "dropout_p", "dropout_position", "lora_A_init_method", "merged", "_merge_record")


@dataclass
class _MergeRecord:
    """What unmerge needs to restore a layer's weight exactly (kept on the layer, not in its state dict)."""

    lora_A: torch.Tensor  # the merged adapters, in the compute dtype, on the weight's device
    lora_B: torch.Tensor
    scale: float
    weight_dtype: torch.dtype
    # Entries where subtraction does not give W back: flat indices and original values ...
    patch_index: Optional[torch.Tensor] = None
    patch_values: Optional[torch.Tensor] = None
    # ... or, when that would be larger, a copy of the whole original W.
    weight_copy: Optional[torch.Tensor] = None


def _lora_layers(model: nn.Module) -> list[tuple[str, LinearLoRA]]:
    """(first name, module) of every LoRA layer of `model`, each module once."""
    seen: set[int] = set()
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, LinearLoRA) and id(module) not in seen:
            seen.add(id(module))
            layers.append((name, module))
    return layers


def _compute_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


def _row_chunks(rows: int, cols: int):
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield start, min(start + step, rows)


def _delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, start: int, stop: int) -> torch.Tensor:
    """s * (B @ A) for weight rows [start, stop), in lora_A's (compute) dtype.

    merge and unmerge both call this with the same tensors and the same row ranges,
    so they get the same values bit for bit.
    """
    return torch.mm(lora_B[start:stop], lora_A).mul_(scale)


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` sharded by FSDP2 (fully_shard). After a forward (in eval, or for the root
    unit) their parameters can be plain unsharded tensors that the next reshard discards, so a
    DTensor check on the weights alone does not tell a sharded model."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _check_mergeable(model: nn.Module, layers: list[tuple[str, LinearLoRA]]) -> None:
    """Raises before anything changes if some layer cannot be merged."""
    if fsdp_modules(model):
        raise NotImplementedError(
            "cannot merge: the model is sharded with FSDP2 (fully_shard); its weights may be unsharded copies "
            "that the next reshard discards. Gather the full weights first (e.g. a full state dict) and merge "
            "an unsharded model"
        )
    param_owners: dict[int, set[str]] = {}
    module_names: dict[int, set[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        module_names.setdefault(id(module), set()).add(module_name)
        for param_name, param in module.named_parameters(recurse=False):
            param_owners.setdefault(id(param), set()).add(_join(module_name, param_name))
    for name, layer in layers:
        weight = layer.weight
        label = name or "<root>"
        if weight.is_meta:
            raise RuntimeError(f"cannot merge {label}: its weight is on the meta device; materialise the model first")
        if _is_dtensor(weight):
            raise NotImplementedError(
                f"cannot merge {label}: its weight is a DTensor (FSDP/tensor parallel); gather the full "
                "weights first (e.g. a full state dict) and merge an unsharded model"
            )
        if weight.dtype not in _BITS_DTYPE:
            raise TypeError(f"cannot merge {label}: its weight has dtype {weight.dtype}; merging needs a floating weight")
        if parametrize.is_parametrized(layer, "weight"):
            # layer.weight is then computed from the parametrization's original on every access:
            # an update written into it would be lost while `merged` skips the adapters.
            raise RuntimeError(
                f"cannot merge {label}: its weight is parametrized (torch.nn.utils.parametrize); merge into the "
                "original tensor is not defined. Remove the parametrization first "
                "(parametrize.remove_parametrizations(layer, 'weight'))"
            )
        own_names = {_join(n, "weight") for n in module_names[id(layer)]}
        sharers = param_owners.get(id(weight), set()) - own_names
        if sharers:
            raise RuntimeError(
                f"cannot merge {label}: its weight is shared (tied) with {sorted(sharers)}; merging would change "
                "those modules too. Untie the weights first (e.g. give the layer its own copy of the parameter)"
            )


def _merge_layer(layer: LinearLoRA, record: bool) -> None:
    weight = layer.weight.data
    compute_dtype = _compute_dtype(weight.dtype)
    lora_A = layer.lora_A.weight.detach().to(device=weight.device, dtype=compute_dtype, copy=True)
    lora_B = layer.lora_B.weight.detach().to(device=weight.device, dtype=compute_dtype, copy=True)
    scale = float(layer.scale)
    rows, cols = weight.shape
    bits = _BITS_DTYPE[weight.dtype]

    merge_record = None
    if record:
        # First pass: which entries would subtraction fail to restore? (Nothing is written yet.)
        lossy = []
        for start, stop in _row_chunks(rows, cols):
            old = weight[start:stop]
            delta = _delta(lora_A, lora_B, scale, start, stop)
            merged = (old.to(compute_dtype) + delta).to(weight.dtype)
            restored = (merged.to(compute_dtype) - delta).to(weight.dtype)
            lossy.append(restored.view(bits) != old.view(bits))
        lossy_mask = torch.cat(lossy).reshape(-1)
        index_dtype = torch.int32 if weight.numel() < 2**31 else torch.int64
        n_lossy = int(lossy_mask.sum())
        patch_bytes = n_lossy * (torch.empty((), dtype=index_dtype).element_size() + weight.element_size())
        merge_record = _MergeRecord(lora_A, lora_B, scale, weight.dtype)
        if patch_bytes <= weight.numel() * weight.element_size():
            merge_record.patch_index = lossy_mask.nonzero().reshape(-1).to(index_dtype)
            merge_record.patch_values = weight.reshape(-1)[lossy_mask].clone()
        else:
            merge_record.weight_copy = weight.clone()
        del lossy, lossy_mask

    for start, stop in _row_chunks(rows, cols):
        old = weight[start:stop]
        old.copy_((old.to(compute_dtype) + _delta(lora_A, lora_B, scale, start, stop)).to(weight.dtype))
    layer._merge_record = merge_record
    layer.merged = True


def _unmerge_layer(name: str, layer: LinearLoRA) -> None:
    record: Optional[_MergeRecord] = getattr(layer, "_merge_record", None)
    if record is None:
        raise RuntimeError(f"cannot unmerge {name or '<root>'}: it was merged without a record (merge_and_unload?)")
    weight = layer.weight.data
    if record.weight_copy is not None and record.weight_copy.dtype == weight.dtype:
        weight.copy_(record.weight_copy)
    else:
        compute_dtype = _compute_dtype(weight.dtype)
        lora_A = record.lora_A.to(device=weight.device, dtype=compute_dtype)
        lora_B = record.lora_B.to(device=weight.device, dtype=compute_dtype)
        rows, cols = weight.shape
        for start, stop in _row_chunks(rows, cols):
            cur = weight[start:stop]
            cur.copy_((cur.to(compute_dtype) - _delta(lora_A, lora_B, record.scale, start, stop)).to(weight.dtype))
        if record.weight_dtype != weight.dtype:
            warnings.warn(
                f"unmerge of {name or '<root>'}: the weight's dtype changed from {record.weight_dtype} to "
                f"{weight.dtype} while merged; it was restored by subtraction (not bit for bit)",
                stacklevel=3,
            )
        elif record.patch_index is not None:
            # Row-major positions, written through (row, column) pairs: reshape(-1) of a non-contiguous
            # weight (a transposed view, say) is a copy, and the patch would be lost.
            index = record.patch_index.to(device=weight.device, dtype=torch.int64)
            weight.index_put_((index // cols, index % cols), record.patch_values.to(weight.device))
    layer._merge_record = None
    layer.merged = False


@torch.no_grad()
def merge_adapters(model: nn.Module) -> int:
    """Adds s * B @ A into the weight of every LoRA layer of `model`; returns how many it merged.

    A merged layer computes x W'^T + b (the adapters are inside W'), so outputs equal
    the unmerged model's up to the rounding of W' to W's dtype. Layers already merged
    are skipped. Everything is checked before the first weight changes: a meta or
    DTensor weight, or a weight tied to another module, raises and leaves the model as
    it was. Dropout does not apply to merged layers; merge for inference.

    The layer keeps what unmerge_adapters needs to restore W bit for bit (see the
    module docstring: a sparse patch, at most one copy of W).
    """
    layers = [(n, m) for n, m in _lora_layers(model) if not m.merged]
    _check_mergeable(model, layers)
    for _, layer in layers:
        _merge_layer(layer, record=True)
    return len(layers)


@torch.no_grad()
def unmerge_adapters(model: nn.Module) -> int:
    """Restores the weight of every merged LoRA layer bit for bit; returns how many it unmerged.

    Uses the adapters as they were at merge time (changing them while merged does not
    matter); the layers then apply their current adapters again. Unmerged layers are
    skipped.
    """
    layers = [(n, m) for n, m in _lora_layers(model) if m.merged]
    for name, layer in layers:
        _unmerge_layer(name, layer)
    return len(layers)


def _unload_class(layer: LinearLoRA) -> type:
    # A patched subclass of an nn.Linear subclass goes back to that subclass; the
    # LoRA classes themselves go back to nn.Linear.
    bases = type(layer).__dict__.get("_lora_bases")
    return bases[1] if bases is not None else nn.Linear


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merges every LoRA layer for good and turns it back into a plain linear module; returns `model`.

    Each LoRA layer changes class in place (to nn.Linear, or to the nn.Linear subclass
    it was before patching), keeps its weight Parameter (now holding W + s * B @ A,
    rounded once to W's dtype; still frozen) and bias, and loses lora_A, lora_B and the
    LoRA attributes, so its state_dict has the base model's keys only. Layers merged
    earlier with merge_adapters are unloaded as they are. No unmerge record is kept.
    """
    layers = _lora_layers(model)
    _check_mergeable(model, [(n, m) for n, m in layers if not m.merged])
    for _, layer in layers:
        if not layer.merged:
            _merge_layer(layer, record=False)
    for _, layer in layers:
        del layer.lora_A
        del layer.lora_B
        for attribute in _LORA_ATTRIBUTES:
            layer.__dict__.pop(attribute, None)
        layer.__class__ = _unload_class(layer)
    return model
