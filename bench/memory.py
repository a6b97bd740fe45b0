"""Peak training memory (and step time) of IST against full fine-tuning and LoRA, in one run.

Same model, batch and sequence for every method; each method starts from the
same weights and trains on the same random batches.

Methods:
  full          full fine-tuning, AdamW
  lora          peft LoRA on all layers, AdamW
  fixed-spread  LoRA trained on a fixed 25% subset spread over depth (e.g. {0,4,8} of 12)
  fixed-top     LoRA trained on the top 25% of layers (the floor IST can approach)
  ist-keep / ist-offload / ist-drop   ISTAdamW (25% of layers per step) with each state_policy
  ist-selective ISTAdamW, state_policy=drop, checkpoint_unselected=True

Measurement: on CUDA ``max_memory_allocated`` after ``reset_peak_memory_stats``;
on CPU the ordered sum of the profiler's memory events of the step (DESIGN.md
section 6). "total" = weights + optimizer state resident at the step start +
the step's peak of new allocations. The peak is split into gradients (bytes
of .grad after backward) and "activations & temporaries" (the rest of the
step's peak). Per-step numbers: the max and the mean over the measured steps
(the first step of each method is warm-up and not counted). IST's measured
steps include its probe rounds (every 10 steps), which are part of training;
with the default ``kernels="auto"`` they run torch ops, with no JIT compile or
autotuning buffer in the window (the kernels are never autotuned).

    python bench/memory.py                                  # GPT-2-small config, seq 1024
    python bench/memory.py --model tinyllama --seq 256 --steps 6
    python bench/memory.py --checkpointing                  # HF gradient checkpointing on
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from common import conditions, peak_step_bytes, state_bytes_on_device
from peft import LoraConfig, get_peft_model

from ist_optim import ISTAdamW

MIB = 2**20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_base(name: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "gpt2":
        config = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
        return GPT2LMHeadModel(config), ["c_attn", "c_proj", "c_fc"]
    if name == "tinyllama":  # TinyLLaMA-1.1B's config
        config = LlamaConfig(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            max_position_embeddings=2048,
        )
        return LlamaForCausalLM(config), ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    raise ValueError(f"unknown model {name!r}")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, data shape, precision and device options shared with ``step_time.py``."""
    parser.add_argument("--model", default="gpt2", choices=["gpt2", "tinyllama"])
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument(
        "--dtype",
        default="fp32",
        choices=list(DTYPES),
        help="base weights' dtype; LoRA adapters stay float32 (the paper: fp16 base)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def blocks_of(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.transformer.h if hasattr(base, "transformer") else base.model.layers


def setup(method: str, base_state: dict, args) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model, targets = build_base(args.model)
    model.load_state_dict(base_state)
    model = model.to(DTYPES[args.dtype])  # peft keeps the adapters in float32 (autocast_adapter_dtype)
    if method != "full":
        lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05, target_modules=targets)
        model = get_peft_model(model, lora)
    model = model.to(args.device)
    if args.checkpointing:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    num_layers = len(blocks_of(model))
    quarter = max(1, round(num_layers / 4))
    if method.startswith("fixed"):
        chosen = (
            list(range(0, num_layers, num_layers // quarter))[:quarter]
            if method == "fixed-spread"
            else list(range(num_layers - quarter, num_layers))
        )
        for index, block in enumerate(blocks_of(model)):
            for p in block.parameters():
                if index not in chosen:
                    p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    if method.startswith("ist"):
        policy = {"ist-keep": "keep", "ist-offload": "offload", "ist-drop": "drop", "ist-selective": "drop"}[method]
        opt = ISTAdamW(
            model,
            lr=1e-4,
            active_layers=0.25,
            state_policy=policy,
            checkpoint_unselected=method == "ist-selective",
            seed=0,
        )
    else:
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    return model, opt


def one_step(model, opt, ids, device: str) -> dict[str, float]:
    """Train one step; return its memory split (bytes) and time (s)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    state = state_bytes_on_device(opt)
    grads = {}

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads["bytes"] = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)

    start = time.perf_counter()
    _, peak = peak_step_bytes(step, device)
    elapsed = time.perf_counter() - start
    return {
        "weights": weights,
        "state": state,
        "peak": peak,
        "grads": grads["bytes"],
        "total": weights + state + peak,
        "time": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--steps", type=int, default=20, help="measured steps for IST methods (after 1 warm-up)")
    parser.add_argument("--baseline-steps", type=int, default=3, help="measured steps for fixed methods")
    parser.add_argument("--checkpointing", action="store_true", help="HF non-reentrant gradient checkpointing")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["full", "lora", "fixed-spread", "fixed-top", "ist-keep", "ist-offload", "ist-drop", "ist-selective"],
    )
    args = parser.parse_args()

    base, _ = build_base(args.model)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    vocab = base.config.vocab_size
    del base
    gen = torch.Generator().manual_seed(0)
    total_steps = 1 + max(args.steps, args.baseline_steps)
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=gen) for _ in range(total_steps)]

    print(
        conditions(
            model=f"{args.model} config (random init), base {args.dtype}, adapters fp32",
            seq=args.seq,
            batch=args.batch,
            lora=f"r={args.rank} dropout 0.05",
            checkpointing=args.checkpointing,
            measure="max_memory_allocated" if args.device == "cuda" else "profiler memory events",
        )
    )
    rows_out = {}
    for method in args.methods:
        print(f"measuring {method} ...", file=sys.stderr, flush=True)
        model, opt = setup(method, base_state, args)
        steps = args.steps if method.startswith("ist") else args.baseline_steps
        rows = [one_step(model, opt, batches[i].to(args.device), args.device) for i in range(1 + steps)][1:]
        worst = max(rows, key=lambda r: r["total"])
        rows_out[method] = dict(
            worst,
            mean_total=statistics.mean(r["total"] for r in rows),
            median_time=statistics.median(r["time"] for r in rows),
            steps=steps,
        )
        del model, opt

    ref = rows_out.get("lora")
    print(
        f"{'method':14s} {'steps':>5s} {'peak MiB':>8s} {'vs lora':>7s} {'mean MiB':>8s} {'weights':>7s} "
        f"{'opt st':>6s} {'grads':>6s} {'act+tmp':>7s} {'s/step':>6s} {'vs lora':>7s}"
    )
    for method, r in rows_out.items():
        ratio = f"{r['total'] / ref['total']:7.2f}" if ref else "      -"
        t_ratio = f"{r['median_time'] / ref['median_time']:7.2f}" if ref else "      -"
        print(
            f"{method:14s} {r['steps']:5d} {r['total'] / MIB:8.0f} {ratio} {r['mean_total'] / MIB:8.0f} "
            f"{r['weights'] / MIB:7.0f} {r['state'] / MIB:6.1f} {r['grads'] / MIB:6.1f} "
            f"{(r['peak'] - r['grads']) / MIB:7.0f} {r['median_time']:6.2f} {t_ratio}"
        )
    print(
        "peak: the worst measured step's weights + resident optimizer state + the step's allocation peak; "
        "mean: the same averaged over steps; the split is of the worst step; s/step: median"
    )


if __name__ == "__main__":
    main()
