"""LinearLoRA, TritonLinearLoRA, patch_linear_module and LoRATritonFunction."""
import copy
import io
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import lora_ext
from lora_ext import LinearLoRA, LoRATritonFunction, TritonLinearLoRA, patch_linear_module
from lora_ext.modules import LoRAAdapterLinear
from lora_ext.ops import draw_seed
from lora_ext.reference import lora_linear_reference

# Tolerances for comparing with the float64 reference, by the dtype the LoRA path and
# base GEMM run in (sizes here are small: K <= 64).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}


def assert_close_to_reference(actual, expected, dtype):
    """|actual - expected| <= tol * (1 + |expected|) elementwise, tol by dtype."""
    tol = TOL[dtype]
    actual = actual.double()
    expected = expected.double()
    assert actual.shape == expected.shape
    err = (actual - expected).abs()
    bound = tol * (1 + expected.abs())
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}, tol {tol}"


def make_lora(in_features=12, out_features=10, bias=True, dtype=torch.float32, lora_dtype=None, cls=LinearLoRA,
              **kwargs):
    """A LoRA layer with random base and random, non-zero adapters."""
    base = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    layer = cls(base, lora_dtype=lora_dtype, **kwargs)
    with torch.no_grad():
        layer.lora_A.weight.normal_()
        layer.lora_B.weight.normal_()
    return layer


def reference_of(layer, x, dropout_p=0.0, seed=None):
    return lora_linear_reference(
        x, layer.weight, layer.bias, layer.lora_A.weight, layer.lora_B.weight, layer.scale,
        dropout_p, layer.dropout_position, seed,
    )


# --------------------------------------------------------------------------- structure


def test_attributes_and_structure():
    base = nn.Linear(12, 10)
    layer = LinearLoRA(base, dim=4, alpha=16, dropout=0.25, dropout_position="pre", lora_A_init_method="uniform")
    assert isinstance(layer, nn.Linear)
    assert layer.dim == 4
    assert layer.scale == 4.0 and isinstance(layer.scale, float)
    assert layer.dropout_p == 0.25
    assert layer.dropout_position == "pre"
    assert layer.lora_A_init_method == "uniform"
    assert (layer.in_features, layer.out_features) == (12, 10)
    assert isinstance(layer.lora_A, nn.Linear) and isinstance(layer.lora_B, nn.Linear)
    assert layer.lora_A.weight.shape == (4, 12) and layer.lora_A.bias is None
    assert layer.lora_B.weight.shape == (10, 4) and layer.lora_B.bias is None


def test_scale_is_a_float_for_integer_alpha_and_dim():
    layer = LinearLoRA(nn.Linear(4, 4), dim=3, alpha=32)
    assert layer.scale == pytest.approx(32 / 3)


def test_reuses_the_base_parameters_and_freezes_them():
    base = nn.Linear(12, 10)
    layer = LinearLoRA(base)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.weight", "lora_B.weight"}


def test_state_dict_keys():
    assert list(LinearLoRA(nn.Linear(6, 5)).state_dict()) == ["weight", "bias", "lora_A.weight", "lora_B.weight"]
    assert list(LinearLoRA(nn.Linear(6, 5, bias=False)).state_dict()) == ["weight", "lora_A.weight", "lora_B.weight"]


def test_keeps_training_mode_of_the_original():
    assert LinearLoRA(nn.Linear(3, 3).eval()).training is False
    assert LinearLoRA(nn.Linear(3, 3)).training is True


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_adapters_default_to_base_dtype(base_dtype):
    layer = LinearLoRA(nn.Linear(6, 5, dtype=base_dtype))
    assert layer.lora_A.weight.dtype == base_dtype and layer.lora_B.weight.dtype == base_dtype


