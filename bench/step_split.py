"""Where a step's time goes, IST against LoRA on pretrained SmolLM2 (the paper's Table 13, on this machine).

Both arms are built up front from the same weights and take turns, one
training step each, on the same batches (``--batch`` x ``--seq`` random token
ids: the time does not depend on which tokens), so drift of the machine hits
both alike. Each step is split into forward,
backward and ``opt.step()``; for IST, ``opt.step()`` on a probe step also
runs the probe round, so the probe time is the median of probe steps'
``opt.step()`` minus that of the other steps, and it is amortised over
``probe_interval``. Medians after ``--warmup`` rounds.

``--model gpt2`` is the [Memory] setting of ``memory.py`` / ``step_time.py``
(GPT-2-small config, random init, LoRA r=32 with dropout 0.05 on
c_attn/c_proj/c_fc, 1024 tokens, batch 1): 12 layers, 3 trained per step, so
the backward cut skips a larger share of the blocks than on SmolLM2's 30.

    python bench/step_split.py                      # SmolLM2, 128 tokens, batch 8
    python bench/step_split.py --seq 512 --batch 2
    python bench/step_split.py --model gpt2         # 1024 tokens, batch 1
    python bench/step_split.py --probe-rows 2       # IST probing 2 of the batch's 8 rows
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import conditions, sync
from finetune import LORA_TARGETS, add_lora

from ist_optim import ISTAdamW


def timed(fn) -> tuple[object, float]:
    sync()
    start = time.perf_counter()
    value = fn()
    sync()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, help="default: 128 (1024 for gpt2)")
    parser.add_argument("--batch", type=int, help="default: 8 (1 for gpt2)")
    parser.add_argument("--rounds", type=int, default=30, help="measured steps per arm")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--probe-interval", type=int, default=10)
    parser.add_argument("--active-layers", type=float, default=0.25)
    parser.add_argument(
        "--probe-rows",
        type=lambda v: float(v) if "." in v else int(v),
        nargs="+",
        default=[1.0],
        help="IST's probe_rows: an int count of the batch's rows, or a float fraction (default 1.0: "
        "all); several values give one IST arm each (ist, ist@rows), timed in turn",
    )
    parser.add_argument("--random", action="store_true", help="also time policy='random' (no probes), for IST/random")
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "gpt2", "tiny"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    args.seq = args.seq or (1024 if args.model == "gpt2" else 128)
    args.batch = args.batch or (1 if args.model == "gpt2" else 8)

    lora_targets = "+".join(LORA_TARGETS)
    if args.model == "gpt2":
        from memory import build_base, setup

        base, _ = build_base("gpt2")
        vocab = base.config.vocab_size
        state = base.state_dict()
        settings = argparse.Namespace(model="gpt2", rank=32, dtype="fp32", device=args.device, checkpointing=False)
        lora, ist_model = (setup("lora", state, settings)[0] for _ in range(2))  # r=32, dropout 0.05, as memory.py
        random_model = setup("lora", state, settings)[0] if args.random else None
        lora_targets = "c_attn+c_proj+c_fc, r=32"
    elif args.model == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        base = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=512,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=8,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        )
        vocab = 512
    else:
        from smollm2 import load_smollm2

        base, tokenizer = load_smollm2()
        vocab = tokenizer.vocab_size
    if args.model != "gpt2":
        base = base.to(args.device)
        lora, ist_model = add_lora(base, 8, seed=0), add_lora(base, 8, seed=0)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(args.device) for _ in range(4)]

    arms = {}
    arms["lora"] = (
        lora,
        torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0),
    )
    for k, rows in enumerate(args.probe_rows):
        model = (
            ist_model
            if k == 0
            else add_lora(base, 8, seed=0)
            if args.model != "gpt2"
            else setup("lora", state, settings)[0]
        )
        arms["ist" if k == 0 else f"ist@{rows}"] = (
            model,
            ISTAdamW(
                model,
                lr=1e-4,
                active_layers=args.active_layers,
                probe_interval=args.probe_interval,
                probe_rows=rows,
                seed=0,
            ),
        )
    if args.random:
        random_model = random_model if args.model == "gpt2" else add_lora(base, 8, seed=0)
        arms["random"] = (
            random_model,
            ISTAdamW(random_model, lr=1e-4, active_layers=args.active_layers, policy="random", seed=0),
        )
    times: dict[str, dict[str, list[float]]] = {
        a: {"forward": [], "backward": [], "step": [], "probe_step": [], "whole": []} for a in arms
    }
    total_rounds = args.warmup + args.rounds
    for round_ in range(total_rounds):
        for arm, (model, opt) in arms.items():
            ids = batches[round_ % len(batches)]
            loss, forward = timed(lambda: model(input_ids=ids, labels=ids).loss)
            _, backward = timed(loss.backward)
            probe = arm.startswith("ist") and (opt.num_steps + 1) % args.probe_interval == 0
            _, step = timed(opt.step)
            opt.zero_grad(set_to_none=True)
            if round_ >= args.warmup or probe:  # probe steps are rare: keep every one
                times[arm]["forward"].append(forward)
                times[arm]["backward"].append(backward)
                times[arm]["probe_step" if probe else "step"].append(step)
                if not probe:
                    times[arm]["whole"].append(forward + backward + step)

    print(
        conditions(
            model=args.model,
            seq=args.seq,
            batch=args.batch,
            lora_targets=lora_targets,
            active_layers=args.active_layers,
            probe_interval=args.probe_interval,
            probe_rows=args.probe_rows,
            rounds=args.rounds,
        )
    )
    print(
        f"{'arm':8s} {'forward':>8s} {'backward':>8s} {'optim':>8s} {'probe/round':>11s} {'amortised':>9s} {'total':>8s} {'vs lora':>7s}"
    )
    totals = {}
    for arm, parts in times.items():
        f, b, s = (statistics.median(parts[k]) for k in ("forward", "backward", "step"))
        probe = statistics.median(parts["probe_step"]) - s if parts["probe_step"] else 0.0
        amortised = probe / args.probe_interval
        totals[arm] = f + b + s + amortised
        print(
            f"{arm:8s} {f:8.3f} {b:8.3f} {s:8.3f} {probe:11.3f} {amortised:9.3f} {totals[arm]:8.3f} "
            f"{totals[arm] / totals.get('lora', totals[arm]):7.2f}"
        )
    print(
        "seconds, medians; probe/round: one probe round (its opt.step() minus an ordinary one); amortised: "
        f"over probe_interval={args.probe_interval}"
    )
    # The sum of per-part medians need not be the median step (IST's parts vary from step to step with
    # the lowest selected layer): the median whole step, for comparison.
    whole = {arm: statistics.median(parts["whole"]) for arm, parts in times.items()}
    amortised = {
        arm: totals[arm] - sum(statistics.median(times[arm][k]) for k in ("forward", "backward", "step"))
        for arm in times
    }
    print(
        "median whole step without a probe round: "
        + ", ".join(f"{arm} {whole[arm]:.3f} s ({whole[arm] / whole['lora']:.2f}x)" for arm in whole)
        + "; plus the amortised probes: "
        + ", ".join(
            f"{arm} {whole[arm] + amortised[arm]:.3f} s ({(whole[arm] + amortised[arm]) / whole['lora']:.2f}x)"
            for arm in whole
        )
    )
    for arm in (a for a in whole if a.startswith("ist") and "random" in whole):
        ist = whole[arm] + amortised[arm]
        print(
            f"{arm} with amortised probes / random: {ist / (whole['random'] + amortised['random']):.2f}x "
            f"(sum of part medians: {totals[arm] / totals['random']:.2f}x)"
        )


if __name__ == "__main__":
    main()
