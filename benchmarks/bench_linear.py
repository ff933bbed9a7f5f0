"""One LoRA linear layer, side by side with its peers: time and extra memory (issue 4, item 1).

Providers (one run times them all, so ratios are same-run ratios):
  base              frozen nn.Linear: the floor every ratio divides by
  full              trainable nn.Linear (full fine-tuning: also computes grad_weight)
  peft              PEFT's LoRA layer (peft.tuners.lora.Linear from get_peft_model), eager
  peft_compile      the same layer under torch.compile
  lora_ext          lora_ext.LinearLoRA (backend "auto", i.e. LORA_EXT_BACKEND or lora_ext's choice)
  lora_ext_triton   lora_ext.TritonLinearLoRA (the Triton kernels)
  lora_ext_native   LinearLoRA with lora_backend = "native" (the CUDA C++ / ATen path)
  lora_ext_compile  LinearLoRA under torch.compile (not in the default set)
Modes:
  fwd       training forward (x requires grad; autograd records the graph), M tokens
  fwd+bwd   forward + torch.autograd.grad of x and the trainable tensors for a random
            grad_out (base frozen, x requiring grad as in a middle layer); also the peak
            memory of one such step over what was allocated before it
  decode    inference forward (eval mode, torch.no_grad) at small M
Timing: triton.testing.do_bench median (which flushes L2 between calls) for fwd and
fwd+bwd; decode runs calls back to back between two CUDA events (steady-state eager
cost: the CPU launch overhead shows, as it does in a decode loop). On CUDA the providers of
DEVICE_TIME_PROVIDERS are also timed as a CUDA graph of the call, replayed with L2 flushed
(bench_common.gpu_us; --no-device-time skips it): the device's time without the host's launch
path, in its own table next to do_bench ÷ that time, so that a row where the host may have
issued the call slower than the GPU ran it (the small k/v layer is the suspect) says so. Inputs rotate among
three random sets; adapters are random and non-zero. Before timing, every provider's
output and gradients are compared with the float64 reference (lora_ext/reference.py).

Outputs in --out (default benchmarks/): bench_linear.csv (written row by row, so a run
cut short keeps what it measured), bench_linear.meta.json, bench_linear.md (tables) and
bench_linear.png (ratio to base per provider; needs matplotlib). --results-md writes the
tables into benchmarks/RESULTS.md; --from-csv renders CSVs of earlier runs (e.g. fetched
from the GPU machine, or several partial runs) without running anything.

    python benchmarks/bench_linear.py --device cpu --quick          # logic check on CPU
    python benchmarks/bench_linear.py --out $OUT                     # full sweep on a GPU
    python benchmarks/bench_linear.py --from-csv run1.csv run2.csv --results-md
"""
from __future__ import annotations

import argparse
import csv
import gc
import itertools
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

import bench_common as common

common.ensure_repo_on_path()
import lora_ext  # noqa: E402
from lora_ext import ops as lora_ops  # noqa: E402
from lora_ext.reference import lora_linear_reference  # noqa: E402

