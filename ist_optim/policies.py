"""Layer-selection policies: how the layers to train are chosen each step.

IST's own bandit (:class:`~ist_optim.ImportanceScheduler`, ``policy="ist"``)
is one policy among several that differ only in this choice; the freezing,
backward cut, state eviction and exact resume around it are the same for all.

The protocol, which a user's own policy implements (subclass :class:`LayerPolicy`):

``bind(num_layers)``
    called once by IST with the number ``L`` of discovered layers; validate here.
``sample_active() -> list[int]``
    the sorted layers to train in the next step (called at construction and
    after every step); also stored in ``active``.
``uses_probes``
    ``True`` if the policy learns from probe passes: IST then calls
    ``sample_candidates() -> (N_c, L) bool`` and ``update(kept, losses)``
    every ``probe_interval`` steps (see :class:`~ist_optim.ImportanceScheduler`).
``state_dict()`` / ``check_state_dict(sd)`` / ``load_state_dict(sd)``
    tensors, numbers, strings and lists only, so checkpoints load with
    ``torch.load(weights_only=True)``; ``check_state_dict`` raises before
    anything changes.

Built in: ``"ist"`` (the bandit, default), ``"random"`` (uniform without
replacement: LISA, and the paper's random sparse tuning), :class:`FixedLayers`
and :class:`WeightedLayers` (e.g. OwLore's outlier ratios).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .scheduler import as_int, resolve_layer_count

__all__ = ["LayerPolicy", "FixedLayers", "WeightedLayers"]


class LayerPolicy:
    """Base class of selection policies that do not learn from probes (see the module docstring).

    Attributes:
        num_layers: ``L`` (set by :meth:`bind`).
        active: the layers chosen by the last :meth:`sample_active`.
        uses_probes: ``False`` here.
    """

    uses_probes = False

    def __init__(self) -> None:
        self.num_layers = 0
        self.active: list[int] = []

    def bind(self, num_layers: int) -> None:
        if self.num_layers and self.num_layers != num_layers:
            raise ValueError(f"{type(self).__name__} is bound to {self.num_layers} layers, the model has {num_layers}")
        self.num_layers = num_layers

    def sample_active(self) -> list[int]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"policy": type(self).__name__, "num_layers": self.num_layers, "active": list(self.active)}

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("policy") != type(self).__name__:
            raise ValueError(f"loaded state is for policy {state_dict.get('policy')!r}, not {type(self).__name__}")
        if state_dict["num_layers"] != self.num_layers:
            raise ValueError(f"loaded state is for {state_dict['num_layers']} layers, not {self.num_layers}")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.check_state_dict(state_dict)
        self.active = [int(i) for i in state_dict["active"]]


class FixedLayers(LayerPolicy):
    """Always the same layers (a static choice, e.g. from a CKA ranking or the top layers).

    Args:
        layers: layer indices into ``opt.layer_names``.
    """

    def __init__(self, layers: Sequence[int]) -> None:
        super().__init__()
        indices = [as_int(i) for i in layers]
        if not indices or any(i is None for i in indices):
            raise ValueError(f"Invalid layers: {list(layers)} (need a non-empty list of ints)")
        if len(set(indices)) != len(indices):
            raise ValueError(f"Invalid layers: {list(layers)} (repeated index)")
        self.layers = sorted(indices)

    def bind(self, num_layers: int) -> None:
        super().bind(num_layers)
        if self.layers[0] < 0 or self.layers[-1] >= num_layers:
            raise ValueError(f"Invalid layers: {self.layers} (the model has {num_layers} layers, 0..{num_layers - 1})")

    def sample_active(self) -> list[int]:
        self.active = list(self.layers)
        return list(self.active)

    def __repr__(self) -> str:
        return f"FixedLayers({self.layers})"


class WeightedLayers(LayerPolicy):
    """``active_layers`` layers drawn without replacement with probability proportional to ``weights``.

    With one layer per step, layer ``i`` trains with probability
    ``weights[i] / sum(weights)``; with several, each draw is proportional to
    the weights of the layers not drawn yet (``torch.multinomial``).

    Args:
        weights: ``L`` non-negative weights (e.g. OwLore's layer-wise outlier ratios).
        active_layers: layers per step: int count or float fraction of ``L``.
        seed: seed of the policy's own generator (the global RNG is never used).
    """

    def __init__(self, weights: Sequence[float] | torch.Tensor, active_layers: int | float = 0.25, seed: int = 0):
        super().__init__()
        self.weights = torch.as_tensor(weights, dtype=torch.float64).detach().cpu().reshape(-1)
        if not bool(torch.isfinite(self.weights).all()) or bool((self.weights < 0).any()):
            raise ValueError(f"Invalid weights: {self.weights.tolist()} (need finite non-negative numbers)")
        if as_int(seed) is None:
            raise TypeError(f"seed must be an int, but got {type(seed).__name__}")
        self.active_layers = active_layers
        self.seed = as_int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.num_active = 0

    def bind(self, num_layers: int) -> None:
        super().bind(num_layers)
        if self.weights.numel() != num_layers:
            raise ValueError(f"Invalid weights: {self.weights.numel()} of them for {num_layers} layers")
        self.num_active = resolve_layer_count(self.active_layers, num_layers, "active_layers")
        if int((self.weights > 0).sum()) < self.num_active:
            raise ValueError(
                f"Invalid weights: only {int((self.weights > 0).sum())} are positive, fewer than the "
                f"{self.num_active} layers drawn per step"
            )

    def sample_active(self) -> list[int]:
        chosen = torch.multinomial(self.weights, self.num_active, replacement=False, generator=self.generator)
        self.active = sorted(chosen.tolist())
        return list(self.active)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.generator.set_state(state_dict["generator"].to("cpu"))

    def __repr__(self) -> str:
        return f"WeightedLayers({self.weights.tolist()}, active_layers={self.active_layers}, seed={self.seed})"
