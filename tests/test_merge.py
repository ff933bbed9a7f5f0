"""merge_adapters / unmerge_adapters / merge_and_unload (lora_ext/merge.py).

What is promised and checked here:
- merged weight = W + s * B @ A formed in float32 and rounded once to W's dtype
  (checked against float64 within half an ulp of the result plus float32 error);
- merged and unmerged outputs agree against the float64 reference (tolerance by dtype);
- a merged layer no longer applies its adapters (changing them changes nothing);
- unmerge restores W bit for bit, through the sparse patch and through the full-copy
  fallback, across row chunks, and even if the adapters changed while merged;
- everything is checked before anything changes (tied, meta weights);
- merge_and_unload gives plain nn.Linear layers (or the original Linear subclass).
"""
import copy

import pytest
import torch
import torch.nn as nn

import lora_ext
from lora_ext import merge as merge_mod
from lora_ext.modules import LinearLoRA
from lora_ext.reference import lora_linear_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Tolerance of one forward against the float64 reference, per dtype (inputs ~ N(0, 1)).
FORWARD_TOL = {torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 8e-3}
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


class Tower(nn.Module):
    """Three Linears (one without bias) and a non-Linear in between."""

    def __init__(self, dtype=torch.float32, device="cpu"):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.up = nn.Linear(24, 40, **kw)
        self.act = nn.GELU()
        self.down = nn.Linear(40, 24, bias=False, **kw)
        self.head = nn.Linear(24, 7, **kw)

    def forward(self, x):
        return self.head(self.down(self.act(self.up(x))))


def lora_tower(dtype=torch.float32, device="cpu", b_std=0.05, seed=0):
    torch.manual_seed(seed)
    model = Tower(dtype, device)
    lora_ext.apply_lora_to_linear_modules(model, lora_ext.PeftConfig(match_all_linear=True, dim=4, alpha=8))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LinearLoRA):
                m.lora_B.weight.normal_(0.0, b_std)  # never test with the zero init
    return model


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LinearLoRA)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_merged_weight_is_w_plus_scaled_ba(dtype):
    model = lora_tower(dtype)
    expected = {}
    with torch.no_grad():
        for m in lora_layers(model):
            w, a, b = m.weight.double(), m.lora_A.weight.double(), m.lora_B.weight.double()
            exact = w + m.scale * (b @ a)
            # float32 computation error bound: a few eps32 times the magnitudes summed.
            magnitude = w.abs() + m.scale * (b.abs() @ a.abs())
            expected[m] = (exact, magnitude)
    assert lora_ext.merge_adapters(model) == 3
    for m, (exact, magnitude) in expected.items():
        assert m.merged
        merged = m.weight.detach().double()
        # One rounding to W's dtype: half an ulp, ulp(x) <= eps * |x|.
        rounding = torch.finfo(dtype).eps * exact.abs() / 2
        f32_err = 4 * torch.finfo(torch.float32).eps * magnitude
        assert torch.all((merged - exact).abs() <= rounding + f32_err)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merged_and_unmerged_outputs_agree_with_reference(dtype):
    model = lora_tower(dtype)
    x = torch.randn(5, 3, 24, dtype=dtype)
    # float64 reference of the unmerged model, layer by layer.
    up, down, head = model.up, model.down, model.head

    def ref_layer(m, h):
        return lora_linear_reference(h, m.weight, m.bias, m.lora_A.weight, m.lora_B.weight, m.scale)

    h = ref_layer(up, x.double())
    h = torch.nn.functional.gelu(h)
    ref = ref_layer(head, ref_layer(down, h)).double()

    with torch.no_grad():
        unmerged = model(x)
        lora_ext.merge_adapters(model)
        merged = model(x)
    tol = FORWARD_TOL[dtype] * ref.abs().max().item()
    assert merged.dtype == dtype and unmerged.dtype == dtype
    assert (unmerged.double() - ref).abs().max().item() <= tol
    assert (merged.double() - ref).abs().max().item() <= tol
    assert (merged.double() - unmerged.double()).abs().max().item() <= tol


def test_merged_layer_does_not_apply_adapters_again():
    model = lora_tower()
    x = torch.randn(6, 24)
    lora_ext.merge_adapters(model)
    with torch.no_grad():
        before = model(x)
        for m in lora_layers(model):
            m.lora_B.weight.mul_(3.0)  # would change the output if the LoRA path ran
        after = model(x)
    assert torch.equal(before, after)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b_std", [1e-3, 0.05, 3.0])