# Llama-3-8B's linear layers, K x N (in_features x out_features).
SHAPES = {
    "qo": (4096, 4096),
    "kv": (4096, 1024),
    "gate_up": (4096, 14336),
    "down": (14336, 4096),
}
# The same roles, 64x smaller, for a logic check on CPU.
CPU_SHAPES = {name: (max(K // 64, 8), max(N // 64, 8)) for name, (K, N) in SHAPES.items()}
ALL_PROVIDERS = ("base", "full", "peft", "peft_compile", "lora_ext", "lora_ext_triton", "lora_ext_native",
                 "lora_ext_compile")
DEFAULT_PROVIDERS = ALL_PROVIDERS[:-1]
LORA_PROVIDERS = tuple(p for p in ALL_PROVIDERS if p not in ("base", "full"))
DECODE_PROVIDERS = tuple(p for p in ALL_PROVIDERS if p != "full")  # full == base in inference
COMPILED = ("peft_compile", "lora_ext_compile")
N_INPUT_SETS = 3
# Timed a second time as a replayed CUDA graph (fwd and fwd+bwd, CUDA only): the ratio the targets
# are read against next to the do_bench one, which includes the host's launch path where it is longer.
DEVICE_TIME_PROVIDERS = ("base", "lora_ext")
# device_ms, started and ended last: CSVs of earlier runs, without them, still render. started / ended: the local
# wall time (nvidia-smi's timestamp format) when a row's timing began (its warm-up calls) and ended (its device
# time), so that a clock sampled over the run (scripts/h200_run.sh CLOCK_LOG_MS) can be read over each row.
CSV_FIELDS = ["mode", "shape", "M", "K", "N", "r", "dropout", "provider", "ms", "peak_mib", "rel_err", "note",
              "device_ms", "started", "ended"]
# bf16 operands land between 1e-3 and 1e-2 (METHOD.md); fp32 far below.
REL_ERR_LIMIT = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-4}


@dataclass
class Provider:
    fn: Callable  # x -> y
    params: list  # trainable tensors whose gradients fwd+bwd computes (besides x)
    kind: str  # "base", "full" or "lora": which reference it is checked against
    backend: Optional[str] = None  # lora_ext backend, for the seeded dropout check
    note: str = ""


@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    alpha: float
    dropout_position: str
    peft_fp32_adapters: bool
    warmup_ms: float
    rep_ms: float
    check: bool
    notes: dict = field(default_factory=dict)  # provider -> why it was skipped
    device_time: bool = False  # also time DEVICE_TIME_PROVIDERS as a replayed CUDA graph


# ---------------------------------------------------------------------------
# Building the layers
# ---------------------------------------------------------------------------


class OneLinear(nn.Module):
    """A model with one Linear named `proj`, for get_peft_model."""

    def __init__(self, proj: nn.Linear):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def peft_import_error() -> Optional[str]:
    try:
        import peft  # noqa: F401
    except Exception as e:  # ImportError, or a peft/transformers version clash
        return f"peft not importable ({type(e).__name__}: {e})"
    return None


def available_providers(requested, device: torch.device) -> tuple[list, dict]:
    """The requested providers that can run here, and a note for each one skipped."""
    skipped = {}
    peft_error = peft_import_error()
    for name in requested:
        if name.startswith("peft") and peft_error:
            skipped[name] = peft_error
        if device.type == "cuda":
            from lora_ext.kernels import cuda_dispatch

            # Without the backend, cuda_dispatch would silently run the other one.
            if name == "lora_ext_triton" and not cuda_dispatch.triton_available():
                skipped[name] = "triton is not installed"
            if name == "lora_ext_native" and not cuda_dispatch.native_available():
                skipped[name] = "lora_ext was built without CUDA (lora_ext._C.has_cuda() is False)"
        if name == "lora_ext_native" and not hasattr(lora_ext.LinearLoRA, "lora_backend"):
            skipped[name] = "LinearLoRA has no lora_backend attribute"
    # In ALL_PROVIDERS order, whatever order they were asked in: tables and plots stay comparable.
    return [n for n in ALL_PROVIDERS if n in requested and n not in skipped], skipped


def make_peft_layer(base: nn.Linear, r, alpha, p, A, B, fp32_adapters: bool) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, target_modules=["proj"], bias="none")
    # autocast_adapter_dtype=False keeps the adapters in the base's dtype (as lora_ext
    # does by default); PEFT's own default would make them float32 for a bf16 base.
    model = get_peft_model(OneLinear(base), config, autocast_adapter_dtype=fp32_adapters)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    return layer


def make_lora_ext_layer(base: nn.Linear, r, alpha, p, position, A, B, backend: str) -> nn.Module:
    cls = lora_ext.TritonLinearLoRA if backend == "triton" else lora_ext.LinearLoRA
    layer = cls(base, dim=r, alpha=alpha, dropout=p, dropout_position=position)
    if backend == "native":
        layer.lora_backend = "native"  # instance attribute over the class's "auto"
    with torch.no_grad():
        layer.lora_A.weight.copy_(A)
        layer.lora_B.weight.copy_(B)
    return layer


def build_providers(names, base: nn.Linear, r, p, A, B, s: Settings, training: bool) -> dict:
    """{name: Provider}; every LoRA layer wraps `base`'s own weight and holds copies of A and B."""
    providers = {}
    peft_layer = lora_layer = None
    for name in names:
        if name == "base":
            providers[name] = Provider(base, [], "base")
        elif name == "full":
            full = nn.Linear(base.in_features, base.out_features, bias=False, device=s.device, dtype=s.dtype)
            with torch.no_grad():
                full.weight.copy_(base.weight)
            providers[name] = Provider(full, [full.weight], "full")
        elif name in ("peft", "peft_compile"):
            if peft_layer is None:
                peft_layer = make_peft_layer(base, r, s.alpha, p, A, B, s.peft_fp32_adapters).train(training)
            layer = peft_layer if name == "peft" else torch.compile(peft_layer, dynamic=False)
            params = [peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight]
            providers[name] = Provider(layer, params, "lora")
        else:
            backend = {"lora_ext": "auto", "lora_ext_triton": "triton", "lora_ext_native": "native",
                       "lora_ext_compile": "auto"}[name]
            if name == "lora_ext_compile":
                if lora_layer is None:
                    lora_layer = make_lora_ext_layer(base, r, s.alpha, p, s.dropout_position, A, B, "auto")
                layer, eager = torch.compile(lora_layer.train(training), dynamic=False), lora_layer
            else:
                layer = eager = make_lora_ext_layer(base, r, s.alpha, p, s.dropout_position, A, B, backend)
                layer.train(training)
                if name == "lora_ext":
                    lora_layer = layer
            providers[name] = Provider(layer, [eager.lora_A.weight, eager.lora_B.weight], "lora", backend)
    return providers


# ---------------------------------------------------------------------------
# Correctness, against the float64 reference
# ---------------------------------------------------------------------------


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if ref.numel() == 0:
        return 0.0
    err = ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()
    return err if math.isfinite(err) else float("inf")


class References:
    """Float64 outputs and gradients (dropout off) for one config and M, computed once for all providers."""

    def __init__(self, x, grad_out, weight, A, B, scale):
        self.x, self.grad_out, self.weight, self.A, self.B, self.scale = x, grad_out, weight, A, B, scale
        self._cache = {}

    def get(self, kind):
        if kind not in self._cache:
            x64, w64, A64, B64 = (t.detach().double().requires_grad_(True)
                                  for t in (self.x, self.weight, self.A, self.B))
            if kind == "lora":
                ref = lora_linear_reference(x64, w64, None, A64, B64, self.scale)
                wrt = [x64, A64, B64]
            else:
                ref = x64 @ w64.t()
                wrt = [x64] if kind == "base" else [x64, w64]
            grads = torch.autograd.grad(ref, wrt, self.grad_out.double())
            self._cache[kind] = (ref.detach(), *grads)
        return self._cache[kind]


def check_provider(prov: Provider, refs: References) -> float:
    """Largest relative error of y and every gradient (dropout off) vs float64."""
    x = refs.x.detach().clone().requires_grad_(True)
    y = prov.fn(x)
    grads = torch.autograd.grad(y, [x, *prov.params], refs.grad_out)
    return max(relative_error(o, e) for o, e in zip((y, *grads), refs.get(prov.kind)))


def check_seeded_dropout(prov: Provider, x_full, grad_out_full, weight, A, B, scale, p, position,
                         rows: int = 16) -> float:
    """lora_ext with dropout at a fixed seed vs the reference's mask.

    The reference's numpy Philox is too slow for M x 14336 masks, so: (1) a `rows`-row
    input, output and every gradient vs the reference; (2) the full-M input with the same
    seed, whose first `rows` rows have the same mask indices, so their y and grad_x rows
    must match the same reference (this checks the large-M kernels' mask too).
    """
    seed = torch.tensor([20261128], dtype=torch.int64, device=weight.device)

    def run(x, grad_out):
        x = x.detach().clone().requires_grad_(True)
        A_, B_ = A.detach().clone().requires_grad_(True), B.detach().clone().requires_grad_(True)
        y = lora_ops.linear(x, weight, None, A_, B_, scale, p, position, seed, backend=prov.backend)
        return (y, *torch.autograd.grad(y, [x, A_, B_], grad_out))

    x_small, grad_small = x_full[:rows], grad_out_full[:rows]
    x64, A64, B64 = (t.detach().double().requires_grad_(True) for t in (x_small, A, B))
    ref = lora_linear_reference(x64, weight.double(), None, A64, B64, scale, p, position, seed)
    ref_all = (ref, *torch.autograd.grad(ref, [x64, A64, B64], grad_small.double()))
    small = run(x_small, grad_small)
    errors = [relative_error(o, e) for o, e in zip(small, ref_all)]
    y_full, dx_full, _, _ = run(x_full, grad_out_full)
    errors += [relative_error(y_full[:rows], ref_all[0]), relative_error(dx_full[:rows], ref_all[1])]
    return max(errors)


# ---------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_call(mode, prov: Provider, xs, grad_out):
    inputs = itertools.cycle(xs)
    if mode == "fwd":
        return lambda: prov.fn(next(inputs))
    if mode == "decode":
        def decode():
            with torch.no_grad():
                return prov.fn(next(inputs))
        return decode

    def fwd_bwd():
        x = next(inputs)
        return torch.autograd.grad(prov.fn(x), [x, *prov.params], grad_out)

    return fwd_bwd


def _do_bench_median(fn, warmup_ms, rep_ms) -> float:
    import triton.testing

    try:
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    except TypeError:  # a triton without return_mode
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5]))


