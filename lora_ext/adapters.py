"""LoRA adapters on disk in the Hugging Face PEFT format, both ways.

A PEFT LoRA adapter is a directory with two files:

- `adapter_model.safetensors`: for every adapted Linear at module name `<fqn>`, the
  tensors `base_model.model.<fqn>.lora_A.weight` (r x in_features) and
  `base_model.model.<fqn>.lora_B.weight` (out_features x r);
- `adapter_config.json`: `peft_type` "LORA", `r`, `lora_alpha`, `target_modules`,
  `lora_dropout`, `bias` "none", ... (the scale is lora_alpha / r).

lora_ext's LoRA layers keep their adapters at `<fqn>.lora_A.weight` / `<fqn>.lora_B.weight`
with scale = alpha / dim, so the two formats differ only by the key prefix. The files
written here load with `peft.PeftModel.from_pretrained(base_model, path)`, and files
written by `peft` (`save_pretrained`) load here.

Decisions:
- `target_modules` is written so that peft selects exactly the adapted layers: the
  leaf names (e.g. ["q_proj", "v_proj"]) where every module of that name is adapted,
  full module names otherwise, and where even a full name would select another module too
  (a top-level "fc" next to an unadapted "block.fc"), one regex of the full names (peft
  full-matches a string target_modules).
- Layers with different ranks or alphas are written with `rank_pattern` /
  `alpha_pattern` (full module names, regex-escaped), as peft does.
- peft's `lora_dropout` drops the adapters' input (lora_ext's dropout_position 'pre').
  The dropout probability is written as `lora_dropout` whatever the position; lora_ext's
  position is kept in the safetensors metadata ("lora_ext.dropout_position"), where
  `read_adapter_config` finds it. Dropout only matters for training.
- peft saves the frozen base weight of some targeted layers too (`<fqn>.base_layer.weight`,
  e.g. lm_head's). Loading never changes base weights: such a tensor equal to the model's
  weight is accepted, a different one fails the load.
- Loading never changes a layer's hyper-parameters: the file's scale (lora_alpha / r,
  or / sqrt(r) with use_rslora) must equal each layer's `scale`, and the file's shapes
  its rank, otherwise loading fails. `read_adapter_config(path)` gives the PeftConfig
  that patches a model to match a file.
- Loading reads safetensors only (no pickle) and checks every key, shape and scale
  before it writes anything: on any mismatch it raises AdapterMismatchError naming all
  missing, unexpected and mis-shaped keys, and the model is unchanged.
- Saving writes each file under a temporary name in the target directory, flushes it to
  disk, then renames it over the final name (os.replace), so a crash never leaves a
  half-written file. The weights are replaced before the config.
- Sharded (FSDP2/DTensor) adapters are gathered: call save_adapter on every rank (rank 0
  writes) and load_adapter on every rank (each keeps its shard).
"""
from __future__ import annotations

import collections
import json
import math
import numbers
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from ._distributed import is_dtensor as _is_dtensor
from ._report import problem_report
from .config import PeftConfig
from .merge import fsdp_modules
from .modules import LinearLoRA

__all__ = [
    "ADAPTER_WEIGHTS_NAME",
    "ADAPTER_CONFIG_NAME",
    "AdapterMismatchError",
    "save_adapter",
    "load_adapter",
    "read_adapter_config",
    "adapter_state_dict",
]

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
# What peft puts before a module's name: PeftModel.base_model (the LoraModel) .model (the user's model).
PEFT_KEY_PREFIX = "base_model.model."
_METADATA_PREFIX = "lora_ext."
# Relative tolerance when comparing a file's scale with a layer's (alpha/r is a float).
_SCALE_RTOL = 1e-6

PathLike = Union[str, os.PathLike]


class AdapterMismatchError(ValueError):
    """The adapter file does not fit the model; the message lists every mismatch. The model is unchanged."""


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile's OptimizedModule prefixes names with "_orig_mod."; adapters are
    # named after the user's module tree.
    return getattr(model, "_orig_mod", model)


def _lora_layers(model: nn.Module) -> dict[str, LinearLoRA]:
    """{fqn: layer} for every LoRA layer, each under its first name."""
    return {name: m for name, m in _unwrap(model).named_modules() if isinstance(m, LinearLoRA)}


def _key(fqn: str, which: str) -> str:
    return f"{PEFT_KEY_PREFIX}{fqn}.{which}.weight" if fqn else f"{PEFT_KEY_PREFIX}{which}.weight"


