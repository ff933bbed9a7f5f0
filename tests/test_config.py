"""PeftConfig: defaults, dtype parsing, validation, and the JSON round trip."""
import json

import pytest
import torch

from lora_ext import PeftConfig
from lora_ext.config import parse_dtype


def test_defaults_match_the_seed():
    c = PeftConfig()
    assert c.target_modules == [] and c.exclude_modules == []
    assert c.match_all_linear is False
    assert (c.dim, c.alpha, c.dropout) == (8, 32, 0.0)
    assert c.dropout_position == "post"
    assert c.lora_A_init == "xavier"
    assert c.lora_dtype is None
    assert c.use_triton is False


def test_default_lists_are_not_shared():
    a, b = PeftConfig(), PeftConfig()
    a.target_modules.append("q_proj")
    assert b.target_modules == []


@pytest.mark.parametrize(
    "name, dtype",
    [
        ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("torch.bfloat16", torch.bfloat16),
        ("fp16", torch.float16), ("float16", torch.float16), ("half", torch.float16),
        ("torch.float16", torch.float16),
        ("fp32", torch.float32), ("float32", torch.float32), ("float", torch.float32),
        ("torch.float32", torch.float32), ("BF16", torch.bfloat16),
        ("float64", torch.float64),
    ],
)
def test_parse_dtype_names(name, dtype):
    assert parse_dtype(name) is dtype
    assert PeftConfig(lora_dtype=name).lora_dtype is dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, None])
def test_parse_dtype_passes_dtypes_and_none(dtype):
    assert parse_dtype(dtype) is dtype


@pytest.mark.parametrize("bad", ["int8", "bf17", "", torch.int32, torch.bool, 16])
def test_parse_dtype_rejects(bad):
    with pytest.raises(ValueError, match="lora_dtype"):
        PeftConfig(lora_dtype=bad)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"dim": 0}, "dim"),
        ({"dim": -3}, "dim"),
        ({"dim": 2.5}, "dim"),
        ({"dropout": -0.1}, "dropout"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": 1.5}, "dropout"),
        ({"dropout_position": "middle"}, "dropout_position"),
        ({"lora_A_init": "gaussian"}, "lora_A_init"),
        ({"alpha": "big"}, "alpha"),
        ({"match_all_linear": "yes"}, "match_all_linear"),
        ({"target_modules": [1, 2]}, "target_modules"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        PeftConfig(**kwargs)


def test_edge_values_are_valid():
    c = PeftConfig(dim=1, dropout=0.999, dropout_position="pre", lora_A_init="uniform", alpha=0.5)
    assert c.dim == 1 and c.dropout == 0.999 and c.alpha == 0.5


def test_a_single_string_is_one_pattern():
    assert PeftConfig(target_modules="q_proj").target_modules == ["q_proj"]
    assert PeftConfig(exclude_modules=("a", "b")).exclude_modules == ["a", "b"]


def test_to_dict_is_json_serialisable_with_dtype_name():
    c = PeftConfig(target_modules=["q_proj", "re:.*v_proj"], dim=4, alpha=16, dropout=0.1,
                   dropout_position="pre", lora_A_init="uniform", lora_dtype=torch.bfloat16, use_triton=True)
    d = c.to_dict()
    assert d["lora_dtype"] == "bfloat16"
    text = json.dumps(d)
    assert PeftConfig.from_dict(json.loads(text)) == c


def test_to_dict_is_json_serialisable_with_numpy_numbers():
    """numpy numbers are accepted as integers / reals (numbers.Integral, numbers.Real); to_dict gives
    Python numbers, so json (and save_adapter) can write them."""
    np = pytest.importorskip("numpy")
    c = PeftConfig(target_modules=["q_proj"], dim=np.int64(4), alpha=np.float32(16.5), dropout=np.float64(0.1))
    d = json.loads(json.dumps(c.to_dict()))
    assert (d["dim"], d["alpha"], d["dropout"]) == (4, 16.5, 0.1)
    assert type(PeftConfig(dim=8, alpha=np.int32(32)).to_dict()["alpha"]) is int


@pytest.mark.parametrize("lora_dtype", [None, torch.float32, torch.float16, torch.bfloat16])
def test_round_trip(lora_dtype):
    c = PeftConfig(exclude_modules=["lm_head"], lora_dtype=lora_dtype)
    assert PeftConfig.from_dict(c.to_dict()) == c


def test_to_dict_returns_copies():
    c = PeftConfig(target_modules=["q_proj"])
    c.to_dict()["target_modules"].append("k_proj")
    assert c.target_modules == ["q_proj"]


def test_from_dict_ignores_unknown_keys_and_parses_dtype_strings():
    c = PeftConfig.from_dict({"dim": 16, "lora_dtype": "torch.bfloat16", "peft_type": "LORA", "r": 99})
    assert c.dim == 16 and c.lora_dtype is torch.bfloat16


def test_from_dict_validates():
    with pytest.raises(ValueError, match="dim"):
        PeftConfig.from_dict({"dim": 0})


def test_validate_catches_assignment_after_construction():
    c = PeftConfig()
    c.dropout = 2.0
    with pytest.raises(ValueError, match="dropout"):
        c.validate()
