"""The one command to run first on a GPU: every CUDA path of ist-optim against its reference, then the figures.

No GPU has run this library yet (issue 20). Until this script has passed on
one, ``kernels="auto"`` and ``fuse_lora`` run the torch path on CUDA and
``state_policy="auto"`` keeps optimizer state on the device. What it checks,
each against a reference in the same process:

  kernels     the Triton expand (out of place, in place as the probes call it,
              fp32 adapters beside a bf16/fp16 h) and the one-GEMM linear,
              fp32/bf16/fp16, ranks 4-72, 1 and 4 row groups, a second sequence
              length after the first, against the float32 torch reference
  autocast    fuse_lora(kernels="triton") under bf16 autocast with fp32 adapters
              against peft's forward and backward
  probes      probe losses through the Triton kernel against the torch path,
              sequential and batched, fp32 and bf16 base
  offload     ISTAdamW state_policy="offload" against "keep", bit for bit, with
              probe rounds, a deepcopy and a state_dict right after step()
  fuse_lora   10 training steps through the fused op against peft's forward
Figures (CUDA only): peak memory (max_memory_allocated, a fresh process per
method; GPT-2-small and TinyLLaMA-1.1B configs, bf16 base, fp32 adapters),
step time of IST against LoRA with the probes amortised (mean over whole
probe intervals), and kernel timings at two or three shapes.

It writes ``gpu_check.json`` and ``gpu_check.md`` (the README's table) to
``--out``; without CUDA it says so, runs the checks in the Triton interpreter
at tiny sizes, writes ``gpu_check_cpu.*`` instead, and exits 0 if those pass.
Exit status 1 when any check fails. About 5-8 minutes on one GPU.

    python bench/gpu_check.py
    python bench/gpu_check.py --skip-figures        # checks only (a minute)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # before the first @triton.jit is decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ist_optim import ISTAdamW, discover_layers, find_adapter_modules, fuse_lora  # noqa: E402
from ist_optim.kernels import lora_expand_reference, lora_linear_reference, triton_available  # noqa: E402
from ist_optim.probes import probe_losses  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# max |got - ref| / max(1, max |ref|): accumulation is fp32 in both, only the output rounding differs
KERNEL_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
MIB = 2**20


class Report:
    """Rows of ``{section, check, status, detail, seconds}``; status is pass, FAIL or skip."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.figures: dict[str, Any] = {}

    def run(self, section: str, check: str, fn: Callable[[], str]) -> None:
        start = time.perf_counter()
        try:
            detail, status = fn(), "pass"
        except Skip as skip:
            detail, status = str(skip), "skip"
        except Exception as error:  # a failing check is reported, the others still run
            detail, status = f"{type(error).__name__}: {error}"[:400], "FAIL"
        row = dict(
            section=section, check=check, status=status, detail=detail, seconds=round(time.perf_counter() - start, 2)
        )
        self.rows.append(row)
        print(f"[{status:4s}] {section:9s} {check:44s} {detail}", flush=True)

    @property
    def failed(self) -> int:
        return sum(row["status"] == "FAIL" for row in self.rows)


class Skip(Exception):
    pass


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.float(), ref.float()
    if got.isnan().any():
        return float("inf")
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


def _need_triton() -> None:
    if not triton_available():
        raise Skip("Triton is not installed")