@pytest.mark.parametrize("lora_dtype", [torch.bfloat16, "bf16", "torch.bfloat16", "float16"])
def test_lora_dtype_accepts_dtypes_and_names(lora_dtype):
    layer = LinearLoRA(nn.Linear(6, 5), lora_dtype=lora_dtype)
    expected = torch.float16 if lora_dtype == "float16" else torch.bfloat16
    assert layer.lora_A.weight.dtype == expected and layer.lora_B.weight.dtype == expected
    assert layer.weight.dtype == torch.float32


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("shape", [(12,), (5, 12), (2, 3, 12), (2, 1, 3, 12), (0, 12)])
@pytest.mark.parametrize("bias", [True, False])
def test_fresh_layer_returns_exactly_the_base_output(shape, bias):
    base = nn.Linear(12, 10, bias=bias)
    x = torch.randn(shape)
    expected = base(x)
    for init in ("xavier", "uniform"):
        layer = LinearLoRA(copy.deepcopy(base), lora_A_init_method=init)
        assert torch.equal(layer(x), expected)


def test_fresh_layer_exact_on_a_larger_shape():
    base = nn.Linear(64, 48)
    x = torch.randn(4, 33, 64)
    assert torch.equal(LinearLoRA(copy.deepcopy(base), dim=16)(x), base(x))


