"""FSDP2 training of a model with LoRA layers, checked against single-process training.

Run by tests/test_fsdp.py as
    python tests/fsdp_worker.py --world-size 2 --port PORT --out RESULT.json [--backend gloo --device cpu]
It spawns one process per rank. Every rank:
1. trains the reference: the model built normally on one process, LoRA applied,
   adapters initialised from a fixed seed, full global batch, a few AdamW steps;
2. trains the FSDP2 model, built the way a large model would be: under
   torch.device("meta"), LoRA applied, fully_shard per block and at the root,
   lora_ext.materialize (each rank keeps its shard; same adapter seed), each rank on its
   half of the global batch;
3. compares per-step global loss, every adapter gradient (gathered) and the final
   adapters; saves the FSDP adapters with lora_ext.save_adapter (collective; rank 0
   writes) and loads them back into a fresh FSDP model, and into one left unsharded by an
   eval forward; merging that sharded model must be refused.
Rank 0 writes the differences to --out as JSON; the test asserts on them.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

VOCAB, DIM, HIDDEN, BLOCKS = 64, 32, 48, 3
GLOBAL_BATCH, SEQ, STEPS = 8, 12, 4
LORA = dict(target_modules=["up", "down", "head"], dim=4, alpha=8)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM, bias=False)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def lm_loss(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def data(step, device):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen).to(device)


def base_weights():
    torch.manual_seed(0)
    return TinyLM().state_dict()


def adapter_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train_reference(lora_ext, weights, device):
    model = TinyLM().to(device)
    model.load_state_dict(weights)
    lora_ext.apply_lora_to_linear_modules(model, lora_ext.PeftConfig(**LORA))
    torch.manual_seed(1)  # the adapter init materialize does: reset_parameters in module order
    for m in model.modules():
        if isinstance(m, lora_ext.LinearLoRA):
            m.reset_parameters()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, grads = [], []
    for step in range(STEPS):
        loss = lm_loss(model, data(step, device))
        loss.backward()
        losses.append(loss.item())
        grads.append({n: g.clone() for n, g in adapter_grads(model).items()})
        opt.step()
        opt.zero_grad()
    return model, losses, grads


def build_fsdp(lora_ext, weights, device, mesh):
    from torch.distributed.fsdp import fully_shard

    with torch.device("meta"):
        model = TinyLM()
    lora_ext.apply_lora_to_linear_modules(model, lora_ext.PeftConfig(**LORA))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    torch.manual_seed(1)
    lora_ext.materialize(model, weights, device)
    return model


def run(rank, world_size, port, out, backend, device_type):
    train_and_compare(rank, world_size, port, out, backend, device_type)
    # Everything that referenced the process group (the device mesh, the sharded parameters)
    # is gone now: collect it here, while the interpreter is alive. Left to interpreter
    # shutdown, gloo's threads were sometimes destroyed still joinable, and the rank died
    # with SIGABRT ("terminate called without an active exception") after it had finished.
    gc.collect()


def train_and_compare(rank, world_size, port, out, backend, device_type):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # The LM head's output is a view of the op's result; nothing here modifies it in place.
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    import lora_ext
    from torch.distributed.device_mesh import init_device_mesh

    if device_type == "cuda":
        torch.cuda.set_device(rank)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh(device_type, (world_size,))
        weights = base_weights()
        reference, ref_losses, ref_grads = train_reference(lora_ext, weights, device)

        model = build_fsdp(lora_ext, weights, device, mesh)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        rows = GLOBAL_BATCH // world_size
        losses, grad_diff, n_grads = [], 0.0, 0
        for step in range(STEPS):
            batch = data(step, device)[rank * rows:(rank + 1) * rows]
            loss = lm_loss(model, batch)
            loss.backward()  # FSDP2 averages the gradients over ranks: the global-batch mean
            global_loss = loss.detach().clone()
            dist.all_reduce(global_loss)
            losses.append(global_loss.item() / world_size)
            grads = adapter_grads(model)
            assert grads.keys() == ref_grads[step].keys(), (sorted(grads), sorted(ref_grads[step]))
            for name, g in grads.items():
                grad_diff = max(grad_diff, (full(g) - ref_grads[step][name]).abs().max().item())
                n_grads += 1
            opt.step()
            opt.zero_grad()

        ref_params = dict(reference.named_parameters())
        param_diff = max(
            (full(p.detach()) - ref_params[n].detach()).abs().max().item()
            for n, p in model.named_parameters() if p.requires_grad
        )
        frozen_same = all(
            torch.equal(full(p.detach()), ref_params[n].detach())
            for n, p in model.named_parameters() if not p.requires_grad
        )

        # Adapters of a sharded model: save (gathered, rank 0 writes), load into a fresh sharded model.
        # Beside the result file: the caller's temporary folder (pytest's tmp_path) owns it, also when a rank fails.
        beside_out = os.path.dirname(os.path.abspath(out))
        tmp = [tempfile.mkdtemp(prefix="fsdp_adapter_", dir=beside_out) if rank == 0 else None]
        dist.broadcast_object_list(tmp)
        lora_ext.save_adapter(model, tmp[0])  # returns on every rank once the files exist (no barrier here)
        fresh = build_fsdp(lora_ext, weights, device, mesh)
        lora_ext.load_adapter(fresh, tmp[0])
        trained = dict(model.named_parameters())
        load_diff = max(
            (full(p.detach()) - full(trained[n].detach())).abs().max().item()
            for n, p in fresh.named_parameters() if p.requires_grad
        )
        # After an eval forward FSDP2 leaves the root unit's parameters unsharded: a load must still land
        # in the shards (compared after an explicit reshard), and a merge must refuse the sharded model.
        again = build_fsdp(lora_ext, weights, device, mesh).eval()
        with torch.no_grad():
            lm_loss(again, data(0, device)[rank * rows:(rank + 1) * rows])
        lora_ext.load_adapter(again, tmp[0])
        for module in again.modules():
            if hasattr(module, "reshard"):
                module.reshard()
        reload_diff = max(
            (full(p.detach()) - full(trained[n].detach())).abs().max().item()
            for n, p in again.named_parameters() if p.requires_grad
        )
        try:
            lora_ext.merge_adapters(again)
            merge_refused = False
        except NotImplementedError:
            merge_refused = not any(getattr(m, "merged", False) for m in again.modules())
        saved_diff = 0.0
        if rank == 0:
            from safetensors.torch import load_file

            saved = load_file(os.path.join(tmp[0], "adapter_model.safetensors"))
            for n, p in reference.named_parameters():
                if p.requires_grad:
                    saved_diff = max(saved_diff, (saved["base_model.model." + n] - p.detach().cpu()).abs().max().item())
            result = dict(
                world_size=world_size, losses=losses, ref_losses=ref_losses, grad_diff=grad_diff, n_grads=n_grads,
                param_diff=param_diff, frozen_same=frozen_same, saved_diff=saved_diff, load_diff=load_diff,
                n_saved=len(saved), reload_diff=reload_diff, merge_refused=merge_refused,
            )
            with open(out, "w") as f:
                json.dump(result, f, indent=1)
    finally:
        dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    mp.spawn(run, args=(args.world_size, args.port, args.out, args.backend, args.device), nprocs=args.world_size)


if __name__ == "__main__":
    sys.exit(main())
