"""Kernels for the beta-scaled LoRA term, installed as ``ist_optim.kernels``.

Importing this package never imports Triton; the Triton kernels load on
first use. Every op has a pure-torch reference (:mod:`.reference`), which is
also the path on CPU.

* :func:`lora_expand` ``base + scale[group] * (h @ B.T)`` (probe passes; in place allowed)
* :func:`lora_linear` ``x @ W0.T + bias + scale[group] * (h @ B.T)`` in one GEMM
* ``torch.ops.ist_optim.lora_expand`` (:mod:`.ops`): the same as a custom op with
  autograd, for training; :func:`ist_optim.fuse_lora` routes peft LoRA layers through it

Math only: nothing here knows about peft or the optimizer.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .reference import lora_expand_reference, lora_linear_reference, row_scale

__all__ = [
    "triton_available",
    "use_triton",
    "lora_expand",
    "lora_linear",
    "lora_expand_reference",
    "lora_linear_reference",
    "row_scale",
]


def triton_available() -> bool:
    """Triton is installed (it may still lack a GPU: see :func:`use_triton`)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(tensor: torch.Tensor, *, forced: bool = False) -> bool:
    """Whether to run the Triton kernels on ``tensor``.

    ``auto`` (``forced=False``): Triton is installed and ``tensor`` is on CUDA.
    ``forced``: also on CPU in interpreter mode (``TRITON_INTERPRET=1``), as the tests do.
    """
    if not triton_available():
        return False
    return tensor.is_cuda or (forced and tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def lora_expand(base, h, lora_b, scale, *, out=None, backend: str = "auto"):
    """``base + scale[group] * (h @ B.T)``; Triton on CUDA, else torch.

    ``backend``: ``"auto"``, ``"triton"`` (force; raise if it cannot run) or ``"torch"``.
    Shapes as in :func:`.reference.lora_expand_reference`.
    """
    if _pick(backend, base) == "triton":
        from .triton_lora import lora_expand as kernel

        return kernel(base, h, lora_b, scale, out=out)
    result = lora_expand_reference(base, h, lora_b, scale)
    return out.copy_(result) if out is not None else result


def lora_linear(x, weight, bias, h, lora_b, scale, *, backend: str = "auto"):
    """``x @ W0.T + bias + scale[group] * (h @ B.T)``; Triton on CUDA, else torch (``backend`` as above)."""
    if _pick(backend, x) == "triton":
        from .triton_lora import lora_linear as kernel

        return kernel(x, weight, bias, h, lora_b, scale)
    return lora_linear_reference(x, weight, bias, h, lora_b, scale)


def _pick(backend: str, tensor: torch.Tensor) -> str:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"Invalid backend: {backend!r} (expected 'auto', 'triton' or 'torch')")
    if backend == "triton" and not use_triton(tensor, forced=True):
        raise RuntimeError(
            "backend='triton' needs Triton and a CUDA tensor (or TRITON_INTERPRET=1 set before import on CPU)"
        )
    if backend == "auto":
        return "triton" if use_triton(tensor) else "torch"
    return backend
