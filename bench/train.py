"""The main job: fine-tune a LoRA model with plain AdamW and with ISTAdamW, side by side.

Runs offline on an embedded default: a config-built LLaMA-style model (random
weights, byte-level vocabulary) learning a short embedded text, so it shows
the mechanics (which layers train, how importance moves, step time) in about
a minute on a laptop CPU. ``--data`` points it at a real text instead, e.g.
``../shared/data/tinyshakespeare/input.txt``. Both runs start from the same
weights and see the same batches.

    python bench/train.py
    python bench/train.py --data ../shared/data/tinyshakespeare/input.txt --steps 200
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from common import conditions
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from ist_optim import ISTAdamW

EMBEDDED_TEXT = """\
Importance-aware sparse tuning trains only a few layers at every step. Every few steps it asks
which layers matter: it turns some adapters down to a quarter of their output, runs the model
without gradients, and rewards the layers whose absence hurts the loss. The layers it finds
important are then trained more often, and the others less. Memory falls because frozen layers
keep no gradients, no optimizer moments and, below the lowest trained layer, no activations.
"""


def byte_batches(text: str, batch: int, seq: int, steps: int, seed: int) -> list[torch.Tensor]:
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    if data.numel() <= seq + 1:
        raise ValueError(f"text of {data.numel()} bytes is shorter than --seq {seq}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - seq, (steps, batch), generator=gen)
    return [torch.stack([data[s : s + seq] for s in row.tolist()]) for row in starts]


def build(layers: int, hidden: int, rank: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32),
                         max_position_embeddings=1024)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05,
                      target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    return get_peft_model(LlamaForCausalLM(config), lora)


def train(model, opt, batches, log_every: int, name: str) -> tuple[float, float]:
    model.train()
    losses, start = [], time.perf_counter()
    for step, ids in enumerate(batches, 1):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % log_every == 0:
            extra = f"  active {opt.active_layers}" if hasattr(opt, "active_layers") else ""
            print(f"  {name:8s} step {step:4d}  loss {sum(losses[-log_every:]) / log_every:.3f}{extra}")
    return sum(losses[-log_every:]) / log_every, (time.perf_counter() - start) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="plain-text file to learn (default: an embedded paragraph)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--active-layers", type=float, default=0.25)
    parser.add_argument("--probe-interval", type=int, default=10)
    parser.add_argument("--importance-lr", type=float, default=10.0)
    parser.add_argument("--rule", default="reference", choices=["reference", "paper"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    text = open(args.data, encoding="utf-8").read() if args.data else EMBEDDED_TEXT
    batches = byte_batches(text, args.batch, args.seq, args.steps, args.seed)
    lora_model = build(args.layers, args.hidden, args.rank, args.seed)
    ist_model = copy.deepcopy(lora_model)
    log_every = max(1, args.steps // 6)

    print(conditions(data=args.data or "embedded", steps=args.steps, batch=args.batch, seq=args.seq,
                     model=f"LLaMA-config L={args.layers} d={args.hidden}, LoRA r={args.rank}", seed=args.seed))
    print("LoRA + AdamW (all layers every step)")
    adamw = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    lora_loss, lora_time = train(lora_model, adamw, batches, log_every, "AdamW")

    print(f"LoRA + ISTAdamW (active_layers={args.active_layers}, rule={args.rule})")
    ist = ISTAdamW(ist_model, lr=args.lr, active_layers=args.active_layers, probe_interval=args.probe_interval,
                   importance_lr=args.importance_lr, rule=args.rule, seed=args.seed)
    ist_loss, ist_time = train(ist_model, ist, batches, log_every, "ISTAdamW")

    print()
    print(f"{'optimizer':10s} {'final loss':>10s} {'s/step':>8s}")
    print(f"{'AdamW':10s} {lora_loss:10.3f} {lora_time:8.3f}")
    print(f"{'ISTAdamW':10s} {ist_loss:10.3f} {ist_time:8.3f}  ({ist_time / lora_time:.2f}x AdamW's step time)")
    importance = ", ".join(f"{v:+.3f}" for v in ist.scheduler.importance.tolist())
    print(f"importance per layer: [{importance}]  ({ist.scheduler.num_updates} updates, "
          f"{ist.scheduler.num_skipped} skipped)")


if __name__ == "__main__":
    main()
