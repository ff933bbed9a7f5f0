"""apply_lora_to_linear_modules: add LoRA adapters to the selected Linear layers of a model."""
from __future__ import annotations

import warnings
from typing import Any, Callable, Union

import torch.nn as nn

from .config import PeftConfig
from .matching import compile_patterns
from .modules import LinearLoRA, LoRAAdapterLinear, patch_linear_module


def _module_selector(config: PeftConfig) -> Callable[[str], bool]:
    """The FQN predicate the config describes; ValueError when the fields conflict or are all unset."""
    if config.target_modules and config.exclude_modules:
        raise ValueError(
            "set either target_modules or exclude_modules, not both "
            f"(got target_modules={config.target_modules}, exclude_modules={config.exclude_modules})"
        )
    if config.match_all_linear and (config.target_modules or config.exclude_modules):
        raise ValueError(
            "match_all_linear=True selects every Linear: leave target_modules and exclude_modules empty "
            f"(got target_modules={config.target_modules}, exclude_modules={config.exclude_modules})"
        )
    if config.match_all_linear:
        return lambda fqn: True
    if config.target_modules:
        return compile_patterns(config.target_modules)
    if config.exclude_modules:
        excluded = compile_patterns(config.exclude_modules)
        return lambda fqn: not excluded(fqn)
    raise ValueError(
        "nothing to apply LoRA to: set target_modules (patterns of the Linear layers to adapt), "
        "exclude_modules (patterns of the Linear layers to leave alone) or match_all_linear=True"
    )


def apply_lora_to_linear_modules(model: nn.Module, peft_config: Union[PeftConfig, dict[str, Any]]) -> int:
    """Adds LoRA adapters, in place, to every nn.Linear of `model` that the config selects.

    Selection (SPEC.md section 2; pattern rules in lora_ext.matching):
    match_all_linear=True -> every Linear; target_modules -> the Linears any pattern
    matches; exclude_modules -> every Linear no pattern matches. A module reachable by
    several names is selected when any name matches, and patched once.

    Skipped and not counted: selected modules that are not nn.Linear, modules that
    already are LoRA layers (so applying the same config twice patches nothing new),
    and the adapters (lora_A/lora_B) of LoRA layers.

    Afterwards every parameter of `model` is frozen except the LoRA adapters: those
    created by this call are trainable, and adapters from an earlier call keep their
    requires_grad.

    `peft_config` may also be a dict (read with PeftConfig.from_dict).
    Returns the number of modules patched by this call.
    """
    if isinstance(peft_config, dict):
        peft_config = PeftConfig.from_dict(peft_config)
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a PeftConfig or a dict, got {type(peft_config).__name__}")
    peft_config.validate()
    selected = _module_selector(peft_config)

    # Decide everything before changing anything, so a bad pattern leaves the model as it was.
    to_patch: dict[int, nn.Linear] = {}
    for fqn, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, nn.Linear) or isinstance(module, (LinearLoRA, LoRAAdapterLinear)):
            continue
        if id(module) not in to_patch and selected(fqn):
            to_patch[id(module)] = module
            if peft_config.lora_dtype is None and not module.weight.dtype.is_floating_point:
                # patch_linear_module would refuse it too, but only after earlier layers were patched.
                raise ValueError(
                    f"apply_lora_to_linear_modules: {fqn}'s weight is {module.weight.dtype}; lora_dtype must be "
                    "given when a base weight is not floating point"
                )

    adapter_params = {
        id(p) for m in model.modules() if isinstance(m, LinearLoRA) for p in (m.lora_A.weight, m.lora_B.weight)
    }
    for param in model.parameters():
        if id(param) not in adapter_params:
            param.requires_grad_(False)

    for module in to_patch.values():
        patch_linear_module(
            module,
            dim=peft_config.dim,
            alpha=peft_config.alpha,
            dropout=peft_config.dropout,
            dropout_position=peft_config.dropout_position,
            lora_A_init_method=peft_config.lora_A_init,
            lora_dtype=peft_config.lora_dtype,
            use_triton=peft_config.use_triton,
        )
    if not to_patch:
        warnings.warn("apply_lora_to_linear_modules: no Linear module matched; nothing was patched", stacklevel=2)
    return len(to_patch)
