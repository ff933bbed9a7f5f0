"""PEFT adapter files (lora_ext/adapters.py), tested against the real `peft` package both ways.

- lora_ext saves -> peft.PeftModel.from_pretrained loads -> same logits (uniform ranks,
  mixed ranks/alphas via rank_pattern/alpha_pattern, a single layer named in full);
- peft save_pretrained (random lora_B) -> lora_ext.load_adapter -> same logits (plain,
  rslora, regex target_modules);
- missing / unexpected / mis-shaped keys, a different scale, merged layers: a clear
  AdapterMismatchError naming them, and the model is bit-for-bit unchanged;
- saving is atomic (a failing write leaves the old files and no temporary file);
- only safetensors are read.
"""
import copy
import json
import os

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lora_ext  # noqa: E402
from lora_ext import adapters  # noqa: E402
from lora_ext.modules import LinearLoRA  # noqa: E402

VOCAB = 128


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def perturb_adapters(model, seed=2):
    """Random lora_A and lora_B (a fresh lora_B is zero, which would make every test pass)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LinearLoRA):
                m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=gen) * 0.2)
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.2)


def lora_model(base, **config):
    model = copy.deepcopy(base)
    lora_ext.apply_lora_to_linear_modules(model, lora_ext.PeftConfig(**config))
    return model


def state_snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, snapshot):
    current = model.state_dict()
    assert current.keys() == snapshot.keys()
    for k, v in snapshot.items():
        assert torch.equal(current[k], v), k


def peft_lora_layer_names(peft_model):
    return sorted(n for n, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))


# ---------------------------------------------------------------- lora_ext -> peft


def test_lora_ext_adapter_loads_in_peft(base_model, tokens, tmp_path):
    model = lora_model(base_model, target_modules=["q_proj", "v_proj"], dim=4, alpha=8)
    perturb_adapters(model)
    expected = logits(model, tokens)
    assert not torch.allclose(expected, logits(base_model, tokens), atol=1e-3)

    lora_ext.save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["bias"] == "none"

    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), str(tmp_path)).eval()
    assert len(peft_lora_layer_names(peft_model)) == 4
    torch.testing.assert_close(logits(peft_model, tokens), expected, rtol=1e-5, atol=1e-5)


def test_mixed_ranks_and_alphas_load_in_peft(base_model, tokens, tmp_path):
    model = copy.deepcopy(base_model)
    lora_ext.apply_lora_to_linear_modules(model, lora_ext.PeftConfig(target_modules=["q_proj", "k_proj"], dim=4, alpha=8))
    lora_ext.apply_lora_to_linear_modules(model, lora_ext.PeftConfig(target_modules=["layers.1.mlp.down_proj"], dim=2, alpha=3))
    perturb_adapters(model)
    lora_ext.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    # down_proj exists in layer 0 without LoRA: the adapted one is named in full.
    assert config["target_modules"] == ["k_proj", "model.layers.1.mlp.down_proj", "q_proj"]
    assert list(config["rank_pattern"].values()) == [2] and list(config["alpha_pattern"].values()) == [3]

    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), str(tmp_path)).eval()
    names = peft_lora_layer_names(peft_model)
    assert len(names) == 5 and sum("down_proj" in n for n in names) == 1
    torch.testing.assert_close(logits(peft_model, tokens), logits(model, tokens), rtol=1e-5, atol=1e-5)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x)


class _TopAndNested(nn.Module):
    """A top-level `fc` and a nested `block.fc`: the full name "fc" is also block.fc's suffix."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.block = _Block()

    def forward(self, x):
        return self.block(self.fc(x))


