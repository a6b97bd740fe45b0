"""Triton kernels for the beta-scaled LoRA term (importing this module imports Triton).

1. :func:`lora_expand`: ``out = base + scale[group] * (h @ B.T)``. The rank-r
   product is formed in registers and added in the epilogue, so the
   ``(M, N)`` adapter term never goes to memory: one read of ``base``, one
   write of ``out`` (in place allowed), against about 8 passes for peft's
   eager ``result + lora_B(lora_A(x)) * scaling``.
2. :func:`lora_linear`: ``out = x @ W0.T + bias + scale[group] * (h @ B.T)``
   as one GEMM over the concatenated K dimension (``x`` with ``W0``, then the
   rank-r tile of ``h`` with ``B``), so the base output is not written and
   re-read either.

``scale`` is per row group (``G`` probe candidates stacked on dim 0, rows
grouped contiguously); ``alpha`` (LoRA's ``scaling``) is a by-value factor
for every row. Both kernels launch with a fixed tile configuration per shape
bucket, never autotuned (the expand runs in place: tuning on its real
arguments would add the term once per benchmark launch), on the inputs' own
GPU, with one dtype into each ``tl.dot``. Interpreter mode
(``TRITON_INTERPRET=1``, set before this module is imported) runs them on CPU
tensors; there it uses small tiles and upcasts bf16 before ``tl.dot``, which
the interpreter gets wrong (DESIGN.md section 6).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

__all__ = ["lora_expand", "lora_linear", "INTERPRETING"]

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def _expand_config(M: int, N: int) -> dict[str, int]:
    """Tile sizes for the expand: a fixed choice per shape bucket, never autotuned.

    The expand is memory-bound (one read of ``base``, one write of ``out``; the
    rank-r product is a few FLOPs per element) and runs in place: autotuning it
    on its real arguments would add the term once per benchmark launch
    (issue 20), and a tuning key with ``M`` in it re-tunes at every new
    sequence length. One compile per bucket instead.
    """
    if INTERPRETING:  # small tiles keep the interpreter quick and exercise the masks with several tiles
        return {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    block_m = 64 if M >= 64 else max(16, triton.next_power_of_2(M))
    block_n = 128 if N >= 128 else max(16, triton.next_power_of_2(N))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 4, "num_stages": 2}


def _linear_config(M: int, N: int, elem_size: int) -> dict[str, int]:
    """Tile sizes for the one-GEMM linear: fixed per shape bucket (no tuning on the real arguments either)."""
    if INTERPRETING:
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
    block_m = 128 if M >= 128 else max(16, triton.next_power_of_2(M))
    block_k = 64 if elem_size <= 2 else 32  # fp32 tiles: half the K per stage keeps shared memory in bounds
    warps = 8 if block_m >= 128 else 4
    return {"BLOCK_M": block_m, "BLOCK_N": 128, "BLOCK_K": block_k, "num_warps": warps, "num_stages": 3}


@triton.jit
def _accumulate(
    acc,
    a_ptr,
    b_ptr,
    rows,
    cols,
    row_ok,
    col_ok,
    K,
    stride_a_m,
    stride_a_k,
    stride_b_n,
    stride_b_k,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    """``acc += a[rows, :K] @ b[cols, :K].T``, K in ``BLOCK_K`` tiles, every load masked."""
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(
            a_ptr + rows[:, None] * stride_a_m + ks[None, :] * stride_a_k,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_K)
        b_t = tl.load(
            b_ptr + ks[:, None] * stride_b_k + cols[None, :] * stride_b_n,
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )  # (BLOCK_K, BLOCK_N)
        if UPCAST:
            a = a.to(tl.float32)
            b_t = b_t.to(tl.float32)
        if IEEE:
            acc += tl.dot(a, b_t, input_precision="ieee")
        else:
            acc += tl.dot(a, b_t)
    return acc


@triton.jit
def _lora_expand_kernel(
    base_ptr,
    h_ptr,
    b_ptr,
    scale_ptr,
    out_ptr,
    alpha,
    M,
    N,
    R,
    rows_per_group,
    stride_base_m,
    stride_base_n,
    stride_h_m,
    stride_h_r,
    stride_b_n,
    stride_b_r,
    stride_out_m,
    stride_out_n,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M * stride can pass 2**31
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate(
        acc,
        h_ptr,
        b_ptr,
        rows,
        cols,
        row_ok,
        col_ok,
        R,
        stride_h_m,
        stride_h_r,
        stride_b_n,
        stride_b_r,
        BLOCK_R,
        UPCAST,
        IEEE,
    )  # h @ B.T

    mask = row_ok[:, None] & col_ok[None, :]
    base = tl.load(base_ptr + rows[:, None] * stride_base_m + cols[None, :] * stride_base_n, mask=mask, other=0.0)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + rows // rows_per_group, mask=row_ok, other=0.0).to(tl.float32) * alpha
        out = base.to(tl.float32) + acc * scale[:, None]
    else:
        out = base.to(tl.float32) + acc * alpha
    tl.store(
        out_ptr + rows[:, None] * stride_out_m + cols[None, :] * stride_out_n,
        out.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _lora_linear_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    h_ptr,
    b_ptr,
    scale_ptr,
    out_ptr,
    alpha,
    M,
    N,
    K,
    R,
    rows_per_group,
    stride_x_m,
    stride_x_k,
    stride_w_n,
    stride_w_k,
    stride_h_m,
    stride_h_r,
    stride_b_n,
    stride_b_r,
    stride_out_m,
    stride_out_n,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST_BASE: tl.constexpr,
    IEEE_BASE: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N

    # the base GEMM over K, then the adapter's rank-r K, kept apart to scale it per row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate(
        acc,
        x_ptr,
        w_ptr,
        rows,
        cols,
        row_ok,
        col_ok,
        K,
        stride_x_m,
        stride_x_k,
        stride_w_n,
        stride_w_k,
        BLOCK_K,
        UPCAST_BASE,
        IEEE_BASE,
    )  # x @ W0.T
    lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    lora = _accumulate(
        lora,
        h_ptr,
        b_ptr,
        rows,
        cols,
        row_ok,
        col_ok,
        R,
        stride_h_m,
        stride_h_r,
        stride_b_n,
        stride_b_r,
        BLOCK_R,
        UPCAST,
        IEEE,
    )  # h @ B.T

    if HAS_SCALE:
        scale = tl.load(scale_ptr + rows // rows_per_group, mask=row_ok, other=0.0).to(tl.float32) * alpha
        out = acc + lora * scale[:, None]
    else:
        out = acc + lora * alpha
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + rows[:, None] * stride_out_m + cols[None, :] * stride_out_n,
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def _block_r(rank: int) -> int:
    # tl.dot needs every dim >= 16; ranks above 64 loop over 64-wide tiles
    return min(64, max(16, triton.next_power_of_2(rank)))


def _group_scale(scale: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Validate ``(G,)`` on ``like``'s device; return it as contiguous float32 with the rows per group.

    ``None`` (one factor ``alpha`` for every row) returns ``like`` as an unread placeholder pointer.
    """
    if scale is None:
        return like, 1
    if scale.dim() != 1 or scale.numel() == 0:
        raise ValueError(f"scale must be a non-empty (G,) tensor, got shape {tuple(scale.shape)}")
    num_rows = like.shape[0]
    if num_rows % scale.numel():
        raise ValueError(f"{num_rows} rows do not split into {scale.numel()} equal groups")
    if scale.device != like.device:  # a host tensor here would be a blocking copy at every launch
        raise ValueError(
            f"scale is on {scale.device}, the other inputs on {like.device}: build it on their device once "
            "(or pass a single factor as alpha)"
        )
    return scale.to(torch.float32).contiguous(), max(1, num_rows // scale.numel())


def _same_device(tensors: dict[str, torch.Tensor | None]) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listed = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise ValueError(f"inputs must be on one device, got {listed}")
    return first


def _on_device(device: torch.device):
    """Launch on ``device``'s GPU, not the current one (a model split over GPUs: ``device_map="auto"``)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _dot_operands(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, bool]]:
    """One dtype into ``tl.dot``: both operands in their promoted dtype, and its precision flags.

    fp32 adapters under bf16 autocast give a bf16 ``h`` and an fp32 ``B``; ``tl.dot`` of two dtypes does
    not compile. Both become fp32 (small: ``(M, r)`` and ``(N, r)``) and the product runs in IEEE fp32,
    as the reference computes it; bf16/fp16 pairs accumulate in fp32 on the tensor cores.
    """
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.to(dtype), b.to(dtype)
    # the interpreter gets bf16 tl.dot wrong (DESIGN.md section 6): upcast there only
    return a, b, {"UPCAST": INTERPRETING and dtype == torch.bfloat16, "IEEE": dtype == torch.float32}


def _grid(M: int, N: int, config: dict[str, int]) -> tuple[int, int]:
    return (triton.cdiv(M, config["BLOCK_M"]), triton.cdiv(N, config["BLOCK_N"]))


def lora_expand(
    base: torch.Tensor,
    h: torch.Tensor,
    lora_b: torch.Tensor,
    scale: torch.Tensor | None = None,
    *,
    alpha: float = 1.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``base + alpha * scale[group] * (h @ B.T)``; ``out=base`` updates in place.

    Args:
        base: ``(M, N)``; h: ``(M, r)``; lora_b: ``(N, r)``; any strides, one device.
        scale: ``(G,)`` on that device with ``M % G == 0``, or ``None`` (every row ``alpha``).
        alpha: a factor for every row (LoRA's ``scaling``), passed by value: no tensor, no copy.
        out: ``(M, N)`` destination (may be ``base``); a new tensor if ``None``.
    """
    M, N = base.shape
    R = h.shape[1]
    if h.shape[0] != M or lora_b.shape != (N, R):
        raise ValueError(f"shapes do not match: base {tuple(base.shape)}, h {tuple(h.shape)}, B {tuple(lora_b.shape)}")
    device = _same_device({"base": base, "h": h, "lora_b": lora_b, "out": out})
    scale_arg, rows_per_group = _group_scale(scale, base)
    if out is None:
        out = torch.empty((M, N), device=device, dtype=base.dtype)
    elif out.shape != (M, N):
        raise ValueError(f"out must have shape {(M, N)}, got {tuple(out.shape)}")
    if M == 0 or N == 0:
        return out
    h, lora_b, flags = _dot_operands(h, lora_b)
    config = _expand_config(M, N)
    with _on_device(device):
        _lora_expand_kernel[_grid(M, N, config)](
            base,
            h,
            lora_b,
            scale_arg,
            out,
            float(alpha),
            M,
            N,
            R,
            rows_per_group,
            base.stride(0),
            base.stride(1),
            h.stride(0),
            h.stride(1),
            lora_b.stride(0),
            lora_b.stride(1),
            out.stride(0),
            out.stride(1),
            HAS_SCALE=scale is not None,
            BLOCK_R=_block_r(R),
            **flags,
            **config,
        )
    return out


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    h: torch.Tensor,
    lora_b: torch.Tensor,
    scale: torch.Tensor | None = None,
    *,
    alpha: float = 1.0,
) -> torch.Tensor:
    """``x @ W0.T + bias + alpha * scale[group] * (h @ B.T)`` in one kernel.

    Args:
        x: ``(M, K)``; weight: ``(N, K)`` of ``x``'s dtype; bias: ``(N,)`` or ``None``;
        h: ``(M, r)`` (``x @ A.T``); lora_b: ``(N, r)``; scale, alpha: as in :func:`lora_expand`.
    """
    M, K = x.shape
    N = weight.shape[0]
    R = h.shape[1]
    if weight.shape[1] != K or h.shape[0] != M or lora_b.shape != (N, R):
        raise ValueError(
            f"shapes do not match: x {tuple(x.shape)}, W0 {tuple(weight.shape)}, h {tuple(h.shape)}, "
            f"B {tuple(lora_b.shape)}"
        )
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    if weight.dtype != x.dtype:  # casting W0 would copy the whole weight at every call
        raise ValueError(f"x is {x.dtype} and W0 {weight.dtype}: the base GEMM takes one dtype")
    device = _same_device({"x": x, "weight": weight, "bias": bias, "h": h, "lora_b": lora_b})
    scale_arg, rows_per_group = _group_scale(scale, x)
    out = torch.empty((M, N), device=device, dtype=x.dtype)
    if M == 0 or N == 0:
        return out
    h, lora_b, flags = _dot_operands(h, lora_b)
    base_flags = {"UPCAST_BASE": INTERPRETING and x.dtype == torch.bfloat16, "IEEE_BASE": x.dtype == torch.float32}
    config = _linear_config(M, N, x.element_size())
    with _on_device(device):
        _lora_linear_kernel[_grid(M, N, config)](
            x,
            weight,
            bias if bias is not None else x,
            h,
            lora_b,
            scale_arg,
            out,
            float(alpha),
            M,
            N,
            K,
            R,
            rows_per_group,
            x.stride(0),
            x.stride(1),
            weight.stride(0),
            weight.stride(1),
            h.stride(0),
            h.stride(1),
            lora_b.stride(0),
            lora_b.stride(1),
            out.stride(0),
            out.stride(1),
            HAS_BIAS=bias is not None,
            HAS_SCALE=scale is not None,
            BLOCK_R=_block_r(R),
            **base_flags,
            **flags,
            **config,
        )
    return out
