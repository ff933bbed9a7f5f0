"""The target/exclude pattern rules of SPEC.md section 2."""
import pytest

from lora_ext.matching import compile_patterns, matches, matches_any

FQN = "model.layers.1.self_attn.q_proj"


@pytest.mark.parametrize(
    "pattern",
    ["q_proj", ".q_proj.", "*_proj", "self_attn.q_proj", "layers.1.**", r"re:.*layers\.1\..*q_proj"],
)
def test_spec_examples_that_match(pattern):
    assert matches(pattern, FQN)


@pytest.mark.parametrize("pattern", ["layers.1.*", "layers.10.**", "proj"])
def test_spec_examples_that_do_not_match(pattern):
    assert not matches(pattern, FQN)


@pytest.mark.parametrize(
    "pattern, fqn, expected",
    [
        # the whole name, and a suffix only (never a prefix or a middle part alone)
        ("model.layers.1.self_attn.q_proj", FQN, True),
        ("model", FQN, False),
        ("self_attn", FQN, False),
        ("layers.1", FQN, False),
        # `*` is confined to one part
        ("*", "q_proj", True),
        ("*", FQN, True),  # suffix: the last part
        ("layers.*.self_attn.q_proj", FQN, True),
        ("layers.*.q_proj", FQN, False),
        ("q_*", FQN, True),
        ("*proj*", FQN, True),
        ("q*j", FQN, True),
        ("k_*", FQN, False),
        ("layers.1*.self_attn.q_proj", FQN, True),  # 1* matches "1"
        ("layers.1*.self_attn.q_proj", "model.layers.12.self_attn.q_proj", True),
        ("layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj", False),
        # `**` spans any number of parts, zero included
        ("layers.**.q_proj", FQN, True),
        ("layers.1.**.q_proj", FQN, True),
        ("layers.1.self_attn.**.q_proj", FQN, True),  # zero parts
        ("layers.1.**.**.q_proj", FQN, True),
        ("**", FQN, True),
        ("**.q_proj", FQN, True),
        ("model.**", FQN, True),
        ("model.**.k_proj", FQN, False),
        ("layers.**.mlp.**", FQN, False),
        ("layers.1.**", "model.layers.1", True),  # `**` may be empty at the end too
        ("a.**.b.**.c", "x.a.1.b.2.3.c", True),
        ("a.**.b.**.c", "x.a.1.c.2.3.b", False),
        # a `*` inside a `**`-like part is just a glob
        ("layers.**x.q_proj", FQN, False),
        # dots at the ends are ignored, inside they separate parts
        ("..q_proj..", FQN, True),
        (".self_attn.q_proj", FQN, True),
        # special regex characters in a glob are literal
        ("q.proj", "model.q_proj", False),
        ("q+proj", "model.q+proj", True),
        ("q?proj", "model.q_proj", False),
        # regex: must match the whole FQN
        ("re:q_proj", FQN, False),
        ("re:.*q_proj", FQN, True),
        (r"re:model\.layers\.\d+\.self_attn\.(q|k)_proj", FQN, True),
        (r"re:model\.layers\.\d+\.self_attn\.(q|k)_proj", "model.layers.1.self_attn.v_proj", False),
        ("re:.*layers.1", FQN, False),
        # the root module has an empty name
        ("q_proj", "", False),
        ("**", "", True),
        ("re:", "", True),
    ],
)
def test_pattern_rules(pattern, fqn, expected):
    assert matches(pattern, fqn) is expected


@pytest.mark.parametrize("bad", ["", ".", "...", "a..b", "re:(unclosed"])
def test_malformed_patterns_raise(bad):
    with pytest.raises(ValueError, match="pattern"):
        matches(bad, FQN)


def test_non_string_pattern_raises():
    with pytest.raises(ValueError, match="string"):
        matches(["q_proj"], FQN)


def test_any_of_several_patterns():
    assert matches_any(["k_proj", "q_proj"], FQN)
    assert not matches_any(["k_proj", "v_proj"], FQN)
    assert not matches_any([], FQN)


def test_compile_patterns_fails_up_front():
    with pytest.raises(ValueError):
        compile_patterns(["q_proj", "a..b"])


def test_many_double_stars_stay_fast():
    # Dynamic programming: a backtracking matcher would take exponential time here.
    pattern = ".".join(["**"] * 30 + ["nomatch"])
    fqn = ".".join(["p"] * 200)
    assert not matches(pattern, fqn)
