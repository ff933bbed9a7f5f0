"""torch.compile of a small model whose layers call lora_ext.ops.linear directly.

The model is an embedding followed by a two-layer MLP (frozen nn.Linear bases with LoRA
adapters, 'pre' dropout on the first layer and 'post' on the second). Compiled with
fullgraph=True, dynamic=True it must: match eager (outputs and gradients), have no graph
break, compile once for three sequence lengths, and train with dropout.

Randomness under inductor (measured with torch 2.13 on CPU): the dropout seeds are drawn by
torch.randint inside the graph. With inductor's default fallback_random=False, inductor
generates that randint with its own RNG, so the compiled model draws different seeds (hence
different masks) than eager for the same torch.manual_seed; compiled runs are still
reproducible under torch.manual_seed and draw fresh masks at every step. With
torch._inductor.config.fallback_random=True, or with the aot_eager backend, compiled and
eager draw the same seeds and agree.

Compiles are slow on CPU (an inductor compile of this model takes ~10-20 s on 2 cores), so
each compiled model is a module-scope fixture shared by the tests that use it.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_ext  # noqa: F401  (registers torch.ops.lora.*)
from lora_ext import ops

SEQUENCE_LENGTHS = (5, 9, 14)
BATCH = 3
VOCAB = 41


class TinyLoRAMLP(nn.Module):
    """Embedding -> Linear+LoRA ('pre' dropout) -> GELU -> Linear+LoRA ('post' dropout).

    The bases are plain nn.Linear layers; the first is frozen, the second keeps its weight and
    bias trainable so that compiled backward computes those gradients too. lora_B is random
    (not zero) so that the LoRA path contributes to outputs and gradients from the start.
    """

    def __init__(self, hidden=16, ffn=24, rank=4, alpha=8.0, dropout_pre=0.0, dropout_post=0.0):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, hidden)
        self.up = nn.Linear(hidden, ffn)
        self.down = nn.Linear(ffn, hidden)
        self.up_lora_A = nn.Parameter(torch.randn(rank, hidden) * hidden**-0.5)
        self.up_lora_B = nn.Parameter(torch.randn(ffn, rank) * 0.3)
        self.down_lora_A = nn.Parameter(torch.randn(rank, ffn) * ffn**-0.5)
        self.down_lora_B = nn.Parameter(torch.randn(hidden, rank) * 0.3)
        self.scale = alpha / rank
        self.dropout_pre = dropout_pre
        self.dropout_post = dropout_post
        for frozen in (self.embedding.weight, self.up.weight, self.up.bias):
            frozen.requires_grad_(False)

    def forward(self, tokens):
        # F.embedding on the weight, not self.embedding(tokens): nn.Embedding.forward reads the
        # float attribute norm_type, which makes dynamo restart its first trace (a second compile).
        h = F.embedding(tokens, self.embedding.weight)
        p_pre = self.dropout_pre if self.training else 0.0
        p_post = self.dropout_post if self.training else 0.0
        h = ops.linear(h, self.up.weight, self.up.bias, self.up_lora_A, self.up_lora_B, self.scale, p_pre, "pre")
        h = F.gelu(h)
        return ops.linear(
            h, self.down.weight, self.down.bias, self.down_lora_A, self.down_lora_B, self.scale, p_post, "post"
        )


class CountingBackend:
    """A torch.compile backend that counts the graphs it compiles and delegates to a named backend."""

    def __init__(self, name: str):
        self.name = name
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return torch._dynamo.lookup_backend(self.name)(gm, example_inputs)


class CompiledModel:
    """An eager model, its compiled twin (sharing parameters) and the inductor config it compiles under."""

    def __init__(self, backend_name: str, inductor_config: dict, **model_kwargs):
        torch.manual_seed(0)
        self.model = TinyLoRAMLP(**model_kwargs).train()
        self.backend = CountingBackend(backend_name)
        self.compiled = torch.compile(self.model, backend=self.backend, fullgraph=True, dynamic=True)
        self.inductor_config = inductor_config

    def config(self):
        # Forward and backward graphs compile lazily (at the first call / first backward), so
        # every use runs under the config the model was meant to compile with.
        return torch._inductor.config.patch(**self.inductor_config) if self.inductor_config else contextlib.nullcontext()

    def trainable(self):
        return [p for p in self.model.parameters() if p.requires_grad]


def tokens_of(length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + length)
    return torch.randint(0, VOCAB, (BATCH, length), generator=generator)


def loss_and_grads(fn, params, tokens, rng_seed: int):
    torch.manual_seed(rng_seed)
    y = fn(tokens)
    loss = y.square().mean()
    return y, torch.autograd.grad(loss, params)


def assert_matches(actual, expected, what):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * max(scale, 1.0), msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module", autouse=True)
def clean_dynamo_counters_one_thread():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # Tiny tensors: two OpenMP threads on a busy 2-core machine make each small matmul wait
    # for the other thread (~30 ms measured against ~3 us on one thread); see test_ops.py.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inductor_same_rng():
    """Inductor with fallback_random=True: compiled randint draws the same seeds as eager."""
    return CompiledModel("inductor", {"fallback_random": True}, dropout_pre=0.25, dropout_post=0.0)


@pytest.fixture(scope="module")
def inductor_default_rng():
    """Inductor with its default RNG; dropout on both layers."""
    return CompiledModel("inductor", {}, dropout_pre=0.25, dropout_post=0.25)


@pytest.fixture(scope="module")
def aot_eager_model():
    return CompiledModel("aot_eager", {}, dropout_pre=0.25, dropout_post=0.25)


def _check_matches_eager_without_recompiles(cm: CompiledModel):
    params = cm.trainable()
    graphs_after_first = None
    for i, length in enumerate(SEQUENCE_LENGTHS):
        tokens = tokens_of(length)
        y_eager, grads_eager = loss_and_grads(cm.model, params, tokens, rng_seed=100 + i)
        stance = torch.compiler.set_stance("fail_on_recompile") if i else contextlib.nullcontext()
        with cm.config(), stance:
            y_compiled, grads_compiled = loss_and_grads(cm.compiled, params, tokens, rng_seed=100 + i)
        if i == 0:
            graphs_after_first = cm.backend.graphs
            assert graphs_after_first >= 1
        assert y_compiled.shape == (BATCH, length, 16)
        assert_matches(y_compiled, y_eager, f"output, length {length}")
        for p, g_compiled, g_eager in zip(params, grads_compiled, grads_eager):
            assert_matches(g_compiled, g_eager, f"grad of a {tuple(p.shape)} parameter, length {length}")
    assert cm.backend.graphs == graphs_after_first, "recompiled for a new sequence length"
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


def test_inductor_matches_eager_across_sequence_lengths(inductor_same_rng):
    _check_matches_eager_without_recompiles(inductor_same_rng)


def test_aot_eager_matches_eager_across_sequence_lengths(aot_eager_model):
    _check_matches_eager_without_recompiles(aot_eager_model)


def test_explain_finds_one_graph_and_no_break():
    torch.manual_seed(0)
    model = TinyLoRAMLP(dropout_pre=0.25, dropout_post=0.25).train()
    explanation = torch._dynamo.explain(model)(tokens_of(7))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    lora_calls = [
        node for graph in explanation.graphs for node in graph.graph.nodes
        if node.op == "call_function" and "lora" in str(node.target) and "linear" in str(node.target)
    ]
    assert len(lora_calls) == 2, [str(n.target) for n in lora_calls]


def test_compiled_dropout_reproducible_under_manual_seed_and_fresh_per_step(inductor_default_rng):
    cm = inductor_default_rng
    tokens = tokens_of(SEQUENCE_LENGTHS[0])
    # With grad enabled, as in training: under no_grad dynamo would compile a second graph.
    with cm.config():
        torch.manual_seed(7)
        first = cm.compiled(tokens)
        next_step = cm.compiled(tokens)
        torch.manual_seed(7)
        again = cm.compiled(tokens)
        cm.model.eval()
        without_dropout = cm.model(tokens)
        cm.model.train()
    assert torch.equal(first, again), "torch.manual_seed does not reproduce the compiled dropout"
    assert not torch.equal(first, next_step), "two steps drew the same dropout masks"
    assert not torch.allclose(first, without_dropout), "dropout had no effect"


def test_compiled_training_with_dropout_reduces_loss(inductor_default_rng):
    cm = inductor_default_rng
    params = cm.trainable()
    optimizer = torch.optim.Adam(params, lr=2e-2)
    # Target: a fixed random function of the tokens that the adapters (and the trainable
    # down-projection) can fit better than the initial model.
    torch.manual_seed(1)
    target_table = torch.randn(VOCAB, 16) * 0.5
    losses = []
    graphs_before = None
    with cm.config():
        for step in range(30):
            tokens = tokens_of(SEQUENCE_LENGTHS[step % len(SEQUENCE_LENGTHS)], seed=step)
            loss = (cm.compiled(tokens) - target_table[tokens]).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if step == len(SEQUENCE_LENGTHS) - 1:
                graphs_before = cm.backend.graphs
    assert cm.backend.graphs == graphs_before, "training recompiled"
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, f"loss did not fall: first steps {losses[:5]}, last steps {losses[-5:]}"
    assert not torch._dynamo.utils.counters["graph_break"]