@pytest.mark.parametrize("cls", [LinearLoRA, TritonLinearLoRA])
@pytest.mark.parametrize("shape", [(12,), (7, 12), (2, 3, 12)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_backward_match_reference(cls, shape, bias):
    torch.manual_seed(0)
    layer = make_lora(bias=bias, cls=cls, dim=3, alpha=6)
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)

    ref_params = [t.detach().double().requires_grad_() for t in (x, layer.lora_A.weight, layer.lora_B.weight)]
    ref = lora_linear_reference(ref_params[0], layer.weight, layer.bias, ref_params[1], ref_params[2], layer.scale)
    ref.backward(grad_y.double())

    assert_close_to_reference(y, ref, torch.float32)
    assert_close_to_reference(x.grad, ref_params[0].grad, torch.float32)
    assert_close_to_reference(layer.lora_A.weight.grad, ref_params[1].grad, torch.float32)
    assert_close_to_reference(layer.lora_B.weight.grad, ref_params[2].grad, torch.float32)
    assert layer.weight.grad is None and (layer.bias is None or layer.bias.grad is None)


class _Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


@pytest.mark.parametrize("where", ["lora_A", "base"])
def test_forward_sees_parametrized_weights(where):
    """forward reads parameters from `_parameters` (fast) but must still see a weight that
    torch.nn.utils.parametrize turned into a computed property."""
    torch.manual_seed(0)
    layer = make_lora(dim=3, alpha=6)
    x = torch.randn(5, 12)
    owner = layer.lora_A if where == "lora_A" else layer
    plain = owner.weight.detach().clone()
    torch.nn.utils.parametrize.register_parametrization(owner, "weight", _Doubled())
    assert "weight" not in owner._parameters
    A = 2 * plain if where == "lora_A" else layer.lora_A.weight
    W = 2 * plain if where == "base" else layer.weight
    expected = lora_linear_reference(x, W, layer.bias, A, layer.lora_B.weight, layer.scale)
    assert_close_to_reference(layer(x), expected, torch.float32)


def test_patching_a_parametrized_linear_freezes_the_parametrization_and_keeps_it():
    """patch_linear_module on a Linear whose weight is parametrized: the base stays the parametrization
    (frozen: its original tensor no longer requires grad), the adapters are added, and y is the
    reference's with the computed weight. LinearLoRA(orig) would hold a snapshot: refused, naming the
    way that works."""
    torch.manual_seed(2)
    base = nn.Linear(12, 8)
    torch.nn.utils.parametrize.register_parametrization(base, "weight", _Doubled())
    with pytest.raises(ValueError, match="parametrized.*patch_linear_module"):
        LinearLoRA(base, dim=3)
    layer = patch_linear_module(base, dim=3, alpha=6, use_triton=False)
    assert not base.parametrizations.weight.original.requires_grad and not base.bias.requires_grad
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(5, 12)
    expected = lora_linear_reference(x, base.weight, base.bias, layer.lora_A.weight, layer.lora_B.weight, layer.scale)
    assert_close_to_reference(layer(x), expected, torch.float32)


def test_adapters_follow_the_layers_training_mode():
    layer = patch_linear_module(nn.Linear(6, 4).eval(), dim=2)
    assert not layer.training and not layer.lora_A.training and not layer.lora_B.training
    assert LinearLoRA(nn.Linear(6, 4).train(), dim=2).lora_A.training


def test_triton_layer_equals_plain_layer_on_cpu():
    torch.manual_seed(1)
    layer = make_lora()
    triton_layer = TritonLinearLoRA(layer)  # shares the base parameters
    with torch.no_grad():
        triton_layer.lora_A.weight.copy_(layer.lora_A.weight)
        triton_layer.lora_B.weight.copy_(layer.lora_B.weight)
    x = torch.randn(4, 12)
    assert torch.equal(triton_layer(x), layer(x))


@pytest.mark.parametrize(
    "base_dtype, lora_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                               (torch.float16, torch.float32), (torch.float32, torch.float16)]
)
def test_lora_dtype_different_from_base(base_dtype, lora_dtype):
    torch.manual_seed(2)
    layer = make_lora(dtype=base_dtype, lora_dtype=lora_dtype)
    x = torch.randn(3, 12, dtype=base_dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == base_dtype
    gy = torch.randn_like(y)  # random, not y.sum()'s ones: a uniform gradient hides row and column mix-ups
    y.backward(gy)
    assert x.grad.dtype == base_dtype
    assert layer.lora_A.weight.grad.dtype == lora_dtype and layer.lora_B.weight.grad.dtype == lora_dtype
    # Compare against the reference built from the same (exactly representable) values.
    x_ref = x.detach().double().requires_grad_()
    a_ref = layer.lora_A.weight.detach().double().requires_grad_()
    b_ref = layer.lora_B.weight.detach().double().requires_grad_()
    ref = lora_linear_reference(x_ref, layer.weight, layer.bias, a_ref, b_ref, layer.scale)
    ref.backward(gy.double())
    coarser = base_dtype if TOL[base_dtype] > TOL[lora_dtype] else lora_dtype
    # Output scale: scale * |B| * |A x| grows with the random adapters, so compare relative to its size.
    assert_close_to_reference(y / ref.abs().max(), ref / ref.abs().max(), coarser)
    assert_close_to_reference(x.grad / x_ref.grad.abs().max(), x_ref.grad / x_ref.grad.abs().max(), coarser)
    assert_close_to_reference(layer.lora_A.weight.grad / a_ref.grad.abs().max(), a_ref.grad / a_ref.grad.abs().max(),
                              coarser)
    assert_close_to_reference(layer.lora_B.weight.grad / b_ref.grad.abs().max(), b_ref.grad / b_ref.grad.abs().max(),
                              coarser)


# --------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("position", ["pre", "post"])
def test_eval_mode_means_no_dropout(position):
    torch.manual_seed(3)
    layer = make_lora(dropout=0.5, dropout_position=position).eval()
    x = torch.randn(6, 12)
    assert_close_to_reference(layer(x), reference_of(layer, x), torch.float32)
    # Bitwise identical to the same layer without dropout.
    no_dropout = LinearLoRA(nn.Linear(12, 10), dropout=0.0, dropout_position=position).eval()
    no_dropout.load_state_dict(layer.state_dict())
    assert torch.equal(layer(x), no_dropout(x))


@pytest.mark.parametrize("position", ["pre", "post"])
def test_training_dropout_matches_reference_and_is_reproducible(position):
    torch.manual_seed(4)
    layer = make_lora(dropout=0.5, dropout_position=position).train()
    x = torch.randn(6, 12)
    torch.manual_seed(123)
    y1 = layer(x)
    y_next = layer(x)  # a new seed is drawn each call
    torch.manual_seed(123)
    y2 = layer(x)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y_next)
    assert not torch.allclose(y1, layer.eval()(x))
    # The module draws its seed as the op wrapper does; reproduce it for the reference.
    torch.manual_seed(123)
    seed = draw_seed(x.device)
    assert_close_to_reference(y1, reference_of(layer, x, 0.5, seed), torch.float32)


def test_training_dropout_gradients_match_reference():
    torch.manual_seed(5)
    layer = make_lora(dropout=0.3, dropout_position="post").train()
    x = torch.randn(2, 5, 12, requires_grad=True)
    gy = torch.randn(2, 5, layer.out_features)
    torch.manual_seed(7)
    layer(x).backward(gy)
    torch.manual_seed(7)
    seed = draw_seed(x.device)
    x_ref = x.detach().double().requires_grad_()
    a_ref = layer.lora_A.weight.detach().double().requires_grad_()
    b_ref = layer.lora_B.weight.detach().double().requires_grad_()
    lora_linear_reference(x_ref, layer.weight, layer.bias, a_ref, b_ref, layer.scale, 0.3, "post",
                          seed).backward(gy.double())
    assert_close_to_reference(x.grad, x_ref.grad, torch.float32)
    assert_close_to_reference(layer.lora_A.weight.grad, a_ref.grad, torch.float32)
    assert_close_to_reference(layer.lora_B.weight.grad, b_ref.grad, torch.float32)


# --------------------------------------------------------------------------- init


def test_lora_B_starts_at_zero_and_lora_A_does_not():
    layer = LinearLoRA(nn.Linear(12, 10))
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert torch.count_nonzero(layer.lora_A.weight) == layer.lora_A.weight.numel()


def test_xavier_and_uniform_statistics():
    in_features, dim = 2048, 64
    torch.manual_seed(6)
    xavier = LinearLoRA(nn.Linear(in_features, 8, device="meta"), dim=dim, lora_A_init_method="xavier")
    assert xavier.lora_A.weight.is_meta  # cheap check of the device rule; statistics need real tensors
    base = nn.Linear(in_features, 8)
    xavier = LinearLoRA(base, dim=dim, lora_A_init_method="xavier").lora_A.weight.detach()
    uniform = LinearLoRA(base, dim=dim, lora_A_init_method="uniform").lora_A.weight.detach()

    # Xavier-normal: std = sqrt(2 / (fan_in + fan_out)); about 4.55% beyond 2 std.
    xavier_std = math.sqrt(2.0 / (in_features + dim))
    assert xavier.std().item() == pytest.approx(xavier_std, rel=0.02)
    assert abs(xavier.mean().item()) < 0.01 * xavier_std
    assert (xavier.abs() > 2 * xavier_std).float().mean().item() == pytest.approx(0.0455, abs=0.005)

    # Kaiming-uniform with a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(in_features)
    assert uniform.abs().max().item() <= bound
    assert uniform.abs().max().item() > 0.99 * bound
    assert uniform.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)


