"""FSDP2 training of a Llama-style model with LoRA on N GPUs (NCCL): loss and tokens/s.

The library's large-model flow, end to end, on every rank:
    meta build (transformers LlamaForCausalLM from a config, bf16)
    -> lora_ext.apply_lora_to_linear_modules (every Linear, lm_head included; on meta)
    -> fully_shard per decoder layer and at the root
    -> lora_ext.materialize (each rank keeps its shard; rotary tables recomputed)
    -> AdamW on the adapters.
The global batch is fixed (--global-batch sequences of --seq tokens, drawn from a seeded
generator) and split across ranks, so runs with different N train on the same data and
their losses can be compared step by step.

    python benchmarks/fsdp_gpu.py --nproc 2                     # spawns 2 ranks (or: torchrun --nproc_per_node 2 ...)
    python benchmarks/fsdp_gpu.py --nproc 1                     # same training on one GPU, to compare losses
    python benchmarks/fsdp_gpu.py --nproc 2 --device cpu --tiny # logic check on CPU with gloo

NVLink multicast (NVLS) and symmetric-memory multicast are switched off before the
process group starts (the lent H200 machines do not support them).
"""
from __future__ import annotations

import os

# Before torch.distributed / NCCL initialise: no NVLink SHARP (NVLS) and no multicast symmetric memory.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lora_ext  # noqa: E402

# ~0.85B parameters (Llama-2/TinyLlama-like proportions, grouped-query attention); same as bench_train.py.
GPU_MODEL = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=5632, vocab_size=32000)
TINY_MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=160, vocab_size=512)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=None, help="ranks to spawn (default: all GPUs); ignored under torchrun")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="a tiny model (logic check)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--global-batch", type=int, default=8, help="sequences per step, split across ranks")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3, help="steps not timed")
    p.add_argument("--rank", type=int, default=16, dest="lora_rank")
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    p.add_argument("--out", default=None, help="write the rank-0 result as JSON here")
    args = p.parse_args()
    if args.tiny:
        args.seq = min(args.seq, 64)
    return args


def build_config(args):
    from transformers import LlamaConfig

    config = LlamaConfig(**(TINY_MODEL if args.tiny else GPU_MODEL), max_position_embeddings=args.seq,
                         use_cache=False, tie_word_embeddings=False)
    try:
        config._attn_implementation = "sdpa"
    except Exception:  # a transformers without the setter keeps its default attention
        pass
    return config


@torch.no_grad()
def random_base_weights(model, device, seed=0):
    """Full random base weights by name (N(0, 0.02) matrices, ones for norms), same on every rank."""
    gen = torch.Generator(device=device).manual_seed(seed)
    weights = {}
    for name, t in model.state_dict().items():
        if ".lora_" in name:
            continue
        if t.dim() >= 2:
            weights[name] = torch.randn(t.shape, generator=gen, device=device, dtype=torch.float32).mul_(0.02).to(t.dtype)
        else:
            weights[name] = torch.ones(t.shape, device=device, dtype=t.dtype)
    return weights


def batch_for(step, args, vocab, rank, world, device):
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, vocab, (args.global_batch, args.seq + 1), generator=gen)
    rows = args.global_batch // world
    return tokens[rank * rows:(rank + 1) * rows].to(device)


def run(rank, world, args, port, local_rank=None):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaForCausalLM

    if "RANK" not in os.environ:  # spawned here, not by torchrun
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    local_rank = rank if local_rank is None else local_rank
    # FSDP2 warns that the root returns a view (HF's output); nothing here modifies it in place.
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        device = torch.device("cpu")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        if args.global_batch % world:
            raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {world} ranks")
        mesh = init_device_mesh(args.device, (world,))
        config = build_config(args)
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32

        t0 = time.perf_counter()
        with torch.device("meta"):
            model = LlamaForCausalLM(config).to(dtype)
        n_lora = lora_ext.apply_lora_to_linear_modules(
            model, lora_ext.PeftConfig(match_all_linear=True, dim=args.lora_rank, alpha=args.alpha)
        )
        for layer in model.model.layers:
            if args.compile:
                layer.compile()
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        weights = random_base_weights(model, device)
        torch.manual_seed(0)  # adapter init: the same on every rank and for every N
        lora_ext.materialize(model, weights, device)
        del weights
        setup_s = time.perf_counter() - t0
        n_params = sum(p.numel() for p in model.parameters())
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        tokens_per_step = args.global_batch * args.seq
        losses, step_s = [], []
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for step in range(args.steps):
            if args.device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            batch = batch_for(step, args, config.vocab_size, rank, world, device)
            logits = model(input_ids=batch[:, :-1]).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            global_loss = loss.detach().clone()
            dist.all_reduce(global_loss)
            losses.append(global_loss.item() / world)  # .item() also waits for the step
            step_s.append(time.perf_counter() - t)
            if rank == 0:
                print(f"step {step:3d}  loss {losses[-1]:.5f}  {step_s[-1] * 1e3:8.1f} ms", flush=True)

        timed = step_s[args.warmup:] or step_s
        median = statistics.median(timed)
        result = dict(
            world_size=world, device=torch.cuda.get_device_name(device) if args.device == "cuda" else "cpu",
            torch=torch.__version__,
            n_lora_layers=n_lora, seq=args.seq, global_batch=args.global_batch, lora_rank=args.lora_rank,
            compile=args.compile, setup_s=round(setup_s, 2), step_ms_median=round(median * 1e3, 2),
            tokens_per_s=round(tokens_per_step / median, 1), tokens_per_s_per_gpu=round(tokens_per_step / median / world, 1),
            peak_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if args.device == "cuda" else None,
            losses=[round(x, 6) for x in losses],
        )
        # Parameter counts: local shards summed over ranks.
        counts = torch.tensor([n_params, n_trainable], dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        result["params_m"] = round(counts[0].item() / 1e6, 1)
        result["trainable_m"] = round(counts[1].item() / 1e6, 2)
        if rank == 0:
            print(json.dumps(result, indent=1), flush=True)
            print(f"FSDP2 x{world}: {result['tokens_per_s']:.0f} tokens/s "
                  f"({result['tokens_per_s_per_gpu']:.0f} per rank), median step {result['step_ms_median']} ms, "
                  f"final loss {losses[-1]:.5f}", flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    args = parse_args()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, None, int(os.environ["LOCAL_RANK"]))
        return
    world = args.nproc or (torch.cuda.device_count() if args.device == "cuda" else 2)
    mp.spawn(run, args=(world, args, free_port()), nprocs=world)


if __name__ == "__main__":
    main()