def _same_base_weight(saved: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a base weight saved by peft is the model's (its values, in the model's dtype)."""
    if tuple(saved.shape) != tuple(weight.shape) or weight.is_meta:
        return False
    weight = _full(weight)
    return torch.equal(saved.to(dtype=weight.dtype), weight.detach().cpu())


def _full(t: torch.Tensor) -> torch.Tensor:
    # A DTensor's full value (a collective: every rank must get here).
    return t.full_tensor() if _is_dtensor(t) else t


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters of every LoRA layer under peft's keys (detached, full tensors, on their devices)."""
    tensors = {}
    for fqn, layer in _lora_layers(model).items():
        tensors[_key(fqn, "lora_A")] = _full(layer.lora_A.weight.detach())
        tensors[_key(fqn, "lora_B")] = _full(layer.lora_B.weight.detach())
    return tensors


def _number(x: float) -> Union[int, float]:
    # 32.0 -> 32: peft writes lora_alpha as an int when it is one.
    return int(x) if float(x).is_integer() else float(x)


def _most_common(values: list) -> Any:
    return collections.Counter(values).most_common(1)[0][0]


def _target_modules(model: nn.Module, layers: dict[str, LinearLoRA]) -> Union[list[str], str]:
    """peft's target_modules selecting exactly `layers` (see the module docstring).

    A list: peft selects a module when its name equals a target or ends with "." + target.
    Where even a full name would also select another module (a top-level "fc" also names
    "block.fc"), a string instead: one regex that peft full-matches against module names.
    """
    lora_ids = {id(m) for m in layers.values()}
    adapter_ids = {id(sub) for m in layers.values() for sub in (m.lora_A, m.lora_B)}
    modules_by_leaf: dict[str, list[nn.Module]] = collections.defaultdict(list)
    other_names = []
    for name, module in _unwrap(model).named_modules(remove_duplicate=False):
        if name and id(module) not in adapter_ids:
            modules_by_leaf[name.rsplit(".", 1)[-1]].append(module)
            if id(module) not in lora_ids:
                other_names.append(name)
    targets = set()
    for fqn in layers:
        leaf = fqn.rsplit(".", 1)[-1]
        if fqn and all(id(m) in lora_ids for m in modules_by_leaf[leaf]):
            targets.add(leaf)
        else:
            targets.add(fqn)
    if any(name == t or name.endswith("." + t) for t in targets for name in other_names):
        return "|".join(re.escape(fqn) for fqn in sorted(layers))
    return sorted(targets)


def _peft_config_dict(model: nn.Module, layers: dict[str, LinearLoRA]) -> dict[str, Any]:
    ranks = {fqn: int(m.dim) for fqn, m in layers.items()}
    alphas = {fqn: m.scale * m.dim for fqn, m in layers.items()}
    r = _most_common(list(ranks.values()))
    alpha = _most_common([_number(a) for a in alphas.values()])
    # Full names, escaped: peft matches pattern keys as regexes against the module name's end.
    rank_pattern = {re.escape(fqn): d for fqn, d in ranks.items() if d != r}
    alpha_pattern = {re.escape(fqn): _number(a) for fqn, a in alphas.items() if not math.isclose(a, alpha, rel_tol=_SCALE_RTOL)}
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "auto_mapping": None,
        # As peft's save_pretrained: a saved adapter loads frozen unless the loader asks for training.
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": _most_common([float(m.dropout_p) for m in layers.values()]),
        "target_modules": _target_modules(model, layers),
        "exclude_modules": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "loftq_config": {},
        "layer_replication": None,
    }


