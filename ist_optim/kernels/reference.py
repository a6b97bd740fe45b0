"""Pure-torch references of the kernels: the CPU path, and what the Triton kernels are tested against.

Shapes: ``M`` rows (tokens, all candidates stacked), ``K`` input features,
``N`` output features, ``r`` adapter rank, ``G`` row groups (probe
candidates; 1 when sequential). Rows are grouped contiguously: row ``m``
belongs to group ``m // (M // G)``.
"""

from __future__ import annotations

import torch

__all__ = ["row_scale", "lora_expand_reference", "lora_linear_reference"]


def row_scale(scale: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Per-group factors ``(G,)`` -> per-row ``(M, 1)`` float32."""
    groups = scale.numel()
    if num_rows % groups:
        raise ValueError(f"{num_rows} rows do not split into {groups} equal groups")
    return scale.float().repeat_interleave(num_rows // groups).view(num_rows, 1)


def lora_expand_reference(
    base: torch.Tensor,
    h: torch.Tensor,
    lora_b: torch.Tensor,
    scale: torch.Tensor | None = None,
    *,
    alpha: float = 1.0,
) -> torch.Tensor:
    """``base + alpha * scale[group] * (h @ B.T)``, accumulated in float32.

    Args:
        base: ``(M, N)`` the base layer's output.
        h: ``(M, r)`` the adapter's down projection ``x @ A.T``.
        lora_b: ``(N, r)`` the up projection weight ``B``.
        scale: ``(G,)`` per-group factor (probe betas), or ``None`` (one group of 1).
        alpha: a factor for every row (LoRA's ``scaling``).

    Returns:
        ``(M, N)`` in ``base.dtype``.
    """
    delta = h.float() @ lora_b.float().T  # (M, N)
    if scale is not None:
        factor = row_scale(scale, base.shape[0]).to(base.device)
        delta = delta * (factor * alpha if alpha != 1.0 else factor)
    elif alpha != 1.0:
        delta = delta * alpha
    return (base.float() + delta).to(base.dtype)


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    h: torch.Tensor,
    lora_b: torch.Tensor,
    scale: torch.Tensor | None = None,
    *,
    alpha: float = 1.0,
) -> torch.Tensor:
    """``x @ W0.T + bias + alpha * scale[group] * (h @ B.T)``, accumulated in float32.

    Args:
        x: ``(M, K)``; weight: ``(N, K)``; bias: ``(N,)`` or ``None``;
        h: ``(M, r)``; lora_b: ``(N, r)``; scale: ``(G,)`` or ``None``; alpha: as in the expand.

    Returns:
        ``(M, N)`` in ``x.dtype``.
    """
    base = x.float() @ weight.float().T  # (M, N), kept in float32 for the expand
    if bias is not None:
        base = base + bias.float()
    return lora_expand_reference(base, h, lora_b, scale, alpha=alpha).to(x.dtype)
