"""apply_lora_to_linear_modules: selection, counting, freezing, errors and the meta-device flow."""
import copy

import pytest
import torch
import torch.nn as nn

from lora_ext import LinearLoRA, PeftConfig, TritonLinearLoRA, apply_lora_to_linear_modules

HIDDEN, VOCAB, LAYERS = 16, 32, 2
LINEARS_PER_BLOCK = 6  # q, k, v, o, up, down


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.k_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.v_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.o_proj = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        scores = torch.softmax(self.q_proj(x) @ self.k_proj(x).transpose(-1, -2) / HIDDEN**0.5, dim=-1)
        return self.o_proj(scores @ self.v_proj(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        self.self_attn = Attention()
        # Not a Linear, but "*_proj" patterns select it: it must be skipped.
        self.mixer_proj = nn.Conv1d(HIDDEN, HIDDEN, kernel_size=1)
        self.mlp = nn.Sequential()
        self.mlp.add_module("up_proj", nn.Linear(HIDDEN, 2 * HIDDEN))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("down_proj", nn.Linear(2 * HIDDEN, HIDDEN))

    def forward(self, x):
        h = x + self.self_attn(self.norm(x))
        h = h + self.mixer_proj(h.transpose(-1, -2)).transpose(-1, -2)
        return h + self.mlp(h)


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, tokens):
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(h)


def build_model(seed=0):
    torch.manual_seed(seed)
    return TinyLM()


def lora_names(model):
    return sorted(name for name, m in model.named_modules() if isinstance(m, LinearLoRA))


def randomise_adapters(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LinearLoRA):
                module.lora_A.weight.normal_()
                module.lora_B.weight.normal_(std=0.1)


TOKENS = torch.tensor([[1, 5, 9, 30, 2], [0, 31, 7, 7, 3]])


# --------------------------------------------------------------------------- selection


@pytest.mark.parametrize(
    "config, expected",
    [
        (PeftConfig(target_modules=["q_proj", "v_proj"]),
         [f"layers.{i}.self_attn.{p}" for i in range(LAYERS) for p in ("q_proj", "v_proj")]),
        (PeftConfig(target_modules=[".o_proj."]), [f"layers.{i}.self_attn.o_proj" for i in range(LAYERS)]),
        (PeftConfig(target_modules=["layers.0.**"]),
         ["layers.0.mlp.down_proj", "layers.0.mlp.up_proj"]
         + [f"layers.0.self_attn.{p}" for p in ("k_proj", "o_proj", "q_proj", "v_proj")]),
        (PeftConfig(target_modules=["layers.*.mlp.*"]),
         [f"layers.{i}.mlp.{p}" for i in range(LAYERS) for p in ("down_proj", "up_proj")]),
        (PeftConfig(target_modules=[r"re:layers\.1\..*_proj"]),
         ["layers.1.mlp.down_proj", "layers.1.mlp.up_proj"]
         + [f"layers.1.self_attn.{p}" for p in ("k_proj", "o_proj", "q_proj", "v_proj")]),
        (PeftConfig(target_modules=["lm_head"]), ["lm_head"]),
        (PeftConfig(exclude_modules=["lm_head", "self_attn.*"]),
         [f"layers.{i}.mlp.{p}" for i in range(LAYERS) for p in ("down_proj", "up_proj")]),
    ],
    ids=["names", "dots", "double-star", "star", "regex", "lm_head", "exclude"],
)
def test_selection(config, expected):
    model = build_model()
    count = apply_lora_to_linear_modules(model, config)
    assert count == len(expected)
    assert lora_names(model) == sorted(expected)


def test_match_all_linear_patches_every_linear():
    model = build_model()
    assert apply_lora_to_linear_modules(model, PeftConfig(match_all_linear=True)) == LAYERS * LINEARS_PER_BLOCK + 1
    plain_linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert plain_linears == []  # the adapters are LoRAAdapterLinear, every base Linear is patched


def test_exclude_keeps_only_the_excluded_unpatched():
    model = build_model()
    count = apply_lora_to_linear_modules(model, PeftConfig(exclude_modules=["lm_head"]))
    assert count == LAYERS * LINEARS_PER_BLOCK
    assert type(model.lm_head) is nn.Linear


def test_non_linear_matches_are_skipped_and_not_counted():
    model = build_model()
    count = apply_lora_to_linear_modules(model, PeftConfig(target_modules=["*_proj"]))
    assert count == LAYERS * LINEARS_PER_BLOCK  # the Conv1d mixer_proj modules are not counted
    assert all(type(block.mixer_proj) is nn.Conv1d for block in model.layers)
    # A pattern that selects only containers patches nothing.
    with pytest.warns(UserWarning, match="no Linear"):
        assert apply_lora_to_linear_modules(build_model(), PeftConfig(target_modules=["self_attn", "mlp"])) == 0


def test_config_values_reach_the_layers():
    model = build_model()
    config = PeftConfig(target_modules=["q_proj"], dim=4, alpha=2, dropout=0.2, dropout_position="pre",
                        lora_A_init="uniform", lora_dtype="bf16", use_triton=True)
    apply_lora_to_linear_modules(model, config)
    q = model.layers[0].self_attn.q_proj
    assert type(q) is TritonLinearLoRA
    assert (q.dim, q.scale, q.dropout_p, q.dropout_position) == (4, 0.5, 0.2, "pre")
    assert q.lora_A_init_method == "uniform" and q.lora_A.weight.abs().max() <= 1 / HIDDEN**0.5
    assert q.lora_A.weight.dtype == torch.bfloat16 and q.weight.dtype == torch.float32
    model2 = build_model()
    apply_lora_to_linear_modules(model2, PeftConfig(target_modules=["q_proj"], use_triton=False))
    assert type(model2.layers[0].self_attn.q_proj) is LinearLoRA


def test_accepts_a_dict():
    model = build_model()
    assert apply_lora_to_linear_modules(model, {"target_modules": ["k_proj"], "dim": 2, "unknown": 1}) == LAYERS
    assert model.layers[1].self_attn.k_proj.dim == 2


def test_shared_module_is_patched_once_and_matched_by_any_name():
    model = nn.Module()
    model.encoder = nn.Sequential(nn.Linear(4, 4))
    model.decoder = nn.Sequential()
    model.decoder.add_module("tied", model.encoder[0])  # same module, second name
    assert apply_lora_to_linear_modules(model, PeftConfig(target_modules=["tied"])) == 1
    assert isinstance(model.encoder[0], LinearLoRA) and model.decoder.tied is model.encoder[0]


def test_root_linear_is_patched_in_place():
    linear = nn.Linear(4, 3)
    assert apply_lora_to_linear_modules(linear, PeftConfig(match_all_linear=True)) == 1
    assert isinstance(linear, LinearLoRA)


# --------------------------------------------------------------------------- freezing and training


def test_freezes_everything_but_the_adapters():
    model = build_model()
    apply_lora_to_linear_modules(model, PeftConfig(target_modules=["q_proj", "down_proj"]))
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    expected = sorted(
        f"layers.{i}.{path}.{adapter}.weight"
        for i in range(LAYERS) for path in ("self_attn.q_proj", "mlp.down_proj") for adapter in ("lora_A", "lora_B")
    )
    assert trainable == expected


def test_only_adapters_get_gradients_and_fresh_model_output_is_unchanged():
    model = build_model()
    reference = copy.deepcopy(model)
    apply_lora_to_linear_modules(model, PeftConfig(match_all_linear=True))
    assert torch.equal(model(TOKENS), reference(TOKENS))
    randomise_adapters(model, 1)
    loss = model(TOKENS).logsumexp(-1).mean()
    loss.backward()
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_applying_twice_skips_patched_modules_and_keeps_adapters_trainable():
    model = build_model()
    assert apply_lora_to_linear_modules(model, PeftConfig(target_modules=["q_proj"])) == LAYERS
    first_A = model.layers[0].self_attn.q_proj.lora_A
    # Every Linear now: the q_proj layers are already LoRA (skipped, not counted) and
    # their adapters are never patched themselves.
    newly_patched = apply_lora_to_linear_modules(model, PeftConfig(match_all_linear=True))
    assert newly_patched == LAYERS * (LINEARS_PER_BLOCK - 1) + 1
    assert model.layers[0].self_attn.q_proj.lora_A is first_A
    assert not isinstance(first_A, LinearLoRA)
    assert first_A.weight.requires_grad  # adapters of the first call stay trainable
    # Once more: nothing left to patch.
    with pytest.warns(UserWarning):
        assert apply_lora_to_linear_modules(model, PeftConfig(match_all_linear=True)) == 0


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_modules": ["q_proj"], "exclude_modules": ["lm_head"]}, "not both"),
        ({"match_all_linear": True, "target_modules": ["q_proj"]}, "match_all_linear"),
        ({"match_all_linear": True, "exclude_modules": ["lm_head"]}, "match_all_linear"),
        ({}, "target_modules"),
        ({"target_modules": ["layers..q_proj"]}, "pattern"),
        ({"target_modules": ["re:(q_proj"]}, "regular expression"),
        ({"exclude_modules": ["."]}, "pattern"),
    ],
)
def test_value_errors_leave_the_model_untouched(kwargs, message):
    model = build_model()
    with pytest.raises(ValueError, match=message):
        apply_lora_to_linear_modules(model, PeftConfig(**kwargs))
    assert lora_names(model) == []
    assert all(p.requires_grad for p in model.parameters())


