"""Which probe mode should be the default? Sequential vs batched importance updates.

One importance update = ``N_c`` no-grad forwards (sequential) or one forward
over ``N_c`` stacked copies of the batch (batched). Both run on the same model
and batch in the same process, interleaved, after warm-up; the losses are
checked equal before timing.

    python bench/probe_modes.py                 # LLaMA-style config, LoRA r=32
    python bench/probe_modes.py --batch 1 4 16 --seq 128 --repeats 5
"""

from __future__ import annotations

import argparse

import torch
from common import conditions, median, quantiles, time_alternating
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from ist_optim import discover_layers, find_adapter_modules
from ist_optim.probes import probe_losses


def build(layers: int, hidden: int, vocab: int, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=2048,
    )
    model = LlamaForCausalLM(config)
    lora = LoraConfig(r=32, lora_alpha=64, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    return get_peft_model(model, lora).to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--num-probes", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    model = build(args.layers, args.hidden, args.vocab, args.device)
    layer_map = discover_layers(model, [p for p in model.parameters() if p.requires_grad])
    adapters = find_adapter_modules(model, layer_map.params)
    gen = torch.Generator().manual_seed(0)
    kept = torch.stack([torch.randperm(args.layers, generator=gen) < args.layers // 2 for _ in range(args.num_probes)])
    beta = torch.where(kept, 1.0, 0.25).double()

    print(
        conditions(
            model=f"LLaMA-config L={args.layers} d={args.hidden} V={args.vocab}, LoRA r=32 q,k,v,up,down",
            seq=args.seq,
            num_probes=args.num_probes,
            repeats=args.repeats,
        )
    )
    print(f"{'batch':>5} | {'sequential s (p20-p80)':>24} | {'batched s (p20-p80)':>24} | batched/sequential")
    for batch_size in args.batch:
        ids = torch.randint(0, args.vocab, (batch_size, args.seq), generator=gen).to(args.device)
        batch = ((), {"input_ids": ids, "labels": ids})
        seq_losses = probe_losses(model, adapters, beta, batch=batch, mode="sequential")
        bat_losses = probe_losses(model, adapters, beta, batch=batch, mode="batched")
        torch.testing.assert_close(bat_losses, seq_losses, rtol=1e-4, atol=1e-4)
        times = time_alternating(
            {
                "sequential": lambda: probe_losses(model, adapters, beta, batch=batch, mode="sequential"),
                "batched": lambda: probe_losses(model, adapters, beta, batch=batch, mode="batched"),
            },
            repeats=args.repeats,
        )
        s, b = times["sequential"], times["batched"]
        cell = lambda v: f"{median(v):.3f} ({quantiles(v)[0]:.3f}-{quantiles(v)[1]:.3f})"  # noqa: E731
        print(f"{batch_size:>5} | {cell(s):>24} | {cell(b):>24} | {median(b) / median(s):.2f}")


if __name__ == "__main__":
    main()
