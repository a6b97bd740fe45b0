"""``ist_optim::lora_expand`` as a torch custom op with autograd.

Forward: ``out = base + alpha * (h @ B.T)`` (the Triton kernel when
``triton``, else the torch reference). Backward, with ``g_s = alpha * grad``
in float32: ``d base = grad``, ``d h = g_s @ B``, ``d B = g_s.T @ h``.
``alpha`` (LoRA's ``scaling``) is a float passed by value: no tensor is built
or copied to the device per call.
"""

from __future__ import annotations

from typing import Any

import torch

from . import lora_expand as _lora_expand

__all__ = ["lora_expand_op"]


@torch.library.custom_op("ist_optim::lora_expand", mutates_args=())
def lora_expand_op(
    base: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, alpha: float, triton: bool = False
) -> torch.Tensor:
    """``(M, N), (M, r), (N, r) -> (M, N)``, contiguous; ``triton`` picks the kernel (CUDA or the interpreter)."""
    backend = "triton" if triton else "torch"
    return _lora_expand(base, h, lora_b, alpha=alpha, backend=backend).contiguous()


@lora_expand_op.register_fake
def _(base: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, alpha: float, triton: bool = False) -> torch.Tensor:
    return base.new_empty(base.shape)


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    base, h, lora_b, alpha, _ = inputs
    ctx.save_for_backward(h, lora_b)
    ctx.alpha = alpha
    ctx.base_dtype = base.dtype


def _backward(ctx: Any, grad: torch.Tensor) -> tuple:
    h, lora_b = ctx.saved_tensors
    grad_scaled = grad.float() * ctx.alpha  # (M, N)
    grad_h = (grad_scaled @ lora_b.float()).to(h.dtype)  # (M, r)
    grad_b = (grad_scaled.T @ h.float()).to(lora_b.dtype)  # (N, r)
    return grad.to(ctx.base_dtype), grad_h, grad_b, None, None


lora_expand_op.register_autograd(_backward, setup_context=_setup_context)