def _events_median(fn, warmup_ms, rep_ms, calls_per_sample: int) -> float:
    """Median ms per call over samples of `calls_per_sample` back-to-back calls between CUDA events."""
    fn()
    torch.cuda.synchronize()
    per_sample_ms = max(common.cuda_events_ms(fn, calls_per_sample) * calls_per_sample, 1e-3)
    n_warmup = max(1, int(warmup_ms / per_sample_ms))
    n_samples = max(5, int(rep_ms / per_sample_ms))
    for _ in range(n_warmup):
        fn()
    return statistics.median(common.cuda_events_ms(fn, calls_per_sample) for _ in range(n_samples))


def _cpu_median(fn, warmup_ms, rep_ms) -> float:
    fn()
    samples = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(samples) < 5 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def time_ms(fn, mode, s: Settings, have_triton: bool) -> float:
    if s.device.type != "cuda":
        return _cpu_median(fn, s.warmup_ms, s.rep_ms)
    if mode == "decode":
        # Back to back: do_bench's L2 flush before each call would hide the CPU's launch time.
        return _events_median(fn, s.warmup_ms, s.rep_ms, calls_per_sample=20)
    if have_triton:
        return _do_bench_median(fn, s.warmup_ms, s.rep_ms)
    return _events_median(fn, s.warmup_ms, s.rep_ms, calls_per_sample=1)


def graph_device_ms(fn, what: str) -> tuple[Optional[float], str]:
    """(fn's device time in ms, replayed as a CUDA graph with L2 flushed (bench_common.gpu_us), "") or,
    where capturing it fails, (None, why): not fatal, the do_bench row stands without it."""
    try:
        return common.gpu_us(fn) / 1e3, ""
    except Exception as e:
        why = f"no device time (CUDA graph): {type(e).__name__}: {e}".replace("\n", " ")[:200]
        print(f"  !! {what}: {why}", flush=True)
        return None, why
    finally:
        torch.cuda.empty_cache()  # the graph (freed when gpu_us returns) leaves its pool's blocks cached


def peak_memory_mib(fn, device) -> Optional[float]:
    """Peak bytes (MiB) allocated by one call beyond what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return peak / 2**20


def measure_ceilings(device, s: Settings, have_triton: bool) -> str:
    """The card's two rates as this run finds them: a 1 GiB device copy and an 8192^3 bf16 GEMM."""
    n = 2**29  # bf16 elements: 1 GiB
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), "fwd", s, have_triton)
    del src, dst
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    gemm_ms = time_ms(lambda: a @ b, "fwd", s, have_triton)
    del a, b
    torch.cuda.empty_cache()
    tbps = 2 * n * 2 / (copy_ms * 1e-3) / 1e12
    tflops = 2 * 8192**3 / (gemm_ms * 1e-3) / 1e12
    return (f"device copy {tbps:.2f} TB/s (bytes read + written, 1 GiB bf16), "
            f"bf16 GEMM 8192³ {tflops:.0f} TFLOP/s (random data)")


# ---------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------


@dataclass
class Config:
    mode_set: str  # "train" (fwd and fwd+bwd) or "decode"
    shape: str
    K: int
    N: int
    r: int
    dropout: float
    Ms: tuple  # one M for train, several for decode


