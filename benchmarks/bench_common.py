"""Helpers shared by the benchmark scripts: RESULTS.md sections, tables, run descriptions.

The scripts run as `python benchmarks/<script>.py`, so this module is imported by
its bare name (the script's folder is first on sys.path).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import shlex
import statistics
import sys
from typing import Iterable, Optional, Sequence

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
RESULTS_MD = os.path.join(BENCH_DIR, "RESULTS.md")

_RESULTS_HEADER = (
    "# Benchmark results\n\n"
    "Each section below is written by the script it names (between its start/end markers);\n"
    "re-running the script replaces its section. Ratios are same-run ratios.\n"
)


def ensure_repo_on_path() -> None:
    """Lets `import lora_ext` find the checkout when the package is not installed."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)


def command_line() -> str:
    """The command that ran this script, as a user would type it from the repo root."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO_ROOT)
    # Every lora_ext switch that is set (LORA_EXT_BACKEND, LORA_EXT_FUSED_*, ...): rows measured with one
    # must not read as the default path's.
    names = sorted(k for k in os.environ if k.startswith("LORA_EXT_")) + ["TRITON_INTERPRET"]
    env = " ".join(f"{k}={os.environ[k]}" for k in names if k in os.environ)
    python = os.path.basename(sys.executable) or "python"
    return (env + " " if env else "") + shlex.join([python, script, *sys.argv[1:]])


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# nvidia-smi's timestamps (2026/12/07 20:00:00.000; %f's microseconds cut to milliseconds when written).
SMI_TIME_FORMAT = "%Y/%m/%d %H:%M:%S.%f"


def local_timestamp() -> str:
    """The local time now as nvidia-smi's timestamps write it: bench_linear.csv's started / ended, read against
    scripts/h200_run.sh's CLOCK_LOG_MS samples (ab_summary.py --clocks)."""
    return datetime.datetime.now().strftime(SMI_TIME_FORMAT)[:-3]


def cpu_description() -> str:
    """CPU model and core count, e.g. 'AMD EPYC (2 cores)'."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def replace_section(name: str, body: str, path: str = RESULTS_MD) -> None:
    """Writes `body` between `<!-- name:start -->` and `<!-- name:end -->` in `path`.

    An existing section of that name is replaced; otherwise the section is appended.
    The rest of the file is left as it was.
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n{body.rstrip()}\n{end}\n"
    text = _RESULTS_HEADER
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    if pattern.search(text):
        # A function replacement, so backslashes in the body are taken literally.
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w") as f:
        f.write(text)


# The end-to-end model's linear layers (bench_train.py's GPU_MODEL: hidden 2048, 8 of 32 heads for k/v,
# intermediate 5632, vocabulary 32000) as (K, N), and its tokens per step (batch 2 x seq 2048).
E2E_SHAPES = {"e2e_qo": (2048, 2048), "e2e_kv": (2048, 512), "e2e_gate_up": (2048, 5632), "e2e_down": (5632, 2048),
              "e2e_lm_head": (2048, 32000)}
E2E_TOKENS = 4096


def csv_cells(row: dict) -> dict:
    """A row for csv.DictWriter: None (not measured) as an empty cell."""
    return {k: ("" if v is None else v) for k, v in row.items()}


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def format_spread(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    """'1.02' for one value (or equal ones), '1.01–1.04' (min–max) for several."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    lo, hi = min(values), max(values)
    if fmt.format(lo) == fmt.format(hi):
        return fmt.format(lo)
    return f"{fmt.format(lo)}–{fmt.format(hi)}"


def median(values: Sequence[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def cuda_events_ms(fn, calls: int) -> float:
    """Milliseconds per call of `calls` back-to-back calls of fn between two CUDA events
    (the host's launch time shows when it exceeds the device's)."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


@contextlib.contextmanager
def switched(*settings):
    """Native-path settings at given values inside the block, then back as they were: each of
    `settings` is (setter, value), a lora_ext._C.set_* that returns the previous setting."""
    restore = []
    try:
        for setter, value in settings:
            restore.append((setter, setter(value)))
        yield
    finally:
        for setter, previous in reversed(restore):
            setter(previous)


# Bytes zeroed before each timed call to evict the inputs from L2 (H200: 50 MiB; a kv-sized dY of
# 16 MiB would otherwise be read from L2 on every replay).
L2_FLUSH_BYTES = 256 * 2**20


def random_bf16(*shape, std: float = 1.0):
    """A standard-normal bf16 tensor on the GPU, times std: the probes' operands."""
    import torch

    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * std


def max_relative_error(actual, reference) -> float:
    """max |actual - reference| / max |reference|, in float64: the probes' check of a kernel's result."""
    return ((actual.double() - reference.double()).abs().max() / reference.double().abs().max()).item()


def gpu_us(fn) -> float:
    """Device time of fn in µs, replayed in a CUDA graph (a Python launch path, ~30-100 µs per
    Triton launch on a slow host, would otherwise be what do_bench measures for the small shapes),
    from HBM: each replay zeroes a 256 MiB buffer first, and the median of [zero, fn] minus the
    median of [zero] alone is fn's time. (Before 12-05 this was the mean over replays of fn alone,
    whose inputs stayed in L2 when they fit.)"""
    import torch
    import triton.testing

    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    with_flush = triton.testing.do_bench_cudagraph(lambda: (flush.zero_(), fn()), rep=30, return_mode="median")
    flush_only = triton.testing.do_bench_cudagraph(flush.zero_, rep=30, return_mode="median")
    return (with_flush - flush_only) * 1e3


def wall_us_per_call(fn, calls: int, device, warmup: int = 0, repeats: int = 1, wait_for_device: bool = True) -> float:
    """Wall-clock µs per call of `calls` back-to-back calls of fn after `warmup` untimed ones;
    the best of `repeats` such loops. On CUDA the device is idle when each loop starts, and
    with `wait_for_device` the loop's time runs until its queued work has finished (else it
    is the host's issue time alone)."""
    import time

    import torch

    def synchronize():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if wait_for_device:
            synchronize()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
        synchronize()
    return best
