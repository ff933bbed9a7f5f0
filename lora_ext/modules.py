"""LoRA linear layers: LinearLoRA, TritonLinearLoRA, patch_linear_module, LoRATritonFunction.

A LoRA layer is an `nn.Linear` whose frozen `weight`/`bias` keep their names (so
checkpoints load unchanged) plus two trainable child modules, `lora_A`
(in_features -> dim) and `lora_B` (dim -> out_features). Its forward is one call of
`torch.ops.lora.linear`.

Two ways to get one, sharing all their code:
- `LinearLoRA(orig_linear, ...)` builds a new module around `orig_linear`'s own
  weight/bias Parameters (no copy);
- `patch_linear_module(orig_linear, ...)` turns `orig_linear` itself into a LoRA
  layer by switching its class, so it works on meta-device modules and keeps the
  object's identity, hooks and attributes. For a subclass of `nn.Linear` the new
  class derives from both the LoRA class and the original one (so `isinstance`
  with the original class still holds); those classes are made on demand, cached,
  and pickle by reference to their two bases, so a patched model can be
  `torch.save`d whole.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from . import ops as lora_ops
from .config import DtypeLike, check_lora_hyperparameters, parse_dtype


class LoRAAlreadyAppliedError(ValueError, RuntimeError):
    """Raised when LoRA is applied to a module that already is a LoRA layer.

    It is both a ValueError (a bad argument) and a RuntimeError (the module's state
    forbids it), so either `except` catches it.
    """


class LoRAAdapterLinear(nn.Linear):
    """The `nn.Linear` of `lora_A` / `lora_B`: a plain Linear without bias whose own
    `reset_parameters` does nothing.

    The owning LoRA layer initialises both adapters together (lora_A random, lora_B
    zeros). Were this a plain nn.Linear, the usual meta-device recipe
    `for m in model.modules(): m.reset_parameters()` would visit the adapters after
    their owner and overwrite the zero lora_B with random values.
    """

    def reset_parameters(self) -> None:
        pass


def _check_module_hyperparameters(dim, alpha, dropout, dropout_position, lora_A_init_method) -> None:
    check_lora_hyperparameters(dim, dropout, dropout_position, lora_A_init_method, alpha)


def _parameter(module: nn.Module, name: str):
    """`getattr(module, name)` for a parameter (or None), read from `module._parameters` when it is there.

    Why: nn.Module.__getattr__, which `module.weight` goes through, costs about 1-2 us per lookup
    (2-core CPU, torch 2.13), and a LoRA forward needs four of them; in decode, which is
    host-bound, that was a third of the layer's host time (benchmarks/NOTES.md #24). Falls back
    to getattr for anything else, e.g. a parametrized weight (torch.nn.utils.parametrize).
    """
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


class LinearLoRA(nn.Linear):
    """Linear + LoRA; keeps the checkpoint structure (`weight`/`bias` stay at the same FQN).

    y = x W^T + b + drop(s (x A^T) B^T)   (dropout_position='post', the default)
    y = x W^T + b + s (drop(x) A^T) B^T   (dropout_position='pre')
    with A = lora_A.weight (dim, in_features), B = lora_B.weight (out_features, dim),
    s = scale = alpha / dim. Dropout is active in training mode only.

    Args:
        orig_linear: the nn.Linear to augment; its weight/bias Parameters are reused
            (not copied) and frozen.
        dim: LoRA rank (>= 1).
        alpha: scaling numerator; scale = alpha / dim.
        dropout: dropout probability in [0, 1).
        dropout_position: 'pre' (drop the adapters' input) or 'post' (drop the LoRA term).
        lora_A_init_method: 'xavier' (Xavier-normal) or 'uniform' (Kaiming-uniform, a=sqrt(5)).
        lora_dtype: the adapters' dtype (a torch.dtype or a name such as "bf16");
            default: the base weight's dtype.
    """

    # Which kernel the op runs on CUDA: "auto" lets lora_ext choose (see cuda_dispatch).
    lora_backend = "auto"
    # True while lora_ext.merge_adapters has folded the adapters into `weight`.
    merged = False

    def __init__(
        self,
        orig_linear: nn.Linear,
        dim: int = 8,
        alpha: float = 32,
        dropout: float = 0.0,
        dropout_position: str = "post",
        lora_A_init_method: str = "xavier",
        lora_dtype: DtypeLike = None,
    ):
        if not isinstance(orig_linear, nn.Linear):
            raise TypeError(f"orig_linear must be an nn.Linear, got {type(orig_linear).__name__}")
        if parametrize.is_parametrized(orig_linear, "weight"):
            # Its weight is computed from the parametrization on every access: taken here it would be
            # one frozen snapshot. patch_linear_module keeps the module, and so the parametrization.
            raise ValueError(
                "orig_linear's weight is parametrized (torch.nn.utils.parametrize); use "
                "patch_linear_module(orig_linear, ...), which keeps the parametrization"
            )
        _check_module_hyperparameters(dim, alpha, dropout, dropout_position, lora_A_init_method)
        # nn.Module.__init__, not nn.Linear.__init__: the latter would allocate and
        # initialise a new weight, and we take orig_linear's own Parameters instead.
        nn.Module.__init__(self)
        self.in_features = orig_linear.in_features
        self.out_features = orig_linear.out_features
        self.weight = orig_linear.weight
        self.register_parameter("bias", orig_linear.bias)
        self.train(orig_linear.training)
        LinearLoRA._init_adapter(
            self, dim, alpha, dropout, dropout_position, lora_A_init_method, lora_dtype
        )

    @staticmethod
    def _init_adapter(
        obj: nn.Linear,
        dim: int = 8,
        alpha: float = 32,
        dropout: float = 0.0,
        dropout_position: str = "post",
        lora_A_init_method: str = "xavier",
        lora_dtype: DtypeLike = None,
    ) -> None:
        """Adds the LoRA adapters and attributes to `obj` (a LinearLoRA, or a Linear being patched).

        Every argument is checked before `obj` is changed, so a ValueError leaves it as it was.
        """
        _check_module_hyperparameters(dim, alpha, dropout, dropout_position, lora_A_init_method)
        weight = obj.weight
        adapter_dtype = parse_dtype(lora_dtype, "lora_dtype")
        if adapter_dtype is None:
            if not weight.dtype.is_floating_point:
                raise ValueError(
                    f"lora_dtype must be given when the base weight is not floating point (it is {weight.dtype})"
                )
            adapter_dtype = weight.dtype

        obj.dim = int(dim)
        obj.scale = float(alpha) / obj.dim
        obj.dropout_p = float(dropout)
        obj.dropout_position = dropout_position
        obj.lora_A_init_method = lora_A_init_method
        if parametrize.is_parametrized(obj, "weight"):
            # weight is computed, not a leaf: the base's trainable tensors are the parametrization's.
            for p in obj.parametrizations.weight.parameters():
                p.requires_grad_(False)
        else:
            weight.requires_grad_(False)
        if obj.bias is not None:
            obj.bias.requires_grad_(False)
        # Same device as the base weight: on meta, the adapters are meta too.
        factory = dict(device=weight.device, dtype=adapter_dtype)
        obj.lora_A = LoRAAdapterLinear(obj.in_features, obj.dim, bias=False, **factory)
        obj.lora_B = LoRAAdapterLinear(obj.dim, obj.out_features, bias=False, **factory)
        obj.lora_A.train(obj.training)  # new modules start in training mode; follow the layer's
        obj.lora_B.train(obj.training)
        LinearLoRA.init_lora_weights(obj, lora_A_init_method)

    @torch.no_grad()
    def init_lora_weights(self, init_method: str) -> None:
        """(Re-)initialises the adapters: lora_A by `init_method`, lora_B to zeros.

        'xavier' is Xavier-normal, 'uniform' is Kaiming-uniform with a=sqrt(5) (what
        nn.Linear uses). `weight`/`bias` are never touched. The method is remembered
        for later `reset_parameters()` calls.
        """
        if init_method not in ("xavier", "uniform"):
            raise ValueError(f"init_method must be 'xavier' or 'uniform', got {init_method!r}")
        self.lora_A_init_method = init_method
        if self.lora_A.weight.is_meta:
            # Meta tensors hold no values. Skipping also avoids the one-time lazy import
            # (~900 modules, 4-5 s) that the first normal_() on meta costs (measured:
            # torch 2.13, 2-core CPU).
            return
        if init_method == "xavier":
            nn.init.xavier_normal_(self.lora_A.weight)
        elif init_method == "uniform":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def reset_parameters(self) -> None:
        """Re-initialises the adapters (never the frozen base weight/bias).

        Called by nn.Linear.__init__ before any adapter exists; then it does nothing.
        """
        if "lora_A" in self._modules and "lora_B" in self._modules:
            self.init_lora_weights(self.lora_A_init_method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T + b + the LoRA term, through torch.ops.lora.linear (dropout in training only)."""
        if self.merged:
            # The LoRA term is already inside weight (lora_ext.merge); adding it again would count it twice.
            return nn.functional.linear(x, self.weight, self.bias)
        dropout_p = self.dropout_p if self.training else 0.0
        return lora_ops.linear(
            x, _parameter(self, "weight"), _parameter(self, "bias"),
            _parameter(self._modules["lora_A"], "weight"), _parameter(self._modules["lora_B"], "weight"),
            self.scale, dropout_p, self.dropout_position, backend=self.lora_backend,
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, dim={self.dim}, scale={self.scale:g}, dropout_p={self.dropout_p}, "
            f"dropout_position={self.dropout_position!r}"
        )

    def __reduce_ex__(self, protocol):
        # Classes made by _lora_class_for cannot be found by name when unpickling;
        # rebuild them from their two bases instead (see _new_patched_module).
        reduced = super().__reduce_ex__(protocol)
        bases = type(self).__dict__.get("_lora_bases")
        if bases is None:
            return reduced
        return (_new_patched_module, bases) + tuple(reduced[2:])


class TritonLinearLoRA(LinearLoRA):
    """LinearLoRA that runs the Triton kernels on CUDA (`backend="triton"`).

    On CPU (and meta) it runs the same op as LinearLoRA. Arguments as LinearLoRA.
    """

    lora_backend = "triton"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forward with the Triton kernels on CUDA; see LinearLoRA.forward."""
        return super().forward(x)


# (LoRA class, original Linear subclass) -> class deriving from both.
_PATCHED_CLASSES: dict[tuple[type, type], type] = {}


def _lora_class_for(lora_class: type, orig_class: type) -> type:
    """The class a module of `orig_class` becomes when patched with `lora_class`."""
    if orig_class is nn.Linear:
        return lora_class
    key = (lora_class, orig_class)
    cls = _PATCHED_CLASSES.get(key)
    if cls is None:
        # LoRA first in the MRO: its forward/reset_parameters/extra_repr win, while
        # isinstance(module, orig_class) still holds.
        suffix = "TritonLoRA" if issubclass(lora_class, TritonLinearLoRA) else "LoRA"
        name = f"{orig_class.__name__}With{suffix}"
        cls = type(name, (lora_class, orig_class), {"_lora_bases": key, "__module__": __name__, "__qualname__": name})
        _PATCHED_CLASSES[key] = cls
    return cls


def _new_patched_module(lora_class: type, orig_class: type) -> nn.Module:
    """Unpickling helper: an empty instance of the patched class of `orig_class`."""
    cls = _lora_class_for(lora_class, orig_class)
    return cls.__new__(cls)


def patch_linear_module(
    orig_linear: nn.Linear,
    dim: int = 8,
    alpha: float = 32,
    dropout: float = 0.0,
    dropout_position: str = "post",
    lora_A_init_method: str = "xavier",
    lora_dtype: DtypeLike = None,
    use_triton: bool = True,
) -> nn.Linear:
    """Turns `orig_linear` (an nn.Linear or subclass) into a LoRA layer in place; returns it.

    No weight is copied or allocated (the adapters are created on the base weight's
    device), so it works on meta-device modules. The module becomes a
    TritonLinearLoRA (use_triton=True) or LinearLoRA; for a subclass of nn.Linear, a
    class deriving from both. Arguments as LinearLoRA.

    Raises:
        TypeError: `orig_linear` is not an nn.Linear.
        LoRAAlreadyAppliedError (a ValueError and RuntimeError): it is already a LoRA
            layer; the module is left unchanged.
        ValueError: an invalid hyper-parameter, naming it; the module is left unchanged.
    """
    if not isinstance(orig_linear, nn.Linear):
        raise TypeError(f"patch_linear_module needs an nn.Linear, got {type(orig_linear).__name__}")
    if isinstance(orig_linear, LinearLoRA):
        raise LoRAAlreadyAppliedError(
            f"this {type(orig_linear).__name__} already has LoRA adapters (dim={orig_linear.dim}); "
            "patching it again is not supported"
        )
    _check_module_hyperparameters(dim, alpha, dropout, dropout_position, lora_A_init_method)
    parse_dtype(lora_dtype, "lora_dtype")
    lora_class = TritonLinearLoRA if use_triton else LinearLoRA
    orig_class = type(orig_linear)
    orig_linear.__class__ = _lora_class_for(lora_class, orig_class)
    try:
        LinearLoRA._init_adapter(
            orig_linear, dim, alpha, dropout, dropout_position, lora_A_init_method, lora_dtype
        )
    except BaseException:
        orig_linear.__class__ = orig_class
        raise
    return orig_linear


class LoRATritonFunction(torch.autograd.Function):
    """The LoRA term alone, s * (x A^T) B^T, by the library's kernels (Triton on CUDA).

    `LoRATritonFunction.apply(x, lora_A, lora_B, scale, dtype)`:
        x: (..., K) input; it is cast to `dtype` for the computation.
        lora_A: (r, K) -- the `lora_A.weight` of a LoRA layer (nn.Linear layout, out x in).
        lora_B: (N, r) -- the `lora_B.weight` of a LoRA layer.
        scale: float s.
        dtype: dtype of the result (a torch.dtype or a name such as "bf16"; None = lora_A's dtype).
    Returns (..., N) in `dtype`. The product runs in the adapters' dtype. No dropout.

    Backward calls lora::linear_backward; it recomputes the small x A^T (M x r) instead
    of saving it. Gradients come back in each input's dtype.
    """

    @staticmethod
    def forward(x, lora_A, lora_B, scale, dtype):
        """Forward of the LoRA term; any number of leading dimensions."""
        out_dtype = parse_dtype(dtype, "dtype") or lora_A.dtype
        y, _ = torch.ops.lora.linear(
            x.to(out_dtype), None, None, lora_A, lora_B, float(scale), 0.0, "post", None, "triton"
        )
        return y

    @staticmethod
    def setup_context(ctx, inputs, output):
        """Saves x and the adapters (nothing of the output's size) for backward."""
        x, lora_A, lora_B, scale, dtype = inputs
        ctx.save_for_backward(x, lora_A, lora_B)
        ctx.scale = float(scale)
        ctx.out_dtype = output.dtype

    @staticmethod
    def backward(ctx, d_y):
        """Gradients of x, lora_A and lora_B through lora::linear_backward."""
        x, lora_A, lora_B = ctx.saved_tensors
        need_x, need_A, need_B = ctx.needs_input_grad[:3]
        if not (need_x or need_A or need_B):
            return None, None, None, None, None
        x_out = x.to(ctx.out_dtype)
        # lora::linear's xa (x A^T in the adapters' dtype), recomputed: it is M x r.
        xa = x_out.reshape(-1, x.shape[-1]).to(lora_A.dtype) @ lora_A.t()
        grad_x, _, _, grad_A, grad_B = lora_ops.linear_backward(
            d_y, x_out, None, lora_A, lora_B, xa, ctx.scale, 0.0, "post", None,
            [need_x, False, False, need_A, need_B], backend="triton",
        )
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_A, grad_B, None, None
