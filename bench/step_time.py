"""Step time of IST against LoRA, alternating step by step in one process.

``memory.py`` measures one method after the other under the profiler; this
script answers only "how long is a step", without the profiler: every method
is built up front (same weights, same batches) and the methods take turns,
one training step each, so slow drift of the machine hits all of them alike.
Reports the median and 20/80 quantiles after warm-up and the ratio of
medians against ``lora`` (or ``lora+ckpt`` for the checkpointed methods).

Method names are those of ``memory.py``; a ``+ckpt`` suffix turns on HF
non-reentrant gradient checkpointing for that method.

    python bench/step_time.py
    python bench/step_time.py --methods lora ist-keep lora+ckpt ist-keep+ckpt --rounds 6
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from common import conditions, median, quantiles
from memory import add_model_arguments, build_base, setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument(
        "--rounds",
        type=int,
        default=20,
        help="measured rounds (each method steps once per round); 20 = two whole probe intervals",
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--methods", nargs="+", default=["lora", "ist-keep", "ist-selective", "lora+ckpt", "ist-keep+ckpt"]
    )
    args = parser.parse_args()

    base, _ = build_base(args.model)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    vocab = base.config.vocab_size
    del base
    runs = {}
    for method in args.methods:
        name, _, ckpt = method.partition("+")
        method_args = copy.copy(args)
        method_args.checkpointing = ckpt == "ckpt"
        runs[method] = setup(name, base_state, method_args)
    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(args.device)
        for _ in range(args.warmup + args.rounds)
    ]

    print(
        conditions(
            model=f"{args.model} config, base {args.dtype}",
            seq=args.seq,
            batch=args.batch,
            lora=f"r={args.rank}",
            rounds=args.rounds,
            warmup=args.warmup,
        )
    )
    times: dict[str, list[float]] = {m: [] for m in runs}
    for index, ids in enumerate(batches):
        for method, (model, opt) in runs.items():
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if args.device == "cuda":
                torch.cuda.synchronize()
            if index >= args.warmup:
                times[method].append(time.perf_counter() - start)

    # the median drops the probe steps (one in ten); the mean over whole probe intervals pays for them
    interval = 10
    whole = (len(next(iter(times.values()))) // interval) * interval
    print(
        f"{'method':18s} {'median s':>8s} {'p20-p80 s':>13s} {'vs baseline':>11s} {'mean s*':>8s} "
        f"{'vs baseline*':>12s}  baseline"
    )
    for method, values in times.items():
        baseline = "lora+ckpt" if method.endswith("+ckpt") else "lora"
        ref = times.get(baseline)
        ratio = f"{median(values) / median(ref):11.2f}" if ref else "          -"
        mean = sum(values[:whole]) / whole if whole else float("nan")
        mean_ratio = f"{mean / (sum(ref[:whole]) / whole):12.2f}" if ref and whole else "           -"
        q20, q80 = quantiles(values)
        print(
            f"{method:18s} {median(values):8.2f} {q20:6.2f}-{q80:6.2f} {ratio} {mean:8.2f} {mean_ratio}  "
            f"{baseline if ref else '-'}"
        )
    print(
        f"* mean over the first {whole} measured steps: whole probe intervals (a probe round every {interval} "
        "steps), so IST pays for its probes; the median leaves them out"
        if whole
        else f"* fewer than {interval} measured rounds: no whole probe interval, no probe-amortised mean"
    )


if __name__ == "__main__":
    main()
