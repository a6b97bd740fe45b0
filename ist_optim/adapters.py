"""Bottleneck adapters (LLM-Adapters, Hu et al. 2023) for models with or without peft.

The paper applies IST to series and parallel adapters as well as LoRA; peft
has neither. Both follow peft's ``base_layer`` convention (the wrapped
module is ``self.base_layer``, the adapter adds ``scale * up(act(down(.)))``),
so layer discovery, suppression and the probe passes treat them like peft
layers, in any ``nn.Module``.

* :class:`ParallelAdapter` beside a module: ``base_layer(x) + s * up(act(down(x)))``;
* :class:`SeriesAdapter` after a module's output, ``h + s * up(act(down(h)))``
  with ``h = base_layer(x)``, or before its input,
  ``base_layer(x + s * up(act(down(x))))`` (LLM-Adapters on LLaMA: before
  ``gate_proj``/``up_proj``, after ``down_proj``);
* :func:`add_adapters` wraps the modules whose names match.

``down`` is kaiming-uniform and ``up`` zeros (the authors' initialisation),
so a freshly inserted adapter leaves the model's output unchanged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["BottleneckAdapter", "ParallelAdapter", "SeriesAdapter", "add_adapters"]

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "identity": nn.Identity}


def _features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:  # e.g. GPT-2's Conv1D stores (in, out)
        return (weight.shape[0], weight.shape[1]) if type(module).__name__ == "Conv1D" else tuple(weight.shape[::-1])
    raise TypeError(f"cannot infer the features of {type(module).__name__}; adapters wrap nn.Linear-like modules")


class BottleneckAdapter(nn.Module):
    """Shared parts of the series and parallel adapters.

    Args:
        base_layer: the module to wrap (``nn.Linear`` or a linear-like module).
        bottleneck: width of the bottleneck (LLM-Adapters: 256).
        scale: ``s``, the factor on the adapter's output (a float; probes multiply it by ``beta``).
        activation: ``"tanh"`` (LLM-Adapters), ``"relu"``, ``"gelu"``, ``"silu"`` or ``"identity"``.
        dropout: dropout on the adapter's input.
        in_features, out_features: the widths the adapter reads and writes.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        in_features: int,
        out_features: int,
        bottleneck: int,
        scale: float,
        activation: str,
        dropout: float,
    ) -> None:
        super().__init__()
        if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck < 1:
            raise ValueError(f"Invalid bottleneck: {bottleneck} (need a positive int)")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"Invalid activation: {activation!r} (expected one of {sorted(_ACTIVATIONS)})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Invalid dropout: {dropout} (need 0 <= dropout < 1)")
        if not math.isfinite(float(scale)):
            raise ValueError(f"Invalid scale: {scale} (need a finite float)")
        self.base_layer = base_layer
        weight = next(base_layer.parameters(), None)
        factory = {"device": weight.device, "dtype": weight.dtype} if weight is not None else {}
        self.adapter_down = nn.Linear(in_features, bottleneck, bias=False, **factory)
        self.adapter_up = nn.Linear(bottleneck, out_features, bias=False, **factory)
        self.adapter_act = _ACTIVATIONS[activation]()
        self.adapter_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scale: float | torch.Tensor = float(scale)
        nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.adapter_up.weight)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """``scale * up(act(down(dropout(h))))``; ``h`` is ``(..., features)``."""
        return self.scale * self.adapter_up(self.adapter_act(self.adapter_down(self.adapter_dropout(h))))


class ParallelAdapter(BottleneckAdapter):
    """``base_layer(x) + scale * up(act(down(x)))``: a bottleneck beside a linear-like module.

    ``x`` is ``(..., in_features)``, the output ``(..., out_features)``.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        bottleneck: int = 256,
        scale: float = 1.0,
        activation: str = "tanh",
        dropout: float = 0.0,
    ) -> None:
        in_features, out_features = _features(base_layer)
        super().__init__(base_layer, in_features, out_features, bottleneck, scale, activation, dropout)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.base_layer(x, *args, **kwargs) + self.delta(x)


class SeriesAdapter(BottleneckAdapter):
    """A bottleneck in series with a module: after its output (default) or before its input.

    ``position="output"``: ``h + scale * up(act(down(h)))`` with ``h = base_layer(x)``.
    ``position="input"``: ``base_layer(x + scale * up(act(down(x))))``.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        bottleneck: int = 256,
        scale: float = 1.0,
        activation: str = "tanh",
        dropout: float = 0.0,
        position: str = "output",
    ) -> None:
        if position not in ("output", "input"):
            raise ValueError(f"Invalid position: {position!r} (expected 'output' or 'input')")
        in_features, out_features = _features(base_layer)
        features = out_features if position == "output" else in_features
        super().__init__(base_layer, features, features, bottleneck, scale, activation, dropout)
        self.position = position

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.position == "input":
            return self.base_layer(x + self.delta(x), *args, **kwargs)
        h = self.base_layer(x, *args, **kwargs)
        return h + self.delta(h)


def _matches(name: str, targets: str | Sequence[str]) -> bool:
    if isinstance(targets, str):  # a regular expression over the full module name, as in peft
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def add_adapters(
    model: nn.Module,
    target_modules: str | Sequence[str],
    kind: str = "parallel",
    *,
    bottleneck: int = 256,
    scale: float = 1.0,
    activation: str = "tanh",
    dropout: float = 0.0,
    position: str = "output",
    freeze_base: bool = True,
) -> list[str]:
    """Wrap every module of ``model`` whose name matches ``target_modules`` in an adapter, in place.

    Args:
        model: any ``nn.Module``.
        target_modules: module-name suffixes (``["up_proj", "down_proj"]``), or one regular
            expression matched against the full name (as peft's ``target_modules``).
        kind: ``"parallel"`` or ``"series"``.
        bottleneck, scale, activation, dropout: as in :class:`BottleneckAdapter`.
        position: series adapters only: ``"output"`` or ``"input"``.
        freeze_base: make only adapter parameters trainable (as peft does).

    Returns:
        the names of the wrapped modules.

    Raises:
        ValueError: when nothing matches, or a match is already an adapter.
    """
    if kind not in ("parallel", "series"):
        raise ValueError(f"Invalid kind: {kind!r} (expected 'parallel' or 'series')")
    if kind == "parallel" and position != "output":
        raise ValueError("position applies to series adapters only")
    matched = [(name, module) for name, module in model.named_modules() if name and _matches(name, target_modules)]
    if not matched:
        raise ValueError(f"no module of {type(model).__name__} matches target_modules={target_modules!r}")
    for name, module in matched:
        if isinstance(module, BottleneckAdapter) or name.endswith(".base_layer"):
            raise ValueError(f"{name} is already wrapped by an adapter")
    if freeze_base:
        model.requires_grad_(False)
    for name, module in matched:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if kind == "parallel":
            adapter = ParallelAdapter(module, bottleneck, scale, activation, dropout)
        else:
            adapter = SeriesAdapter(module, bottleneck, scale, activation, dropout, position)
        setattr(parent, child, adapter)
    return [name for name, _ in matched]