def test_init_lora_weights_reinitialises_only_the_adapters():
    torch.manual_seed(8)
    layer = make_lora()
    weight, bias = layer.weight.clone(), layer.bias.clone()
    old_A = layer.lora_A.weight.clone()
    layer.init_lora_weights("uniform")
    assert torch.equal(layer.weight, weight) and torch.equal(layer.bias, bias)
    assert not torch.equal(layer.lora_A.weight, old_A)
    assert layer.lora_A.weight.abs().max() <= 1 / math.sqrt(12)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert layer.lora_A_init_method == "uniform"


def test_reset_parameters_reinitialises_only_the_adapters():
    torch.manual_seed(9)
    layer = make_lora(lora_A_init_method="uniform")
    weight = layer.weight.clone()
    layer.reset_parameters()
    assert torch.equal(layer.weight, weight)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert layer.lora_A.weight.abs().max() <= 1 / math.sqrt(12)


def test_reset_parameters_before_adapters_exist_is_a_no_op():
    # nn.Linear.__init__ calls reset_parameters; before the adapters exist it must not
    # touch the base weight.
    linear = nn.Linear(5, 4)
    weight = linear.weight.clone()
    linear.__class__ = LinearLoRA
    linear.reset_parameters()
    assert torch.equal(linear.weight, weight)
    linear.__class__ = nn.Linear


def test_every_modules_reset_parameters_keeps_lora_B_zero():
    # The common meta-device recipe visits a LoRA layer, then its adapters.
    model = nn.Sequential(patch_linear_module(nn.Linear(6, 5)))
    with torch.no_grad():
        model[0].lora_B.weight.normal_()
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    assert torch.count_nonzero(model[0].lora_B.weight) == 0
    assert isinstance(model[0].lora_B, LoRAAdapterLinear)


