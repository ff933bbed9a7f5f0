"""Fine-tune a small Llama-style decoder with lora_ext: the project's demo.

The whole flow a user runs at scale, at toy size so it finishes in under two minutes on
two CPU cores (and uses a GPU when there is one):

1. a "pretrained" base checkpoint is written (random weights stand in for real ones);
2. the model is built on the meta device (no memory), LoRA is applied to its linear
   layers, it is materialised with `to_empty`, the base weights are loaded by their
   unchanged names, and the adapters are initialised;
3. the adapters are trained with `torch.compile` on a shipped text (bytes as tokens),
   with a tqdm progress bar and the loss printed as it falls;
4. the adapters are saved in the Hugging Face PEFT format.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import lora_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=int, default=32)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--no-compile", action="store_true", help="run eagerly")
    parser.add_argument("--out", default=os.path.join(HERE, "output"), help="where checkpoints and adapters go")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


def model_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=256,  # bytes
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


def write_base_checkpoint(path: str) -> None:
    """Stands in for a downloaded pretrained checkpoint."""
    torch.manual_seed(1234)
    base = LlamaForCausalLM(model_config())
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, path)


def load_corpus(device: str) -> torch.Tensor:
    with open(os.path.join(HERE, "data", "tiny_corpus.txt"), "rb") as f:
        return torch.tensor(list(f.read()), dtype=torch.long, device=device)


def sample_batch(tokens: torch.Tensor, batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, tokens.numel() - seq - 1, (batch,), generator=generator)
    return torch.stack([tokens[s : s + seq + 1] for s in starts.tolist()])


def main() -> None:
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    checkpoint = os.path.join(args.out, "base_model.safetensors")
    write_base_checkpoint(checkpoint)

    # Build on meta, patch, materialise, load the base by its unchanged names, init adapters.
    with torch.device("meta"):
        model = LlamaForCausalLM(model_config())
    peft_config = lora_ext.PeftConfig(
        target_modules=["*_proj"], dim=args.rank, alpha=args.alpha, dropout=args.dropout
    )
    patched = lora_ext.apply_lora_to_linear_modules(model, peft_config)
    torch.manual_seed(0)  # the adapters' init draws from torch's generator
    lora_ext.materialize(model, checkpoint, device=args.device)
    model.to(dtype)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"patched {patched} linear layers; training {trainable:,} of {total:,} parameters on {args.device}")

    tokens = load_corpus(args.device)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    def train_step(batch: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        return loss

    step_fn = train_step if args.no_compile else torch.compile(train_step)
    model.train()
    first_loss = None
    progress = tqdm(range(args.steps), desc="LoRA fine-tune", unit="step")
    for step in progress:
        batch = sample_batch(tokens, args.batch, args.seq, generator)
        loss = step_fn(batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        first_loss = value if first_loss is None else first_loss
        progress.set_postfix(loss=f"{value:.3f}")
        if step % 20 == 0 or step == args.steps - 1:
            tqdm.write(f"step {step:4d}  loss {value:.4f}")

    adapter_dir = os.path.join(args.out, "adapter")
    lora_ext.save_adapter(model, adapter_dir, peft_config=peft_config)
    print(f"loss {first_loss:.3f} -> {value:.3f}; adapters saved to {adapter_dir} "
          f"({os.path.getsize(os.path.join(adapter_dir, 'adapter_model.safetensors')) / 1024:.0f} KiB); "
          f"total {time.perf_counter() - t_start:.1f} s")
    if not value < first_loss:
        raise SystemExit("the loss did not fall")


if __name__ == "__main__":
    main()