def _atomic_write(directory: Path, name: str, write) -> None:
    """Calls write(tmp_path) for a temporary file in `directory`, then renames it to `name`."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, directory / name)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_adapter(model: nn.Module, path: PathLike, *, peft_config: Optional[PeftConfig] = None) -> None:
    """Writes the adapters of every LoRA layer of `model` to directory `path` in the PEFT format.

    `path` is created if needed; existing adapter files there are replaced atomically
    (see the module docstring). Tensors are saved in the adapters' dtype, on CPU.

    peft_config: the lora_ext PeftConfig the model was patched with, if any. Its
    fields are stored in the safetensors metadata (for read_adapter_config); its dim and
    alpha must agree with the layers (ValueError otherwise). The layers' own attributes
    are what is written.

    With FSDP2 (DTensor adapters) call it on every rank; rank 0 writes.
    """
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA layers (apply_lora_to_linear_modules first)")
    if peft_config is not None:
        mismatched = [
            fqn for fqn, m in layers.items()
            if m.dim != peft_config.dim or not math.isclose(m.scale, peft_config.alpha / peft_config.dim, rel_tol=_SCALE_RTOL)
        ]
        if mismatched:
            raise ValueError(
                f"save_adapter: peft_config (dim={peft_config.dim}, alpha={peft_config.alpha}) does not describe "
                f"layers {mismatched[:5]}{' ...' if len(mismatched) > 5 else ''}"
            )
    tensors = {k: v.to("cpu").contiguous().clone() for k, v in adapter_state_dict(model).items()}
    distributed = (torch.distributed.is_available() and torch.distributed.is_initialized()
                   and torch.distributed.get_world_size() > 1)
    if distributed and torch.distributed.get_rank() != 0:
        # Rank 0 writes; returning before it has would let this rank's next load_adapter miss the files.
        torch.distributed.barrier()
        return
    try:
        _write_adapter(Path(path), tensors, model, layers, peft_config)
    finally:
        if distributed:
            torch.distributed.barrier()  # the other ranks wait here for the files (or rank 0's error)


def _write_adapter(directory: Path, tensors: dict[str, torch.Tensor], model: nn.Module,
                   layers: dict[str, LinearLoRA], peft_config: Optional[PeftConfig]) -> None:
    from safetensors.torch import save_file

    config = _peft_config_dict(model, layers)
    metadata = {
        "format": "pt",
        _METADATA_PREFIX + "dropout_position": _most_common([m.dropout_position for m in layers.values()]),
    }
    if peft_config is not None:
        metadata[_METADATA_PREFIX + "peft_config"] = json.dumps(peft_config.to_dict())

    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory, ADAPTER_WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    def write_config(tmp):
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic_write(directory, ADAPTER_CONFIG_NAME, write_config)


def _read_config(directory: Path) -> dict[str, Any]:
    config_path = directory / ADAPTER_CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG_NAME} in {directory}")
    with open(config_path) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_path}: peft_type is {config.get('peft_type')!r}; lora_ext reads LORA adapters only")
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "lora_bias": bool(config.get("lora_bias")),
        "bias": config.get("bias", "none") != "none",
        "modules_to_save": bool(config.get("modules_to_save")),
        "layer_replication": bool(config.get("layer_replication")),
        "target_parameters": bool(config.get("target_parameters")),
        "trainable_token_indices": bool(config.get("trainable_token_indices")),
    }
    used = [f"{k}={config.get(k)!r}" for k, bad in unsupported.items() if bad]
    if used:
        raise ValueError(f"{config_path}: lora_ext does not support {', '.join(used)} (plain LoRA on Linear layers only)")
    _check_ranks_and_alphas(config, config_path)
    return config


def _check_ranks_and_alphas(config: dict[str, Any], config_path: Path) -> None:
    """r and lora_alpha (and their per-module patterns) must be values a LoRA layer can have.

    Checked up front so that a bad file gives a ValueError naming the field, not a
    ZeroDivisionError (r=0) or a conversion error later.
    """

    def check_rank(value: Any, where: str) -> None:
        integral = isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer()
        if not integral or value < 1:
            raise ValueError(f"{config_path}: {where} must be an integer >= 1, got {value!r}")

    def check_alpha(value: Any, where: str) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{config_path}: {where} must be a finite number, got {value!r}")

    check_rank(config.get("r", 8), "r")
    check_alpha(config.get("lora_alpha", 8), "lora_alpha")
    for key, value in (config.get("rank_pattern") or {}).items():
        check_rank(value, f"rank_pattern[{key!r}]")
    for key, value in (config.get("alpha_pattern") or {}).items():
        check_alpha(value, f"alpha_pattern[{key!r}]")


def _pattern_value(patterns: dict[str, Any], fqn: str, default: Any) -> Any:
    # peft's rule (peft.tuners.tuners_utils.get_pattern_key): the first key whose regex matches the name's end.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", fqn):
            return value
    return default


def _file_scale(config: dict[str, Any], fqn: str) -> tuple[int, float, float]:
    """(r, alpha, scale) the file gives module `fqn`, by peft's rules."""
    r = int(_pattern_value(config.get("rank_pattern") or {}, fqn, config.get("r", 8)))
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, fqn, config.get("lora_alpha", 8)))
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return r, alpha, scale