def plan(args, shapes, device) -> list:
    configs = []
    if "train" in args.modes:
        for shape, r, p in itertools.product(args.shapes, args.ranks, args.dropouts):
            K, N = shapes[shape]
            configs.append(Config("train", shape, K, N, r, p, (args.m,)))
    if "decode" in args.modes:
        for shape, r in itertools.product(args.shapes, args.decode_ranks):
            K, N = shapes[shape]
            configs.append(Config("decode", shape, K, N, r, 0.0, tuple(args.decode_m)))
    return configs


def estimate_seconds(cfg: Config, providers, s: Settings) -> float:
    """A rough guess (GPU: compile ~10 s per compiled layer and mode set; a measurement ~rep+warmup+50 ms)."""
    per_measure = (s.warmup_ms + s.rep_ms) / 1e3 + 0.05
    n_compiled = sum(p in COMPILED for p in providers)
    if cfg.mode_set == "train":
        # gpu_us, per mode: two do_bench_cudagraph runs (each a capture and ~10 replays of a ~30 ms graph).
        n_graphed = sum(p in DEVICE_TIME_PROVIDERS for p in providers) if s.device_time else 0
        return len(providers) * (2 * per_measure + 0.1) + n_graphed * 2 * 1.0 + n_compiled * 10.0 + 1.0
    return len(cfg.Ms) * (len(providers) * per_measure + n_compiled * 3.0) + 0.5


def random_adapters(K, N, r, s: Settings):
    # Scaled like trained adapters (so y's LoRA term is a modest correction), never zero.
    A = torch.randn(r, K, device=s.device, dtype=s.dtype) * K ** -0.5
    B = torch.randn(N, r, device=s.device, dtype=s.dtype) * r ** -0.5
    return A, B


def run_config(cfg: Config, provider_names, s: Settings, writer, have_triton) -> list:
    """Builds, checks and times every provider for one configuration; returns (and writes) its rows."""
    torch._dynamo.reset()  # fresh compile caches: every config compiles its own layers
    rows = []
    base = nn.Linear(cfg.K, cfg.N, bias=False, device=s.device, dtype=s.dtype)
    with torch.no_grad():
        base.weight.normal_(0, cfg.K ** -0.5)
    base.weight.requires_grad_(False)
    A, B = random_adapters(cfg.K, cfg.N, cfg.r, s)
    scale = s.alpha / cfg.r
    training = cfg.mode_set == "train"
    names = [n for n in provider_names if training or n in DECODE_PROVIDERS]
    providers = build_providers(names, base, cfg.r, cfg.dropout, A, B, s, training)

    def emit(mode, M, name, ms, peak=None, err=None, note="", device_ms=None, started=None, ended=None):
        row = dict(mode=mode, shape=cfg.shape, M=M, K=cfg.K, N=cfg.N, r=cfg.r, dropout=cfg.dropout,
                   provider=name, ms=ms, peak_mib=peak, rel_err=err, note=note, device_ms=device_ms,
                   started=started, ended=ended)
        rows.append(row)
        writer.writerow(common.csv_cells(row))

    limit = REL_ERR_LIMIT.get(s.dtype, 3e-2)
    for M in cfg.Ms:
        requires_grad = training
        xs = [torch.randn(M, cfg.K, device=s.device, dtype=s.dtype, requires_grad=requires_grad)
              for _ in range(N_INPUT_SETS)]
        grad_out = torch.randn(M, cfg.N, device=s.device, dtype=s.dtype)
        errors = {}
        refs = References(xs[0], grad_out, base.weight, A, B, scale)
        for name, prov in providers.items():
            err, note = None, ""
            try:
                if s.check and training and cfg.dropout == 0.0:
                    err = check_provider(prov, refs)
                elif s.check and training and prov.backend is not None and name != "lora_ext_compile":
                    err = check_seeded_dropout(prov, xs[0], grad_out, base.weight, A, B, scale, cfg.dropout,
                                               s.dropout_position)
            except Exception as e:  # report and go on: one broken provider must not end the run
                err, note = float("inf"), f"check failed: {type(e).__name__}: {e}".replace("\n", " ")[:300]
            if err is not None and not err <= limit:
                note = note or f"WRONG: relative error {err:.2e} > {limit:.0e}"
                print(f"  !! {cfg.shape} M={M} r={cfg.r} p={cfg.dropout} {name}: {note}", flush=True)
            errors[name] = (err, note)

        modes = ("fwd", "fwd+bwd") if training else ("decode",)
        for mode in modes:
            for name, prov in providers.items():
                err, note = errors[name]
                call = make_call(mode, prov, xs if training else [x.detach() for x in xs], grad_out)
                started = common.local_timestamp()
                try:
                    for _ in range(3):  # compile / autotune / first-call work stays out of the timings
                        out = call()
                    del out
                    ms = time_ms(call, mode, s, have_triton)
                    peak = peak_memory_mib(call, s.device) if mode == "fwd+bwd" else None
                except Exception as e:
                    ms, peak = None, None
                    note = f"failed: {type(e).__name__}: {e}".replace("\n", " ")[:300]
                    print(f"  !! {cfg.shape} M={M} r={cfg.r} p={cfg.dropout} {mode} {name}: {note}", flush=True)
                device_ms = None
                if s.device_time and training and ms is not None and name in DEVICE_TIME_PROVIDERS:
                    device_ms, why = graph_device_ms(call, f"{cfg.shape} M={M} r={cfg.r} p={cfg.dropout} {mode} {name}")
                    if why:
                        # Not again in this run: a failed capture may leave the process's graph state unclean.
                        s.device_time = False
                        note = "; ".join(n for n in (note, why) if n)
                emit(mode, M, name, ms, peak, err, note, device_ms, started, common.local_timestamp())
        del xs, grad_out, refs
    del providers, base
    gc.collect()
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------
# Rendering: markdown tables and the plot
# ---------------------------------------------------------------------------


