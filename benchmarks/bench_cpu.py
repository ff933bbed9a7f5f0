"""CPU benchmark: the C++ lora::linear op against the plain-PyTorch LoRA layer that PEFT runs.

Providers (fp32, frozen base without bias, trainable adapters, x requiring grad as in
a middle layer):
  base           the frozen nn.Linear alone (the floor)
  peft           base(x) + lora_B(lora_A(dropout(x))) * s with nn.Linear adapters and
                 nn.Dropout: PEFT's LoRA forward ('pre' dropout)
  lora_ext       lora_ext.ops.linear with dropout_position='pre' (the same math as peft)
  lora_ext_post  lora_ext.ops.linear with dropout_position='post' (the library default;
                 timed only when dropout > 0, identical to lora_ext otherwise)
Modes: fwd (a training forward: autograd records the graph) and fwd+bwd
(torch.autograd.grad of x and the adapters, given a random grad_out).

Timing: providers are interleaved call by call (one round calls each once) so that
load from other processes on a shared machine hits them alike; each provider's time
is the median of its calls; --runs repeats the whole sweep and the table shows the
range over runs. Before timing, each configuration is checked against the float64
reference (lora_ext/reference.py).

    python benchmarks/bench_cpu.py                 # full sweep, prints a markdown table
    python benchmarks/bench_cpu.py --results-md    # ... and writes benchmarks/RESULTS.md
    python benchmarks/bench_cpu.py --quick         # tiny shapes, seconds
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch
import torch.nn as nn

import bench_common as common

common.ensure_repo_on_path()
import lora_ext  # noqa: E402,F401  (registers torch.ops.lora)
from lora_ext import ops as lora_ops  # noqa: E402
from lora_ext.reference import lora_linear_reference  # noqa: E402

FULL_SHAPES = [(256, 512, 512), (256, 1024, 1024), (256, 1024, 256),
               (2048, 512, 512), (2048, 1024, 1024), (2048, 1024, 256)]
QUICK_SHAPES = [(64, 96, 80), (128, 64, 32)]
PROVIDERS = ("base", "peft", "lora_ext", "lora_ext_post")
MODES = ("fwd", "fwd+bwd")
N_INPUT_SETS = 3  # x is rotated among this many random tensors


class PeftStyleLoRA(nn.Module):
    """PEFT's LoRA layer forward in plain PyTorch: base(x) + lora_B(lora_A(dropout(x))) * s."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout_p: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        self.dropout = nn.Dropout(dropout_p) if dropout_p > 0 else nn.Identity()
        self.scaling = alpha / r

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def check_config(base, A, B, scale, p, x, grad_out) -> None:
    """lora_ext ('pre' and 'post') and the PEFT-style layer against the float64 reference.

    Raises AssertionError when an output or gradient is off (fp32 lands near 1e-7).
    """
    tol = 2e-5
    weight = base.weight
    seed = torch.tensor([12345], dtype=torch.int64)
    for position in ("pre", "post"):
        xs = x.detach().clone().requires_grad_(True)
        y = lora_ops.linear(xs, weight, None, A, B, scale, p, position, seed if p > 0 else None)
        grads = torch.autograd.grad(y, [xs, A, B], grad_out)
        x64, A64, B64 = (t.detach().double().requires_grad_(True) for t in (x, A, B))
        ref = lora_linear_reference(x64, weight.double(), None, A64, B64, scale, p, position,
                                    12345 if p > 0 else None)
        ref_grads = torch.autograd.grad(ref, [x64, A64, B64], grad_out.double())
        for name, out, expected in zip(("y", "grad_x", "grad_A", "grad_B"), (y, *grads), (ref, *ref_grads)):
            err = relative_error(out, expected)
            assert err < tol, f"lora_ext {position} {name}: relative error {err:.2e} vs float64 reference"


def make_providers(M, K, N, r, p, alpha=32.0):
    """{name: (layer_fn(x) -> y, trainable tensors)} sharing one base weight and adapters."""
    base = nn.Linear(K, N, bias=False)
    base.weight.requires_grad_(False)
    peft_layer = PeftStyleLoRA(base, r, alpha, p).train()
    with torch.no_grad():
        # Random non-zero adapters (PEFT would start lora_B at zero).
        peft_layer.lora_A.weight.normal_(0, K ** -0.5)
        peft_layer.lora_B.weight.normal_(0, r ** -0.5)
    A, B = peft_layer.lora_A.weight, peft_layer.lora_B.weight
    scale = peft_layer.scaling
    providers = {
        "base": (base, []),
        "peft": (peft_layer, [A, B]),
        "lora_ext": (lambda x: lora_ops.linear(x, base.weight, None, A, B, scale, p, "pre"), [A, B]),
    }
    if p > 0:
        providers["lora_ext_post"] = (lambda x: lora_ops.linear(x, base.weight, None, A, B, scale, p, "post"), [A, B])
    return providers, (base, A, B, scale)


def make_call(mode, layer_fn, params, xs, grad_out):
    """A no-argument function running one forward (or forward+backward) on the next input set."""
    inputs = itertools.cycle(xs)
    if mode == "fwd":
        return lambda: layer_fn(next(inputs))

    def fwd_bwd():
        x = next(inputs)
        y = layer_fn(x)
        return torch.autograd.grad(y, [x, *params], grad_out)

    return fwd_bwd