@torch.no_grad()
def load_adapter(model: nn.Module, path: PathLike) -> None:
    """Loads a PEFT-format LoRA adapter from directory `path` into the LoRA layers of `model`.

    The model must already have LoRA layers at the adapter's modules with the adapter's
    rank and scale (read_adapter_config(path) gives a PeftConfig for
    apply_lora_to_linear_modules). Every key, shape and scale is checked first; any
    mismatch raises AdapterMismatchError listing all of them and leaves the model
    unchanged. Tensors are cast to each layer's adapter dtype and device. Only
    safetensors are read (never pickle). Merged layers must be unmerged first.

    With FSDP2 (DTensor adapters) call it on every rank; each rank keeps its shard.
    """
    from safetensors import SafetensorError, safe_open

    directory = Path(path)
    weights_path = directory / ADAPTER_WEIGHTS_NAME
    config = _read_config(directory)
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"no {ADAPTER_WEIGHTS_NAME} in {directory} (lora_ext reads safetensors only, never pickled .bin files)"
        )
    # FSDP2 leaves a unit's parameters unsharded after a forward (eval, or the root unit): writing into
    # those copies would be lost at the next reshard. Resharding first makes them the sharded DTensors.
    for module in fsdp_modules(model):
        module.reshard()
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("load_adapter: the model has no LoRA layers (apply_lora_to_linear_modules first)")

    try:
        # safe_open checks the header against the file size, so a truncated file fails here.
        with safe_open(str(weights_path), framework="pt") as f:
            file_slices = {k: f.get_slice(k) for k in f.keys()}
            file_shapes = {k: tuple(s.get_shape()) for k, s in file_slices.items()}
            file_dtypes = {k: s.get_dtype() for k, s in file_slices.items()}
    except SafetensorError as e:
        raise ValueError(f"{weights_path}: not a valid safetensors file ({e}); nothing was loaded") from None
    expected = {}
    for fqn, layer in layers.items():
        expected[_key(fqn, "lora_A")] = (fqn, layer.lora_A.weight)
        expected[_key(fqn, "lora_B")] = (fqn, layer.lora_B.weight)

    missing = sorted(k for k in expected if k not in file_shapes)
    # peft also saves some targeted layers' frozen base weight (`<fqn>.base_layer.weight`, e.g. for
    # lm_head). Loading never changes base weights: one equal to the model's is accepted, a different
    # one is a mismatch (peft would load it over the base).
    base_keys = {f"{PEFT_KEY_PREFIX}{fqn}.base_layer.weight": layer for fqn, layer in layers.items() if fqn}
    base_differs = []
    with safe_open(str(weights_path), framework="pt") as f:
        for k, layer in base_keys.items():
            if k in file_shapes and not _same_base_weight(f.get_tensor(k), layer.weight):
                base_differs.append(k)
    # PEFT's adapters of other layer kinds: an embedding's lora_embedding_A/B, a convolution's lora_A/B
    # weights with kernel dimensions (3-D to 5-D). lora_ext adapts nn.Linear layers only: they are named
    # as what they are (with the frozen base weight peft saves beside them), not as "unexpected".
    other_kinds = sorted(
        k for k in file_shapes
        if k not in expected and (".lora_embedding_" in k or (
            k.endswith((".lora_A.weight", ".lora_B.weight")) and len(file_shapes[k]) != 2)))
    other_bases = {k.rsplit(".lora_", 1)[0] + ".base_layer.weight" for k in other_kinds}
    unexpected = sorted(k for k in file_shapes
                        if k not in expected and k not in base_keys and k not in other_kinds and k not in other_bases)
    misshaped = sorted(
        f"{k}: file {list(file_shapes[k])}, model {list(param.shape)}"
        for k, (_, param) in expected.items()
        if k in file_shapes and file_shapes[k] != tuple(param.shape)
    )
    # Floating formats only ("F32", "BF16", "F8_E4M3", ...): copying integers, booleans or
    # complex numbers into the adapters would load something (complex loses its imaginary
    # part) instead of failing.
    not_floating = sorted(
        f"{k}: {file_dtypes[k]}" for k in expected if k in file_dtypes and not file_dtypes[k].startswith(("F", "BF"))
    )
    wrong_scale, merged, on_meta = [], [], []
    for fqn, layer in layers.items():
        r, alpha, scale = _file_scale(config, fqn)
        if not math.isclose(scale, layer.scale, rel_tol=_SCALE_RTOL):
            wrong_scale.append(
                f"{fqn}: file lora_alpha={alpha:g}, r={r}{' (rslora)' if config.get('use_rslora') else ''} -> "
                f"scale {scale:g}; layer alpha={layer.scale * layer.dim:g}, dim={layer.dim} -> scale {layer.scale:g}"
            )
        if layer.merged:
            merged.append(fqn)
        if layer.lora_A.weight.is_meta or layer.lora_B.weight.is_meta:
            on_meta.append(fqn)
    problems = problem_report([
        ("missing from the file (LoRA layers of the model without adapter tensors)", missing),
        ("adapters of embedding or convolution layers (lora_ext adapts nn.Linear layers only)", other_kinds),
        ("unexpected in the file (no LoRA layer of that name and shape in the model)", unexpected),
        ("mis-shaped (different rank or layer size)", misshaped),
        ("base weights that differ from the model's (loading never changes base weights)", sorted(base_differs)),
        ("not floating point (adapters are floating tensors)", not_floating),
        ("scale differs (patch the model with read_adapter_config(path))", wrong_scale),
        ("merged layers (unmerge_adapters first)", merged),
        ("adapters on the meta device (materialise the model first)", on_meta),
    ])
    if problems:
        raise AdapterMismatchError(
            f"cannot load the adapter in {directory} into this model; nothing was loaded:\n" + problems
        )

    with safe_open(str(weights_path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in expected}
    for key, (_, param) in expected.items():
        value = tensors[key]
        if _is_dtensor(param):
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(
                value.to(device=param.device, dtype=param.dtype), param.device_mesh, param.placements
            )
            param.to_local().copy_(value.to_local())
        else:
            param.copy_(value)


def read_adapter_config(path: PathLike) -> PeftConfig:
    """The lora_ext PeftConfig that patches a model like the PEFT adapter in directory `path`.

    Use: `apply_lora_to_linear_modules(model, read_adapter_config(path)); load_adapter(model, path)`.
    If lora_ext wrote the adapter with a peft_config, that config is returned. Otherwise
    it is translated from adapter_config.json: r -> dim, lora_alpha -> alpha (times
    sqrt(r) for use_rslora, so the scale is the same), lora_dropout -> dropout with
    dropout_position 'pre' (peft drops the adapters' input), target_modules list ->
    the same names as patterns (peft's "name or ends with .name" is lora_ext's
    suffix match), a target_modules string -> "re:" + it (both full-match regexes).
    Things a single PeftConfig cannot express raise ValueError: rank_pattern or
    alpha_pattern, layers_to_transform, "all-linear", both target and exclude modules.
    """
    from safetensors import safe_open

    directory = Path(path)
    config = _read_config(directory)
    weights_path = directory / ADAPTER_WEIGHTS_NAME
    metadata = {}
    if weights_path.is_file():
        with safe_open(str(weights_path), framework="pt") as f:
            metadata = f.metadata() or {}
    if _METADATA_PREFIX + "peft_config" in metadata:
        return PeftConfig.from_dict(json.loads(metadata[_METADATA_PREFIX + "peft_config"]))

    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern"):
        if config.get(key):
            raise ValueError(
                f"{directory / ADAPTER_CONFIG_NAME}: {key}={config[key]!r} cannot be expressed by one lora_ext "
                "PeftConfig; patch the layers yourself (patch_linear_module) with the ranks/alphas it gives"
            )
    targets, excludes = config.get("target_modules"), config.get("exclude_modules")
    if targets == "all-linear":
        raise ValueError(
            f"{directory / ADAPTER_CONFIG_NAME}: target_modules='all-linear' (peft: every Linear but the output "
            "layer) has no exact lora_ext equivalent; use exclude_modules=['lm_head'] or name the modules"
        )
    if targets and excludes:
        raise ValueError(f"{directory / ADAPTER_CONFIG_NAME}: both target_modules and exclude_modules are set")

    def patterns(value):
        if value is None:
            return []
        return [f"re:{value}"] if isinstance(value, str) else list(value)

    r = int(config.get("r", 8))
    alpha = float(config.get("lora_alpha", 8))
    if config.get("use_rslora"):
        alpha *= math.sqrt(r)
    return PeftConfig(
        target_modules=patterns(targets),
        exclude_modules=patterns(excludes),
        dim=r,
        alpha=_number(alpha),
        dropout=float(config.get("lora_dropout", 0.0)),
        dropout_position=metadata.get(_METADATA_PREFIX + "dropout_position", "pre"),
    )
