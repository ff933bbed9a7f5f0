"""materialize: the last step of the meta-device flow.

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)       # no memory, no init
    lora_ext.apply_lora_to_linear_modules(model, peft_config)  # adapters on meta too
    lora_ext.materialize(model, "model.safetensors", "cuda")   # allocate, load, init adapters

`model.to_empty(device)` alone is not enough, for three reasons this function handles:
- to_empty gives every parameter its own storage, which unties tied weights (e.g. a
  language model's lm_head and embeddings); the ties are recorded first and restored;
- non-persistent buffers (rotary `inv_freq`, ...) are not in any checkpoint, and
  to_empty leaves them as garbage; they are taken from the weights if present there,
  else recomputed by the Hugging Face model's own `_init_weights`;
- the base weights must be loaded by their unchanged names and the adapters
  initialised (lora_A random, lora_B zeros) without touching the base weights.

Everything is checked before anything is allocated: a missing, unexpected or
mis-shaped weight, or a buffer that cannot be restored, raises ValueError naming it,
and the model stays on meta. Weights are read one tensor at a time from safetensors
files (never pickle), so peak memory is the model plus one tensor.

FSDP2: materialize may run after fully_shard (parameters are meta DTensors); each rank
then keeps its shard of the full weights, and the adapters get the values they would
have without FSDP (for the same torch seed on every rank).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Mapping, Union

import torch
import torch.nn as nn

from ._distributed import is_dtensor as _is_dtensor
from ._report import problem_report
from .modules import LinearLoRA

__all__ = ["materialize"]

PathLike = Union[str, os.PathLike]
WeightsLike = Union[Mapping[str, torch.Tensor], PathLike]


class _WeightSource:
    """Names, shapes and (lazily) values of the weights: a dict, a .safetensors file, or a directory."""

    def __init__(self, weights: WeightsLike):
        self._files: dict[str, str] = {}  # name -> safetensors file holding it
        self._dict: Mapping[str, torch.Tensor] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        if isinstance(weights, Mapping):
            self._dict = weights
            self.shapes = {k: tuple(v.shape) for k, v in weights.items()}
            return
        from safetensors import safe_open

        for file in self._safetensors_files(Path(weights)):
            with safe_open(file, framework="pt") as f:
                for k in f.keys():
                    self._files[k] = file
                    self.shapes[k] = tuple(f.get_slice(k).get_shape())

    @staticmethod
    def _safetensors_files(path: Path) -> list[str]:
        if path.is_file():
            if path.suffix != ".safetensors":
                raise ValueError(f"materialize reads safetensors files only (never pickle), got {path}")
            return [str(path)]
        if path.is_dir():
            index = path / "model.safetensors.index.json"
            if index.is_file():
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                return [str(path / shard) for shard in shards]
            files = sorted(str(p) for p in path.glob("*.safetensors"))
            if files:
                return files
        raise FileNotFoundError(f"no safetensors weights at {path} (a .safetensors file or a directory of them)")

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def get(self, name: str) -> torch.Tensor:
        if name in self._dict:
            return self._dict[name]
        from safetensors import safe_open

        with safe_open(self._files[name], framework="pt") as f:
            return f.get_tensor(name)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _copy_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """target <- full (cast to target's dtype/device); a DTensor target keeps its own shard."""
    if _is_dtensor(target):
        from torch.distributed.tensor import distribute_tensor

        local = target.to_local()
        shard = distribute_tensor(full.to(device=local.device, dtype=local.dtype), target.device_mesh, target.placements)
        local.copy_(shard.to_local())
    else:
        target.copy_(full)


def _tensor_slots(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str, bool]]]:
    """id(tensor) -> every (fqn, owning module, attribute name, is_parameter) holding it: the tie groups."""
    slots: dict[int, list] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, param in module._parameters.items():
            if param is not None:
                slots.setdefault(id(param), []).append((_join(module_name, name), module, name, True))
        for name, buf in module._buffers.items():
            if buf is not None:
                slots.setdefault(id(buf), []).append((_join(module_name, name), module, name, False))
    return slots


def _owner_fqn(tensor_fqn: str) -> str:
    return tensor_fqn.rsplit(".", 1)[0] if "." in tensor_fqn else ""


def _slot_tensor(slot: tuple[str, nn.Module, str, bool]) -> torch.Tensor:
    _, module, name, is_param = slot
    return (module._parameters if is_param else module._buffers)[name]