def test_unmerge_restores_weight_bitwise(dtype, b_std):
    model = lora_tower(dtype, b_std=b_std)
    originals = {m: m.weight.detach().clone() for m in lora_layers(model)}
    lora_ext.merge_adapters(model)
    changed = any(not bit_equal(m.weight.detach(), w) for m, w in originals.items())
    assert changed, "the merge should have changed some weight"
    assert lora_ext.unmerge_adapters(model) == 3
    for m, w in originals.items():
        assert not m.merged
        assert bit_equal(m.weight.detach(), w)
        assert m._merge_record is None


def test_subtraction_alone_would_not_restore_and_patch_is_small():
    """The patch is needed (subtraction alone loses bits) and is far smaller than a copy of W."""
    torch.manual_seed(1)
    layer = nn.Linear(256, 256, dtype=torch.bfloat16)
    lora_ext.patch_linear_module(layer, dim=8, alpha=16)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.02)
        layer.lora_B.weight.normal_(0.0, 0.002)  # update RMS ~5% of W's: a typical fine-tune
    original = layer.weight.detach().clone()
    delta = layer.scale * (layer.lora_B.weight.float() @ layer.lora_A.weight.float())
    naive = ((original.float() + delta).bfloat16().float() - delta).bfloat16()
    assert not bit_equal(naive, original)

    model = nn.Sequential(layer)
    lora_ext.merge_adapters(model)
    record = layer._merge_record
    assert record.weight_copy is None and record.patch_index is not None
    patch_bytes = record.patch_index.numel() * (record.patch_index.element_size() + 2)
    assert 0 < patch_bytes < 0.5 * original.numel() * original.element_size()
    lora_ext.unmerge_adapters(model)
    assert bit_equal(layer.weight.detach(), original)


def test_full_copy_fallback_when_patch_would_be_larger():
    # Huge adapters relative to tiny weights: nearly every entry changes binade.
    model = lora_tower(torch.bfloat16, b_std=50.0)
    with torch.no_grad():
        for m in lora_layers(model):
            m.weight.mul_(1e-3)
    originals = {m: m.weight.detach().clone() for m in lora_layers(model)}
    lora_ext.merge_adapters(model)
    assert all(m._merge_record.weight_copy is not None for m in originals)
    lora_ext.unmerge_adapters(model)
    assert all(bit_equal(m.weight.detach(), w) for m, w in originals.items())


def test_row_chunks_give_same_merge_and_exact_unmerge(monkeypatch):
    reference_model = lora_tower(torch.bfloat16)
    chunked_model = copy.deepcopy(reference_model)
    originals = {name: m.weight.detach().clone() for name, m in chunked_model.named_modules() if isinstance(m, LinearLoRA)}
    lora_ext.merge_adapters(reference_model)
    monkeypatch.setattr(merge_mod, "_CHUNK_ELEMENTS", 50)  # 1-2 rows per chunk
    lora_ext.merge_adapters(chunked_model)
    for name, m in chunked_model.named_modules():
        if isinstance(m, LinearLoRA):
            merged_ref = reference_model.get_submodule(name).weight.detach()
            # float32 matmuls of a few rows vs all rows: equal up to float32 rounding.
            torch.testing.assert_close(m.weight.detach(), merged_ref, rtol=1e-2, atol=1e-6)
    lora_ext.unmerge_adapters(chunked_model)
    for name, w in originals.items():
        assert bit_equal(chunked_model.get_submodule(name).weight.detach(), w)


def test_adapters_changed_while_merged_still_restore_exactly():
    model = lora_tower(torch.float16)
    originals = {m: m.weight.detach().clone() for m in lora_layers(model)}
    lora_ext.merge_adapters(model)
    with torch.no_grad():
        for m in lora_layers(model):
            m.lora_A.weight.add_(1.0)
            m.lora_B.weight.normal_()
    lora_ext.unmerge_adapters(model)
    assert all(bit_equal(m.weight.detach(), w) for m, w in originals.items())
    # ... and the layers now apply the new adapters.
    x = torch.randn(4, 24, dtype=torch.float16)
    m = model.up
    expected = lora_linear_reference(x, m.weight, m.bias, m.lora_A.weight, m.lora_B.weight, m.scale)
    torch.testing.assert_close(m(x).double(), expected.double(), rtol=8e-3, atol=8e-3 * expected.abs().max().item())