def test_top_level_layer_named_like_a_nested_one_selects_itself_alone(tmp_path):
    """Only the top-level `fc` adapted: as a list, target_modules ["fc"] would make peft (and
    read_adapter_config) adapt block.fc too; the file names it with a full-match regex instead, so
    peft adapts exactly `fc` with the same outputs, and the file loads back into lora_ext."""
    torch.manual_seed(0)
    base = _TopAndNested()
    model = copy.deepcopy(base)
    assert lora_ext.apply_lora_to_linear_modules(model, lora_ext.PeftConfig(target_modules=["re:fc"], dim=2)) == 1
    with torch.no_grad():
        model.fc.lora_B.weight.normal_()
    lora_ext.save_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    adapted = sorted(n for n, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    assert adapted == ["base_model.model.fc"]
    x = torch.randn(3, 8)
    torch.testing.assert_close(peft_model(x), model.eval()(x))
    again = copy.deepcopy(base)
    assert lora_ext.apply_lora_to_linear_modules(again, lora_ext.read_adapter_config(tmp_path)) == 1
    lora_ext.load_adapter(again, tmp_path)
    torch.testing.assert_close(again.eval()(x), model(x))


def test_save_of_compiled_wrapper_uses_module_names(base_model, tmp_path):
    model = lora_model(base_model, target_modules=["o_proj"], dim=2)
    perturb_adapters(model)
    lora_ext.save_adapter(torch.compile(model, backend="eager"), tmp_path)  # not run: no compile cost
    from safetensors.torch import load_file

    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys[0] == "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight" and len(keys) == 4


# ---------------------------------------------------------------- peft -> lora_ext


@pytest.mark.parametrize(
    "peft_kwargs",
    [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        dict(r=8, lora_alpha=16, target_modules=["gate_proj", "o_proj"], use_rslora=True, lora_dropout=0.1),
        dict(r=2, lora_alpha=5, target_modules=r"model\.layers\.1\.self_attn\.(k|v)_proj"),
    ],
    ids=["plain", "rslora", "regex"],
)
def test_peft_adapter_loads_in_lora_ext(base_model, tokens, tmp_path, peft_kwargs):
    torch.manual_seed(3)
    config = peft.LoraConfig(init_lora_weights=False, **peft_kwargs)  # random lora_B
    peft_model = peft.get_peft_model(copy.deepcopy(base_model), config).eval()
    peft_model.save_pretrained(str(tmp_path))
    expected = logits(peft_model, tokens)
    assert not torch.allclose(expected, logits(base_model, tokens), atol=1e-3)

    lora_config = lora_ext.read_adapter_config(tmp_path)
    assert lora_config.dim == peft_kwargs["r"] and lora_config.dropout_position == "pre"
    model = copy.deepcopy(base_model)
    n = lora_ext.apply_lora_to_linear_modules(model, lora_config)
    assert n == len(peft_lora_layer_names(peft_model))
    lora_ext.load_adapter(model, tmp_path)
    torch.testing.assert_close(logits(model, tokens), expected, rtol=1e-5, atol=1e-5)


def test_peft_adapter_on_lm_head_loads_and_its_base_weight_is_checked(base_model, tokens, tmp_path):
    """peft saves lm_head's frozen base weight with its adapters (`lm_head.base_layer.weight`). Equal to
    the model's it is accepted and the logits are peft's; different, loading refuses (it never changes
    base weights) and names the key."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(5)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    peft_model = peft.get_peft_model(copy.deepcopy(base_model), config).eval()
    peft_model.save_pretrained(str(tmp_path))
    weights = load_file(str(tmp_path / "adapter_model.safetensors"))
    base_key = "base_model.model.lm_head.base_layer.weight"
    assert base_key in weights  # what this test is about: peft writes it
    model = copy.deepcopy(base_model)
    lora_ext.apply_lora_to_linear_modules(model, lora_ext.read_adapter_config(tmp_path))
    lora_ext.load_adapter(model, tmp_path)
    torch.testing.assert_close(logits(model, tokens), logits(peft_model, tokens), rtol=1e-5, atol=1e-5)

    weights[base_key] = weights[base_key] + 1.0
    save_file(weights, str(tmp_path / "adapter_model.safetensors"))
    other = copy.deepcopy(base_model)
    lora_ext.apply_lora_to_linear_modules(other, lora_ext.read_adapter_config(tmp_path))
    snapshot = state_snapshot(other)
    with pytest.raises(adapters.AdapterMismatchError, match=r"(?s)base weights that differ.*lm_head\.base_layer"):
        lora_ext.load_adapter(other, tmp_path)
    assert_unchanged(other, snapshot)


def test_peft_embedding_adapter_is_refused_as_such(base_model, tmp_path):
    """A peft adapter on the embedding too (lora_embedding_A/B): the Linear part would load, but loading
    refuses the whole file, naming the embedding's tensors as an unsupported kind (not as merely
    "unexpected"), and leaves the model unchanged."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    peft.get_peft_model(copy.deepcopy(base_model), config).save_pretrained(str(tmp_path))
    model = copy.deepcopy(base_model)
    assert lora_ext.apply_lora_to_linear_modules(model, lora_ext.read_adapter_config(tmp_path)) == 2  # q_proj x 2
    snapshot = state_snapshot(model)
    with pytest.raises(adapters.AdapterMismatchError) as caught:
        lora_ext.load_adapter(model, tmp_path)
    message = str(caught.value)
    assert "adapters of embedding or convolution layers (lora_ext adapts nn.Linear layers only)" in message
    assert "embed_tokens.lora_embedding_A" in message and "unexpected" not in message, message
    assert_unchanged(model, snapshot)


