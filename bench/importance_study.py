"""Why IST's importance does not separate layers in short runs: the signal-to-noise of one probe round.

Trains SmolLM2 with IST (the weekday setting of ``quality.py``: lr 5e-4 x4,
batch 16, ``probe_interval=5``, the reference rule) for ``--train-steps``,
then freezes that LoRA state and measures, on ``--batches`` fresh training
batches (the probe batch is a training batch):

* the *oracle* per-layer effect ``d_i``: loss with layer ``i``'s adapters
  suppressed by beta (all others kept) minus the loss with none suppressed,
  per batch, and its mean over batches with its standard error;
* ``--masks`` random half-masks (suppress 15 of 30) and their complements per
  batch, the kind of candidate a probe round draws.

From those it reports: how far the oracle separates layers, how it relates to
how often each layer has trained so far (the importance a probe can see is
the adapter's *current* contribution), whether half-mask losses are additive
in ``d_i``, the candidate-vs-noise split of one round, the size of the
rewards, and, by replaying probe rounds drawn from the measured pool, how
well several estimators recover the oracle after ``k`` rounds (Pearson with
the oracle, over many replays). The frozen model isolates the estimator's
noise from the drift of a model that keeps training.

    OMP_NUM_THREADS=1 python bench/importance_study.py --seed 0 --train-steps 40

The half-mask losses are also kept per row of the batch (``mask_row_losses``),
so the replay can score probes on only the first ``k`` rows (IST's
``probe_rows=k``: the verbalizer loss is the mean over rows, each row's
logits independent of the others) against the same full-batch oracle:
``--probe-rows 16 4 2`` prints ``reference/rows=k@rounds`` beside the
full-batch estimators, so the signal a cheaper probe gives up is measured.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import statistics
import time
from pathlib import Path

import torch
from finetune import Batches, HFTokens, RunConfig, WordTokenizer, tiny_model, train_run, verbalizer_loss
from quality import pearson
from tasks import weekday_task

from ist_optim import ISTAdamW
from ist_optim.probes import probe_losses

HERE = Path(__file__).resolve().parent


def collect(args: argparse.Namespace) -> dict:
    task = weekday_task(num_eval=256)
    if args.model == "tiny":  # config-built, for the smoke test
        tokens = WordTokenizer.for_task(task)
        base = tiny_model(tokens)
    else:
        from smollm2 import load_smollm2

        base, tokenizer = load_smollm2()
        tokens = HFTokens(tokenizer)
    batches = Batches(tokens, task, max_prompt_tokens=128)
    config = RunConfig(
        "ist",
        steps=args.train_steps,
        batch_size=16,
        lr=5e-4,
        sparse_lr_scale=4.0,
        probe_interval=5,
        importance_lr=10.0,
        seed=args.seed,
        measure_memory=False,
    )
    started = time.perf_counter()
    result = train_run(base, batches, task, config)
    print(f"trained {args.train_steps} steps in {time.perf_counter() - started:.0f} s", flush=True)
    model = result.model
    # An optimizer only to find the adapters per layer (nothing is stepped).
    opt = ISTAdamW(
        model, lr=0.0, probe_interval=1, seed=0, loss_fn=functools.partial(verbalizer_loss, batches.label_words)
    )
    L = len(opt.adapters)
    rng = random.Random(10_000 + args.seed)  # batches the run never drew in this order
    gen = torch.Generator().manual_seed(args.seed)
    beta = args.beta
    rows = []
    for b in range(args.batches):
        batch = batches.train_batch(rng.sample(task.train, 16))
        target = batch.pop("target")
        loss_fn = functools.partial(verbalizer_loss, batches.label_words, target=target)
        factors = [torch.ones(L)]
        for i in range(L):
            f = torch.ones(L)
            f[i] = beta
            factors.append(f)
        masks = []
        for _ in range(args.masks):
            kept = torch.zeros(L, dtype=torch.bool)
            kept[torch.randperm(L, generator=gen)[: L // 2]] = True
            masks += [kept, ~kept]
        factors += [torch.where(m, 1.0, beta) for m in masks]
        beta_rows = torch.stack(factors).double()
        per_row: list[list[float]] = []  # per-row cross-entropies of each candidate, in order

        def row_loss(output, *args, target, per_row=per_row, **kwargs):
            loss = loss_fn(output, *args, **kwargs)  # the probe's own loss, unchanged
            logits = output.logits[:, -1, batches.label_words.to(output.logits.device)].float()
            per_row.append(torch.nn.functional.cross_entropy(logits, target, reduction="none").double().tolist())
            return loss

        losses = torch.cat(
            [
                probe_losses(
                    model,
                    opt.adapters,
                    beta_rows[s : s + 8],
                    batch=((), batch),
                    loss_fn=functools.partial(row_loss, target=target),
                    mode="batched",
                )
                for s in range(0, len(beta_rows), 8)
            ]
        )
        rows.append(
            {
                "base": losses[0].item(),
                "single": losses[1 : L + 1].tolist(),
                "masks": [m.tolist() for m in masks],
                "mask_losses": losses[L + 1 :].tolist(),
                "mask_row_losses": per_row[L + 1 :],
            }
        )
        print(f"batch {b}: base loss {losses[0]:.4f}", flush=True)
    opt.remove_hooks()
    return {
        "seed": args.seed,
        "train_steps": args.train_steps,
        "beta": beta,
        "layers": L,
        "importance": result.importance,
        "layer_counts": result.layer_counts,
        "rows": rows,
    }


# ---------------------------------------------------------------------- estimators replayed on the pool
def replay(
    data: dict, estimator: str, rounds: int, rng: random.Random, candidates: int = 3, probe_rows: int | None = None
) -> list[float]:
    """Importance after ``rounds`` probe rounds, each on one batch of the pool, under ``estimator``.

    ``probe_rows=k``: the half-mask candidates' losses are those of the batch's first ``k`` rows only.
    """
    L = data["layers"]
    imp = [0.0] * L
    design, response = [], []
    for _ in range(rounds):
        row = rng.choice(data["rows"])
        if estimator == "single":  # probe_layers=1, reward="standardized": one suppressed layer per candidate
            picks = rng.sample(range(L), candidates)
            value = [math.exp(-row["single"][i]) for i in picks]
            mean, sd = statistics.fmean(value), statistics.pstdev(value)
            for i, v in zip(picks, value):
                imp[i] -= (v - mean) / sd if sd > 0 else 0.0
            continue
        pairs = len(row["masks"]) // 2
        if estimator == "antithetic":  # one complementary pair on the same batch: 2 forwards a round, not 3
            picks = [2 * p + s for p in rng.sample(range(pairs), max(1, candidates // 2)) for s in (0, 1)]
        else:  # independent half-masks, as the reference rule draws at importance ~ 0
            picks = rng.sample(range(len(row["masks"])), candidates)
        if probe_rows is None:
            losses = [row["mask_losses"][k] for k in picks]
        else:
            losses = [statistics.fmean(row["mask_row_losses"][k][:probe_rows]) for k in picks]
        kept = [row["masks"][k] for k in picks]
        value = [math.exp(-x) for x in losses]
        mean = statistics.fmean(value)
        reward = [v - mean for v in value]
        if estimator in ("zscore", "antithetic"):
            sd = statistics.pstdev(value)
            reward = [r / sd if sd > 0 else 0.0 for r in reward]
        if estimator == "lstsq":  # importance of kept layers: regress -loss on the kept mask, batch-centred
            centre = statistics.fmean(losses)
            mean_mask = [statistics.fmean(1.0 if m[i] else 0.0 for m in kept) for i in range(L)]
            for m, x in zip(kept, losses):  # centred within the round: the batch's own loss level drops out
                design.append([(1.0 if m[i] else 0.0) - mean_mask[i] for i in range(L)])
                response.append(centre - x)
            continue
        for m, r in zip(kept, reward):
            for i in range(L):
                # The rewards of a round sum to 0, so this is 2x the reference rule's -sum_j r_j [i suppressed in j]
                # (without its sigmoid factor, ~1/4 near importance 0): the same direction, read from both sides.
                imp[i] += r if m[i] else -r
    if estimator == "lstsq":
        X = torch.tensor(design, dtype=torch.float64)
        y = torch.tensor(response, dtype=torch.float64)
        sol = torch.linalg.lstsq(X.T @ X + 1e-3 * torch.eye(L, dtype=torch.float64), X.T @ y[:, None]).solution
        imp = sol[:, 0].tolist()
    return imp


def analyse(data: dict, replays: int, probe_rows: list[int] = ()) -> dict:
    L, rows = data["layers"], data["rows"]
    d = [[r["single"][i] - r["base"] for i in range(L)] for r in rows]  # (B, L) loss increase when i suppressed
    oracle = [statistics.fmean(col) for col in zip(*d)]
    se = [statistics.stdev(col) / math.sqrt(len(col)) for col in zip(*d)]
    half = len(rows) // 2
    oracle_a = [statistics.fmean(col[:half]) for col in zip(*d)]
    oracle_b = [statistics.fmean(col[half:]) for col in zip(*d)]
    out = {
        "oracle": oracle,
        "oracle_se": se,
        "oracle_split_half_corr": pearson(oracle_a, oracle_b),
        "oracle_between_layer_sd": statistics.stdev(oracle),
        "oracle_within_layer_batch_sd": statistics.fmean(statistics.stdev(col) for col in zip(*d)),
        "corr_oracle_trained_steps": pearson(oracle, data["layer_counts"]),
        "corr_oracle_ist_importance": pearson(oracle, data["importance"][-1]) if data["importance"] else None,
        "base_loss_mean": statistics.fmean(r["base"] for r in rows),
    }
    # Additivity: a half-mask's loss increase vs the sum of the single effects of its suppressed layers.
    pred, meas, resid, signal = [], [], [], []
    for r in rows:
        ml = r["mask_losses"]
        c = statistics.fmean(ml)
        p = [sum(r["single"][i] - r["base"] for i in range(L) if not m[i]) for m in r["masks"]]
        pc = statistics.fmean(p)
        for x, y in zip(ml, p):
            pred.append(y - pc)
            meas.append(x - c)
        # the part of a candidate's loss the *oracle* (mean over batches) explains vs the rest (noise)
        po = [sum(oracle[i] for i in range(L) if not m[i]) for m in r["masks"]]
        poc = statistics.fmean(po)
        for x, y in zip(ml, po):
            signal.append(y - poc)
            resid.append((x - c) - (y - poc))
    out["additivity_corr_same_batch"] = pearson(pred, meas)
    out["candidate_signal_sd"] = statistics.pstdev(signal)  # spread of candidates' losses the oracle predicts
    out["candidate_noise_sd"] = statistics.pstdev(resid)  # the rest: batch x candidate interaction
    out["candidate_loss_spread_sd"] = statistics.pstdev(meas)
    value = [math.exp(-x) for r in rows for x in r["mask_losses"]]
    out["typical_abs_reward"] = statistics.fmean(
        abs(math.exp(-x) - statistics.fmean(math.exp(-y) for y in r["mask_losses"][:6]))
        for r in rows
        for x in r["mask_losses"][:6]
    )
    out["exp_neg_loss_mean"] = statistics.fmean(value)
    # Estimators replayed: mean and sd of Pearson(estimate, oracle) over replays, after k rounds.
    rng = random.Random(0)
    table = {}
    for est in ("reference", "zscore", "antithetic", "lstsq", "single"):
        for k in (4, 16, 64):
            corr = [pearson(replay(data, est, k, rng), oracle) for _ in range(replays)]
            corr = [c for c in corr if not math.isnan(c)]
            table[f"{est}@{k}"] = (statistics.fmean(corr), statistics.stdev(corr))
    if probe_rows and "mask_row_losses" not in rows[0]:
        print("(no per-row losses in this JSON, collected before --probe-rows: no rows estimators)")
    elif probe_rows:
        for est in ("reference", "zscore"):
            for n in probe_rows:
                rng = random.Random(0)  # the same draws for every n: paired
                for k in (4, 16, 64):
                    corr = [pearson(replay(data, est, k, rng, probe_rows=n), oracle) for _ in range(replays)]
                    corr = [c for c in corr if not math.isnan(c)]
                    table[f"{est}/rows={n}@{k}"] = (statistics.fmean(corr), statistics.stdev(corr))
    out["estimator_corr_with_oracle"] = table
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--masks", type=int, default=4, help="random half-masks per batch (each with its complement)")
    parser.add_argument("--beta", type=float, default=0.25)
    parser.add_argument("--replays", type=int, default=200)
    parser.add_argument(
        "--out", default=None, help="JSON of the measurements (default results/importance_study_s{seed}_t{steps}.json)"
    )
    parser.add_argument("--analyse-only", action="store_true")
    parser.add_argument(
        "--probe-rows",
        type=int,
        nargs="*",
        default=[],
        help="also replay the half-mask estimators with the losses of the first k rows only",
    )
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    args = parser.parse_args()
    out = Path(args.out or HERE / "results" / f"importance_study_s{args.seed}_t{args.train_steps}.json")
    if args.analyse_only:
        data = json.loads(out.read_text())
    else:
        data = collect(args)
        out.write_text(json.dumps(data))
    report = analyse(data, args.replays, args.probe_rows)
    for key, value in report.items():
        if isinstance(value, list):
            print(f"{key}: [{', '.join(f'{v:+.4f}' for v in value)}]")
        elif isinstance(value, dict):
            print(f"{key}:")
            for k, (m, s) in value.items():
                print(f"  {k:22s} {m:+.2f} +- {s:.2f}")
        else:
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