def test_merge_twice_and_unmerge_unmerged_are_no_ops():
    model = lora_tower()
    assert lora_ext.unmerge_adapters(model) == 0
    assert lora_ext.merge_adapters(model) == 3
    once = [m.weight.detach().clone() for m in lora_layers(model)]
    assert lora_ext.merge_adapters(model) == 0
    assert all(torch.equal(m.weight, w) for m, w in zip(lora_layers(model), once))


def test_tied_weight_refused_before_anything_changes():
    model = lora_tower()
    shared = nn.Linear(24, 7)
    shared.weight = model.head.weight  # tie: merging head would change `shared` too
    model.shared = shared
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match=r"tied.*shared\.weight"):
        lora_ext.merge_adapters(model)
    assert not any(m.merged for m in lora_layers(model))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_meta_weight_refused():
    model = Tower(device="meta")
    lora_ext.apply_lora_to_linear_modules(model, lora_ext.PeftConfig(target_modules=["up"]))
    with pytest.raises(RuntimeError, match="meta"):
        lora_ext.merge_adapters(model)
    assert not model.up.merged


def test_parametrized_weight_refused_before_anything_changes():
    """A parametrized weight is recomputed on every access: an update written into it would be lost
    while the layer, marked merged, skips its adapters (outputs silently without the LoRA term)."""
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    model = lora_tower()
    parametrize.register_parametrization(model.down, "weight", Doubled())
    x = torch.randn(5, 24)
    before = model(x)
    with pytest.raises(RuntimeError, match=r"cannot merge down: its weight is parametrized"):
        lora_ext.merge_adapters(model)
    assert not any(m.merged for m in lora_layers(model))
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_unmerge_restores_a_non_contiguous_weight_bitwise(dtype):
    """A weight stored transposed (a view of a (in, out) tensor): the exact-restore patch is written
    through (row, column) positions, not through reshape(-1), which is a copy for such a view."""
    model = lora_tower(dtype, b_std=0.05)  # a few lossy entries: a patch, not the full copy
    layer = model.up
    with torch.no_grad():
        layer.weight = nn.Parameter(layer.weight.detach().t().contiguous().t(), requires_grad=False)
    assert not layer.weight.is_contiguous()
    original = layer.weight.detach().clone()
    lora_ext.merge_adapters(model)
    assert layer._merge_record.patch_index is not None and layer._merge_record.patch_index.numel() > 0
    lora_ext.unmerge_adapters(model)
    assert bit_equal(layer.weight.detach(), original)


class MyLinear(nn.Linear):
    """A user's Linear subclass: merge_and_unload must give it back, not a plain nn.Linear."""


def test_merge_and_unload_gives_plain_linears():
    model = lora_tower()
    torch.manual_seed(3)
    model.extra = MyLinear(7, 5)
    lora_ext.patch_linear_module(model.extra, dim=2, alpha=4)
    with torch.no_grad():
        model.extra.lora_B.weight.normal_()
    x = torch.randn(3, 24)
    with torch.no_grad():
        expected_tower = model(x)
        expected_extra = model.extra(expected_tower)
    lora_ext.merge_adapters(nn.Sequential(model.up))  # `up` merged earlier; the rest merged by unload
    out = lora_ext.merge_and_unload(model)
    assert out is model
    assert type(model.up) is nn.Linear and type(model.down) is nn.Linear and type(model.head) is nn.Linear
    assert type(model.extra) is MyLinear
    assert not any(isinstance(m, LinearLoRA) for m in model.modules())
    assert all("lora" not in k for k in model.state_dict())
    assert not hasattr(model.up, "merged") and not hasattr(model.up, "scale")
    with torch.no_grad():
        tower = model(x)
        torch.testing.assert_close(tower, expected_tower, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.extra(tower), expected_extra, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_merge_unmerge(dtype):
    model = lora_tower(dtype, device="cuda")
    originals = {m: m.weight.detach().clone() for m in lora_layers(model)}
    x = torch.randn(8, 24, dtype=dtype, device="cuda")
    with torch.no_grad():
        unmerged = model(x)
        lora_ext.merge_adapters(model)
        merged = model(x)
    assert all(m.weight.device.type == "cuda" for m in originals)
    tol = FORWARD_TOL[dtype] * unmerged.abs().max().item()
    assert (merged.double() - unmerged.double()).abs().max().item() <= tol
    lora_ext.unmerge_adapters(model)
    assert all(bit_equal(m.weight.detach(), w) for m, w in originals.items())