def test_round_trip_keeps_config_and_dtype(base_model, tmp_path):
    config = lora_ext.PeftConfig(target_modules=["*_proj"], dim=3, alpha=7, dropout=0.1, lora_dtype="bf16")
    model = copy.deepcopy(base_model)
    lora_ext.apply_lora_to_linear_modules(model, config)
    perturb_adapters(model)
    lora_ext.save_adapter(model, tmp_path, peft_config=config)
    assert lora_ext.read_adapter_config(tmp_path) == config

    other = copy.deepcopy(base_model)
    lora_ext.apply_lora_to_linear_modules(other, config)
    lora_ext.load_adapter(other, tmp_path)
    for (name, a), (_, b) in zip(model.named_parameters(), other.named_parameters()):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_save_rejects_config_that_does_not_describe_layers(base_model, tmp_path):
    model = lora_model(base_model, target_modules=["q_proj"], dim=4, alpha=8)
    with pytest.raises(ValueError, match="does not describe"):
        lora_ext.save_adapter(model, tmp_path, peft_config=lora_ext.PeftConfig(target_modules=["q_proj"], dim=8))
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------- mismatches leave the model untouched


@pytest.fixture
def saved_qv(base_model, tmp_path):
    """An adapter on q_proj and v_proj (r=4, alpha=8) saved by lora_ext."""
    model = lora_model(base_model, target_modules=["q_proj", "v_proj"], dim=4, alpha=8)
    perturb_adapters(model)
    lora_ext.save_adapter(model, tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(target_modules=["q_proj", "k_proj", "v_proj"], dim=4, alpha=8),
         r"missing from the file .*\(4\):\s+base_model\.model\.model\.layers\.0\.self_attn\.k_proj\.lora_A\.weight"),
        (dict(target_modules=["q_proj"], dim=4, alpha=8),
         r"unexpected in the file .*\(4\):\s+base_model\.model\.model\.layers\.0\.self_attn\.v_proj\.lora_A\.weight"),
        (dict(target_modules=["q_proj", "v_proj"], dim=8, alpha=16),
         r"mis-shaped .*\n\s+base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight: file \[4, 64\], model \[8, 64\]"),
        (dict(target_modules=["q_proj", "v_proj"], dim=4, alpha=32),
         r"scale differs .*\n\s+model\.layers\.0\.self_attn\.q_proj: file lora_alpha=8, r=4 -> scale 2; layer alpha=32"),
    ],
    ids=["missing", "unexpected", "misshaped", "scale"],
)
def test_mismatch_raises_and_leaves_model_untouched(base_model, saved_qv, config, message):
    model = lora_model(base_model, **config)
    perturb_adapters(model, seed=9)
    snapshot = state_snapshot(model)
    with pytest.raises(adapters.AdapterMismatchError, match=message):
        lora_ext.load_adapter(model, saved_qv)
    assert_unchanged(model, snapshot)


def test_merged_layers_refused(base_model, saved_qv):
    model = lora_model(base_model, target_modules=["q_proj", "v_proj"], dim=4, alpha=8)
    perturb_adapters(model, seed=9)
    lora_ext.merge_adapters(model)
    snapshot = state_snapshot(model)
    with pytest.raises(adapters.AdapterMismatchError, match="unmerge_adapters first"):
        lora_ext.load_adapter(model, saved_qv)
    assert_unchanged(model, snapshot)


def test_no_pickle_and_missing_files(base_model, tmp_path):
    model = lora_model(base_model, target_modules=["q_proj"], dim=4, alpha=8)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    torch.save({"x": torch.zeros(1)}, tmp_path / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        lora_ext.load_adapter(model, tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora_ext.load_adapter(model, tmp_path / "nowhere")


def test_unsupported_peft_features_refused(base_model, saved_qv):
    config_path = saved_qv / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["use_dora"] = True
    config_path.write_text(json.dumps(config))
    model = lora_model(base_model, target_modules=["q_proj", "v_proj"], dim=4, alpha=8)
    with pytest.raises(ValueError, match="use_dora=True"):
        lora_ext.load_adapter(model, saved_qv)


# ---------------------------------------------------------------- atomic save


def test_failed_save_keeps_old_files_and_leaves_no_temporaries(base_model, saved_qv, monkeypatch):
    before = {name: (saved_qv / name).read_bytes() for name in os.listdir(saved_qv)}
    model = lora_model(base_model, target_modules=["q_proj", "v_proj"], dim=4, alpha=8)
    perturb_adapters(model, seed=5)

    import safetensors.torch

    def failing_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        lora_ext.save_adapter(model, saved_qv)
    assert {name: (saved_qv / name).read_bytes() for name in os.listdir(saved_qv)} == before

    monkeypatch.undo()
    lora_ext.save_adapter(model, saved_qv)  # overwriting works and leaves only the two files
    assert sorted(os.listdir(saved_qv)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (saved_qv / "adapter_model.safetensors").read_bytes() != before["adapter_model.safetensors"]