# ---------------------------------------------------------------------- kernels
def kernel_checks(report: Report, quick: bool) -> None:
    from ist_optim.kernels.triton_lora import lora_expand, lora_linear

    if CUDA and not quick:
        sizes, ranks, K = [(2048, 4096), (1000, 4096)], [4, 16, 33, 64, 72], 1024
    else:  # the interpreter: tiny, still ragged, still two row counts
        sizes, ranks, K = [(40, 53), (24, 53)], [4, 72], 40
    for dtype_name, dtype in DTYPES.items():
        for rank in ranks:

            def check(dtype=dtype, rank=rank) -> str:
                _need_triton()
                worst = 0.0
                for M, N in sizes:  # the second M: a new sequence length after the first was compiled
                    gen = torch.Generator(device=DEVICE).manual_seed(M + N + rank)

                    def rand(*shape, dt=dtype):
                        return torch.randn(*shape, device=DEVICE, generator=gen).to(dt)

                    base, h, b = rand(M, N), rand(M, rank), rand(N, rank) * 0.1
                    x, w, bias = rand(M, K), rand(N, K) * K**-0.5, rand(N)
                    for groups in (1, 4):
                        scale = torch.linspace(0.25, 1.0, groups, device=DEVICE)
                        ref = lora_expand_reference(base, h, b, scale, alpha=2.0)
                        cases = {"expand": lora_expand(base, h, b, scale, alpha=2.0)}
                        in_place = base.clone()
                        lora_expand(in_place, h, b, scale, alpha=2.0, out=in_place)
                        lora_expand(in_place.clone(), h, b, scale, alpha=2.0, out=in_place.clone())  # cached launch
                        cases["in place"] = in_place
                        for name, got in cases.items():
                            err = _rel_err(got, ref)
                            worst = max(worst, err)
                            assert err <= KERNEL_TOL[dtype], f"{name} M={M} G={groups}: rel err {err:.2e}"
                        if dtype != torch.float32:  # fp32 adapters beside a low-precision h (autocast)
                            b32 = b.float()
                            err = _rel_err(
                                lora_expand(base, h, b32, scale, alpha=2.0),
                                lora_expand_reference(base, h, b32, scale, alpha=2.0),
                            )
                            worst = max(worst, err)
                            assert err <= KERNEL_TOL[dtype], f"mixed M={M} G={groups}: rel err {err:.2e}"
                        err = _rel_err(
                            lora_linear(x, w, bias, h, b, scale, alpha=2.0),
                            lora_linear_reference(x, w, bias, h, b, scale, alpha=2.0),
                        )
                        worst = max(worst, err)
                        assert err <= KERNEL_TOL[dtype] * 2, f"linear M={M} G={groups}: rel err {err:.2e}"
                return f"worst rel err {worst:.1e} (tol {KERNEL_TOL[dtype]:.0e}) over {sizes}"

            report.run("kernels", f"{dtype_name} r={rank}", check)


# ---------------------------------------------------------------------- models
def tiny_peft_llama(dtype: torch.dtype = torch.float32, layers: int = 4, seed: int = 0) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64 if not CUDA else 256,
        intermediate_size=128 if not CUDA else 512,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config).to(dtype)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lora)  # adapters in fp32 (peft's autocast_adapter_dtype)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.to(DEVICE)


def batch(step: int = 0, rows: int = 4, seq: int = 32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 128, (rows, seq), generator=gen).to(DEVICE)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def autocast_check() -> str:
    _need_triton()
    model = tiny_peft_llama()
    reference = copy.deepcopy(model)
    handle = fuse_lora(model, kernels="triton")
    assert handle.modules, "nothing was fused"
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss, ref_loss = model(**batch()).loss, reference(**batch()).loss
    loss.backward()
    ref_loss.backward()
    err = abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())
    assert err < 2e-2, f"loss {loss.item():.5f} vs peft {ref_loss.item():.5f}"
    ref_grads = dict(reference.named_parameters())
    worst = max(_rel_err(p.grad, ref_grads[n].grad) for n, p in model.named_parameters() if p.grad is not None)
    assert worst < 5e-2, f"grad rel err {worst:.2e}"
    return f"loss rel err {err:.1e}, worst grad rel err {worst:.1e} ({len(handle.modules)} fused layers)"


