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
grouped contiguously). Interpreter mode (``TRITON_INTERPRET=1``, set before
this module is imported) runs the kernels on CPU tensors; there it prunes
autotuning to one config and upcasts bf16 before ``tl.dot``, which the
interpreter gets wrong (DESIGN.md section 6).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["lora_expand", "lora_linear", "INTERPRETING"]

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

if INTERPRETING:  # autotuning needs a GPU; one small config keeps the interpreter quick
    _EXPAND_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32})]
    _LINEAR_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32})]
else:
    _EXPAND_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(64, 128, 4, 3), (128, 128, 8, 3), (64, 256, 8, 3), (128, 64, 4, 4), (32, 128, 4, 4)]
    ]
    _LINEAR_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 128, 64, 8, 3),
            (128, 256, 64, 8, 3),
            (64, 128, 64, 4, 4),
            (128, 128, 32, 4, 4),
            (256, 128, 64, 8, 3),
        ]
    ]


@triton.jit
def _accumulate(
    acc, a_ptr, b_ptr, rows, cols, row_ok, col_ok, K,
    stride_a_m, stride_a_k, stride_b_n, stride_b_k,
    BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """``acc += a[rows, :K] @ b[cols, :K].T``, K in ``BLOCK_K`` tiles, every load masked."""
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_ptr + rows[:, None] * stride_a_m + ks[None, :] * stride_a_k,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        b_t = tl.load(b_ptr + ks[:, None] * stride_b_k + cols[None, :] * stride_b_n,
                      mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
        if UPCAST:
            a = a.to(tl.float32)
            b_t = b_t.to(tl.float32)
        if IEEE:
            acc += tl.dot(a, b_t, input_precision="ieee")
        else:
            acc += tl.dot(a, b_t)
    return acc


@triton.autotune(configs=_EXPAND_CONFIGS, key=["M", "N", "R"])
@triton.jit
def _lora_expand_kernel(
    base_ptr, h_ptr, b_ptr, scale_ptr, out_ptr,
    M, N, R, rows_per_group,
    stride_base_m, stride_base_n, stride_h_m, stride_h_r, stride_b_n, stride_b_r, stride_out_m, stride_out_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M * stride can pass 2**31
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate(acc, h_ptr, b_ptr, rows, cols, row_ok, col_ok, R,
                      stride_h_m, stride_h_r, stride_b_n, stride_b_r, BLOCK_R, UPCAST, IEEE)  # h @ B.T

    scale = tl.load(scale_ptr + rows // rows_per_group, mask=row_ok, other=0.0).to(tl.float32)
    mask = row_ok[:, None] & col_ok[None, :]
    base = tl.load(base_ptr + rows[:, None] * stride_base_m + cols[None, :] * stride_base_n, mask=mask, other=0.0)
    out = base.to(tl.float32) + acc * scale[:, None]
    tl.store(out_ptr + rows[:, None] * stride_out_m + cols[None, :] * stride_out_n,
             out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_LINEAR_CONFIGS, key=["M", "N", "K", "R"])
@triton.jit
def _lora_linear_kernel(
    x_ptr, w_ptr, bias_ptr, h_ptr, b_ptr, scale_ptr, out_ptr,
    M, N, K, R, rows_per_group,
    stride_x_m, stride_x_k, stride_w_n, stride_w_k, stride_h_m, stride_h_r, stride_b_n, stride_b_r,
    stride_out_m, stride_out_n,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N

    # the base GEMM over K, then the adapter's rank-r K, kept apart to scale it per row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate(acc, x_ptr, w_ptr, rows, cols, row_ok, col_ok, K,
                      stride_x_m, stride_x_k, stride_w_n, stride_w_k, BLOCK_K, UPCAST, IEEE)  # x @ W0.T
    lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    lora = _accumulate(lora, h_ptr, b_ptr, rows, cols, row_ok, col_ok, R,
                       stride_h_m, stride_h_r, stride_b_n, stride_b_r, BLOCK_R, UPCAST, IEEE)  # h @ B.T

    scale = tl.load(scale_ptr + rows // rows_per_group, mask=row_ok, other=0.0).to(tl.float32)
    out = acc + lora * scale[:, None]
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_out_m + cols[None, :] * stride_out_n,
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _block_r(rank: int) -> int:
    # tl.dot needs every dim >= 16; ranks above 64 loop over 64-wide tiles
    return min(64, max(16, triton.next_power_of_2(rank)))


def _group_scale(scale: torch.Tensor, num_rows: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Validate ``(G,)`` and return it as contiguous float32 on ``device``, with the rows per group."""
    if scale.dim() != 1 or scale.numel() == 0:
        raise ValueError(f"scale must be a non-empty (G,) tensor, got shape {tuple(scale.shape)}")
    if num_rows % scale.numel():
        raise ValueError(f"{num_rows} rows do not split into {scale.numel()} equal groups")
    return scale.to(device=device, dtype=torch.float32).contiguous(), max(1, num_rows // scale.numel())


def _grid(M: int, N: int):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))


def _flags(dtype: torch.dtype) -> dict[str, bool]:
    return {"UPCAST": INTERPRETING and dtype == torch.bfloat16, "IEEE": dtype == torch.float32}


def lora_expand(
    base: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, scale: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``base + scale[group] * (h @ B.T)``; ``out=base`` updates in place.

    Args:
        base: ``(M, N)``; h: ``(M, r)``; lora_b: ``(N, r)``; scale: ``(G,)``
            with ``M % G == 0``; any strides.
        out: ``(M, N)`` destination (may be ``base``); a new tensor if ``None``.
    """
    M, N = base.shape
    R = h.shape[1]
    if h.shape[0] != M or lora_b.shape != (N, R):
        raise ValueError(f"shapes do not match: base {tuple(base.shape)}, h {tuple(h.shape)}, B {tuple(lora_b.shape)}")
    scale, rows_per_group = _group_scale(scale, M, base.device)
    if out is None:
        out = torch.empty((M, N), device=base.device, dtype=base.dtype)
    if M == 0 or N == 0:
        return out
    _lora_expand_kernel[_grid(M, N)](
        base, h, lora_b, scale, out, M, N, R, rows_per_group,
        base.stride(0), base.stride(1), h.stride(0), h.stride(1), lora_b.stride(0), lora_b.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_R=_block_r(R), **_flags(base.dtype),
    )
    return out


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    h: torch.Tensor,
    lora_b: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """``x @ W0.T + bias + scale[group] * (h @ B.T)`` in one kernel.

    Args:
        x: ``(M, K)``; weight: ``(N, K)``; bias: ``(N,)`` or ``None``;
        h: ``(M, r)`` (``x @ A.T``); lora_b: ``(N, r)``; scale: ``(G,)``.
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
    scale, rows_per_group = _group_scale(scale, M, x.device)
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return out
    _lora_linear_kernel[_grid(M, N)](
        x, weight, bias if bias is not None else x, h, lora_b, scale, out, M, N, K, R, rows_per_group,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), h.stride(0), h.stride(1),
        lora_b.stride(0), lora_b.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, BLOCK_R=_block_r(R), **_flags(x.dtype),
    )
    return out