def test_reset_after_to_empty():
    with torch.device("meta"):
        layer = LinearLoRA(nn.Linear(12, 10), dim=4)
    assert layer.weight.is_meta and layer.lora_A.weight.is_meta and layer.lora_B.weight.is_meta
    layer.to_empty(device="cpu")
    base = nn.Linear(12, 10)
    layer.load_state_dict(base.state_dict(), strict=False)
    layer.reset_parameters()
    assert torch.equal(layer.weight, base.weight) and torch.equal(layer.bias, base.bias)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert torch.isfinite(layer.lora_A.weight).all() and layer.lora_A.weight.std() > 0
    x = torch.randn(3, 12)
    assert torch.equal(layer(x), base(x))
    layer.init_lora_weights("xavier")
    assert torch.equal(layer(x), base(x))


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"dim": 0}, "dim"),
        ({"dim": -1}, "dim"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.5}, "dropout"),
        ({"dropout_position": "mid"}, "dropout_position"),
        ({"lora_A_init_method": "normal"}, "lora_A_init_method"),
        ({"lora_dtype": "int8"}, "lora_dtype"),
        ({"lora_dtype": torch.int64}, "lora_dtype"),
    ],
)
@pytest.mark.parametrize("make", ["LinearLoRA", "patch"])
def test_bad_hyperparameters_raise_value_error(kwargs, argument, make):
    linear = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=argument):
        if make == "LinearLoRA":
            LinearLoRA(linear, **kwargs)
        else:
            patch_linear_module(linear, **kwargs)
    # A failed patch leaves the module as it was.
    assert type(linear) is nn.Linear and not hasattr(linear, "lora_A") and linear.weight.requires_grad


def test_init_lora_weights_rejects_unknown_method():
    layer = LinearLoRA(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="init_method"):
        layer.init_lora_weights("orthogonal")


@pytest.mark.parametrize("not_linear", [nn.Conv1d(3, 3, 1), nn.Identity(), nn.Sequential(nn.Linear(2, 2))])
def test_non_linear_raises_type_error(not_linear):
    with pytest.raises(TypeError):
        patch_linear_module(not_linear)
    with pytest.raises(TypeError):
        LinearLoRA(not_linear)


# --------------------------------------------------------------------------- patch_linear_module


class ScaledLinear(nn.Linear):
    """A user subclass of nn.Linear with an extra attribute."""

    def __init__(self, *args, tag="scaled", **kwargs):
        super().__init__(*args, **kwargs)
        self.tag = tag


@pytest.mark.parametrize("use_triton, lora_class", [(True, TritonLinearLoRA), (False, LinearLoRA)])
def test_patch_in_place(use_triton, lora_class):
    torch.manual_seed(10)
    linear = nn.Linear(12, 10)
    weight = linear.weight
    x = torch.randn(3, 12)
    expected = linear(x)
    patched = patch_linear_module(linear, dim=4, alpha=8, use_triton=use_triton)
    assert patched is linear and type(patched) is lora_class
    assert patched.weight is weight and not weight.requires_grad
    assert patched.dim == 4 and patched.scale == 2.0
    assert torch.equal(patched(x), expected)
    with torch.no_grad():
        patched.lora_B.weight.normal_()
    assert_close_to_reference(patched(x), reference_of(patched, x), torch.float32)


def test_patch_on_meta_allocates_nothing():
    with torch.device("meta"):
        linear = nn.Linear(1 << 14, 1 << 14)  # 1 GiB if it were real
    patched = patch_linear_module(linear, dim=8, lora_dtype="bf16")
    assert patched.weight.is_meta and patched.bias.is_meta
    assert patched.lora_A.weight.is_meta and patched.lora_A.weight.shape == (8, 1 << 14)
    assert patched.lora_B.weight.is_meta and patched.lora_B.weight.dtype == torch.bfloat16
    y = patched(torch.empty(2, 1 << 14, device="meta"))
    assert y.is_meta and y.shape == (2, 1 << 14)


@pytest.mark.parametrize("use_triton", [True, False])
def test_patch_linear_subclass(use_triton):
    torch.manual_seed(11)
    linear = ScaledLinear(12, 10, tag="mine")
    patched = patch_linear_module(linear, use_triton=use_triton)
    assert patched is linear
    assert isinstance(patched, ScaledLinear) and isinstance(patched, LinearLoRA)
    assert isinstance(patched, TritonLinearLoRA) == use_triton
    assert patched.tag == "mine"
    # Same subclass, same patched class (cached).
    assert type(patch_linear_module(ScaledLinear(3, 3), use_triton=use_triton)) is type(patched)
    with torch.no_grad():
        patched.lora_B.weight.normal_()
    x = torch.randn(5, 12)
    assert_close_to_reference(patched(x), reference_of(patched, x), torch.float32)