def test_non_floating_base_weight_without_lora_dtype_leaves_the_model_untouched():
    """A selected Linear whose weight is not floating point (a quantised stand-in here) needs lora_dtype;
    refused before anything changes, not after the layers before it were patched and the model frozen."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.no_grad():
        model[1].weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match=r"1's weight is torch.int8; lora_dtype must be given"):
        apply_lora_to_linear_modules(model, PeftConfig(match_all_linear=True))
    assert lora_names(model) == [] and model[0].weight.requires_grad


def test_nothing_to_target_says_what_to_set():
    with pytest.raises(ValueError) as info:
        apply_lora_to_linear_modules(build_model(), PeftConfig())
    for field in ("target_modules", "exclude_modules", "match_all_linear"):
        assert field in str(info.value)


def test_bad_config_type():
    with pytest.raises(TypeError):
        apply_lora_to_linear_modules(build_model(), ["q_proj"])


def test_config_changed_after_construction_is_revalidated():
    config = PeftConfig(target_modules=["q_proj"])
    config.dim = 0
    model = build_model()
    with pytest.raises(ValueError, match="dim"):
        apply_lora_to_linear_modules(model, config)
    assert lora_names(model) == []


# --------------------------------------------------------------------------- meta-device flow


def init_adapters(model, seed):
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LinearLoRA):
            module.reset_parameters()


@pytest.mark.parametrize("use_triton", [False, True])
def test_meta_flow_equals_building_on_cpu(use_triton):
    config = PeftConfig(exclude_modules=["lm_head"], dim=4, lora_A_init="xavier", use_triton=use_triton)
    base_state = build_model(seed=3).state_dict()

    # Built on the CPU, base weights loaded, adapters initialised.
    cpu_model = build_model(seed=99)
    cpu_model.load_state_dict(base_state)
    apply_lora_to_linear_modules(cpu_model, config)
    init_adapters(cpu_model, seed=7)

    # Built on meta: nothing allocated until to_empty; base weights by their unchanged FQNs.
    with torch.device("meta"):
        meta_model = TinyLM()
    assert apply_lora_to_linear_modules(meta_model, config) == LAYERS * LINEARS_PER_BLOCK
    assert all(p.is_meta for p in meta_model.parameters())
    meta_model.to_empty(device="cpu")
    missing, unexpected = meta_model.load_state_dict(base_state, strict=False)
    assert unexpected == []
    assert sorted(missing) == sorted(k for k in cpu_model.state_dict() if ".lora_" in k)
    init_adapters(meta_model, seed=7)

    cpu_state, meta_state = cpu_model.state_dict(), meta_model.state_dict()
    assert list(cpu_state) == list(meta_state)
    for key in cpu_state:
        assert torch.equal(cpu_state[key], meta_state[key]), key
    assert [n for n, p in cpu_model.named_parameters() if p.requires_grad] == \
        [n for n, p in meta_model.named_parameters() if p.requires_grad]

    # Fresh adapters: both equal the base model. Then identical non-zero adapters: identical outputs/grads.
    base_model = build_model(seed=99)
    base_model.load_state_dict(base_state)
    assert torch.equal(meta_model(TOKENS), base_model(TOKENS))
    randomise_adapters(cpu_model, 11)
    randomise_adapters(meta_model, 11)
    cpu_out, meta_out = cpu_model(TOKENS), meta_model(TOKENS)
    assert torch.equal(cpu_out, meta_out) and not torch.equal(cpu_out, base_model(TOKENS))
    cpu_out.sum().backward()
    meta_out.sum().backward()
    for (name, p_cpu), (_, p_meta) in zip(cpu_model.named_parameters(), meta_model.named_parameters()):
        if p_cpu.requires_grad:
            assert torch.equal(p_cpu.grad, p_meta.grad), name
