"""Kernel microbenchmark: the beta-scaled LoRA term, Triton against the torch baselines.

Two questions, each on the same tensors in one run:

* expand step, ``out = base + s*beta * (h @ B.T)`` given the base output:
  naive eager (peft's expression), ``torch.addmm``, in-place ``addmm_``,
  ``torch.compile`` (default, max-autotune) of the naive expression, and the
  Triton expand kernel;
* whole layer, ``x @ W0.T + s*beta * ((x @ A.T) @ B.T)``: ``addmm_``-based
  eager against the Triton adapter-in-GEMM kernel.

On CUDA, by default (a couple of minutes): 4096 tokens, hidden 4096->4096,
rank 16 and 64 (``--tokens 1024 4096 16384 --out-features 4096 11008 --ranks
8 32 64 --max-autotune`` for the full sweep); median and 20/80 quantiles over
repeats with L2 flushed; effective GB/s, % of peak bandwidth, TFLOP/s and
speedup. Correctness is asserted on the exact benchmark tensors before
timing, including the library's own call (``out=base``, in place) and fp32
adapters under bf16/fp16 (a bf16 ``h`` with an fp32 ``B``).

Without CUDA it prints a banner, runs the correctness matrix in the Triton
interpreter, prints the analytic bytes table, and exits non-zero on any
failure.

    python bench/kernels_bench.py
    python bench/kernels_bench.py --tokens 4096 --ranks 32 --dtype bf16 --peak-gbps 3350
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():  # before the first @triton.jit is decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

from common import conditions, median, quantiles  # noqa: E402

from ist_optim.kernels import lora_expand_reference, lora_linear_reference  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (5e-2, 5e-2)}
# Peak DRAM bandwidth (GB/s) by device name, for "% of peak"; --peak-gbps overrides.
PEAK_GBPS = {
    "H100 SXM": 3350,
    "H100 80GB HBM3": 3350,
    "H100 PCIe": 2000,
    "H200": 4800,
    "A100-SXM4-80GB": 2039,
    "A100-SXM4-40GB": 1555,
    "A100-PCIE": 1555,
}


def expand_bytes(method: str, M: int, N: int, R: int, e: int) -> int:
    """Bytes moved by one expand step (each M x N tensor pass counted once)."""
    small = (M * R + N * R) * e
    passes = {
        "naive eager": 6,
        "torch.addmm": 2,
        "addmm_ (in place)": 2,
        "compile": 2,
        "triton expand": 2,
        "triton in place": 2,
    }
    return passes[method] * M * N * e + small


def layer_bytes(method: str, M: int, N: int, K: int, R: int, e: int) -> int:
    inputs = (M * K + N * K + K * R + N * R) * e + 2 * M * R * e  # x, W0, A, B; h written and read
    passes = {"addmm_ eager": 3, "triton adapter-in-GEMM": 1}  # out written; + read/write for addmm_
    return inputs + passes[method] * M * N * e


def analytic_table(args) -> None:
    e = torch.tensor([], dtype=DTYPES[args.dtype]).element_size()
    print(f"\nAnalytic bytes per call ({args.dtype}); ratio = naive eager / method")
    print(
        f"{'tokens':>6s} {'N':>6s} {'r':>3s} | "
        + " | ".join(f"{m:>18s}" for m in ["naive eager", "torch.addmm", "addmm_ (in place)", "triton expand"])
    )
    for M in args.tokens:
        for N in args.out_features:
            for R in args.ranks:
                naive = expand_bytes("naive eager", M, N, R, e)
                cells = []
                for m in ["naive eager", "torch.addmm", "addmm_ (in place)", "triton expand"]:
                    b = expand_bytes(m, M, N, R, e)
                    cells.append(f"{b / 2**20:8.1f} MiB {naive / b:4.2f}x")
                print(f"{M:6d} {N:6d} {R:3d} | " + " | ".join(f"{c:>18s}" for c in cells))
    print(f"\nWhole layer (K={args.hidden}): bytes per call; ratio = addmm_ eager / fused")
    for M in args.tokens:
        for N in args.out_features:
            for R in args.ranks:
                eager = layer_bytes("addmm_ eager", M, N, args.hidden, R, e)
                fused = layer_bytes("triton adapter-in-GEMM", M, N, args.hidden, R, e)
                print(
                    f"{M:6d} {N:6d} {R:3d} | addmm_ eager {eager / 2**20:8.1f} MiB | fused {fused / 2**20:8.1f} MiB "
                    f"| {eager / fused:4.2f}x"
                )


def correctness_matrix() -> bool:
    """Every kernel against its reference over dtypes and ragged shapes (interpreter-sized)."""
    from ist_optim.kernels.triton_lora import lora_expand, lora_linear

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ok = True
    print(f"{'kernel':8s} {'dtype':5s} {'M':>4s} {'N':>4s} {'K':>4s} {'r':>3s} {'G':>2s}  max |err|   result")
    gen = torch.Generator().manual_seed(0)
    for dtype_name, dtype in DTYPES.items():
        for M, N, K, R, G in [(1, 17, 9, 4, 1), (37, 53, 70, 5, 1), (64, 96, 32, 16, 4), (30, 31, 16, 33, 3)]:

            def rand(*shape):
                return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

            base, h, b, x, w, bias = rand(M, N), rand(M, R), rand(N, R), rand(M, K), rand(N, K), rand(N)
            scale = torch.linspace(0.25, 1.0, G, device=device)
            rtol, atol = TOLERANCE[dtype]
            ref = lora_expand_reference(base, h, b, scale, alpha=0.5)
            in_place = base.clone()
            lora_expand(in_place, h, b, scale, alpha=0.5, out=in_place)  # the probes' own call
            b32 = b.float()  # fp32 adapter B beside a low-precision h (autocast)
            for name, got, ref in [
                ("expand", lora_expand(base, h, b, scale), lora_expand_reference(base, h, b, scale)),
                ("inplace", in_place, ref),
                ("mixed", lora_expand(base, h, b32, scale), lora_expand_reference(base, h, b32, scale)),
                ("linear", lora_linear(x, w, bias, h, b, scale), lora_linear_reference(x, w, bias, h, b, scale)),
            ]:
                err = (got.float() - ref.float()).abs().max().item()
                good = torch.allclose(got.float(), ref.float(), rtol=rtol, atol=atol) and not got.isnan().any()
                ok &= good
                print(
                    f"{name:8s} {dtype_name:5s} {M:4d} {N:4d} {K:4d} {R:3d} {G:2d}  {err:9.2e}   "
                    f"{'ok' if good else 'FAIL'}"
                )
    return ok


def cuda_timings(args) -> bool:
    from ist_optim.kernels.triton_lora import lora_expand, lora_linear

    dtype = DTYPES[args.dtype]
    name = torch.cuda.get_device_name()
    peak = args.peak_gbps or next((v for k, v in PEAK_GBPS.items() if k in name), None)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")  # larger than any L2
    ok = True

    def bench(fn) -> list[float]:
        for _ in range(3):
            fn()
        times = []
        for _ in range(args.repeats):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return times

    def naive(base, h, b, s):
        return base + torch.nn.functional.linear(h, b) * s

    compiled = torch.compile(naive)
    compiled_max = torch.compile(naive, mode="max-autotune") if args.max_autotune else None
    e = torch.tensor([], dtype=dtype).element_size()
    print(f"\nexpand step ({args.dtype}); GB/s from analytic bytes; speedup vs naive eager")
    print(
        f"{'tokens':>6s} {'N':>6s} {'r':>3s} {'method':22s} {'ms (p20-p80)':>22s} {'GB/s':>7s} {'%peak':>6s} "
        f"{'TFLOP/s':>8s} {'speedup':>7s}"
    )
    for M in args.tokens:
        for N in args.out_features:
            for R in args.ranks:
                gen = torch.Generator(device="cuda").manual_seed(M + N + R)
                base = torch.randn(M, N, device="cuda", dtype=dtype, generator=gen)
                h = torch.randn(M, R, device="cuda", dtype=dtype, generator=gen)
                b = torch.randn(N, R, device="cuda", dtype=dtype, generator=gen) * 0.05
                s = 0.5
                scale = torch.tensor([s], device="cuda")
                hs = h * s
                work = base.clone()
                methods = {
                    "naive eager": lambda: naive(base, h, b, s),
                    "torch.addmm": lambda: torch.addmm(base, hs, b.T),
                    "addmm_ (in place)": lambda: work.addmm_(hs, b.T),
                    "compile": lambda: compiled(base, h, b, s),
                    "compile max-autotune": lambda: compiled_max(base, h, b, s),
                    "triton expand": lambda: lora_expand(base, h, b, scale),
                    "triton in place": lambda: lora_expand(work, h, b, scale, out=work),
                }
                if compiled_max is None:
                    del methods["compile max-autotune"]
                ref = lora_expand_reference(base, h, b, scale)
                rtol, atol = TOLERANCE[dtype]
                for method, fn in methods.items():
                    if method in ("addmm_ (in place)", "triton in place"):
                        continue  # they accumulate; checked through torch.addmm and the matrix's in-place rows
                    good = torch.allclose(fn().float(), ref.float(), rtol=rtol, atol=atol)
                    ok &= good
                    if not good:
                        print(f"FAIL correctness: {method} at M={M} N={N} r={R}")
                base_time = None
                for method, fn in methods.items():
                    t = bench(fn)
                    med, (q20, q80) = median(t), quantiles(t)
                    base_time = base_time or med
                    nbytes = expand_bytes("compile" if method.startswith("compile") else method, M, N, R, e)
                    gbps = nbytes / med / 1e9
                    print(
                        f"{M:6d} {N:6d} {R:3d} {method:22s} {med * 1e3:7.3f} ({q20 * 1e3:.3f}-{q80 * 1e3:.3f}) "
                        f"{gbps:7.0f} {(f'{100 * gbps / peak:5.0f}%' if peak else '    -'):>6s} "
                        f"{2 * M * N * R / med / 1e12:8.2f} {base_time / med:7.2f}"
                    )

    K = args.hidden
    print(f"\nwhole layer x @ W0.T + s*beta*(x @ A.T) @ B.T, K={K} ({args.dtype}); speedup vs addmm_ eager")
    for M in args.tokens:
        for N in args.out_features:
            for R in args.ranks:
                gen = torch.Generator(device="cuda").manual_seed(M * 3 + N + R)
                x = torch.randn(M, K, device="cuda", dtype=dtype, generator=gen)
                w = torch.randn(N, K, device="cuda", dtype=dtype, generator=gen) * K**-0.5
                a = torch.randn(R, K, device="cuda", dtype=dtype, generator=gen) * K**-0.5
                b = torch.randn(N, R, device="cuda", dtype=dtype, generator=gen) * 0.05
                scale = torch.tensor([0.5], device="cuda")

                def eager():
                    out = x @ w.T
                    return out.addmm_((x @ a.T) * 0.5, b.T)

                def fused():
                    return lora_linear(x, w, None, x @ a.T, b, scale)

                good = torch.allclose(
                    fused().float(), eager().float(), rtol=TOLERANCE[dtype][0] * 4, atol=TOLERANCE[dtype][1] * 4
                )
                ok &= good
                t_eager, t_fused = bench(eager), bench(fused)
                flops = 2 * M * N * K + 2 * M * K * R + 2 * M * N * R
                for method, t in (("addmm_ eager", t_eager), ("triton adapter-in-GEMM", t_fused)):
                    med, (q20, q80) = median(t), quantiles(t)
                    print(
                        f"{M:6d} {N:6d} {R:3d} {method:24s} {med * 1e3:7.3f} ({q20 * 1e3:.3f}-{q80 * 1e3:.3f}) ms "
                        f"{flops / med / 1e12:7.1f} TFLOP/s  speedup {median(t_eager) / med:5.2f}"
                        f"{'' if good else '  FAIL correctness'}"
                    )
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--out-features", type=int, nargs="+", default=[4096])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--max-autotune", action="store_true", help="also time torch.compile max-autotune (slow)")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--peak-gbps", type=float, help="peak DRAM bandwidth for %% of peak (default: by device name)")
    args = parser.parse_args()

    print(conditions(dtype=args.dtype, repeats=args.repeats, triton_interpret=os.environ.get("TRITON_INTERPRET", "0")))
    if not torch.cuda.is_available():
        print("=" * 78)
        print("No CUDA device: GPU timings are pending. Running the correctness matrix in the")
        print("Triton interpreter and printing the analytic bytes table instead.")
        print("=" * 78)
    ok = correctness_matrix()
    analytic_table(args)
    if torch.cuda.is_available():
        ok &= cuda_timings(args)
    print("\nALL CORRECT" if ok else "\nFAILURES (see above)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
