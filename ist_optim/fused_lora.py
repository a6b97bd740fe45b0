"""peft LoRA ``Linear`` forwards that add the adapter term with one fused kernel.

peft computes ``result + lora_B(lora_A(dropout(x))) * scaling``: the rank-r
up projection, the scaling and the add each make a pass over the
``(tokens, out_features)`` output. Here the base output is computed as usual
and ``scaling * beta[group] * (h @ B.T)`` is added to it by
``ist_optim.kernels`` (Triton on CUDA), so the adapter term never exists as
a separate tensor.

* :func:`lora_forward` the forward itself, given how to expand;
* :func:`fuse_lora` opt-in for training: patches every vanilla LoRA ``Linear``
  to use the autograd-aware custom op ``ist_optim::lora_expand``;
* the probe passes use :func:`lora_forward` with the in-place kernel
  (:mod:`ist_optim.suppression`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["is_vanilla_lora", "lora_forward", "fuse_lora", "FusedLoraHandle"]

# expand(flat_base (M, N), h (M, r), B (N, r), scale (G,)) -> (M, N)
Expand = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def is_vanilla_lora(module: nn.Module) -> bool:
    """A peft LoRA layer whose active adapters are plain LoRA (no DoRA or other variant)."""
    scaling = getattr(module, "scaling", None)
    variants = getattr(module, "lora_variant", {}) or {}  # peft >= 0.15: DoRA and friends live here
    use_dora = getattr(module, "use_dora", {}) or {}  # older peft flags DoRA per adapter
    active = getattr(module, "active_adapters", ())
    return (
        isinstance(scaling, dict)
        and hasattr(module, "lora_A")
        and not any(name in variants or use_dora.get(name, False) for name in active)
    )


def has_linear_up_projections(module: nn.Module) -> bool:
    ups = [module.lora_B[name] for name in module.active_adapters if name in module.lora_B]
    return bool(ups) and all(isinstance(up, nn.Linear) for up in ups)


def lora_forward(module: nn.Module, x: torch.Tensor, expand: Expand, group_scale: torch.Tensor | None = None):
    """``base_layer(x)`` plus each active adapter's term, added by ``expand``.

    Args:
        module: a vanilla peft LoRA ``Linear`` (not merged, adapters enabled).
        x: ``(..., in_features)``.
        expand: adds ``scale[group] * (h @ B.T)`` to the flat base output.
        group_scale: ``(G,)`` extra factor per row group (probe betas); ``None`` = 1.
    """
    result = module.base_layer(x)
    flat = result.reshape(-1, result.shape[-1])  # (M, N), rows grouped by candidate
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        lora_a = module.lora_A[name]
        h = lora_a(module.lora_dropout[name](x.to(lora_a.weight.dtype))).reshape(flat.shape[0], -1)  # (M, r)
        scale = torch.tensor([float(module.scaling[name])], dtype=torch.float64)
        if group_scale is not None:
            scale = group_scale.double() * scale
        flat = expand(flat, h, module.lora_B[name].weight, scale.float().to(flat.device))
    return flat.view(result.shape)


class FusedLoraHandle:
    """``remove()`` restores the forwards that :func:`fuse_lora` patched."""

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules

    def remove(self) -> None:
        for module in self.modules:
            module.__dict__.pop("forward", None)
        self.modules = []


def fuse_lora(model: nn.Module) -> FusedLoraHandle:
    """Route every vanilla peft LoRA ``Linear`` of ``model`` through the fused, autograd-aware op.

    Opt-in, for training and inference alike (Triton on CUDA, the torch
    reference elsewhere). Merged layers, disabled adapters, DoRA and
    non-``Linear`` LoRA layers keep peft's forward.

    Returns:
        a handle; ``handle.remove()`` restores peft's forwards.
    """
    from .kernels.ops import lora_expand_op

    patched = []
    for module in model.modules():
        if not (is_vanilla_lora(module) and has_linear_up_projections(module)):
            continue
        original = module.forward

        def forward(x: torch.Tensor, *args: Any, _module=module, _original=original, **kwargs: Any) -> torch.Tensor:
            if args or kwargs or _module.merged or _module.disable_adapters:
                return _original(x, *args, **kwargs)
            return lora_forward(_module, x, lora_expand_op)

        module.forward = forward
        patched.append(module)
    return FusedLoraHandle(patched)