def test_patch_twice_raises_and_leaves_module_unchanged():
    linear = patch_linear_module(nn.Linear(6, 5), dim=4)
    lora_A, cls = linear.lora_A, type(linear)
    with pytest.raises((ValueError, RuntimeError), match="already"):
        patch_linear_module(linear, dim=2)
    assert linear.lora_A is lora_A and linear.dim == 4 and type(linear) is cls
    with pytest.raises((ValueError, RuntimeError), match="already"):
        patch_linear_module(LinearLoRA(nn.Linear(6, 5)))


def test_linear_lora_of_a_subclass_is_a_plain_linear_lora():
    layer = LinearLoRA(ScaledLinear(4, 3))
    assert type(layer) is LinearLoRA


# --------------------------------------------------------------------------- whole-model save


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 16)
        self.act = nn.GELU()
        self.down = ScaledLinear(16, 12, bias=False)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def patched_tiny_model():
    torch.manual_seed(12)
    model = TinyModel()
    patch_linear_module(model.up, dim=4, use_triton=False)
    patch_linear_module(model.down, dim=2, dropout=0.1, dropout_position="pre")
    with torch.no_grad():
        model.up.lora_B.weight.normal_()
        model.down.lora_B.weight.normal_()
    return model.eval()


def test_torch_save_and_load_whole_model():
    model = patched_tiny_model()
    x = torch.randn(3, 12)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.up) is LinearLoRA
    assert type(loaded.down) is type(model.down) and isinstance(loaded.down, ScaledLinear)
    assert loaded.down.dropout_position == "pre" and loaded.down.dim == 2
    assert not loaded.up.weight.requires_grad and loaded.up.lora_A.weight.requires_grad
    assert torch.equal(loaded(x), model(x))


def test_deepcopy_of_patched_model():
    model = patched_tiny_model()
    clone = copy.deepcopy(model)
    assert type(clone.down) is type(model.down) and clone.down.weight is not model.down.weight
    x = torch.randn(2, 12)
    assert torch.equal(clone(x), model(x))


def test_fresh_process_imports_lean_and_loads_a_patched_model(tmp_path):
    # In a new process the patched subclass does not exist until unpickling asks for
    # it. NonDynamicallyQuantizableLinear is an nn.Linear subclass importable anywhere.
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    torch.manual_seed(0)
    model = nn.Sequential(NonDynamicallyQuantizableLinear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    patch_linear_module(model[0], dim=2)
    patch_linear_module(model[2], dim=3, use_triton=False)
    with torch.no_grad():
        model[0].lora_B.weight.normal_()
    path = tmp_path / "model.pt"
    torch.save({"model": model, "y": model(torch.ones(2, 5))}, path)
    script = textwrap.dedent(
        """
        import sys, torch, lora_ext
        # import lora_ext initialises no CUDA and needs no triton
        print(torch.cuda.is_initialized(), "triton" in sys.modules)
        from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
        saved = torch.load(sys.argv[1], weights_only=False)
        model = saved["model"]
        assert isinstance(model[0], NonDynamicallyQuantizableLinear), type(model[0])
        assert isinstance(model[0], lora_ext.TritonLinearLoRA), type(model[0])
        assert type(model[2]) is lora_ext.LinearLoRA, type(model[2])
        assert torch.equal(model(torch.ones(2, 5)), saved["y"])
        print("loaded")
        """
    )
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "loaded"]


# --------------------------------------------------------------------------- LoRATritonFunction


@pytest.mark.parametrize("shape", [(12,), (5, 12), (2, 3, 12)])
def test_lora_triton_function_matches_reference(shape):
    torch.manual_seed(13)
    x = torch.randn(shape, requires_grad=True)
    lora_A = torch.randn(3, 12, requires_grad=True)  # (r, K), nn.Linear layout
    lora_B = torch.randn(10, 3, requires_grad=True)  # (N, r)
    y = LoRATritonFunction.apply(x, lora_A, lora_B, 0.5, torch.float32)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    refs = [t.detach().double().requires_grad_() for t in (x, lora_A, lora_B)]
    ref = lora_linear_reference(refs[0], None, None, refs[1], refs[2], 0.5)
    ref.backward(grad_y.double())
    assert y.dtype == torch.float32
    assert_close_to_reference(y, ref, torch.float32)
    for actual, expected in zip((x.grad, lora_A.grad, lora_B.grad), refs):
        assert_close_to_reference(actual, expected.grad, torch.float32)


