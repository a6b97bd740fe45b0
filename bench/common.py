"""Shared helpers for the benchmark scripts (never imported by the library)."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def conditions(**extra: object) -> str:
    """One line naming what a measurement depends on."""
    import peft
    import transformers

    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    parts = {
        "device": device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        **extra,
    }
    return ", ".join(f"{k}={v}" for k, v in parts.items())


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_alternating(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, interleaved so drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def quantiles(values: list[float]) -> tuple[float, float]:
    """20th and 80th percentiles."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=5, method="inclusive")
    return q[0], q[3]


def peak_step_bytes(fn: Callable[[], T], device: torch.device | str) -> tuple[T, int]:
    """``fn()`` and the peak of the bytes it allocated on ``device`` beyond what was live before it.

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: the
    running sum of the profiler's memory events in time order (DESIGN.md
    section 6: the allocator keeps no peak on CPU).
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        value = fn()
        torch.cuda.synchronize()
        return value, torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        value = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return value, peak


def state_bytes_on_device(opt: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state on the parameters' device (IST's offloaded state is on host: not counted)."""
    from ist_optim import IST

    if isinstance(opt, IST):
        return opt.memory_report()["optimizer_state_device_bytes"]
    return sum(
        v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    )