def _hf_initializer(model: nn.Module, owner_fqn: str) -> Callable[[nn.Module], None] | None:
    """The `_init_weights` of the innermost module holding `owner_fqn` that has one, if any.

    Hugging Face PreTrainedModels recompute non-persistent buffers (rotary inv_freq)
    in `_init_weights(module)`; the model may also sit inside a user's wrapper.
    """
    parts = owner_fqn.split(".") if owner_fqn else []
    for depth in range(len(parts), -1, -1):
        try:
            candidate = model.get_submodule(".".join(parts[:depth]))
        except AttributeError:
            continue
        init = getattr(candidate, "_init_weights", None)
        if callable(init):
            return init
    return None


@torch.no_grad()
def materialize(model: nn.Module, weights: WeightsLike, device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Allocates a meta-device model on `device`, loads its weights, initialises its LoRA adapters.

    Args:
        model: a model built under torch.device("meta"), usually with LoRA layers
            already applied (apply_lora_to_linear_modules works on meta).
        weights: the base model's weights by their usual names (the names of the model
            before LoRA, which LoRA layers keep): a state dict, a .safetensors file, or a
            directory of them (a Hugging Face checkpoint, sharded or not). Tied weights
            need one name only. Adapter tensors (`<layer>.lora_A.weight`, ...) may be
            included; those are loaded instead of initialised.
        device: where to allocate.

    Returns `model`, with nothing left on meta: base weights copied from `weights` (cast
    to the model's dtypes), ties restored, non-persistent buffers restored (from
    `weights` if there, else by the Hugging Face model's `_init_weights`), and each LoRA
    layer's adapters initialised by its `reset_parameters()` (lora_A by its init method
    from torch's generator, in module order; lora_B zeros), exactly as on a real device.

    Raises ValueError before allocating anything when a weight is missing, unexpected
    or mis-shaped, or a non-persistent buffer can be restored neither way; and after
    allocating, when the Hugging Face model's `_init_weights` did not recompute such a
    buffer (a module of the user's inside the model): build the model again then.
    """
    device = torch.device(device)
    source = _WeightSource(weights)
    slots = _tensor_slots(model)
    state_ids = {id(t) for t in model.state_dict(keep_vars=True).values()}
    lora_layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LinearLoRA)]
    adapter_ids = {id(p) for _, m in lora_layers for p in (m.lora_A.weight, m.lora_B.weight)}

    # --- check everything first -------------------------------------------------
    missing, misshaped = [], []
    for tensor_id, group in slots.items():
        if tensor_id not in state_ids and not group[0][3]:
            continue  # a non-persistent buffer: handled below
        names = [fqn for fqn, *_ in group]
        shape = tuple(_slot_tensor(group[0]).shape)
        present = [n for n in names if n in source]
        if not present and tensor_id not in adapter_ids:  # adapters missing from the weights are initialised
            missing.append(" = ".join(names))
        misshaped += [f"{n}: weights {list(source.shapes[n])}, model {list(shape)}" for n in present if source.shapes[n] != shape]
    known = {fqn for group in slots.values() for fqn, *_ in group}
    unexpected = sorted(k for k in source.shapes if k not in known)

    nonpersistent: dict[int, list] = {
        tid: group for tid, group in slots.items() if tid not in state_ids and not group[0][3]
    }
    unrestorable = [
        " = ".join(fqn for fqn, *_ in group)
        for group in nonpersistent.values()
        if not any(fqn in source for fqn, *_ in group)
        and all(_hf_initializer(model, _owner_fqn(fqn)) is None for fqn, *_ in group)
    ]
    problems = problem_report([
        ("missing from the weights", missing),
        ("unexpected in the weights (no such parameter or buffer)", unexpected),
        ("mis-shaped", misshaped),
        ("non-persistent buffers that are in no checkpoint and that this model cannot recompute "
         "(add their values to the weights under these names)", unrestorable),
    ])
    if problems:
        raise ValueError("materialize: nothing was allocated; the weights do not fit the model:\n" + problems)

    # --- allocate, re-tie ---------------------------------------------------------
    model.to_empty(device=device)
    for group in slots.values():
        if len(group) > 1:
            _, first_module, first_name, is_param = group[0]
            table = "_parameters" if is_param else "_buffers"
            tensor = getattr(first_module, table)[first_name]
            for _, module, name, _ in group[1:]:
                getattr(module, table)[name] = tensor

    # --- non-persistent buffers: from the weights, else recomputed by the HF model ----
    to_recompute = []  # groups (one tensor, re-tied above) that no weight gives
    owners_to_init = {}  # every module holding such a tensor: tied owners may differ in what knows them
    for group in nonpersistent.values():
        from_weights = next((n for n, *_ in group if n in source), None)
        if from_weights is not None:
            _copy_full_into(_slot_tensor(group[0]), source.get(from_weights))
            continue
        # A sentinel first: to_empty left the memory as it was, and an _init_weights that does not know
        # the module (a user's module inside a Hugging Face model) leaves it so, silently.
        _fill_sentinel(_slot_tensor(group[0]))
        to_recompute.append(group)
        for member_fqn, member, *_ in group:
            owners_to_init.setdefault(id(member), (_owner_fqn(member_fqn), member))
    for owner_fqn, module in owners_to_init.values():
        init = _hf_initializer(model, owner_fqn)
        if init is None:
            continue  # a tied owner that some other owner's _init_weights covers (checked before allocating)
        # The model's _init_weights on the buffer's owner may also draw that module's parameters (Gemma3:
        # the scaled embedding), which the weights overwrite below; with the random state forked, the
        # adapters after it are drawn as on a model built on `device` directly.
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            init(module)
    not_recomputed = [" = ".join(fqn for fqn, *_ in group) for group in to_recompute
                      if _still_sentinel(_slot_tensor(group[0]))]
    if not_recomputed:
        raise ValueError(
            "materialize: the model is allocated, but its _init_weights did not recompute these non-persistent "
            "buffers, or not all of their elements (in no checkpoint; add their values to the weights under these "
            "names and materialize a freshly built model):\n" + problem_report([("not recomputed", not_recomputed)]))

    # --- adapters: initialised as on a real device, unless both are in the weights -------
    for name, layer in lora_layers:
        if not all(f"{_join(name, which)}.weight" in source for which in ("lora_A", "lora_B")):
            _reset_adapters(layer)

    # --- base weights (and any adapters given, over their init), by unchanged names ---
    for tensor_id, group in slots.items():
        if tensor_id in nonpersistent:
            continue
        name = next((fqn for fqn, *_ in group if fqn in source), None)
        if name is not None:
            _copy_full_into(_slot_tensor(group[0]), source.get(name))

    left_on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left_on_meta:  # to_empty reaches every tensor, so this would be a bug here
        raise RuntimeError(f"materialize: tensors left on meta: {left_on_meta[:10]}")
    return model


# The sentinel non-persistent buffers are filled with before _init_weights: NaN for floating types;
# for bool, the byte 2 (neither False nor True); for integers, every byte 0xA5 (-0x5A5A5A5B for int32).
_SENTINEL_BYTE = 0xA5


def _fill_sentinel(t: torch.Tensor) -> None:
    if not t.is_contiguous() or t.numel() == 0:
        return  # not checked (to_empty allocates buffers contiguous)
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    else:
        t.view(torch.uint8).fill_(2 if t.dtype == torch.bool else _SENTINEL_BYTE)


def _still_sentinel(t: torch.Tensor) -> bool:
    """Whether _init_weights left sentinel elements: any, as a partial write is no recomputation; for
    1-byte integers all (165 or -91 is a plausible value there)."""
    if not t.is_contiguous() or t.numel() == 0:
        return False
    if t.is_floating_point() or t.is_complex():
        return bool(t.isnan().any())
    if t.dtype == torch.bool:
        return bool((t.view(torch.uint8) == 2).any())
    sentinel = torch.full((t.element_size(),), _SENTINEL_BYTE, dtype=torch.uint8, device=t.device).view(t.dtype)
    left = t == sentinel
    return bool(left.all() if t.element_size() == 1 else left.any())


def _reset_adapters(layer: LinearLoRA) -> None:
    """layer.reset_parameters(); for DTensor (FSDP2) adapters, on full tensors then sharded.

    Initialising the full tensors (same torch seed on every rank) gives every rank the
    values a single process would draw, whatever the sharding.
    """
    adapters = [layer.lora_A, layer.lora_B]
    sharded = [m.weight for m in adapters if _is_dtensor(m.weight)]
    if not sharded:
        layer.reset_parameters()
        return
    originals = [m._parameters["weight"] for m in adapters]
    try:
        for m, p in zip(adapters, originals):
            local = p.to_local() if _is_dtensor(p) else p
            m._parameters["weight"] = nn.Parameter(
                torch.empty(p.shape, dtype=p.dtype, device=local.device), requires_grad=p.requires_grad
            )
        layer.reset_parameters()
        full_values = [m._parameters["weight"].detach() for m in adapters]
    finally:
        for m, p in zip(adapters, originals):
            m._parameters["weight"] = p
    for p, full in zip(originals, full_values):
        _copy_full_into(p, full)
