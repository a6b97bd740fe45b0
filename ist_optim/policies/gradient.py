"""Policies fed by the gradients the step computes anyway: GRASS's gradient norm, SafeImportance."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch

from .._checks import as_int, resolve_layer_count
from .base import PolicyContext, _require, _SeededPolicy


# ---------------------------------------------------------------------- gradient norms (GRASS)
def layer_grad_norms(layer_params: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """``(L,)`` float64 on CPU: the L2 norm of each layer's gradients (parameters with ``grad=None`` count 0).

    FSDP2 (``fully_shard``) gradients are sharded ``DTensor``s: each shard's
    norm is a partial result, made whole with ``full_tensor()`` (one small
    all-reduce per parameter), so every rank gets the norm of the full
    gradient. Under DDP the gradients are already all-reduced before
    ``step()``, so every rank computes the same norms locally.
    """
    squares = []
    for params in layer_params:
        total = torch.zeros((), dtype=torch.float64)
        for p in params:
            grad = p.grad
            if grad is None:
                continue
            norm = torch.linalg.vector_norm(grad, dtype=torch.float64 if grad.is_floating_point() else None)
            if hasattr(norm, "full_tensor"):  # DTensor: a partial norm of this rank's shard
                norm = norm.full_tensor()
            total = total + norm.detach().to("cpu", torch.float64) ** 2
        squares.append(total)
    return torch.stack(squares).sqrt() if squares else torch.zeros(0, dtype=torch.float64)


class GradNormLayers(_SeededPolicy):
    """Gradient-norm importance sampling (GRASS, Tian et al. 2026, arXiv 2604.07808).

    Every ``interval`` steps, starting with the first, one step trains *all*
    layers and scores them: layer ``i``'s score is its gradient's root mean
    square, ``s_i = ||g_i||_2 / sqrt(n_i)`` over the layer's ``n_i`` trainable
    gradient entries (GRASS's "mean gradient norm": layers of different sizes
    compare per entry), measured in that step before the optimizer updates.
    On the steps in between, ``active_layers`` layers are drawn without
    replacement (``torch.multinomial``) with probabilities

        ``p = softmax(s / (temperature * mean(s)))``

    Scores are divided by their mean so that ``temperature`` does not depend
    on the gradients' scale (loss scale, learning-rate phase, model size):
    at ``temperature=1`` a layer whose score is one mean above another's is
    ``e`` times as likely. ``temperature -> 0`` approaches top-k, large values
    uniform (LISA). A scoring round with a non-finite norm (a GradScaler step
    that overflowed) is ignored and counted in ``num_skipped``.

    In data-parallel runs the norms are the same on every rank: DDP has
    all-reduced the gradients before ``step()``, and FSDP2's sharded
    gradients are reduced over ranks (:func:`layer_grad_norms`).

    Args:
        active_layers: layers per step between scoring steps (int or float fraction of ``L``).
        interval: a scoring step every ``interval`` steps (``>= 1``; step 0 is one).
        temperature: ``> 0``, see above.
        seed: seed of the policy's own generator; ``None`` (default): IST's ``seed`` option.

    Attributes:
        scores: ``(L,)`` float64, the last scores (zeros before the first).
        num_scored: scoring rounds applied; ``num_skipped``: rounds ignored.
    """

    def __init__(
        self,
        active_layers: int | float = 0.25,
        *,
        interval: int = 10,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> None:
        super().__init__(seed)
        if as_int(interval) is None or as_int(interval) < 1:
            raise ValueError(f"Invalid interval: {interval} (need an int >= 1)")
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, numbers.Real)
            or not (0.0 < float(temperature) < math.inf)
        ):
            raise ValueError(f"Invalid temperature: {temperature} (need a finite float > 0)")
        self.active_layers = active_layers
        self.interval = as_int(interval)
        self.temperature = float(temperature)
        self.num_active = 0
        self.num_steps = 0  # optimizer steps taken; the coming step is a scoring step when num_steps % interval == 0
        self.scores = torch.zeros(0, dtype=torch.float64)
        self.sizes = torch.zeros(0, dtype=torch.float64)
        self.num_scored = 0
        self.num_skipped = 0

    def bind(self, num_layers: int) -> None:
        super().bind(num_layers)
        self.num_active = resolve_layer_count(self.active_layers, num_layers, "active_layers")
        self.scores = torch.zeros(num_layers, dtype=torch.float64)
        self.sizes = torch.ones(num_layers, dtype=torch.float64)

    def attach(self, context: PolicyContext) -> None:
        super().attach(context)
        self.sizes = torch.tensor(
            [max(1, sum(p.numel() for p in ps)) for ps in context.layer_params], dtype=torch.float64
        )

    @property
    def wants_gradient_norms(self) -> bool:  # type: ignore[override]
        return self.num_steps % self.interval == 0

    def observe_gradients(self, norms: torch.Tensor) -> None:
        norms = torch.as_tensor(norms, dtype=torch.float64).detach().cpu().reshape(-1)
        if norms.numel() != self.num_layers:
            raise ValueError(f"observe_gradients: {norms.numel()} norms for {self.num_layers} layers")
        if not bool(torch.isfinite(norms).all()):
            self.num_skipped += 1
            return
        self.scores = norms / self.sizes.sqrt()
        self.num_scored += 1

    def probabilities(self) -> torch.Tensor:
        """``(L,)`` float64: the sampling probabilities of the steps between scoring steps."""
        mean = self.scores.mean() if self.num_layers else torch.zeros((), dtype=torch.float64)
        if not bool(mean > 0):
            return torch.full((self.num_layers,), 1.0 / max(1, self.num_layers), dtype=torch.float64)
        return torch.softmax(self.scores / (self.temperature * mean), dim=0)

    def after_step(self, context: PolicyContext) -> None:
        self.num_steps += 1

    def sample_active(self) -> list[int]:
        if self.num_steps % self.interval == 0 or self.num_active == self.num_layers:
            self.active = list(range(self.num_layers))  # a scoring step: every layer trains and is measured
        else:
            chosen = torch.multinomial(
                self.probabilities(), self.num_active, replacement=False, generator=self.generator
            )
            self.active = sorted(chosen.tolist())
        return list(self.active)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "num_steps": self.num_steps,
            "scores": self.scores.clone(),
            "num_scored": self.num_scored,
            "num_skipped": self.num_skipped,
        }

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().check_state_dict(state_dict)
        _require(state_dict, ("num_steps", "scores", "num_scored", "num_skipped"), type(self).__name__)
        scores = state_dict.get("scores")
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (self.num_layers,):
            raise ValueError(f"GradNormLayers state has scores of shape {getattr(scores, 'shape', None)}")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.scores = state_dict["scores"].detach().to("cpu", torch.float64).clone()
        self.num_steps = int(state_dict["num_steps"])
        self.num_scored = int(state_dict["num_scored"])
        self.num_skipped = int(state_dict["num_skipped"])

    def __repr__(self) -> str:
        return (
            f"GradNormLayers(active_layers={self.active_layers}, interval={self.interval}, "
            f"temperature={self.temperature}, seed={self.seed})"
        )


def _capped_inclusion(weights: torch.Tensor, count: int) -> torch.Tensor:
    """Inclusion probabilities ``pi`` proportional to ``weights`` with ``sum(pi) = count`` and every ``pi <= 1``.

    Layers whose share would pass 1 are set to 1 and the rest rescaled, until none passes (water-filling).
    """
    pi = torch.zeros_like(weights)
    free = torch.ones_like(weights, dtype=torch.bool)
    remaining = float(count)
    while remaining > 0:
        total = float(weights[free].sum())
        if total <= 0:  # no weight left: the rest uniformly
            pi[free] = remaining / int(free.sum())
            break
        share = torch.where(free, weights * (remaining / total), torch.zeros_like(weights))
        over = free & (share >= 1.0)
        if not bool(over.any()):
            pi[free] = share[free]
            break
        pi[over] = 1.0
        free &= ~over
        remaining -= float(over.sum())
    return pi


def systematic_sample(pi: torch.Tensor, generator: torch.Generator, *, shuffle: bool = True) -> list[int]:
    """Randomized systematic sampling: ``round(sum(pi))`` distinct indices, index ``i`` included with probability
    ``pi[i]``.

    Madow's systematic sampling on a random order of the indices (Goodman and Kish 1950): one uniform ``u``; the
    points ``u, u + 1, ...`` fall into the intervals of ``cumsum(pi)`` taken in that order. The marginals are
    ``pi`` either way; the random order is what makes the *joint* draw unbiased too: in a fixed order the points
    are about ``1 / mean(pi)`` indices apart, so with equal ``pi`` the same few evenly spaced sets recur (for 2 of 6:
    only ``{0, 3}``, ``{1, 4}``, ``{2, 5}``) and neighbours never train together, while in a random order every
    ``k``-subset is equally likely (uniform sampling without replacement). ``shuffle=False`` keeps the index order
    (:class:`~ist_optim.SpreadLayers`: a draw spread evenly over the indices). Every ``pi`` must lie in ``[0, 1]``.
    """
    count = int(round(float(pi.sum())))
    order = torch.randperm(pi.numel(), generator=generator) if shuffle else torch.arange(pi.numel())
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    edges = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(pi[order].to(torch.float64), 0)])
    points = torch.arange(count, dtype=torch.float64) + u
    found = torch.searchsorted(edges, points, right=True) - 1
    chosen = {int(order[min(int(i), pi.numel() - 1)]) for i in found.tolist()}
    for i in sorted(range(pi.numel()), key=lambda j: -float(pi[j])):  # rounding at an edge: fill, largest pi first
        if len(chosen) >= count:
            break
        chosen.add(i)
    return sorted(chosen)


class SafeImportance(_SeededPolicy):
    """Gradient-size importance mixed with uniform, with a floor, forced coverage and one learning rate.

    A selection rule that needs no extra forward and cannot starve a layer
    (issue 22; after MISA, arXiv 2511.00056, and the "safe" mixture with
    uniform of Stich et al., NeurIPS 2017):

    * **Signal**, from the gradients the step computes anyway: when layer
      ``l`` trains, ``s_l = ||grad B_l||^2`` over its LoRA ``B`` matrices
      (all its trainable parameters when it has no ``lora_B``: other
      adapters, full-layer mode). ``grad A`` is left out: it scales with
      ``||B||``, so it rewards layers already trained. The potential is a
      bias-corrected moving average updated only when the layer trains
      (MISA's rule): ``m_l <- decay * m_l + (1 - decay) * s_l``,
      ``G_l = m_l / (1 - decay^n_l)`` after ``n_l`` updates.
    * **Coverage first**: until every layer has trained once, the layers
      not yet seen are drawn first (uniformly), as MISA re-samples until
      every block was used.
    * **Rule**: ``x_l = G_l / mean(G)`` (scale-free), ``q_l ~ exp(min(5, eta * x_l))``
      (MISA's KL-to-uniform softmax, clipped), and the inclusion probability
      of each layer among the ``k`` trained per step is
      ``pi_l = k * ((1 - gamma) * q_l + gamma / L)``, capped at 1 with the
      excess moved to the others; ``k`` layers are drawn with exactly these
      marginals (systematic sampling on a random order of the layers: with
      equal ``pi`` the draw is uniform without replacement, as ``"random"``'s).
      If the potentials are nearly equal,
      ``1 - rho < min_gain`` with ``rho = (sum sqrt(G))^2 / (L * sum G)`` (the
      variance of optimal importance sampling over uniform's: the most any
      rule can gain), the draw is uniform (Katharopoulos and Fleuret,
      arXiv 1803.00942: importance only above a threshold).
    * **Forced coverage**: a layer that would otherwise go ``coverage`` steps
      untrained trains in the next step (the least recently used first,
      MISA's rule). This never needs more than ``k`` slots: the layers idle for
      ``coverage - 1`` steps at a step were all trained together in one
      earlier step (``<= k`` of them, none older, by induction), or never,
      and the first pass trains every layer within ``ceil(L / k) <= coverage``
      steps, ``k`` a step.

    What this guarantees, by construction: no layer goes ``coverage`` steps
    untrained; on a step with no forced and no first-pass layer every layer
    trains with probability ``>= gamma * k / L`` (``gamma`` times uniform's;
    when ``f`` slots are forced or first-pass, the other ``k - f`` are drawn by
    the same rule among the rest); every layer uses the optimizer's one
    learning rate. The potentials compare gradients across steps, so a loss
    scale that changes (GradScaler halving it early on, with an optimizer
    that unscales inside its own step) or per-step gradient clipping makes
    them compare unlike scales. It does not promise a lower loss
    than uniform: that depends on whether ``||grad B||`` tracks what a
    layer's update is worth, which ``opt.importance_report()`` can tell.

    Args:
        active_layers: ``k``, layers per step (int or float fraction of ``L``).
        gamma: uniform share in ``(0, 1]`` (1: uniform, LISA's draw).
        eta: softmax sharpness ``>= 0`` on the mean-normalised potentials.
        decay: moving-average factor in ``[0, 1)``.
        coverage: most steps between two trainings of a layer (``>= ceil(L / k)``;
            ``ceil(L / k)`` is round-robin); default ``None``: ``2 * ceil(L / k)``.
        min_gain: the draw is uniform while ``1 - rho < min_gain``.
        seed: seed of the policy's own generator; ``None`` (default): IST's ``seed`` option.

    Attributes:
        potentials: ``(L,)`` float64 ``G`` (NaN for layers not trained yet).
        updates: ``(L,)`` ``n_l``; ``age``: steps since each layer last trained.
    """

    wants_gradient_norms = True

    def __init__(
        self,
        active_layers: int | float = 0.25,
        *,
        gamma: float = 0.5,
        eta: float = 1.0,
        decay: float = 0.9,
        coverage: int | None = None,
        min_gain: float = 0.05,
        seed: int | None = None,
    ) -> None:
        super().__init__(seed)

        def real(value: Any) -> float | None:
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
            return float(value) if ok else None

        if real(gamma) is None or not 0.0 < real(gamma) <= 1.0:
            raise ValueError(f"Invalid gamma: {gamma} (the uniform share must lie in (0, 1])")
        if real(decay) is None or not 0.0 <= real(decay) < 1.0:
            raise ValueError(f"Invalid decay: {decay} (need a float in [0, 1))")
        if real(min_gain) is None or not 0.0 <= real(min_gain) <= 1.0:
            raise ValueError(f"Invalid min_gain: {min_gain} (need a float in [0, 1])")
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0.0 <= float(eta) < math.inf:
            raise ValueError(f"Invalid eta: {eta} (need a finite float >= 0)")
        if coverage is not None and (as_int(coverage) is None or as_int(coverage) < 1):
            raise ValueError(f"Invalid coverage: {coverage} (need an int >= 1, or None)")
        self.active_layers = active_layers
        self.gamma, self.eta, self.decay, self.min_gain = float(gamma), float(eta), float(decay), float(min_gain)
        self.coverage_option = as_int(coverage) if coverage is not None else None
        self.coverage = 0
        self.num_active = 0
        self.moments = torch.zeros(0, dtype=torch.float64)
        self.updates = torch.zeros(0, dtype=torch.long)
        self.age = torch.zeros(0, dtype=torch.long)
        self._signal: list[list[torch.Tensor]] | None = None  # the B matrices (the parameters IST already holds)

    def bind(self, num_layers: int) -> None:
        super().bind(num_layers)
        self.num_active = resolve_layer_count(self.active_layers, num_layers, "active_layers")
        least = math.ceil(num_layers / self.num_active)
        self.coverage = 2 * least if self.coverage_option is None else self.coverage_option
        if self.coverage < least:
            raise ValueError(
                f"Invalid coverage: {self.coverage} (with {self.num_active} of {num_layers} layers per "
                f"step every layer can train once in {least} steps at the earliest)"
            )
        self.moments = torch.zeros(num_layers, dtype=torch.float64)
        self.updates = torch.zeros(num_layers, dtype=torch.long)
        self.age = torch.zeros(num_layers, dtype=torch.long)

    def attach(self, context: PolicyContext) -> None:
        super().attach(context)
        b_ids = {id(p) for name, p in context.model.named_parameters() if "lora_B" in name}
        self._signal = [[p for p in ps if id(p) in b_ids] or list(ps) for ps in context.layer_params]

    @property
    def potentials(self) -> torch.Tensor:
        seen = self.updates > 0
        corrected = self.moments / (1.0 - self.decay ** self.updates.to(torch.float64)).clamp_min(1e-300)
        return torch.where(seen, corrected, torch.full_like(self.moments, math.nan))

    def observe_gradients(self, norms: torch.Tensor) -> None:
        if self._signal is not None:
            norms = layer_grad_norms(self._signal)
        norms = torch.as_tensor(norms, dtype=torch.float64).detach().cpu().reshape(-1)
        if norms.numel() != self.num_layers:
            raise ValueError(f"observe_gradients: {norms.numel()} norms for {self.num_layers} layers")
        for layer in self.active:
            value = float(norms[layer]) ** 2
            if math.isfinite(value):  # a GradScaler overflow step teaches nothing
                self.moments[layer] = self.decay * self.moments[layer] + (1.0 - self.decay) * value
                self.updates[layer] += 1

    def after_step(self, context: PolicyContext) -> None:
        self.age += 1
        if self.active:
            self.age[self.active] = 0

    def inclusion(self) -> torch.Tensor:
        """``(L,)`` float64: each layer's probability of being drawn in the coming step (before forced coverage)."""
        L, k = self.num_layers, self.num_active
        G = self.potentials
        seen = ~torch.isnan(G)
        if not bool(seen.any()) or k == L:
            return torch.full((L,), k / L, dtype=torch.float64)
        G = torch.where(seen, G, G[seen].mean()).clamp_min(0.0)  # unseen layers: neutral (drawn first anyway)
        total = float(G.sum())
        rho = float(G.sqrt().sum()) ** 2 / (L * total) if total > 0 else 1.0
        if 1.0 - rho < self.min_gain:
            q = torch.full((L,), 1.0 / L, dtype=torch.float64)
        else:
            q = torch.exp(torch.clamp(self.eta * G / G.mean(), max=5.0))
            q = q / q.sum()
        return _capped_inclusion((1.0 - self.gamma) * q + self.gamma / L, k)

    def sample_active(self) -> list[int]:
        L, k = self.num_layers, self.num_active
        forced = sorted(range(L), key=lambda i: (-int(self.age[i]), i))
        # The layers idle for coverage - 1 steps now were all trained in one same step (or never, in the first
        # pass, which trains k a step): never more than k, so the cut [:k] drops none of them (see the docstring).
        forced = [i for i in forced if int(self.age[i]) >= self.coverage - 1][:k]
        unseen = [i for i in range(L) if int(self.updates[i]) == 0 and i not in forced]
        chosen = list(forced)
        if unseen and len(chosen) < k:  # coverage first: the layers never trained, uniformly
            order = torch.randperm(len(unseen), generator=self.generator)[: k - len(chosen)]
            chosen += [unseen[i] for i in order.tolist()]
        if len(chosen) < k:
            rest = [i for i in range(L) if i not in chosen]
            weights = self.inclusion()[rest]
            picked = systematic_sample(_capped_inclusion(weights, k - len(chosen)), self.generator)
            chosen += [rest[i] for i in picked]
        self.active = sorted(chosen)
        return list(self.active)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "moments": self.moments.clone(),
            "updates": self.updates.clone(),
            "age": self.age.clone(),
            "num_active": self.num_active,
            "coverage": self.coverage,
        }

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().check_state_dict(state_dict)
        _require(state_dict, ("moments", "updates", "age"), type(self).__name__)
        for key in ("moments", "updates", "age"):
            value = state_dict[key]
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != (self.num_layers,):
                raise ValueError(f"SafeImportance state has {key} of shape {getattr(value, 'shape', None)}")
        for key in ("num_active", "coverage"):  # the ages' coverage bound holds for the settings they grew under
            if key in state_dict and int(state_dict[key]) != getattr(self, key):
                raise ValueError(f"SafeImportance state has {key}={state_dict[key]}, this policy {getattr(self, key)}")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.moments = state_dict["moments"].detach().to("cpu", torch.float64).clone()
        self.updates = state_dict["updates"].detach().to("cpu", torch.long).clone()
        self.age = state_dict["age"].detach().to("cpu", torch.long).clone()

    def __repr__(self) -> str:
        return (
            f"SafeImportance(active_layers={self.active_layers}, gamma={self.gamma}, eta={self.eta}, "
            f"decay={self.decay}, coverage={self.coverage_option}, min_gain={self.min_gain}, seed={self.seed})"
        )
