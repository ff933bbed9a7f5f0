"""Where a decode call's time goes: host time per call of each layer of the launch path, and
device time per call (CUDA graph replay), for the op's three few-token routes (SETTINGS):
"fused", the fused Triton GEMM replayed from C++ (lora_ext._C.set_fused_small_m_forward; the default
since it measured faster, NOTES.md #44); "kernel", cuBLAS x W^T then the LoRA-term kernel (the
default before); "off", the general path's three cuBLAS calls.

Eager decode is host-bound on the H200 (benchmarks/NOTES.md #24), so the ratio to the frozen
base that bench_linear.py reports is mostly a ratio of host times; this splits it.

    python benchmarks/decode_probe.py            # needs a CUDA device
"""
from __future__ import annotations

import argparse

import torch

import bench_common as common

common.ensure_repo_on_path()
import lora_ext  # noqa: E402

SHAPES = {"qo": (4096, 4096), "kv": (4096, 1024), "gate_up": (4096, 14336), "down": (14336, 4096)}


def host_us(fn, calls=3000, repeats=5) -> float:
    """Best of `repeats` of the host's issue time per call over `calls` calls back to back."""
    return common.wall_us_per_call(fn, calls, "cuda", repeats=repeats, wait_for_device=False)


def graph_device_us(fn, calls=20, replays=50) -> float:
    """Device time per call: `calls` calls captured in one CUDA graph, replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (calls * replays)


def back_to_back_us(fn, calls=200) -> float:
    """What bench_linear's decode column sees: calls back to back between two events."""
    for _ in range(20):
        fn()
    return common.cuda_events_ms(fn, calls) * 1e3


def layer_pair(K, N, r, device, dtype):
    base = torch.nn.Linear(K, N, bias=False, device=device, dtype=dtype).requires_grad_(False)
    lora = lora_ext.LinearLoRA(torch.nn.Linear(K, N, bias=False, device=device, dtype=dtype), dim=r).eval()
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    return base, lora


# The op's few-token routes: (fused small-M forward, few-token kernel) switches.
SETTINGS = {"fused": (True, True), "kernel": (False, True), "off": (False, False)}


def few_token_route(setting):
    """The op's few-token route `setting` (SETTINGS) for a with-block, then the switches as they were."""
    fused, kernel = SETTINGS[setting]
    return common.switched((lora_ext._C.set_fused_small_m_forward, fused), (lora_ext._C.set_small_m_forward, kernel))


def host_rows(device, dtype):
    K = N = 64
    base, lora = layer_pair(K, N, 16, device, dtype)
    x = torch.randn(1, K, device=device, dtype=dtype)
    W, A, B = lora.weight, lora.lora_A.weight, lora.lora_B.weight
    op = torch.ops.lora.linear.default
    xa, y = torch.empty(1, 16, device=device, dtype=dtype), torch.empty(1, N, device=device, dtype=dtype)
    candidates = [
        ("torch.mm(x, W.t())", lambda: torch.mm(x, W.t())),
        ("F.linear(x, W)", lambda: torch.nn.functional.linear(x, W)),
        ("nn.Linear module", lambda: base(x)),
        ("_C.small_m_forward_cuda (pybind, kernel only)", lambda: lora_ext._C.small_m_forward_cuda(x, A, B, y, xa, 2.0)),
        ("torch.ops.lora.linear.default", lambda: op(x, W, None, A, B, 2.0, 0.0, "post", None, "auto")),
        ("lora_ext.ops.linear", lambda: lora_ext.ops.linear(x, W, None, A, B, 2.0)),
        ("LinearLoRA module", lambda: lora(x)),
    ]
    rows = []
    with torch.no_grad():
        for setting in SETTINGS:
            with few_token_route(setting):
                for name, fn in candidates:
                    if setting != "kernel" and ("lora" not in name.lower() or "pybind" in name):
                        continue
                    rows.append((name, setting, f"{host_us(fn):.1f}"))
    return rows


def device_rows(device, dtype, ranks, Ms):
    rows = []
    for shape, (K, N) in SHAPES.items():
        for r in ranks:
            base, lora = layer_pair(K, N, r, device, dtype)
            for M in Ms:
                x = torch.randn(M, K, device=device, dtype=dtype)
                with torch.no_grad():
                    base_graph, base_b2b = graph_device_us(lambda: base(x)), back_to_back_us(lambda: base(x))
                    cells = []
                    for setting in SETTINGS:
                        with few_token_route(setting):
                            cells += [graph_device_us(lambda: lora(x)), back_to_back_us(lambda: lora(x))]
                ratios = [cells[i + 1] / base_b2b for i in range(0, len(cells), 2)]
                rows.append((shape, M, r, f"{base_graph:.1f}", f"{base_b2b:.1f}", *(f"{c:.1f}" for c in cells),
                             " / ".join(f"{q:.2f}" for q in ratios)))
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, nargs="+", default=[16])
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16, 128])
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    print(f"decode probe, {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16")
    print("\nhost µs per call (K = N = 64, M = 1, no_grad; best of 5 x 3000 calls)")
    print(common.markdown_table(["call", "few-token route", "µs"], host_rows(device, dtype)))
    print("\ndevice µs per call (CUDA graph of 20 calls) and back-to-back µs per call (events around 200 calls)")
    columns = [f"{setting}: {what}" for setting in SETTINGS for what in ("graph", "b2b")]
    print(common.markdown_table(
        ["shape", "M", "r", "base graph", "base b2b", *columns, "b2b ÷ base b2b (" + " / ".join(SETTINGS) + ")"],
        device_rows(device, dtype, args.ranks, args.m)))


if __name__ == "__main__":
    main()
