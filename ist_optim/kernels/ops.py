"""``ist_optim::lora_expand`` as a torch custom op with autograd.

Forward: ``out = base + scale[group] * (h @ B.T)`` (Triton where it can run,
else the torch reference). Backward, with ``g_s = scale[group] * grad``:
``d base = grad``, ``d h = g_s @ B``, ``d B = g_s.T @ h``; ``scale`` gets none.
"""

from __future__ import annotations

from typing import Any

import torch

from . import lora_expand as _lora_expand
from . import use_triton
from .reference import row_scale

__all__ = ["lora_expand_op"]


@torch.library.custom_op("ist_optim::lora_expand", mutates_args=())
def lora_expand_op(base: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(M, N), (M, r), (N, r), (G,) -> (M, N)``, contiguous; Triton on CUDA and in interpreter mode."""
    backend = "triton" if use_triton(base, forced=True) else "torch"
    return _lora_expand(base, h, lora_b, scale, backend=backend).contiguous()


@lora_expand_op.register_fake
def _(base: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return base.new_empty(base.shape)


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    base, h, lora_b, scale = inputs
    ctx.save_for_backward(h, lora_b, scale)
    ctx.base_dtype = base.dtype


def _backward(ctx: Any, grad: torch.Tensor) -> tuple:
    h, lora_b, scale = ctx.saved_tensors
    grad_scaled = grad.float() * row_scale(scale, grad.shape[0]).to(grad.device)  # (M, N)
    grad_h = (grad_scaled @ lora_b.float()).to(h.dtype)  # (M, r)
    grad_b = (grad_scaled.T @ h.float()).to(lora_b.dtype)  # (N, r)
    return grad.to(ctx.base_dtype), grad_h, grad_b, None


lora_expand_op.register_autograd(_backward, setup_context=_setup_context)
