"""Choices that look at nothing: fixed layers, weighted draws (OwLore), LISA's uniform draw held for K steps, and
draws spread evenly through depth."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .._checks import as_int, resolve_layer_count
from .base import LayerPolicy, PolicyContext, _require, _SeededPolicy
from .gradient import systematic_sample


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

    @property
    def trains_every_layer(self) -> bool:  # type: ignore[override]
        return self.layers == list(range(self.num_layers))

    def sample_active(self) -> list[int]:
        self.active = list(self.layers)
        return list(self.active)

    def __repr__(self) -> str:
        return f"FixedLayers({self.layers})"


class WeightedLayers(_SeededPolicy):
    """``active_layers`` layers drawn without replacement with probability proportional to ``weights``.

    With one layer per step, layer ``i`` trains with probability
    ``weights[i] / sum(weights)``; with several, each draw is proportional to
    the weights of the layers not drawn yet (``torch.multinomial``).

    Args:
        weights: ``L`` non-negative weights (e.g. OwLore's layer-wise outlier
            ratios from :func:`outlier_ratios`).
        active_layers: layers per step: int count or float fraction of ``L``.
        seed: seed of the policy's own generator (the global RNG is never used);
            ``None`` (default): IST's ``seed`` option (by default ``torch.initial_seed()``).
    """

    def __init__(
        self, weights: Sequence[float] | torch.Tensor, active_layers: int | float = 0.25, seed: int | None = None
    ) -> None:
        super().__init__(seed)
        self.weights = torch.as_tensor(weights, dtype=torch.float64).detach().cpu().reshape(-1)
        if not bool(torch.isfinite(self.weights).all()) or bool((self.weights < 0).any()):
            raise ValueError(f"Invalid weights: {self.weights.tolist()} (need finite non-negative numbers)")
        self.active_layers = active_layers
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

    def __repr__(self) -> str:
        return f"WeightedLayers({self.weights.tolist()}, active_layers={self.active_layers}, seed={self.seed})"


class LISALayers(_SeededPolicy):
    """LISA: ``active_layers`` layers drawn uniformly, switched every ``interval_steps`` steps.

    Layerwise Importance Sampled AdamW (Pan et al. 2024, arXiv 2403.17919), as
    LMFlow's ``DynamicLayerActivationCallback`` runs it: before optimizer steps
    ``0, K, 2K, ...`` (``K = interval_steps``) the policy draws
    ``active_layers`` of the ``L`` layers uniformly without replacement
    (``torch.randperm(L)[:active_layers]`` on the policy's own generator;
    LMFlow uses ``np.random.choice(L, n, replace=False)``: the same
    distribution, not the same numbers), and those layers alone train for the
    next ``K`` steps. Everything outside the layers (embeddings, final norm,
    LM head) trains every step with IST's default ``outside_layers="train"``,
    as in LISA. LMFlow's defaults are ``LISALayers(2, interval_steps=20)``;
    ``policy="lisa"`` is ``LISALayers(active_layers, interval_steps=20, seed=seed)``
    with IST's options. LISA is full-parameter fine-tuning: with no adapters
    in the model IST's layers are the blocks themselves (full-layer mode);
    with adapters the same schedule chooses which layers' adapters train.
    The optimizer state of layers switched off is kept (``state_policy="keep"``,
    as LMFlow's AdamW keeps it) unless IST is told to offload or drop it.

    ``interval_steps=1`` redraws before every step, which is ``policy="random"``'s
    distribution.

    The steps counted are the optimizer steps IST takes. A step that
    ``GradScaler`` skips (an fp16 overflow) never calls the optimizer, so it
    does not count here, while LMFlow counts ``Trainer``'s ``global_step``,
    which does: under fp16 the switch points come later than LMFlow's by the
    number of skipped steps (a few, at the start of a run).

    Args:
        active_layers: layers per interval (int count or float fraction of ``L``).
        interval_steps: ``K >= 1``, optimizer steps between switches.
        seed: seed of the policy's own generator; ``None`` (default): IST's ``seed`` option.

    Attributes:
        num_steps: optimizer steps taken.
    """

    def __init__(self, active_layers: int | float = 2, *, interval_steps: int = 20, seed: int | None = None) -> None:
        super().__init__(seed)
        if as_int(interval_steps) is None or as_int(interval_steps) < 1:
            raise ValueError(f"Invalid interval_steps: {interval_steps} (need an int >= 1)")
        self.active_layers = active_layers
        self.interval_steps = as_int(interval_steps)
        self.num_active = 0
        self.num_steps = 0
        self._drawn_at: int | None = None  # num_steps of the last draw (one draw per switch)

    def bind(self, num_layers: int) -> None:
        super().bind(num_layers)
        self.num_active = resolve_layer_count(self.active_layers, num_layers, "active_layers")

    def after_step(self, context: PolicyContext) -> None:
        self.num_steps += 1

    def sample_active(self) -> list[int]:
        if self.num_steps % self.interval_steps == 0 and self._drawn_at != self.num_steps:
            order = torch.randperm(self.num_layers, generator=self.generator)
            self.active = sorted(order[: self.num_active].tolist())
            self._drawn_at = self.num_steps
        return list(self.active)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "num_steps": self.num_steps}

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().check_state_dict(state_dict)
        _require(state_dict, ("num_steps",), type(self).__name__)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.num_steps = int(state_dict["num_steps"])
        self._drawn_at = self.num_steps  # saved after step(): this interval's layers are already drawn

    def __repr__(self) -> str:
        return f"LISALayers(active_layers={self.active_layers}, interval_steps={self.interval_steps}, seed={self.seed})"


class SpreadLayers(_SeededPolicy):
    """``active_layers`` layers spread evenly through depth, at a new random offset every step.

    Each step draws one ``u`` uniformly in ``[0, 1)`` and trains the layers
    ``floor((u + j) * L / k)`` for ``j = 0 .. k - 1``: systematic sampling in
    depth order with equal inclusion probabilities (``systematic_sample(...,
    shuffle=False)``). Every layer trains with probability ``k / L``, as with
    ``policy="random"``; what differs is the joint draw: the ``k`` layers of
    a step lie ``L / k`` apart (rounded down or up: a stratified draw), so
    a step never trains only the bottom or only the top of the network, and
    layers fewer than ``floor(L / k)`` apart never train together. On the
    weekday task this did worse than ``"random"`` (docs/evidence/policies.md);
    it is there as the control that showed it.

    Args:
        active_layers: layers per step (int count or float fraction of ``L``).
        seed: seed of the policy's own generator; ``None`` (default): IST's ``seed`` option.
    """

    def __init__(self, active_layers: int | float = 0.25, *, seed: int | None = None) -> None:
        super().__init__(seed)
        self.active_layers = active_layers
        self.num_active = 0

    def bind(self, num_layers: int) -> None:
        super().bind(num_layers)
        self.num_active = resolve_layer_count(self.active_layers, num_layers, "active_layers")

    def sample_active(self) -> list[int]:
        pi = torch.full((self.num_layers,), self.num_active / self.num_layers, dtype=torch.float64)
        self.active = systematic_sample(pi, self.generator, shuffle=False)
        return list(self.active)

    def __repr__(self) -> str:
        return f"SpreadLayers(active_layers={self.active_layers}, seed={self.seed})"
