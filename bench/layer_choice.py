"""Can layer choice matter here? ``opt.importance_report()`` on the quality studies' settings, after a few steps.

Trains one arm (default ``ist``) of the quality bench's setting for ``--steps``
steps, then prints the report on the last training batch and on fresh
training batches of ``--rows`` rows (a larger batch: a firmer estimate).

    python bench/layer_choice.py --setting weekday --steps 10
    python bench/layer_choice.py --setting sst2 --steps 10 --rows 64
    python bench/layer_choice.py --setting sst2 --model minilm --steps 20
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
from finetune import Batches, HFTokens, RunConfig, WordTokenizer, layer_choice_report, tiny_model, train_run
from quality import CLASSIFIERS, load_setting
from quality import parse_args as quality_args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="weekday")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--arm", default="ist")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", default="64", help="comma-separated sizes of extra fresh batches to report on")
    parser.add_argument("--sparse-lr-scale", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    q = quality_args(["--setting", args.setting, "--model", args.model])
    task = load_setting(args.setting, Path(q.data_root), q.eval_size)
    if args.model == "minilm":
        from minilm import load_minilm

        base, tokenizer = load_minilm(len(task.train[0].choices))
        tokens = HFTokens(tokenizer)
    elif args.model == "tiny":
        tokens = WordTokenizer.for_task(task)
        base = tiny_model(tokens)
    else:
        from smollm2 import load_smollm2

        base, tokenizer = load_smollm2()
        tokens = HFTokens(tokenizer)
    batches = Batches(tokens, task, max_prompt_tokens=q.max_prompt_tokens, head=args.model in CLASSIFIERS)
    config = RunConfig(
        args.arm,
        steps=args.steps,
        batch_size=q.batch,
        lr=q.lr,
        sparse_lr_scale=args.sparse_lr_scale,
        probe_interval=q.probe_interval,
        seed=args.seed,
        measure_memory=False,
    )
    print(
        f"{args.setting} {args.model} {args.arm}: {args.steps} steps, batch {q.batch}, lr {q.lr:g} "
        f"x{args.sparse_lr_scale:g}, seed {args.seed}",
        flush=True,
    )
    torch.manual_seed(args.seed)
    result = train_run(base, batches, task, config)
    print(f"last training batch ({q.batch} rows): {layer_choice_report(result.optimizer, batches)}")
    draw = random.Random(1000 + args.seed)
    for rows in [int(r) for r in args.rows.split(",") if r]:
        report = layer_choice_report(result.optimizer, batches, draw.sample(task.train, rows))
        print(f"fresh training batch ({rows} rows): {report}", flush=True)


if __name__ == "__main__":
    main()
