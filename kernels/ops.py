"""``ist_optim::lora_expand`` as a torch custom op with autograd, and :func:`fuse_lora`.

Forward: ``out = base + scale[group] * (h @ B.T)`` (Triton where it can run,
else the torch reference). Backward, with ``g_s = scale[group] * grad``:
``d base = grad``, ``d h = g_s @ B``, ``d B = g_s.T @ h``; ``scale`` gets none.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import lora_expand as _lora_expand
from . import use_triton
from .reference import row_scale

__all__ = ["lora_expand_op", "fuse_lora", "FusedLoraHandle"]


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


def _is_vanilla_lora_linear(module: nn.Module) -> bool:
    variants = getattr(module, "lora_variant", {}) or {}
    return (
        isinstance(getattr(module, "scaling", None), dict)
        and isinstance(getattr(module, "lora_B", None), nn.ModuleDict)
        and isinstance(getattr(module, "base_layer", None), nn.Module)
        and not any(name in variants for name in getattr(module, "active_adapters", ()))
        and all(isinstance(b, nn.Linear) for b in module.lora_B.values())
    )


def fused_lora_forward(module: nn.Module, x: torch.Tensor, scale_of: Any = None) -> torch.Tensor:
    """peft LoRA ``Linear`` forward with the adapter term added by ``lora_expand_op``.

    Args:
        module: a vanilla peft LoRA layer (not merged, adapters enabled).
        x: ``(..., in_features)``.
        scale_of: ``adapter name -> (G,) scale tensor``; default ``scaling[name]`` with ``G = 1``.
    """
    result = module.base_layer(x)
    out_features = result.shape[-1]
    flat = result.reshape(-1, out_features)
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        lora_a, lora_b = module.lora_A[name], module.lora_B[name]
        inputs = x.to(lora_a.weight.dtype)
        h = lora_a(module.lora_dropout[name](inputs)).reshape(-1, lora_a.out_features)  # (M, r)
        scale = scale_of(name) if scale_of is not None else torch.tensor([float(module.scaling[name])])
        flat = lora_expand_op(flat, h, lora_b.weight, scale.to(flat.device))
    return flat.view(result.shape)


class FusedLoraHandle:
    """Removes what :func:`fuse_lora` patched."""

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules

    def remove(self) -> None:
        for module in self.modules:
            module.__dict__.pop("forward", None)
        self.modules = []


def fuse_lora(model: nn.Module) -> FusedLoraHandle:
    """Patch every vanilla peft LoRA ``Linear`` in ``model`` to add its adapter term with the fused op.

    Merged layers, disabled adapters, DoRA and non-``Linear`` LoRA layers keep
    peft's forward (the patched forward falls back to it at call time).
    """
    patched = []
    for module in model.modules():
        if not _is_vanilla_lora_linear(module):
            continue
        original = module.forward

        def forward(x: torch.Tensor, *args: Any, _module=module, _original=original, **kwargs: Any) -> torch.Tensor:
            if args or kwargs or _module.merged or _module.disable_adapters:
                return _original(x, *args, **kwargs)
            return fused_lora_forward(_module, x)

        module.forward = forward
        patched.append(module)
    return FusedLoraHandle(patched)
