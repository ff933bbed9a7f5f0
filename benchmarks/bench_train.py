"""End-to-end LoRA training steps of a Llama-style decoder: lora_ext vs PEFT, both compiled (issue 4, item 2).

The model is built with transformers from a LlamaConfig on the meta device (no
download), materialised with to_empty and random weights, in bf16. LoRA (r=16,
alpha=32 by default) goes on every Linear layer, lm_head included:
  lora_ext          lora_ext.apply_lora_to_linear_modules(model, PeftConfig(match_all_linear=True, ...)),
                    applied on meta before materialising (the library's meta flow)
  lora_ext_triton   the same with use_triton=True (TritonLinearLoRA)
  lora_ext_native   the same with every layer's lora_backend = "native"
  lora_ext_switches_off  lora_ext with the native path's kernels turned on by the 12-05 measurements
                    turned off for its run: the one-launch adapter gradients and the 'post' fused GEMMs
                    (switches_off; benchmarks/NOTES.md #39), i.e. the cuBLAS compositions they replace
  peft              peft.get_peft_model with target_modules = the names of every Linear
                    (adapters kept in bf16: autocast_adapter_dtype=False, unless --peft-fp32-adapters)
  frozen_base       no adapters at all, only the norms trainable: the floor (what a step would take if the LoRA
                    layers cost nothing over their frozen base), so that "tokens/s ÷ peft" in its row is the
                    most any LoRA layer could reach against PEFT in that run
One step = torch.compile'd forward + cross-entropy loss, backward, AdamW step (adapters
only). Reported: tokens/s from the median step time after warm-up (compilation
happens in the warm-up), and the peak memory allocated during the timed steps.

    python benchmarks/bench_train.py --device cpu --quick --compile none   # logic check on CPU (tiny model)
    python benchmarks/bench_train.py --quick --out $OUT                   # GPU smoke: seq 512, dropout 0.1
    python benchmarks/bench_train.py --out $OUT                     # ~0.85B model, seq 2048, batch 2
    python benchmarks/bench_train.py --from-csv bench_train.csv --results-md
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import json
import math
import os
import statistics
import time
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import bench_common as common

common.ensure_repo_on_path()
import lora_ext  # noqa: E402

ALL_PROVIDERS = ("peft", "lora_ext", "lora_ext_triton", "lora_ext_native", "lora_ext_switches_off", "frozen_base")
CSV_FIELDS = ["provider", "dropout", "compile", "graphs", "batch", "seq", "params_m", "trainable_m", "n_lora_layers",
              "step_ms", "step_ms_min", "step_ms_max", "tokens_per_s", "peak_gib", "first_loss", "last_loss",
              "warmup_s", "note", "repeat", "host_issue_ms", "gpu_busy_ms"]

# ~0.85B parameters: Llama-2/TinyLlama-like proportions with grouped-query attention.
GPU_MODEL = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=5632, vocab_size=32000)
TINY_MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=160, vocab_size=512)


def build_config(args):
    from transformers import LlamaConfig

    sizes = TINY_MODEL if args.tiny else GPU_MODEL
    config = LlamaConfig(**sizes, max_position_embeddings=args.seq, use_cache=False, tie_word_embeddings=False)
    try:
        config._attn_implementation = "sdpa"
    except Exception:  # an older/newer transformers without the setter keeps its default
        pass
    return config


def build_meta_model(config, dtype):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return model.to(dtype)


@torch.no_grad()
def init_base_weights(model: nn.Module, generator_seed: int) -> None:
    """Random base weights after to_empty (N(0, 0.02) matrices, ones for norms), rotary tables recomputed."""
    torch.manual_seed(generator_seed)
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        if param.dim() >= 2:
            param.normal_(0.0, 0.02)
        else:
            param.fill_(1.0)
    # Non-persistent buffers (the rotary inverse frequencies) hold garbage after
    # to_empty: rebuild the module on CPU and copy its buffers over.
    for module in model.modules():
        if "inv_freq" in dict(module.named_buffers(recurse=False)):
            fresh = type(module)(getattr(module, "config", None) or model.config)
            for buf_name, buf in fresh.named_buffers(recurse=False):
                getattr(module, buf_name).copy_(buf)


@torch.no_grad()
def randomize_adapters(model: nn.Module, r: int) -> None:
    """Adapters random and non-zero (a fresh lora_B is zero, which can run faster than real data)."""
    for name, param in model.named_parameters():
        if "lora_A" in name:
            param.normal_(0.0, param.shape[-1] ** -0.5)
        elif "lora_B" in name:
            param.normal_(0.0, 0.01 * r ** -0.5)


def linear_leaf_names(model: nn.Module) -> list:
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def check_finite(model: nn.Module) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not torch.isfinite(t).all():
            raise RuntimeError(f"{name} has non-finite values after initialisation")


def build_model(provider, dropout, args, device, dtype):
    """(model to train, number of LoRA layers) for one provider; base weights identical across providers."""
    config = build_config(args)
    model = build_meta_model(config, dtype)
    if provider == "frozen_base":
        # The floor a LoRA layer could reach: the same model with no adapters. Only the norms'
        # weights are trainable, so the backward still carries dx through every frozen linear layer
        # (as with LoRA on all of them) and no linear weight gets a gradient: the step a LoRA step
        # would be if its adapters cost nothing. (At lr 1e-4 their bf16 values do not move, so the
        # loss stays put; and layer 0's q/k/v input gradient, which LoRA runs do not need, is
        # computed: ~0.2% of the step, so the floor errs slow.) Dropout does not apply (no LoRA term).
        model.to_empty(device=device)
        init_base_weights(model, args.seed)
        for module in model.modules():
            trainable = type(module).__name__.endswith("RMSNorm")
            for param in module.parameters(recurse=False):
                param.requires_grad_(trainable)
        check_finite(model)
        model.train()
        return model, 0
    if provider.startswith("lora_ext"):
        peft_config = lora_ext.PeftConfig(match_all_linear=True, dim=args.rank, alpha=args.alpha, dropout=dropout,
                                          dropout_position=args.dropout_position,
                                          use_triton=provider == "lora_ext_triton")
        n_lora = lora_ext.apply_lora_to_linear_modules(model, peft_config)  # on meta: allocates nothing
        model.to_empty(device=device)
        init_base_weights(model, args.seed)
        for module in model.modules():
            if isinstance(module, lora_ext.LinearLoRA):
                module.reset_parameters()
                if provider == "lora_ext_native":
                    module.lora_backend = "native"
    else:
        from peft import LoraConfig, get_peft_model

        model.to_empty(device=device)
        init_base_weights(model, args.seed)
        targets = linear_leaf_names(model)
        lora_config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=dropout, target_modules=targets,
                                 bias="none")
        peft_model = get_peft_model(model, lora_config, autocast_adapter_dtype=args.peft_fp32_adapters)
        model = peft_model.base_model.model  # the patched LlamaForCausalLM: same call path as lora_ext's
        n_lora = sum(1 for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    randomize_adapters(model, args.rank)
    check_finite(model)
    model.train()
    return model, n_lora


def causal_lm_loss(model, input_ids):
    logits = model(input_ids=input_ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def head_loss(lm_head, hidden, input_ids):
    logits = lm_head(hidden)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def make_loss_fn(model, scope: str, mode: str = "default"):
    """loss(input_ids) with torch.compile over `scope`, in torch.compile's `mode`.

    "model": one graph for the whole forward and the loss (compiles 16 layers unrolled:
    slow to compile). "layers": each decoder layer compiled on its own (they share one
    graph, so compile time is one layer's) plus lm_head + loss as one more graph; the
    embedding, rotary tables and final norm stay eager. "none": eager.
    mode "reduce-overhead" replays each compiled graph (forward and backward) as a CUDA graph:
    one launch per graph instead of each kernel's host path.
    """
    if scope == "model":
        compiled = torch.compile(causal_lm_loss, mode=mode)
        return lambda ids: compiled(model, ids)
    if scope == "none":
        return lambda ids: causal_lm_loss(model, ids)
    for layer in model.model.layers:
        layer.compile(mode=mode)
    compiled_head = torch.compile(head_loss, mode=mode)

    def loss(ids):
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        return compiled_head(model.lm_head, hidden, ids)

    return loss


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def switches_off():
    """The native path's kernels that the 12-05 measurements turned on by default (NOTES.md #39),
    off inside the block, then back as they were: the 'post' dropout fused GEMMs and the one-launch
    adapter gradients."""
    with common.switched((lora_ext._C.set_fused_post_dropout, False), (lora_ext._C.set_fused_adapter_grads, False)):
        yield


def profiled_kernel_ms(step, device, what: str, args) -> Optional[float]:
    """One step() under torch.profiler: the time of its kernels in ms on CUDA (None elsewhere, or where the
    profiler saw no kernel: e.g. another profiler such as nsys attached), and its top rows printed with
    --profile."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        synchronize(device)
    averages = prof.key_averages()
    if args.profile:
        sort_key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(f"--- profile of one step: {what}")
        print(averages.table(sort_by=sort_key, row_limit=args.profile, max_name_column_width=70))
    kernel_us = kernel_time_us(averages) if device.type == "cuda" else 0.0
    if device.type == "cuda" and kernel_us <= 0.0:
        print(f"  !! {what}: the profiler recorded no kernel: no GPU busy time", flush=True)
    return kernel_us / 1e3 if kernel_us > 0.0 else None


def kernel_time_us(averages) -> float:
    """The device time of a profile's kernels (and copies), µs: the "Self CUDA time total" of its table,
    summed over the device-side events only (a CPU op's self device time repeats its kernels'). A sum, not
    a union of intervals: right for one stream, as here."""
    from torch.autograd import DeviceType

    return sum(evt.self_device_time_total for evt in averages
               if evt.device_type == DeviceType.CUDA and not getattr(evt, "is_user_annotation", False))


def run_provider(provider, dropout, args, device, dtype, profile=False) -> dict:
    if provider == "lora_ext_switches_off":
        with switches_off():
            return _run_provider(provider, dropout, args, device, dtype, profile)
    return _run_provider(provider, dropout, args, device, dtype, profile)


def _run_provider(provider, dropout, args, device, dtype, profile=False) -> dict:
    """The timed run of one provider at one dropout: its row. With `profile`, instead: the warm-up,
    then one step under torch.profiler, and {"gpu_busy_ms": its kernels' time (CUDA; None elsewhere)}
    (the profile pass in main, after every timed run: once a process has profiled CUDA, the profiler's
    hooks stay attached and slow what runs after them, pytorch#144455)."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model, n_lora = build_model(provider, dropout, args, device, dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in trainable)
    opt_kwargs = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, **opt_kwargs)
    loss_fn = make_loss_fn(model, args.compile, args.compile_mode)
    graphs_mode = args.compile_mode == "reduce-overhead" and args.compile != "none"
    # The CUDA graphs' memory pools are allocated while recording, in the warm-up: the timed steps'
    # peak then misses the activations (12-05 H200: 1.86 GiB for both providers, the weights alone 1.6).
    peak_unmeasured = graphs_mode and device.type == "cuda"
    counters = torch._dynamo.utils.counters
    counters.clear()
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    batches = [torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=generator).to(device)
               for _ in range(3)]

    def step(i):
        if graphs_mode:
            # A new iteration for CUDA graph trees: the previous step's graph outputs may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
        loss = loss_fn(batches[i % len(batches)])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    losses = []
    t0 = time.perf_counter()
    for i in range(args.warmup):
        losses.append(step(i).item())
    synchronize(device)
    warmup_s = time.perf_counter() - t0
    if profile:
        return {"gpu_busy_ms": profiled_kernel_ms(lambda: step(0), device, f"{provider}, dropout {dropout}", args)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.steps):
        synchronize(device)
        t0 = time.perf_counter()
        loss = step(args.warmup + i)
        synchronize(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak = None if device.type != "cuda" or peak_unmeasured else torch.cuda.max_memory_allocated(device) / 2**30
    # The host's issue time of a step: until step() returns, the GPU still working through its queue.
    # Well under the step time, the step is device-bound; near it, it says nothing alone (the host also
    # blocks once the launch queue is full: a step here launches thousands of kernels) — the profile
    # pass's GPU busy time decides.
    issue = []
    for i in range(3):
        synchronize(device)
        t0 = time.perf_counter()
        step(i)
        issue.append(time.perf_counter() - t0)
    synchronize(device)
    host_issue_ms = statistics.median(issue) * 1e3
    graphs = int(counters["stats"].get("unique_graphs", 0))
    breaks = int(sum(counters["graph_break"].values()))
    step_s = statistics.median(times)
    notes = []
    if not all(math.isfinite(v) for v in losses):
        notes.append("non-finite loss")
    if breaks:
        notes.append(f"{breaks} graph breaks")
    if peak_unmeasured:
        notes.append("no peak (graph pools)")
    note = "; ".join(notes)
    row = dict(provider=provider, dropout=dropout, compile=compile_label(args), graphs=graphs, batch=args.batch,
               seq=args.seq, params_m=round(n_params / 1e6, 1), trainable_m=round(n_trainable / 1e6, 2),
               n_lora_layers=n_lora, step_ms=step_s * 1e3, step_ms_min=min(times) * 1e3, step_ms_max=max(times) * 1e3,
               tokens_per_s=args.batch * args.seq / step_s, peak_gib=peak, first_loss=losses[0],
               last_loss=losses[-1], warmup_s=round(warmup_s, 1), note=note, host_issue_ms=host_issue_ms,
               gpu_busy_ms=None)
    del model, optimizer, trainable, batches, loss_fn
    return row


def compile_label(args) -> str:
    """The CSV's compile column: the scope, and the mode where it is not the default."""
    if args.compile == "none" or args.compile_mode == "default":
        return args.compile
    return f"{args.compile}:{args.compile_mode}"


def render(rows, metas) -> str:
    """The markdown table. With several repeats (--repeats; the CSV's `repeat` column) each
    provider shows its median step over the repeats, and the ratios to PEFT are the median and
    range of the same-repeat ratios: end-to-end step times on the H200 host moved by up to 40%
    between runs of the same code, and only ratios measured side by side are comparable."""
    meta = metas[0]
    by_dropout = {}
    for row in rows:
        by_dropout.setdefault(float(row["dropout"]), {}).setdefault(row["provider"], []).append(row)

    def num(v):
        return None if v in (None, "") else float(v)

    def repeat_of(row):
        return int(row.get("repeat") or 0)

    def host_and_busy(runs):
        """The host's issue time of a step and the GPU's busy share of the step time (medians over the
        repeats; "—" for CSVs of runs before they were measured, and busy on CPU)."""
        issue = [num(r.get("host_issue_ms")) for r in runs if num(r.get("host_issue_ms")) is not None]
        busy = [num(r["gpu_busy_ms"]) / num(r["step_ms"]) for r in runs if num(r.get("gpu_busy_ms")) is not None]
        return (f"{statistics.median(issue):.1f}" if issue else "—",
                f"{statistics.median(busy):.2f}" if busy else "—")

    def ratio_text(ratios):
        if not ratios:
            return "—"
        if len(ratios) == 1:
            return f"**{ratios[0]:.2f}**"
        return f"**{statistics.median(ratios):.2f}** ({min(ratios):.2f}–{max(ratios):.2f})"

    headers = ["dropout", "provider", "step ms (median; min–max)", "tokens/s", "peak GiB",
               "tokens/s ÷ peft", "peak ÷ peft", "loss first → last", "warm-up s", "graphs",
               "host issue ms", "GPU busy ÷ step"]
    lines = []
    for p in sorted(by_dropout):
        group = by_dropout[p]
        peft_by_repeat = {repeat_of(r): r for r in group.get("peft", [])}
        for name in ALL_PROVIDERS:
            runs = group.get(name)
            if not runs:
                continue
            step = statistics.median(num(r["step_ms"]) for r in runs)
            tps = statistics.median(num(r["tokens_per_s"]) for r in runs)
            peaks = [num(r["peak_gib"]) for r in runs if num(r["peak_gib"]) is not None]
            peak = max(peaks) if peaks else None
            tps_ratios, peak_ratios = [], []
            if name != "peft":
                for r in runs:
                    peft = peft_by_repeat.get(repeat_of(r))
                    if peft is None:
                        continue
                    if num(r["tokens_per_s"]) and num(peft["tokens_per_s"]):
                        tps_ratios.append(num(r["tokens_per_s"]) / num(peft["tokens_per_s"]))
                    if num(r["peak_gib"]) and num(peft["peak_gib"]):
                        peak_ratios.append(num(r["peak_gib"]) / num(peft["peak_gib"]))
            notes = sorted({r["note"] for r in runs if r.get("note")})
            first, last = runs[0], runs[-1]
            issue_cell, busy_cell = host_and_busy(runs)
            lines.append([p, name + (f" ({'; '.join(notes)})" if notes else "") +
                          (f" ×{len(runs)}" if len(runs) > 1 else ""),
                          f"{step:.1f} ({min(num(r['step_ms_min']) for r in runs):.1f}–"
                          f"{max(num(r['step_ms_max']) for r in runs):.1f})",
                          f"{tps:,.0f}", f"{peak:.2f}" if peak is not None else "—", ratio_text(tps_ratios),
                          ratio_text(peak_ratios),
                          f"{num(first['first_loss']):.3f} → {num(last['last_loss']):.3f}", first["warmup_s"],
                          first.get("graphs", ""), issue_cell, busy_cell])
    # The model's sizes from a LoRA provider's row: frozen_base has neither adapters nor their parameters.
    lora_rows = [r for r in rows if r.get("provider") != "frozen_base"]
    first = (lora_rows or rows or [{}])[0]
    commands = "; ".join(f"`{m['command']}`" for m in metas)
    return "\n".join([
        "## End-to-end LoRA training of a Llama-style decoder (`bench_train.py`)",
        "",
        f"- date: {meta['date']}; device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, "
        f"peft {meta['peft']}, transformers {meta['transformers']}",
        f"- command(s): {commands}",
        f"- {meta.get('settings', '')}; {first.get('params_m', '?')} M parameters, "
        f"{first.get('n_lora_layers', '?')} LoRA layers, batch {first.get('batch', '?')} × seq {first.get('seq', '?')}",
        "- step = forward + loss (torch.compile scope as in settings: 'layers' = each decoder layer and "
        "lm_head+loss compiled), backward, AdamW (fused on CUDA) on the adapters; "
        "time = median over the timed steps after warm-up (synchronised per step); peak = "
        "torch.cuda.max_memory_allocated over the timed steps (weights included); ×n: n repeats of the "
        "provider sequence (medians over them; ratios: median and range of the same-repeat ratios); host issue = "
        "median time until one step's call returns, its work queued, not done (an upper bound on the host's own "
        "time: the host also waits once the launch queue is full); GPU busy = the kernels' time in one step of "
        "the profile pass (after all timed runs) ÷ the median step time: well under 1, the GPU waited for the host",
        *([] if len(lora_rows) == len(rows) else [
            "- frozen_base = the same model without adapters, only its norms trainable (dx still runs through every "
            "frozen linear layer): the floor, so its tokens/s ÷ peft is the most a LoRA layer could reach in that run"]),
        "",
        common.markdown_table(headers, lines),
    ])


def environment(device, args) -> dict:
    meta = {"date": common.utc_now(), "command": common.command_line(), "torch": torch.__version__}
    for pkg in ("triton", "peft", "transformers"):
        try:
            meta[pkg] = __import__(pkg).__version__
        except Exception:
            meta[pkg] = "not installed"
    if device.type == "cuda":
        meta["device"] = torch.cuda.get_device_name(device)
    else:
        meta["device"] = common.cpu_description() + " (a logic check, not a measurement)"
    sizes = TINY_MODEL if args.tiny else GPU_MODEL
    meta["settings"] = (f"{args.dtype}, LoRA r={args.rank} alpha={args.alpha:g} on every Linear (lm_head too); "
                        f"model {sizes}; compile={compile_label(args)}; "
                        f"warm-up {args.warmup} steps, timed {args.steps}; "
                        f"PEFT adapters in {'fp32' if args.peft_fp32_adapters else 'the base dtype'}; "
                        f"lora_ext dropout '{args.dropout_position}'"
                        f"{' (its default)' if args.dropout_position == 'post' else ' (on x, as PEFT)'}, "
                        "PEFT dropout on x")
    return meta


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny model, short sequence, few steps")
    parser.add_argument("--providers", nargs="+", default=["peft", "lora_ext"], choices=ALL_PROVIDERS)
    parser.add_argument("--dropouts", type=float, nargs="+", default=None,
                        help="default: 0.0 0.1 (--quick: 0.1, the configuration the end-to-end target is about)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropout-position", default="post", choices=["pre", "post"],
                        help="lora_ext's dropout position: 'post' (its default, NeMo's) drops the LoRA term's "
                             "M x N output; 'pre' drops x (M x K), as PEFT does")
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation happens here)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--compile", default="layers", choices=["layers", "model", "none"],
                        help="torch.compile scope: each decoder layer (+ lm_head and loss), the whole model, or none")
    parser.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead"],
                        help="torch.compile's mode for both providers: reduce-overhead replays the compiled "
                             "graphs as CUDA graphs (the host's launch path leaves the step)")
    parser.add_argument("--tiny", action="store_true", help="the tiny model config (implied by --device cpu)")
    parser.add_argument("--peft-fp32-adapters", action="store_true",
                        help="PEFT's default autocast of bf16 adapters to fp32 (off: adapters in the base dtype)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the whole provider sequence this many times (A B A B ...): the table then "
                             "shows medians and the range of the same-repeat ratios")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: start no new run after this (rows so far are kept)")
    parser.add_argument("--out", default=common.BENCH_DIR)
    parser.add_argument("--tag", default="bench_train")
    parser.add_argument("--results-md", action="store_true")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="print the top ROWS kernels of the profile pass's step (after all timed runs)")
    parser.add_argument("--no-busy", action="store_true",
                        help="on CUDA, skip the profile pass (one more warm-up and a profiled step per provider "
                             "and dropout) that gives the GPU's busy time")
    parser.add_argument("--from-csv", nargs="+", default=None)
    args = parser.parse_args()
    defaults = parser.parse_args([])
    if args.device == "cpu":
        args.tiny = True
    if args.dropouts is None:
        # Only when not given: an explicit --dropouts 0.0 0.1 with --quick runs both.
        args.dropouts = [0.1] if args.quick else [0.0, 0.1]
    if args.quick or args.tiny:
        if args.seq == defaults.seq:
            args.seq = 128 if args.tiny else 512
        if args.warmup == defaults.warmup:
            args.warmup = 2
        if args.steps == defaults.steps:
            args.steps = 3
    return args