def _index(rows):
    """{(mode, shape, M, r, dropout): {provider: row}}."""
    table = {}
    for row in rows:
        key = (row["mode"], row["shape"], int(row["M"]), int(row["r"]), float(row["dropout"]))
        table.setdefault(key, {})[row["provider"]] = row
    return table


def _num(value) -> Optional[float]:
    if value in (None, ""):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _ratio(rows_by_provider, name, mode_key="ms"):
    row, base = rows_by_provider.get(name), rows_by_provider.get("base")
    if row is None or base is None:
        return None
    num, den = _num(row.get(mode_key)), _num(base.get(mode_key))
    return num / den if num is not None and den else None


def _cell(value, fmt="{:.2f}", wrong=False):
    if value is None:
        return "—"
    return fmt.format(value) + (" ✗" if wrong else "")


def _is_wrong(row) -> bool:
    return bool(row) and (str(row.get("note", "")).startswith(("WRONG", "check failed", "failed")))


def render_markdown(rows, providers_present) -> str:
    table = _index(rows)
    parts = []
    lora_like = [p for p in providers_present if p != "base"]
    train_keys = sorted({(k[1], k[2], k[3], k[4]) for k in table if k[0] in ("fwd", "fwd+bwd")},
                        key=lambda k: (list(SHAPES).index(k[0]) if k[0] in SHAPES else 99, k[2], k[3]))
    if train_keys:
        headers = ["K×N (role)", "M", "r", "dropout", "base ms fwd / fwd+bwd"] + [
            f"{p} fwd / fwd+bwd" for p in lora_like] + ["lora_ext (auto, else native) ÷ best PEFT fwd / fwd+bwd"]
        lines = []
        for shape, M, r, p in train_keys:
            fwd, fb = table.get(("fwd", shape, M, r, p), {}), table.get(("fwd+bwd", shape, M, r, p), {})
            any_row = next(iter((fwd or fb).values()))
            base_cell = f"{_cell(_num(fwd.get('base', {}).get('ms')), '{:.3f}')} / " \
                        f"{_cell(_num(fb.get('base', {}).get('ms')), '{:.3f}')}"
            cells = []
            for name in lora_like:
                cells.append(f"{_cell(_ratio(fwd, name), wrong=_is_wrong(fwd.get(name)))} / "
                             f"{_cell(_ratio(fb, name), wrong=_is_wrong(fb.get(name)))}")
            vs_peft = []
            for rows_m in (fwd, fb):
                # 'lora_ext' (backend auto); else native, which auto picks on CUDA (README).
                ours_name = "lora_ext" if "lora_ext" in rows_m else "lora_ext_native"
                ours = _num(rows_m.get(ours_name, {}).get("ms"))
                peers = [_num(rows_m.get(n, {}).get("ms")) for n in ("peft", "peft_compile")]
                peers = [t for t in peers if t is not None]
                vs_peft.append(_cell(ours / min(peers)) if ours is not None and peers else "—")
            lines.append([f"{any_row['K']}×{any_row['N']} ({shape})", M, r, p, base_cell] + cells
                         + [" / ".join(vs_peft)])
        parts.append("### Time, ratio to the frozen base (same run)\n\n" + common.markdown_table(headers, lines))

        device_table = render_device_time(table, train_keys)
        if device_table:
            parts.append(device_table)

        mem_headers = ["K×N (role)", "r", "dropout", "base peak MiB"] + [f"{p} extra MiB" for p in lora_like]
        mem_lines = []
        for shape, M, r, p in train_keys:
            fb = table.get(("fwd+bwd", shape, M, r, p), {})
            base_peak = _num(fb.get("base", {}).get("peak_mib"))
            if base_peak is None:
                continue
            any_row = next(iter(fb.values()))
            cells = []
            for name in lora_like:
                peak = _num(fb.get(name, {}).get("peak_mib"))
                cells.append(_cell(peak - base_peak, "{:+.1f}") if peak is not None else "—")
            mem_lines.append([f"{any_row['K']}×{any_row['N']} ({shape})", r, p, f"{base_peak:.0f}"] + cells)
        if mem_lines:
            parts.append("### Peak memory of one fwd+bwd, extra over the frozen base\n\n"
                         + common.markdown_table(mem_headers, mem_lines))

    decode_keys = sorted({(k[1], k[2], k[3]) for k in table if k[0] == "decode"},
                         key=lambda k: (list(SHAPES).index(k[0]) if k[0] in SHAPES else 99, k[1], k[2]))
    if decode_keys:
        dec_providers = [p for p in lora_like if p in DECODE_PROVIDERS]
        headers = ["K×N (role)", "M", "r", "base ms"] + [f"{p}" for p in dec_providers]
        lines = []
        for shape, M, r in decode_keys:
            d = table[("decode", shape, M, r, 0.0)]
            any_row = next(iter(d.values()))
            lines.append([f"{any_row['K']}×{any_row['N']} ({shape})", M, r,
                          _cell(_num(d.get("base", {}).get("ms")), "{:.4f}")]
                         + [_cell(_ratio(d, n), wrong=_is_wrong(d.get(n))) for n in dec_providers])
        parts.append("### Decode (eval, no_grad, back-to-back calls), ratio to the frozen base\n\n"
                     + common.markdown_table(headers, lines))
    failures = [r for r in rows if _is_wrong(r)]
    if failures:
        parts.append("### Problems\n\n" + "\n".join(
            f"- {r['mode']} {r['shape']} M={r['M']} r={r['r']} p={r['dropout']} {r['provider']}: {r['note']}"
            for r in failures))
    return "\n\n".join(parts)


