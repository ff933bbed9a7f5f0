"""Hugging Face transformers models (Llama- and Qwen2-style, tiny configs, no download).

- meta-device flow: build under torch.device("meta"), apply LoRA with fragment patterns,
  lora_ext.materialize from a safetensors file (or a state dict) -> every tensor equal to
  the normally built model with the same adapter init, ties kept, nothing on meta;
- materialize checks before allocating: bad weights raise and leave the model on meta;
- forward and backward of the patched model: loss and adapter gradients equal peft's
  (an independent LoRA implementation) with the same adapters; base weights get no grad;
- torch.compile (aot_eager: traces our ops' fake kernels and autograd) equals eager;
- greedy generate gives the same tokens unmerged, merged, and after merge_and_unload.
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from safetensors.torch import save_model  # noqa: E402

import lora_ext  # noqa: E402
from lora_ext.modules import LinearLoRA  # noqa: E402

VOCAB = 128


def make_config(kind):
    common = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=VOCAB, max_position_embeddings=64,
    )
    if kind == "llama":
        return transformers.LlamaConfig(num_key_value_heads=4, **common)
    if kind == "gemma3":
        # A non-persistent buffer (the embedding's scale) that only the model's _init_weights recomputes.
        return transformers.Gemma3TextConfig(num_key_value_heads=2, head_dim=16, **common)
    # Qwen2: grouped-query attention, q/k/v biases, tied input/output embeddings.
    return transformers.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **common)


def build(kind, seed=0):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(make_config(kind)).eval()


def init_adapters(model, seed):
    """The adapter init materialize does, on a normally built model: reset_parameters in module order."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LinearLoRA):
            m.reset_parameters()


def randomize_lora_B(model, seed=5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LinearLoRA):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.1)


def tokens(batch=2, length=9, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def all_tensors(model):
    return dict(model.named_parameters()) | dict(model.named_buffers())


@pytest.mark.parametrize(
    "kind, patterns, n_expected",
    [
        ("llama", ["q_proj", "v_proj"], 4),
        ("qwen2", "*_proj", 14),
        ("llama", [r"re:model\.layers\.1\.(self_attn|mlp)\.(k|up)_proj"], 2),
        ("gemma3", ["q_proj", "v_proj"], 4),
    ],
    ids=["llama-names", "qwen2-glob", "llama-regex", "gemma3-names"],
)
def test_meta_flow_equals_normal_build(kind, patterns, n_expected, tmp_path):
    config = lora_ext.PeftConfig(target_modules=patterns, dim=4, alpha=8)
    normal = build(kind)
    save_model(normal, str(tmp_path / "model.safetensors"))  # base weights; tied ones stored once
    assert lora_ext.apply_lora_to_linear_modules(normal, config) == n_expected
    init_adapters(normal, seed=7)

    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(make_config(kind)).eval()
    assert lora_ext.apply_lora_to_linear_modules(meta, config) == n_expected
    torch.manual_seed(7)
    assert lora_ext.materialize(meta, tmp_path / "model.safetensors", "cpu") is meta

    expected, got = all_tensors(normal), all_tensors(meta)
    assert expected.keys() == got.keys()
    for name, t in got.items():
        assert not t.is_meta, name
        assert t.dtype == expected[name].dtype and torch.equal(t, expected[name]), name
        assert t.requires_grad == expected[name].requires_grad, name
    if make_config(kind).tie_word_embeddings:
        assert meta.lm_head.weight is meta.model.embed_tokens.weight

    randomize_lora_B(normal)
    randomize_lora_B(meta)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(meta(input_ids=x).logits, normal(input_ids=x).logits)


def test_materialize_from_state_dict_with_adapters(tmp_path):
    """A state dict of the patched model (adapters included) restores it exactly; no RNG needed."""
    config = lora_ext.PeftConfig(target_modules=["o_proj", "down_proj"], dim=2, alpha=4)
    normal = build("qwen2")
    lora_ext.apply_lora_to_linear_modules(normal, config)
    randomize_lora_B(normal)
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(make_config("qwen2"))
    lora_ext.apply_lora_to_linear_modules(meta, config)
    state = {k: v for k, v in normal.state_dict().items() if k != "lm_head.weight"}  # tied: one name is enough
    lora_ext.materialize(meta, state, "cpu")
    for name, t in all_tensors(meta).items():
        assert torch.equal(t, all_tensors(normal)[name]), name


@pytest.mark.parametrize("problem", ["missing", "unexpected", "misshaped"])
def test_materialize_checks_before_allocating(problem):
    normal = build("llama")
    state = dict(normal.state_dict())
    if problem == "missing":
        del state["model.layers.1.mlp.up_proj.weight"]
        message = r"missing from the weights \(1\):\s+model\.layers\.1\.mlp\.up_proj\.weight"
    elif problem == "unexpected":
        state["model.layers.7.extra.weight"] = torch.zeros(2)
        message = r"unexpected in the weights .*\n\s+model\.layers\.7\.extra\.weight"
    else:
        state["model.norm.weight"] = torch.ones(65)
        message = r"mis-shaped \(1\):\s+model\.norm\.weight: weights \[65\], model \[64\]"
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(make_config("llama"))
    lora_ext.apply_lora_to_linear_modules(meta, lora_ext.PeftConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=message):
        lora_ext.materialize(meta, state, "cpu")
    assert all(t.is_meta for t in all_tensors(meta).values())


def test_materialize_refuses_pickle(tmp_path):
    with torch.device("meta"):
        meta = torch.nn.Linear(3, 3)
    torch.save(torch.nn.Linear(3, 3).state_dict(), tmp_path / "w.bin")
    with pytest.raises(ValueError, match="safetensors files only"):
        lora_ext.materialize(meta, tmp_path / "w.bin")


def peft_twin(lora_model, base, tmp_path):
    """The same adapters in a peft model (through the PEFT file format)."""
    lora_ext.save_adapter(lora_model, tmp_path)
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path), is_trainable=True)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_forward_backward_match_peft(kind, tmp_path):
    base = build(kind)
    model = copy.deepcopy(base)
    lora_ext.apply_lora_to_linear_modules(model, lora_ext.PeftConfig(target_modules=["*_proj"], dim=4, alpha=8))
    randomize_lora_B(model)
    twin = peft_twin(model, base, tmp_path)
    x = tokens()

    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    twin_loss = twin(input_ids=x, labels=x).loss
    twin_loss.backward()
    torch.testing.assert_close(loss, twin_loss, rtol=1e-5, atol=1e-6)

    twin_params = dict(twin.named_parameters())
    n_checked = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            twin_name = "base_model.model." + name.replace(".weight", ".default.weight")
            torch.testing.assert_close(p.grad, twin_params[twin_name].grad, rtol=1e-4, atol=1e-6)
            n_checked += 1
        else:
            assert p.grad is None and not p.requires_grad, name
    assert n_checked == 2 * 14