def probe_check(mode: str, dtype: torch.dtype) -> Callable[[], str]:
    def check() -> str:
        _need_triton()
        model = tiny_peft_llama(dtype, layers=4)
        layer_map = discover_layers(model, [p for p in model.parameters() if p.requires_grad])
        adapters = find_adapter_modules(model, layer_map.params)
        beta = torch.tensor(
            [[1.0, 0.25, 1.0, 0.25], [0.25, 1.0, 0.25, 1.0], [0.25, 0.25, 1.0, 1.0]], dtype=torch.float64
        )
        probe = ((), batch(1))
        ref = probe_losses(model, adapters, beta, batch=probe, mode=mode, kernels="torch")
        got = probe_losses(model, adapters, beta, batch=probe, mode=mode, kernels="triton")
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert err <= tol, f"losses {got.tolist()} vs torch {ref.tolist()}"
        return f"rel err {err:.1e} (tol {tol:.0e}), losses {[round(v, 4) for v in ref.tolist()]}"

    return check


def offload_check() -> str:
    runs = {}
    for policy in ("keep", "offload"):
        model = tiny_peft_llama(layers=8)
        opt = ISTAdamW(model, lr=1e-3, active_layers=0.25, probe_interval=3, num_probes=2, state_policy=policy, seed=0)
        runs[policy] = (model, opt)
    copies = {}
    for step in range(9):
        for policy, (model, opt) in runs.items():
            model(**batch(step)).loss.backward()
            opt.step()
            opt.zero_grad()
            if step == 4:  # read host state right after step(): the copies may be in flight
                copies[policy] = copy.deepcopy(opt).state_dict()
    (keep_model, keep_opt), (off_model, off_opt) = runs["keep"], runs["offload"]
    assert off_opt.options["state_policy"] == "offload" and off_opt.evictor.evicted, "nothing was offloaded"
    for (name, p), q in zip(keep_model.named_parameters(), off_model.parameters()):
        assert torch.equal(p, q), f"parameter {name} differs"
    for label, keep_sd, off_sd in (
        ("deepcopy", copies["keep"], copies["offload"]),
        ("state_dict", keep_opt.state_dict(), off_opt.state_dict()),
    ):
        for index, entry in keep_sd["state"].items():
            for key, value in entry.items():
                other = off_sd["state"][index][key]
                assert torch.equal(value.cpu(), other.cpu()), f"{label}: state {index}.{key} differs"
    host = off_opt.memory_report()["optimizer_state_host_bytes"]
    return f"9 steps, 3 probe rounds, params and state bit-identical; {host / 1024:.0f} KiB on host at the end"


def fuse_training_check() -> str:
    _need_triton()
    models = {"fused": tiny_peft_llama(), "peft": tiny_peft_llama()}
    handle = fuse_lora(models["fused"], kernels="triton")
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for k, m in models.items()}
    losses: dict[str, list[float]] = {k: [] for k in models}
    for step in range(10 if CUDA else 3):
        for key, model in models.items():
            loss = model(**batch(step)).loss
            loss.backward()
            opts[key].step()
            opts[key].zero_grad()
            losses[key].append(loss.item())
    handle.remove()
    params = dict(models["peft"].named_parameters())
    worst = max(_rel_err(p, params[n]) for n, p in models["fused"].named_parameters() if p.requires_grad)
    assert worst < 1e-4, f"params rel err {worst:.2e}"
    return (
        f"{len(losses['fused'])} steps, loss {losses['fused'][-1]:.4f} vs {losses['peft'][-1]:.4f}, "
        f"params rel err {worst:.1e}"
    )


# ---------------------------------------------------------------------- figures (CUDA)
def memory_worker(spec: str) -> None:
    """In a fresh process: one method's peak memory, printed as one JSON line."""
    from memory import one_step, setup

    model_name, method = spec.split(":")
    seq = 1024 if model_name == "gpt2" else 512
    args = argparse.Namespace(
        model=model_name, seq=seq, batch=1, rank=32, dtype="bf16", device="cuda", checkpointing=False
    )
    from memory import build_base

    base, _ = build_base(model_name)
    state = base.state_dict()
    vocab = base.config.vocab_size
    model, opt = setup(method, state, args)
    del base, state
    gen = torch.Generator().manual_seed(0)
    rows = [one_step(model, opt, torch.randint(0, vocab, (1, seq), generator=gen).cuda(), "cuda") for _ in range(4)]
    worst = max(rows[1:], key=lambda r: r["total"])
    print(
        json.dumps(
            {
                "model": model_name,
                "method": method,
                "seq": seq,
                "total_mib": worst["total"] / MIB,
                "weights_mib": worst["weights"] / MIB,
                "state_mib": worst["state"] / MIB,
                "max_memory_allocated_mib": torch.cuda.max_memory_allocated() / MIB,
            }
        )
    )


