"""peft LoRA ``Linear`` forwards that add the adapter term with one fused kernel.

peft computes ``result + lora_B(lora_A(dropout(x))) * scaling``: the rank-r
up projection, the scaling and the add each make a pass over the
``(tokens, out_features)`` output. Here the base output is computed as usual
and ``scaling * beta[group] * (h @ B.T)`` is added to it by
``ist_optim.kernels`` (the Triton kernel where chosen), so the adapter term
never exists as a separate tensor. ``scaling`` goes to the kernel as a Python
float: no per-module tensor and no host-to-device copy in the forward.

* :func:`lora_forward` the forward itself, given how to expand;
* :func:`fuse_lora` opt-in for training: patches every vanilla LoRA ``Linear``
  to use the autograd-aware custom op ``ist_optim::lora_expand``;
* the probe passes use :func:`lora_forward` with the in-place kernel
  (:mod:`ist_optim.suppression`);
* :func:`patch_forward` puts a forward on a module's instance and takes off
  only what it put there (accelerate's hooks and users patch ``forward`` too).

Layers the kernel does not cover keep peft's forward: DoRA and other
variants, non-``Linear`` up projections, and ``lora_bias=True`` (the bias of
``lora_B`` is scaled with the term; peft's path is exact for it).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["is_vanilla_lora", "is_fusable", "lora_forward", "fuse_lora", "FusedLoraHandle", "patch_forward"]

# expand(flat_base (M, N), h (M, r), B (N, r), alpha, group_scale (G,) on the device or None) -> (M, N)
Expand = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, "torch.Tensor | None"], torch.Tensor]


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


def has_lora_bias(module: nn.Module) -> bool:
    """Some active ``lora_B`` has a bias (peft ``lora_bias=True``)."""
    ups = [module.lora_B[name] for name in module.active_adapters if name in module.lora_B]
    return any(getattr(up, "bias", None) is not None for up in ups)


def is_fusable(module: nn.Module) -> bool:
    """:func:`lora_forward` computes what peft's forward does: vanilla LoRA, ``Linear`` up projections, no bias."""
    return is_vanilla_lora(module) and has_linear_up_projections(module) and not has_lora_bias(module)


_MISSING = object()


def patch_forward(module: nn.Module, forward: Callable[..., Any]) -> Callable[[], None]:
    """Set ``module.forward = forward`` on the instance; the returned undo removes only that.

    Whatever instance-level forward was there before (accelerate's hook, a
    user's patch, :func:`fuse_lora`) is put back exactly, and none is created
    where there was none. If something else has replaced ours since (and may
    call ours as its original), ours stays in place as a pass-through to the
    forward it replaced, so the later patch keeps working.
    """
    previous_own = module.__dict__.get("forward", _MISSING)
    previous = module.forward
    live = True

    def patched(*args: Any, **kwargs: Any) -> Any:
        return forward(*args, **kwargs) if live else previous(*args, **kwargs)

    module.forward = patched

    def undo() -> None:
        nonlocal live
        live = False
        if module.__dict__.get("forward") is not patched:
            return  # replaced after us: leave the newer patch alone
        if previous_own is _MISSING:
            del module.__dict__["forward"]
        else:
            module.forward = previous_own

    return undo


def lora_forward(
    module: nn.Module,
    x: torch.Tensor,
    expand: Expand,
    factor: float = 1.0,
    group_scale: Callable[[torch.device], torch.Tensor] | None = None,
):
    """``base_layer(x)`` plus each active adapter's term, added by ``expand``.

    Args:
        module: a vanilla peft LoRA ``Linear`` (not merged, adapters enabled).
        x: ``(..., in_features)``.
        expand: adds ``alpha * group_scale[group] * (h @ B.T)`` to the flat base output.
        factor: multiplies ``scaling`` (a sequential probe's beta); a float.
        group_scale: ``device -> (G,)`` factors per row group on that device (batched probes'
            betas, built once per probe pass and device by the caller); ``None`` = 1.
    """
    result = module.base_layer(x)
    flat = result.reshape(-1, result.shape[-1])  # (M, N), rows grouped by candidate
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        lora_a = module.lora_A[name]
        h = lora_a(module.lora_dropout[name](x.to(lora_a.weight.dtype))).reshape(flat.shape[0], -1)  # (M, r)
        groups = group_scale(flat.device) if group_scale is not None else None
        flat = expand(flat, h, module.lora_B[name].weight, float(module.scaling[name]) * factor, groups)
    return flat.view(result.shape)


class FusedLoraHandle:
    """``remove()`` restores the forwards that :func:`fuse_lora` patched (see :func:`patch_forward`)."""

    def __init__(self, modules: list[nn.Module], undos: list[Callable[[], None]]):
        self.modules = modules
        self._undos = undos

    def remove(self) -> None:
        for undo in reversed(self._undos):
            undo()
        self.modules, self._undos = [], []


def fuse_lora(model: nn.Module, *, kernels: str = "auto") -> FusedLoraHandle:
    """Route every vanilla peft LoRA ``Linear`` of ``model`` through the fused, autograd-aware op.

    Opt-in, for training and inference alike. ``kernels``: ``"triton"`` runs
    the fused Triton kernel (CUDA, or the interpreter on CPU); ``"auto"``
    (default) and ``"torch"`` run its torch reference, on CUDA too, until the
    kernel has passed ``bench/gpu_check.py`` on a real GPU (see
    :mod:`ist_optim.kernels`). Merged layers, disabled adapters, DoRA, ``lora_bias``
    and non-``Linear`` LoRA layers keep peft's forward (checked again at every
    call: the active adapters may change). So do layers whose forward is
    already patched on the instance (accelerate's device hooks, a user's
    patch, an earlier ``fuse_lora``): the fused forward would bypass it.

    Returns:
        a handle; ``handle.remove()`` restores the forwards found (peft's, or
        an instance-level patch that was there before).
    """
    from .kernels import _pick, triton_available
    from .kernels.ops import lora_expand_op

    if kernels not in ("auto", "triton", "torch"):
        raise ValueError(f"Invalid kernels: {kernels!r} (expected 'auto', 'triton' or 'torch')")
    if kernels == "triton" and not triton_available():
        raise ValueError("fuse_lora(kernels='triton') needs Triton installed (pip install triton)")

    def expand(flat, h, lora_b, alpha, groups):
        # decided per call: the module's device may change (model.to(...)) after fuse_lora
        return lora_expand_op(flat, h, lora_b, alpha, _pick(kernels, flat) == "triton")

    patched, undos, kept = [], [], 0
    for module in model.modules():
        if not is_fusable(module):
            continue
        if "forward" in vars(module):
            kept += 1
            continue
        original = module.forward

        def forward(x: torch.Tensor, *args: Any, _module=module, _original=original, **kwargs: Any) -> torch.Tensor:
            if args or kwargs or not _runs_fused(_module):
                return _original(x, *args, **kwargs)
            return lora_forward(_module, x, expand)

        undos.append(patch_forward(module, forward))
        patched.append(module)
    if kept:
        warnings.warn(
            f"fuse_lora: {kept} LoRA layers already have a forward patched on the instance "
            "(accelerate, your own, or an earlier fuse_lora); they keep it and are not fused",
            stacklevel=2,
        )
    return FusedLoraHandle(patched, undos)


def _runs_fused(module: nn.Module) -> bool:
    # Batched probes on the scaling path put per-row tensors into ``scaling``: peft's forward broadcasts them.
    return (
        not module.merged
        and not module.disable_adapters
        and is_fusable(module)
        and all(isinstance(module.scaling.get(name, 1.0), (int, float)) for name in module.active_adapters)
    )