def main() -> None:
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.tag)
    if args.from_csv:
        rows, metas = [], []
        for path in args.from_csv:
            with open(path, newline="") as f:
                file_rows = list(csv.DictReader(f))
            # Repeats are numbered per run: renumber so that rows of different runs are never
            # paired as one repeat's side-by-side ratio.
            first_repeat = 1 + max((int(r.get("repeat") or 0) for r in rows), default=-1)
            for row in file_rows:
                row["repeat"] = str(first_repeat + int(row.get("repeat") or 0))
            rows += file_rows
            with open(os.path.splitext(path)[0] + ".meta.json") as f:
                metas.append(json.load(f))
        if len({m.get("settings") for m in metas}) > 1:
            raise SystemExit("bench_train.py --from-csv: these runs used different settings (e.g. the dropout "
                             "position), which one table cannot tell apart; render them separately")
        text = render(rows, metas)
        print(text)
        if args.results_md:
            common.replace_section("bench_train", text)
        return

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False (use --device cpu --quick)")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    providers = list(args.providers)
    for name in list(providers):
        if name == "peft":
            try:
                import peft  # noqa: F401
            except Exception as e:
                print(f"note: skipping peft: not importable ({type(e).__name__}: {e})", flush=True)
                providers.remove(name)
        if name == "lora_ext_native" and device.type == "cuda" and not lora_ext._C.has_cuda():
            print("note: skipping lora_ext_native: lora_ext was built without CUDA", flush=True)
            providers.remove(name)
    for limit_name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, limit_name):
            setattr(torch._dynamo.config, limit_name, max(getattr(torch._dynamo.config, limit_name), 64))

    meta = environment(device, args)
    with open(stem + ".meta.json", "w") as f:
        json.dump(meta, f, indent=1)
    runs = [(repeat, p, d) for repeat in range(args.repeats) for d in args.dropouts for p in providers]
    print(f"{len(runs)} runs: {[(p, d) for _, p, d in runs]}; each = build + {args.warmup} warm-up steps (compile) "
          f"+ {args.steps} timed", flush=True)
    started = time.perf_counter()
    rows = []
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for i, (repeat, provider, dropout) in enumerate(runs):
            if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
                print(f"time budget reached: {len(runs) - i} runs not started", flush=True)
                break
            t0 = time.perf_counter()
            try:
                row = run_provider(provider, dropout, args, device, dtype)
            except Exception as e:  # one failing provider must not lose the others' numbers
                print(f"  !! {provider} dropout={dropout} failed: {type(e).__name__}: {e}", flush=True)
                continue
            row["repeat"] = repeat
            rows.append(row)
            writer.writerow(common.csv_cells(row))
            f.flush()
            print(f"[{i + 1}/{len(runs)}] {provider} dropout={dropout}: {row['tokens_per_s']:,.0f} tokens/s, "
                  f"peak {row['peak_gib'] if row['peak_gib'] is None else round(row['peak_gib'], 2)} GiB, loss "
                  f"{row['first_loss']:.3f} -> {row['last_loss']:.3f} ({time.perf_counter() - t0:.0f} s; elapsed "
                  f"{time.perf_counter() - started:.0f} s)", flush=True)
    if rows and (args.profile or (device.type == "cuda" and not args.no_busy)):
        # The profile pass, after every timed run (see _run_provider): one profiled step per provider and
        # dropout, its kernels' time put on that pair's rows (every repeat); then the CSV again with it.
        for provider, dropout in dict.fromkeys((r["provider"], r["dropout"]) for r in rows):
            if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
                print("time budget reached: the profile pass stops", flush=True)
                break
            try:
                busy = run_provider(provider, dropout, args, device, dtype, profile=True)["gpu_busy_ms"]
            except Exception as e:  # the timed rows stand without it
                print(f"  !! profile pass, {provider} dropout={dropout}: {type(e).__name__}: {e}", flush=True)
                continue
            for r in rows:
                if (r["provider"], r["dropout"]) == (provider, dropout):
                    r["gpu_busy_ms"] = busy
            print(f"profile pass: {provider} dropout={dropout}: GPU busy "
                  f"{'—' if busy is None else f'{busy:.1f} ms'}", flush=True)
        with open(stem + ".csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(common.csv_cells(r) for r in rows)
    meta["elapsed_s"] = round(time.perf_counter() - started)
    with open(stem + ".meta.json", "w") as f:
        json.dump(meta, f, indent=1)
    if not rows:
        raise SystemExit("no provider ran")
    rows = [common.csv_cells(r) for r in rows]
    text = render(rows, [meta])
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    if args.results_md:
        common.replace_section("bench_train", text)
        print(f"wrote the bench_train section of {common.RESULTS_MD}")
    print(text)


if __name__ == "__main__":
    main()