def memory_figures(report: Report) -> None:
    results = []
    for spec in (
        "gpt2:lora",
        "gpt2:ist-keep",
        "gpt2:ist-offload",
        "tinyllama:lora",
        "tinyllama:ist-keep",
        "tinyllama:ist-offload",
    ):

        def check(spec=spec) -> str:
            out = subprocess.run(
                [sys.executable, __file__, "--memory-worker", spec], capture_output=True, text=True, timeout=240
            )
            if out.returncode:
                raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "worker failed")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(row)
            return f"peak {row['total_mib']:.0f} MiB (weights {row['weights_mib']:.0f}, state {row['state_mib']:.1f})"

        report.run("memory", spec, check)
    report.figures["memory"] = results


def step_time_figures(report: Report) -> None:
    from memory import build_base, setup

    def check() -> str:
        args = argparse.Namespace(
            model="gpt2", seq=1024, batch=1, rank=32, dtype="bf16", device="cuda", checkpointing=False
        )
        base, _ = build_base("gpt2")
        state = base.state_dict()
        runs = {m: setup(m, state, args) for m in ("lora", "ist-keep")}
        gen = torch.Generator().manual_seed(0)
        times: dict[str, list[float]] = {m: [] for m in runs}
        for index in range(21):  # 1 warm-up + 20 = two whole probe intervals
            ids = torch.randint(0, 50257, (1, 1024), generator=gen).cuda()
            for method, (model, opt) in runs.items():
                torch.cuda.synchronize()
                start = time.perf_counter()
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                if index:
                    times[method].append(time.perf_counter() - start)
        means = {m: statistics.mean(v) for m, v in times.items()}
        medians = {m: statistics.median(v) for m, v in times.items()}
        report.figures["step_time"] = {
            "model": "gpt2 config, bf16 base, fp32 adapters r=32, seq 1024, batch 1",
            "mean_s": means,
            "median_s": medians,
            "steps": 20,
        }
        return (
            f"ist-keep/lora: mean {means['ist-keep'] / means['lora']:.2f}x (probes amortised), "
            f"median {medians['ist-keep'] / medians['lora']:.2f}x; lora {medians['lora'] * 1e3:.1f} ms"
        )

    report.run("steptime", "gpt2 seq 1024 bf16: lora vs ist-keep", check)