def time_interleaved(calls: dict, min_time_s: float, min_rounds: int, warmup: int) -> dict:
    """Median seconds per call of each function, calling them round-robin."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    samples = {name: [] for name in calls}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or time.perf_counter() - start < min_time_s:
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: common.median(ts) for name, ts in samples.items()}


def run_sweep(shapes, r, dropouts, args, run_index) -> list:
    rows = []
    for (M, K, N), p in itertools.product(shapes, dropouts):
        providers, (base, A, B, scale) = make_providers(M, K, N, r, p)
        xs = [torch.randn(M, K, requires_grad=True) for _ in range(N_INPUT_SETS)]
        grad_out = torch.randn(M, N)
        if run_index == 0:
            check_config(base, A, B, scale, p, xs[0], grad_out)
        for mode in MODES:
            calls = {name: make_call(mode, fn, params, xs, grad_out) for name, (fn, params) in providers.items()}
            times = time_interleaved(calls, args.min_time, args.min_rounds, args.warmup)
            for name, seconds in times.items():
                rows.append(dict(run=run_index, M=M, K=K, N=N, r=r, dropout=p, mode=mode, provider=name,
                                 ms=seconds * 1e3))
            print(f"  run {run_index + 1}: M={M} K={K} N={N} p={p} {mode}: "
                  + ", ".join(f"{n} {t * 1e3:.2f} ms" for n, t in times.items()), file=sys.stderr, flush=True)
    return rows


def summary_table(rows, runs) -> str:
    """One line per (shape, dropout, mode): median ms per provider over runs, ratios as ranges over runs."""
    by_key = {}
    for row in rows:
        key = (row["M"], row["K"], row["N"], row["dropout"], row["mode"])
        by_key.setdefault(key, {}).setdefault(row["provider"], {})[row["run"]] = row["ms"]

    def ratio_range(times, num, den):
        if num not in times or den not in times:
            return "—"
        return common.format_spread([times[num][i] / times[den][i] for i in range(runs)])

    headers = ["M", "K", "N", "dropout", "mode", "base ms", "peft ms", "lora_ext ms", "lora_ext_post ms",
               "peft / base", "lora_ext / base", "**lora_ext / peft**", "lora_ext_post / peft"]
    lines = []
    for (M, K, N, p, mode), times in by_key.items():
        ms = {name: common.median(list(times[name].values())) if name in times else None for name in PROVIDERS}
        lines.append([M, K, N, p, mode] + [f"{ms[n]:.3f}" if ms[n] is not None else "—" for n in PROVIDERS] + [
            ratio_range(times, "peft", "base"), ratio_range(times, "lora_ext", "base"),
            f"**{ratio_range(times, 'lora_ext', 'peft')}**", ratio_range(times, "lora_ext_post", "peft")])
    return common.markdown_table(headers, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and short timings (a logic check)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--runs", type=int, default=2, help="repeat the sweep; ratios show the range over runs")
    parser.add_argument("--min-time", type=float, default=0.4, help="seconds of timed rounds per configuration")
    parser.add_argument("--min-rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (default: torch.get_num_threads()); a non-default count gets its own "
                        "RESULTS.md section")
    parser.add_argument("--results-md", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    if args.quick:
        args.runs, args.min_time, args.min_rounds, args.warmup = 1, 0.0, 3, 1
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    torch.manual_seed(0)

    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {common.cpu_description()}", file=sys.stderr)
    started = time.perf_counter()
    rows = []
    for run_index in range(args.runs):
        rows += run_sweep(shapes, args.rank, args.dropouts, args, run_index)
    elapsed = time.perf_counter() - started

    table = summary_table(rows, args.runs)
    print(table)
    print(f"\n({elapsed:.0f} s)", file=sys.stderr)
    if args.results_md:
        body = "\n".join([
            f"## CPU, {threads} thread{'s' if threads > 1 else ''}: lora_ext C++ op vs the PEFT formulation "
            "(`bench_cpu.py`)",
            "",
            f"- date: {common.utc_now()}",
            f"- machine: {common.cpu_description()}, {threads} torch threads; shared with other jobs "
            "while it ran, so absolute times carry their load (providers are interleaved call by call, "
            "so same-run ratios are the numbers to read)",
            f"- torch {torch.__version__}, fp32, r={args.rank}, frozen base without bias, x requires grad",
            f"- command: `{common.command_line()}` ({elapsed:.0f} s)",
            f"- times: median ms per call in each run, then the median over {args.runs} run(s); ratios: "
            f"range (min–max) of the same-run ratios over the {args.runs} run(s)",
            "- `peft` = `base(x) + lora_B(lora_A(dropout(x))) * s` ('pre' dropout); `lora_ext` = "
            "`lora_ext.ops.linear(..., dropout_position='pre')` (same math); `lora_ext_post` = the "
            "library's default 'post' dropout",
            "",
            table,
        ])
        section = "bench_cpu" if threads == default_threads else f"bench_cpu_{threads}threads"
        common.replace_section(section, body)
        print(f"wrote the {section} section of {common.RESULTS_MD}", file=sys.stderr)


if __name__ == "__main__":
    main()
