"""PeftConfig: which Linear layers get LoRA adapters, and the adapters' hyper-parameters.

Also home of `parse_dtype`, the one place where a dtype given as a string
("bf16", "bfloat16", "torch.bfloat16", ...) becomes a `torch.dtype`.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch

DROPOUT_POSITIONS = ("pre", "post")
LORA_A_INIT_METHODS = ("xavier", "uniform")

# The adapters' dtypes the lora ops accept, by every spelling we take.
_DTYPES_BY_NAME = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp64": torch.float64,
    "float64": torch.float64,
    "double": torch.float64,
}
_FLOAT_DTYPES = frozenset(_DTYPES_BY_NAME.values())

DtypeLike = Union[torch.dtype, str, None]


def parse_dtype(value: DtypeLike, name: str = "lora_dtype") -> Optional[torch.dtype]:
    """A floating `torch.dtype` from a dtype or its name; None stays None.

    Accepted names (case-insensitive, with or without a "torch." prefix): bf16,
    bfloat16, fp16, float16, half, fp32, float32, float, fp64, float64, double.
    Anything else raises ValueError naming `name`.
    """
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        dtype = value
    elif isinstance(value, str):
        key = value.strip().lower()
        key = key[len("torch."):] if key.startswith("torch.") else key
        if key not in _DTYPES_BY_NAME:
            raise ValueError(
                f"{name} must be a floating torch.dtype or one of {sorted(_DTYPES_BY_NAME)} "
                f"(optionally prefixed with 'torch.'), got {value!r}"
            )
        dtype = _DTYPES_BY_NAME[key]
    else:
        raise ValueError(f"{name} must be a torch.dtype, a dtype name or None, got {value!r}")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating dtype (float32, float16, bfloat16, float64), got {dtype}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16: the spelling to_dict writes and parse_dtype reads back."""
    return str(dtype).removeprefix("torch.")


def check_lora_hyperparameters(
    dim: Any,
    dropout: Any,
    dropout_position: Any,
    lora_A_init_method: Any,
    alpha: Any = 1,
    init_argument_name: str = "lora_A_init_method",
) -> None:
    """Raises ValueError, naming the argument, for any invalid LoRA hyper-parameter.

    Shared by PeftConfig and the LoRA modules so both give the same messages.
    """
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
        raise ValueError(f"dim (the LoRA rank) must be an integer >= 1, got {dim!r}")
    # Negative alpha is allowed (it flips the adapter's sign); inf/nan would make every output garbage.
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite real number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    if dropout_position not in DROPOUT_POSITIONS:
        raise ValueError(f"dropout_position must be 'pre' or 'post', got {dropout_position!r}")
    if lora_A_init_method not in LORA_A_INIT_METHODS:
        raise ValueError(f"{init_argument_name} must be 'xavier' or 'uniform', got {lora_A_init_method!r}")


def _pattern_list(value: Any, name: str) -> list:
    # A lone string is one pattern, not a list of one-character patterns.
    if isinstance(value, str):
        return [value]
    if value is None:
        return []
    try:
        patterns = list(value)
    except TypeError:
        raise ValueError(f"{name} must be a list of pattern strings, got {value!r}") from None
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"{name} must contain only strings, got {pattern!r} in {value!r}")
    return patterns


@dataclass
class PeftConfig:
    """What to adapt and how; see SPEC.md section 2 for the matching rules.

    Field values are normalised at construction: `target_modules` and
    `exclude_modules` become lists (a single string is one pattern), `lora_dtype`
    becomes a `torch.dtype` (strings such as "bf16" are parsed). Invalid values raise
    ValueError. Whether the three targeting fields are consistent is checked by
    `apply_lora_to_linear_modules`, which needs a usable combination.
    """

    target_modules: list = field(default_factory=list)
    exclude_modules: list = field(default_factory=list)
    match_all_linear: bool = False
    dim: int = 8
    alpha: int = 32
    dropout: float = 0.0
    dropout_position: Literal["pre", "post"] = "post"
    lora_A_init: str = "xavier"
    lora_dtype: Optional[torch.dtype] = None
    use_triton: bool = False

    def __post_init__(self) -> None:
        self.target_modules = _pattern_list(self.target_modules, "target_modules")
        self.exclude_modules = _pattern_list(self.exclude_modules, "exclude_modules")
        self.lora_dtype = parse_dtype(self.lora_dtype, "lora_dtype")
        self.validate()

    def validate(self) -> None:
        """Re-checks every field (fields may have been assigned after construction)."""
        check_lora_hyperparameters(
            self.dim, self.dropout, self.dropout_position, self.lora_A_init, self.alpha,
            init_argument_name="lora_A_init",
        )
        for name in ("match_all_linear", "use_triton"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        _pattern_list(self.target_modules, "target_modules")
        _pattern_list(self.exclude_modules, "exclude_modules")
        parse_dtype(self.lora_dtype, "lora_dtype")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field; lora_dtype becomes e.g. "bfloat16"."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["target_modules"] = list(self.target_modules)
        d["exclude_modules"] = list(self.exclude_modules)
        d["lora_dtype"] = None if self.lora_dtype is None else dtype_name(self.lora_dtype)
        # Python numbers: numpy's (accepted as numbers.Integral / numbers.Real) are not JSON-serialisable.
        d["dim"] = int(self.dim)
        d["alpha"] = int(self.alpha) if isinstance(self.alpha, numbers.Integral) else float(self.alpha)
        d["dropout"] = float(self.dropout)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PeftConfig":
        """Builds a config from a dict such as to_dict's; keys that are not fields are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