def test_lora_triton_function_casts_to_dtype():
    torch.manual_seed(14)
    x = torch.randn(4, 12, requires_grad=True)
    lora_A = torch.randn(3, 12, dtype=torch.bfloat16, requires_grad=True)
    lora_B = torch.randn(10, 3, dtype=torch.bfloat16, requires_grad=True)
    y = LoRATritonFunction.apply(x, lora_A, lora_B, 2.0, torch.bfloat16)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and lora_A.grad.dtype == torch.bfloat16
    ref = lora_linear_reference(x.detach().bfloat16(), None, None, lora_A, lora_B, 2.0)
    assert_close_to_reference(y / ref.abs().max(), ref / ref.abs().max(), torch.bfloat16)


def test_lora_triton_function_only_lora_grads():
    x = torch.randn(4, 12)
    lora_A = torch.randn(3, 12)
    lora_B = torch.randn(10, 3, requires_grad=True)
    LoRATritonFunction.apply(x, lora_A, lora_B, 1.0, "fp32").sum().backward()
    assert lora_B.grad is not None and lora_B.grad.shape == (10, 3)


# --------------------------------------------------------------------------- package


def test_public_names():
    for name in ("PeftConfig", "LinearLoRA", "TritonLinearLoRA", "LoRATritonFunction", "patch_linear_module",
                 "apply_lora_to_linear_modules"):
        assert hasattr(lora_ext, name) and name in lora_ext.__all__


# --------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cls", [LinearLoRA, TritonLinearLoRA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_layers_match_reference(cls, dtype):
    torch.manual_seed(15)
    layer = make_lora(in_features=64, out_features=48, dtype=dtype, cls=cls, dim=8).cuda()
    x = torch.randn(3, 7, 64, device="cuda", dtype=dtype, requires_grad=True)
    y = layer(x)
    gy = torch.randn(y.shape, device="cuda")
    y.float().backward(gy)
    x_ref = x.detach().double().requires_grad_()
    b_ref = layer.lora_B.weight.detach().double().requires_grad_()
    ref = lora_linear_reference(x_ref, layer.weight, layer.bias, layer.lora_A.weight, b_ref, layer.scale)
    ref.backward(gy.double())
    norm = ref.abs().max()
    assert_close_to_reference(y / norm, ref / norm, dtype)
    assert_close_to_reference(x.grad / x_ref.grad.abs().max(), x_ref.grad / x_ref.grad.abs().max(), dtype)
    assert_close_to_reference(layer.lora_B.weight.grad / b_ref.grad.abs().max(),
                              b_ref.grad / b_ref.grad.abs().max(), dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_lora_triton_function_matches_reference():
    torch.manual_seed(16)
    x = torch.randn(2, 9, 64, device="cuda", requires_grad=True)
    lora_A = torch.randn(8, 64, device="cuda", requires_grad=True)
    lora_B = torch.randn(48, 8, device="cuda", requires_grad=True)
    y = LoRATritonFunction.apply(x, lora_A, lora_B, 0.25, torch.float32)
    gy = torch.randn_like(y)
    y.backward(gy)
    refs = [t.detach().double().requires_grad_() for t in (x, lora_A, lora_B)]
    ref = lora_linear_reference(refs[0], None, None, refs[1], refs[2], 0.25)
    ref.backward(gy.double())
    # TF32 may be on for float32 GEMMs on the GPU: compare relative to the output's size.
    tol_dtype = torch.bfloat16
    assert_close_to_reference(y / ref.abs().max(), ref / ref.abs().max(), tol_dtype)
    for actual, expected in zip((x.grad, lora_A.grad, lora_B.grad), refs):
        norm = expected.grad.abs().max()
        assert_close_to_reference(actual / norm, expected.grad / norm, tol_dtype)