def test_torch_compile_matches_eager():
    model = build("llama")
    lora_ext.apply_lora_to_linear_modules(model, lora_ext.PeftConfig(target_modules=["q_proj", "v_proj"], dim=4))
    randomize_lora_B(model)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    x = tokens()

    eager_loss = model(input_ids=x, labels=x).loss
    eager_loss.backward()
    compiled_loss = compiled(input_ids=x, labels=x).loss
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    compiled_params = dict(compiled_model.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(compiled_params[name].grad, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_generate_same_tokens_merged_and_unmerged(kind):
    model = build(kind)
    lora_ext.apply_lora_to_linear_modules(model, lora_ext.PeftConfig(target_modules=["*_proj"], dim=4, alpha=8))
    randomize_lora_B(model, seed=11)
    prompt = tokens(batch=2, length=5, seed=3)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)

    with torch.no_grad():
        unmerged = model.generate(prompt, **settings)
        base_tokens = build(kind).generate(prompt, **settings)
        lora_ext.merge_adapters(model)
        merged = model.generate(prompt, **settings)
        lora_ext.unmerge_adapters(model)
        unmerged_again = model.generate(prompt, **settings)
        unloaded = lora_ext.merge_and_unload(model).generate(prompt, **settings)
    assert unmerged.shape == (2, 11)
    assert not torch.equal(unmerged, base_tokens), "the adapters should change the greedy tokens"
    assert torch.equal(merged, unmerged)
    assert torch.equal(unmerged_again, unmerged)
    assert torch.equal(unloaded, unmerged)


class WithConstant(torch.nn.Module):
    """A plain module with a non-persistent buffer (in no checkpoint, and no HF _init_weights)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.register_buffer("table", torch.arange(4.0), persistent=False)


def test_nonpersistent_buffer_without_recipe_is_refused_or_taken_from_weights():
    weights = WithConstant().state_dict()
    with torch.device("meta"):
        meta = WithConstant()
    with pytest.raises(ValueError, match=r"non-persistent buffers .*\n\s+table"):
        lora_ext.materialize(meta, weights)
    assert meta.proj.weight.is_meta
    lora_ext.materialize(meta, {**weights, "table": torch.arange(4.0) * 2})
    assert torch.equal(meta.table, torch.arange(4.0) * 2) and torch.equal(meta.proj.weight, weights["proj.weight"])


def test_hf_model_inside_a_wrapper_gets_its_rotary_tables():
    normal = torch.nn.ModuleDict({"lm": build("llama")})
    with torch.device("meta"):
        meta = torch.nn.ModuleDict({"lm": transformers.AutoModelForCausalLM.from_config(make_config("llama"))})
    lora_ext.materialize(meta, normal.state_dict())
    rotary = meta["lm"].model.rotary_emb
    assert torch.equal(rotary.inv_freq, normal["lm"].model.rotary_emb.inv_freq)
    assert torch.equal(rotary.original_inv_freq, normal["lm"].model.rotary_emb.original_inv_freq)


def test_user_buffer_inside_hf_model_is_refused_unless_in_the_weights():
    """A user's module with a non-persistent buffer inside a Hugging Face model: the model's
    _init_weights (found for it) does not know it, so materialize names it instead of leaving
    to_empty's memory there; given in the weights, it is loaded and the rotary tables recomputed."""
    normal = build("llama")
    normal.model.layers[0].extra = WithConstant()
    weights = normal.state_dict()
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(make_config("llama"))
        meta.model.layers[0].extra = WithConstant()
    with pytest.raises(ValueError, match=r"did not recompute.*\n.*\n\s+model\.layers\.0\.extra\.table"):
        lora_ext.materialize(meta, weights)

    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(make_config("llama"))
        meta.model.layers[0].extra = WithConstant()
    lora_ext.materialize(meta, {**weights, "model.layers.0.extra.table": torch.arange(4.0) * 3})
    assert torch.equal(meta.model.layers[0].extra.table, torch.arange(4.0) * 3)
    assert torch.equal(meta.model.rotary_emb.inv_freq, normal.model.rotary_emb.inv_freq)


class BufferHolder(torch.nn.Module):
    """Non-persistent buffers of several dtypes, recomputed (or not) by the wrapper's _init_weights."""

    def __init__(self):
        super().__init__()
        self.register_buffer("flags", torch.zeros(6, dtype=torch.uint8), persistent=False)
        self.register_buffer("mask", torch.ones(6, dtype=torch.bool), persistent=False)
        self.register_buffer("table", torch.arange(6.0), persistent=False)
        self.register_buffer("steps", torch.arange(6), persistent=False)


class WithInitWeights(torch.nn.Module):
    """An HF-like model: `_init_weights(module)` recomputes what `writes` names, `table` maybe partly;
    `user.freq` is the same tensor as `holder.table` (a user's module sharing a rotary table)."""

    def __init__(self, writes):
        super().__init__()
        self.writes = writes
        self.user = torch.nn.Module()
        self.holder = BufferHolder()
        self.user.register_buffer("freq", self.holder.table, persistent=False)

    def _init_weights(self, module):
        if not isinstance(module, BufferHolder):
            return
        if "flags" in self.writes:
            module.flags.zero_()  # zeros: an unsigned type's minimum, which must not read as untouched
        if "mask" in self.writes:
            module.mask.fill_(True)
        if "table" in self.writes:
            module.table.copy_(torch.arange(6.0))
        elif "half table" in self.writes:
            module.table[:3] = 1.0
        if "steps" in self.writes:
            module.steps.copy_(torch.arange(6))


@pytest.mark.parametrize("writes, refused", [
    ({"flags", "mask", "table", "steps"}, []),
    ({"flags", "table", "steps"}, ["holder.mask"]),
    ({"flags", "mask", "half table", "steps"}, ["user.freq = holder.table"]),
    ({"flags", "mask", "table"}, ["holder.steps"]),
], ids=["all", "bool-left", "partial-write", "int64-left"])
def test_nonpersistent_buffers_left_by_init_weights_are_named(writes, refused):
    """Every dtype's buffer that _init_weights leaves (wholly or partly) is named, and only those;
    a tied buffer whose first owner no _init_weights knows is recomputed through its other owner."""
    with torch.device("meta"):
        model = WithInitWeights(writes)
    if not refused:
        lora_ext.materialize(model, {})
        assert torch.equal(model.user.freq, torch.arange(6.0)) and model.user.freq is model.holder.table
        assert torch.equal(model.holder.flags, torch.zeros(6, dtype=torch.uint8)) and bool(model.holder.mask.all())
        assert torch.equal(model.holder.steps, torch.arange(6))
        return
    with pytest.raises(ValueError, match="did not recompute") as error:
        lora_ext.materialize(model, {})
    named = [line.strip() for line in str(error.value).splitlines()[2:]]
    assert named == refused, str(error.value)