def _timed_over_device(row) -> Optional[float]:
    """A row's do_bench time over its own device time, or None where either is missing."""
    timed, device = _num((row or {}).get("ms")), _num((row or {}).get("device_ms"))
    return timed / device if timed is not None and device else None


def render_device_time(table, train_keys) -> Optional[str]:
    """The table of device times (CUDA graph replay), or None where no row has one: each lora-like
    provider of DEVICE_TIME_PROVIDERS as a ratio to the base's device time, and do_bench over the device
    time for the base and for it. A device-bound call reads about 0.9-1.0 there (sustained graph replays
    ran a few percent slower than do_bench's single calls on the H200: qo fwd+bwd 0.92-0.98, 12-05 05:10);
    well above ~1.15 the host's launch path, not the GPU, set the do_bench time."""
    names = [p for p in DEVICE_TIME_PROVIDERS if p != "base"]
    # The frozen base is the same layer at every rank and dropout of a shape, yet its fwd+bwd graph's device
    # time moved ~5% between the rows of one run (H100, 12-06 15:55: gate/up 2.61-2.74 ms, its forward
    # 1.379-1.383): the median over the shape's rows is a steadier denominator beside the same-row one.
    base_times = {}
    for shape, M, r, p in train_keys:
        for mode in ("fwd", "fwd+bwd"):
            value = _num(table.get((mode, shape, M, r, p), {}).get("base", {}).get("device_ms"))
            if value is not None:
                base_times.setdefault((mode, shape, M), []).append(value)
    median_base = {key: statistics.median(values) for key, values in base_times.items()}
    lines = []
    for shape, M, r, p in train_keys:
        fwd, fb = table.get(("fwd", shape, M, r, p), {}), table.get(("fwd+bwd", shape, M, r, p), {})
        base_ms = [_num(rows.get("base", {}).get("device_ms")) for rows in (fwd, fb)]
        if all(v is None for v in base_ms):
            continue
        any_row = next(iter((fwd or fb).values()))
        cells = [" / ".join(_cell(_timed_over_device(rows.get("base"))) for rows in (fwd, fb))]
        for name in names:
            cells.append(" / ".join(_cell(_ratio(rows, name, "device_ms")) for rows in (fwd, fb)))
            cells.append(" / ".join(_cell(_timed_over_device(rows.get(name))) for rows in (fwd, fb)))
        for name in names:
            over_median = []
            for mode, rows in (("fwd", fwd), ("fwd+bwd", fb)):
                value, base = _num(rows.get(name, {}).get("device_ms")), median_base.get((mode, shape, M))
                over_median.append(value / base if value is not None and base else None)
            cells.append(" / ".join(_cell(v) for v in over_median))
        lines.append([f"{any_row['K']}×{any_row['N']} ({shape})", M, r, p,
                      " / ".join(_cell(v, "{:.3f}") for v in base_ms)] + cells)
    if not lines:
        return None
    headers = ["K×N (role)", "M", "r", "dropout", "base device ms fwd / fwd+bwd",
               "base do_bench ÷ its device time fwd / fwd+bwd"]
    for name in names:
        headers += [f"{name} device ÷ base device fwd / fwd+bwd", f"{name} do_bench ÷ its device time fwd / fwd+bwd"]
    headers += [f"{name} device ÷ the shape's median base device fwd / fwd+bwd" for name in names]
    return ("### Device time (the call as a CUDA graph, L2 flushed), ratio to the frozen base's\n\n"
            "do_bench ÷ device time: ~0.9–1.0 where the GPU sets the time (sustained graph replays run a few percent "
            "slower); well above ~1.15, the host issued the call slower than the GPU ran it, by more than the "
            "head start do_bench's L2 flush gives it (in a training step other layers' device work can hide that "
            "host time too). The last column divides by the median of the base's device times over the shape's "
            "rows in this run (the same frozen layer at every rank and dropout), which moves less from row to row "
            "than the base measured beside each row.\n\n"
            + common.markdown_table(headers, lines))