def kernel_timings(report: Report) -> None:
    from ist_optim.kernels.triton_lora import lora_expand, lora_linear

    def timed(fn: Callable[[], object], repeats: int = 30) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    rows = []
    for M, N, R in ((4096, 4096, 16), (4096, 11008, 64), (16384, 4096, 16)):

        def check(M=M, N=N, R=R) -> str:
            _need_triton()
            dt = torch.bfloat16
            base = torch.randn(M, N, device="cuda", dtype=dt)
            h = torch.randn(M, R, device="cuda", dtype=dt)
            b = torch.randn(N, R, device="cuda", dtype=torch.float32) * 0.05  # fp32 adapter (peft's default)
            work = base.clone()
            t = {
                "peft eager": timed(lambda: base + torch.nn.functional.linear(h.float(), b).to(dt) * 0.5),
                "torch reference (auto)": timed(lambda: lora_expand_reference(base, h, b, alpha=0.5)),
                "triton in place": timed(lambda: lora_expand(work, h, b, alpha=0.5, out=work)),
            }
            rows.append({"M": M, "N": N, "r": R, "dtype": "bf16 base, fp32 B", "ms": t})
            return ", ".join(f"{k} {v:.3f} ms" for k, v in t.items())

        report.run("timing", f"expand M={M} N={N} r={R}", check)

    def linear() -> str:
        _need_triton()
        M, N, K, R, dt = 4096, 4096, 4096, 16, torch.bfloat16
        x, w = torch.randn(M, K, device="cuda", dtype=dt), torch.randn(N, K, device="cuda", dtype=dt) * K**-0.5
        a, b = torch.randn(R, K, device="cuda", dtype=dt) * K**-0.5, torch.randn(N, R, device="cuda", dtype=dt)
        t = {
            "eager x@W.T + addmm_": timed(lambda: (x @ w.T).addmm_((x @ a.T) * 0.5, b.T)),
            "triton adapter-in-GEMM": timed(lambda: lora_linear(x, w, None, x @ a.T, b, alpha=0.5)),
        }
        rows.append({"M": M, "N": N, "K": K, "r": R, "dtype": "bf16", "ms": t})
        return ", ".join(f"{k} {v:.3f} ms" for k, v in t.items())

    report.run("timing", "linear M=4096 N=4096 K=4096 r=16", linear)
    report.figures["kernel_timings"] = rows


# ---------------------------------------------------------------------- output
def environment() -> dict[str, Any]:
    env = {
        "device": torch.cuda.get_device_name() if CUDA else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def markdown(report: Report, env: dict[str, Any]) -> str:
    lines = [
        f"`python bench/gpu_check.py` on {env['device']} (torch {env['torch']}, CUDA {env['cuda']}, "
        f"Triton {env['triton']}): {sum(r['status'] == 'pass' for r in report.rows)} passed, "
        f"{report.failed} failed, {sum(r['status'] == 'skip' for r in report.rows)} skipped",
        "",
        "| section | check | result | detail |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {r['section']} | {r['check']} | {r['status']} | {r['detail']} |" for r in report.rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for gpu_check[_cpu].{json,md}")
    parser.add_argument("--skip-figures", action="store_true", help="checks only: no memory, step time, timings")
    parser.add_argument("--quick", action="store_true", help="smallest sizes (the CI smoke test)")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        memory_worker(args.memory_worker)
        return

    env = environment()
    print(" | ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    if not CUDA:
        print("=" * 78)
        print("No CUDA device: this is not the GPU check. Running the checks in the Triton interpreter at tiny")
        print("sizes (it does not reject mixed dtypes or autotune: DESIGN.md section 6); no figures.")
        print("=" * 78, flush=True)
    report = Report()
    kernel_checks(report, args.quick)
    report.run("autocast", "fuse_lora bf16 autocast, fp32 adapters", autocast_check)
    for mode in ("sequential", "batched"):
        for name in ("fp32", "bf16"):
            report.run("probes", f"{mode} {name} base: triton = torch", probe_check(mode, DTYPES[name]))
    report.run("offload", "offload = keep bitwise, deepcopy after step", offload_check)
    report.run("fuse_lora", "training through the fused op = peft", fuse_training_check)
    if CUDA and not args.skip_figures:
        kernel_timings(report)
        step_time_figures(report)
        memory_figures(report)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_check" if CUDA else "gpu_check_cpu"
    (args.out / f"{stem}.json").write_text(
        json.dumps({"environment": env, "checks": report.rows, "figures": report.figures}, indent=1) + "\n"
    )
    (args.out / f"{stem}.md").write_text(markdown(report, env))
    print(
        f"\n{len(report.rows) - report.failed}/{len(report.rows)} checks passed or skipped; "
        f"wrote {args.out / stem}.json and .md"
    )
    if report.failed:
        print("FAILURES: keep kernels='torch' and state_policy='keep' on this GPU until they are fixed")
    sys.exit(1 if report.failed else 0)


if __name__ == "__main__":
    main()
