"""Kernels for the beta-scaled LoRA term, installed as ``ist_optim.kernels``.

Importing this package never imports Triton; the Triton kernels load on
first use. Every op has a pure-torch reference (:mod:`.reference`), which is
also the path on CPU.

* :func:`lora_expand` ``base + alpha * scale[group] * (h @ B.T)`` (probe passes; in place allowed)
* :func:`lora_linear` ``x @ W0.T + bias + alpha * scale[group] * (h @ B.T)`` in one GEMM
* ``torch.ops.ist_optim.lora_expand`` (:mod:`.ops`): the same as a custom op with
  autograd, for training; :func:`ist_optim.fuse_lora` routes peft LoRA layers through it

Math only: nothing here knows about peft or the optimizer.

Which path runs: ``backend="auto"`` is the torch reference everywhere, CUDA
included, until the Triton kernels have passed ``bench/gpu_check.py`` on a
real GPU (none has run them yet; the interpreter cannot stand in for one:
DESIGN.md section 6). ``backend="triton"`` runs them on CUDA (and on CPU
under ``TRITON_INTERPRET=1``, as the tests do).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .reference import lora_expand_reference, lora_linear_reference, row_scale

__all__ = [
    "AUTO_TRITON_ON_CUDA",
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


# Flip to True once bench/gpu_check.py has passed on a real GPU (issue 20): then "auto" means Triton on CUDA.
AUTO_TRITON_ON_CUDA = False


def use_triton(tensor: torch.Tensor, *, forced: bool = False) -> bool:
    """Whether to run the Triton kernels on ``tensor``.

    ``auto`` (``forced=False``): never for now (:data:`AUTO_TRITON_ON_CUDA`: no GPU has checked them).
    ``forced``: Triton is installed and ``tensor`` is on CUDA, or on CPU in interpreter mode
    (``TRITON_INTERPRET=1``), as the tests do.
    """
    if not triton_available():
        return False
    if not forced:
        return AUTO_TRITON_ON_CUDA and tensor.is_cuda
    return tensor.is_cuda or (tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def lora_expand(base, h, lora_b, scale=None, *, alpha: float = 1.0, out=None, backend: str = "auto"):
    """``base + alpha * scale[group] * (h @ B.T)``; torch unless ``backend="triton"`` (see above).

    ``backend``: ``"auto"``, ``"triton"`` (force; raise if it cannot run) or ``"torch"``.
    Shapes as in :func:`.reference.lora_expand_reference`; ``scale=None`` is one group of 1.
    """
    if _pick(backend, base) == "triton":
        from .triton_lora import lora_expand as kernel

        return kernel(base, h, lora_b, scale, alpha=alpha, out=out)
    result = lora_expand_reference(base, h, lora_b, scale, alpha=alpha)
    return out.copy_(result) if out is not None else result


def lora_linear(x, weight, bias, h, lora_b, scale=None, *, alpha: float = 1.0, backend: str = "auto"):
    """``x @ W0.T + bias + alpha * scale[group] * (h @ B.T)``; torch unless ``backend="triton"``."""
    if _pick(backend, x) == "triton":
        from .triton_lora import lora_linear as kernel

        return kernel(x, weight, bias, h, lora_b, scale, alpha=alpha)
    return lora_linear_reference(x, weight, bias, h, lora_b, scale, alpha=alpha)


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