def render_plot(rows, providers_present, path) -> Optional[str]:
    """PNG of the ratio to base per provider; returns a note instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"no plot: matplotlib not importable ({type(e).__name__}: {e})"
    table = _index(rows)
    panels = [m for m in ("fwd", "fwd+bwd", "decode") if any(k[0] == m for k in table)]
    if not panels:
        return "no plot: no rows"
    names = [p for p in providers_present if p != "base"]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(10, 0.5 * len(table) // len(panels) * 1.5 + 4),
                                                       4.2 * len(panels)), squeeze=False)
    for ax, mode in zip(axes[:, 0], panels):
        keys = sorted((k for k in table if k[0] == mode),
                      key=lambda k: (list(SHAPES).index(k[1]) if k[1] in SHAPES else 99, k[2], k[3], k[4]))
        labels = [f"{k[1]}\nM{k[2]} r{k[3]}" + (f" p{k[4]:g}" if mode != "decode" else "") for k in keys]
        shown = [n for n in names if any(_ratio(table[k], n) for k in keys)]
        width = 0.8 / max(1, len(shown))
        for i, name in enumerate(shown):
            values = [_ratio(table[k], name) or float("nan") for k in keys]
            # One colour per provider across panels.
            color = plt.get_cmap("tab10")(ALL_PROVIDERS.index(name) % 10)
            ax.bar([j + i * width for j in range(len(keys))], values, width, label=name, color=color)
        for level, style in ((1.0, "-"), (1.05, ":"), (1.10, "--")):
            ax.axhline(level, color="black", linestyle=style, linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("time / frozen base")
        ax.set_title(mode)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
        ax.grid(axis="y", which="both", linewidth=0.3)
        ax.set_xticklabels(labels, fontsize=7)
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    meta = {"date": common.utc_now(), "command": common.command_line(), "torch": torch.__version__}
    try:
        import triton

        meta["triton"] = triton.__version__
    except Exception:
        meta["triton"] = "not installed"
    try:
        import peft

        meta["peft"] = peft.__version__
    except Exception:
        meta["peft"] = "not installed"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["device"] = f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)"
        meta["cuda"] = torch.version.cuda
    else:
        meta["device"] = common.cpu_description()
    meta["lora_ext_cuda_built"] = bool(getattr(lora_ext._C, "has_cuda", lambda: False)())
    meta["LORA_EXT_BACKEND"] = os.environ.get("LORA_EXT_BACKEND", "")
    return meta


def section_text(meta_list, rows, providers_present, elapsed_note="") -> str:
    meta = meta_list[0]
    commands = "; ".join(f"`{m['command']}`" for m in meta_list)
    lines = [
        "## One LoRA linear layer vs its peers (`bench_linear.py`)",
        "",
        f"- date: {meta['date']}; device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, "
        f"peft {meta['peft']}; lora_ext built with CUDA: {meta['lora_ext_cuda_built']}"
        + (f"; LORA_EXT_BACKEND={meta['LORA_EXT_BACKEND']}" if meta.get("LORA_EXT_BACKEND") else ""),
        f"- command(s): {commands}{elapsed_note}",
        f"- ceilings measured in the run: {meta.get('ceilings', 'not measured')}",
        f"- {meta.get('settings', '')}",
        f"- timing: {meta.get('timer', '?')}. fwd+bwd: base frozen, x requires grad, gradients of x and the "
        "trainable tensors for a random grad_out. Extra memory: peak allocated during one fwd+bwd minus the "
        "frozen base's. ✗ = failed its float64 check (see Problems).",
        "",
        render_markdown(rows, providers_present),
    ]
    return "\n".join(lines)


def read_csvs(paths):
    """The rows and run metadata of several runs' CSVs. Each (mode, shape, M, r, dropout) row group
    must come from one run: its ratios divide by the base timed in the same run, and a base from
    another run would make them cross-run ratios under a "same run" heading."""
    rows, metas, source = [], [], {}
    for path in paths:
        with open(path, newline="") as f:
            run_rows = list(csv.DictReader(f))
        for key in {k for k in _index(run_rows)}:
            if source.setdefault(key, path) != path:
                raise ValueError(f"{key} is in both {source[key]} and {path}: render such runs separately "
                                 "(ratios are same-run ratios)")
        rows += run_rows
        meta_path = os.path.splitext(path)[0] + ".meta.json"
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                metas.append(json.load(f))
    if not metas:
        metas = [{"date": "?", "command": "?", "torch": "?", "triton": "?", "peft": "?", "device": "?",
                  "lora_ext_cuda_built": "?"}]
    return rows, metas


def providers_in(rows):
    present = {r["provider"] for r in rows}
    return [p for p in ALL_PROVIDERS if p in present]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true",
                        help="a small subset (on CPU: the shapes 64x smaller) to check the script works")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help=f"names from {list(SHAPES)} or KxN")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--providers", nargs="+", default=list(DEFAULT_PROVIDERS), choices=ALL_PROVIDERS)
    parser.add_argument("--modes", nargs="+", default=["train", "decode"], choices=["train", "decode"])
    parser.add_argument("--m", type=int, default=8192, help="tokens of the train configurations")
    parser.add_argument("--decode-m", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--decode-ranks", type=int, nargs="+", default=[16])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--dropout-position", default="post", choices=["pre", "post"],
                        help="lora_ext's dropout position (PEFT always drops x, i.e. 'pre')")
    parser.add_argument("--peft-fp32-adapters", action="store_true",
                        help="PEFT's default autocast of bf16 adapters to fp32 (off: adapters in the base dtype)")
    parser.add_argument("--warmup-ms", type=float, default=25.0)
    parser.add_argument("--rep-ms", type=float, default=100.0)
    parser.add_argument("--no-check", action="store_true", help="skip the float64 checks")
    parser.add_argument("--no-ceilings", action="store_true",
                        help="skip measuring the copy bandwidth and GEMM rate at the start (CUDA only)")
    parser.add_argument("--no-device-time", action="store_true",
                        help="skip the CUDA-graph device time of " + ", ".join(DEVICE_TIME_PROVIDERS))
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: start no new configuration after this (rows so far are kept)")
    parser.add_argument("--out", default=common.BENCH_DIR, help="folder for the CSV, JSON, markdown and PNG")
    parser.add_argument("--tag", default="bench_linear", help="file name stem of the outputs")
    parser.add_argument("--results-md", action="store_true", help="write the tables into benchmarks/RESULTS.md")
    parser.add_argument("--from-csv", nargs="+", default=None,
                        help="render these CSVs (and their .meta.json) instead of running")
    args = parser.parse_args()
    if args.quick:
        cpu = args.device == "cpu"
        defaults = parser.parse_args([])
        # Only shrink what the user left at its default.
        if args.shapes == defaults.shapes:
            args.shapes = ["qo", "kv"]
        if args.ranks == defaults.ranks:
            args.ranks = [16]
        if args.decode_m == defaults.decode_m:
            args.decode_m = [1, 16]
        if cpu and args.m == defaults.m:
            args.m = 256
        if cpu and args.warmup_ms == defaults.warmup_ms:
            args.warmup_ms = 5.0
        if cpu and args.rep_ms == defaults.rep_ms:
            args.rep_ms = 20.0
    return args


def resolve_shapes(names, device):
    table = CPU_SHAPES if device.type == "cpu" else SHAPES
    shapes = {}
    for name in names:
        if name in table:
            shapes[name] = table[name]
        else:
            try:
                K, N = (int(v) for v in name.lower().split("x"))
            except ValueError:
                raise SystemExit(f"--shapes: {name!r} is neither one of {list(SHAPES)} nor KxN") from None
            shapes[name] = (K, N)
    return shapes


def main() -> None:
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.tag)

    if args.from_csv:
        rows, metas = read_csvs(args.from_csv)
        present = providers_in(rows)
        text = section_text(metas, rows, present)
        print(text)
        note = render_plot(rows, present, stem + ".png")
        print(note or f"plot: {stem}.png", file=sys.stderr)
        with open(stem + ".md", "w") as f:
            f.write(text + "\n")
        if args.results_md:
            common.replace_section("bench_linear", text)
            print(f"wrote the bench_linear section of {common.RESULTS_MD}", file=sys.stderr)
        return

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False (use --device cpu --quick)")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    shapes = resolve_shapes(args.shapes, device)
    args.shapes = list(shapes)
    providers, skipped = available_providers(args.providers, device)
    if "base" not in providers:
        providers.insert(0, "base")  # every ratio divides by it
    for name, why in skipped.items():
        print(f"note: skipping provider {name}: {why}", flush=True)
    try:
        import triton.testing  # noqa: F401

        have_triton = True
    except Exception:
        have_triton = False
        if device.type == "cuda":
            print("note: triton missing, timing with torch.cuda.Event loops instead of do_bench", flush=True)

    s = Settings(device, dtype, args.alpha, args.dropout_position, args.peft_fp32_adapters, args.warmup_ms,
                 args.rep_ms, not args.no_check, skipped,
                 device_time=device.type == "cuda" and have_triton and not args.no_device_time)
    # Many layers go through torch.compile in one process; each config resets dynamo, and
    # decode compiles once per M (dynamic=False), so this limit is never the reason for eager.
    for limit_name in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.6+; keep both
        if hasattr(torch._dynamo.config, limit_name):
            setattr(torch._dynamo.config, limit_name, max(getattr(torch._dynamo.config, limit_name), 64))
    torch.manual_seed(0)

    configs = plan(args, shapes, device)
    estimates = [estimate_seconds(c, providers, s) for c in configs]
    print(f"{len(configs)} configurations, providers {providers}; rough estimate {sum(estimates):.0f} s"
          + (f" (time budget {args.time_budget:.0f} s)" if args.time_budget else ""), flush=True)

    meta = environment(device)
    if device.type != "cuda":
        meta["timer"] = "CPU wall clock, median of calls (a logic check, not a measurement)"
    else:
        meta["timer"] = (("fwd and fwd+bwd: `triton.testing.do_bench` median (L2 flushed between calls)" if have_triton
                          else "fwd and fwd+bwd: median of CUDA-event-timed calls (triton missing)")
                         + "; decode (eval, no_grad): median of 20-call back-to-back samples between CUDA events, "
                         "so the CPU launch time shows as in a decode loop"
                         + ("; device time of " + ", ".join(DEVICE_TIME_PROVIDERS) + ": the call as a CUDA graph, "
                            "replayed with L2 flushed (median)" if s.device_time else ""))
    meta["settings"] = (f"{args.dtype}, train M={args.m}, alpha={args.alpha:g}, lora_ext dropout_position="
                        f"{args.dropout_position} (PEFT: dropout on x), PEFT adapters in "
                        f"{'fp32 (its autocast default)' if args.peft_fp32_adapters else 'the base dtype'}; "
                        f"do_bench warmup={args.warmup_ms:g} ms rep={args.rep_ms:g} ms"
                        + (f"; skipped: {skipped}" if skipped else ""))
    if device.type == "cuda" and not args.no_ceilings:
        meta["ceilings"] = measure_ceilings(device, s, have_triton)
        print(f"ceilings: {meta['ceilings']}", flush=True)
    with open(stem + ".meta.json", "w") as f:
        json.dump(meta, f, indent=1)

    started = time.perf_counter()
    rows = []
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        done_estimate = 0.0
        for i, cfg in enumerate(configs):
            elapsed = time.perf_counter() - started
            if args.time_budget is not None and elapsed > args.time_budget:
                print(f"time budget reached after {elapsed:.0f} s: {len(configs) - i} configurations not run",
                      flush=True)
                break
            t0 = time.perf_counter()
            rows += run_config(cfg, providers, s, writer, have_triton)
            f.flush()
            done_estimate += estimates[i]
            elapsed = time.perf_counter() - started
            remaining = sum(estimates[i + 1:]) * (elapsed / done_estimate if done_estimate else 1.0)
            print(f"[{i + 1}/{len(configs)}] {cfg.mode_set} {cfg.shape} r={cfg.r} p={cfg.dropout} "
                  f"M={','.join(map(str, cfg.Ms))}: {time.perf_counter() - t0:.1f} s; elapsed {elapsed:.0f} s, "
                  f"about {remaining:.0f} s left", flush=True)
    elapsed = time.perf_counter() - started
    meta["elapsed_s"] = round(elapsed)
    with open(stem + ".meta.json", "w") as f:
        json.dump(meta, f, indent=1)

    present = providers_in(rows)
    text = section_text([meta], rows, present, elapsed_note=f" ({elapsed:.0f} s)")
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    note = render_plot(rows, present, stem + ".png")
    print(note or f"plot: {stem}.png")
    if args.results_md:
        common.replace_section("bench_linear", text)
        print(f"wrote the bench_linear section of {common.RESULTS_MD}")
    print(f"csv: {stem}.csv  ({elapsed:.0f} s)\n")
    print(text)


if __name__ == "__main__":
    main()
