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

Optional, for policies that look at the model (the base class's versions do
nothing, so a policy implementing only the above keeps working):

``attach(context)``
    called once, right after ``bind``, with a :class:`PolicyContext` (the
    model, its layer modules and parameters, IST's resolved ``seed``).
``wants_gradient_norms`` / ``observe_gradients(norms)``
    when ``wants_gradient_norms`` is true at a step, IST calls
    ``observe_gradients(norms)`` in that ``step()`` with the ``(L,)`` float64
    L2 norms of each layer's gradients, after the closure and before the
    wrapped optimizer's step (a layer without gradients has norm 0).
``after_step(context)``
    called after every optimizer step that was taken (not after one GradScaler
    skipped), after the probe round and before ``sample_active``; the
    context's ``batch`` is the inputs of that step's last training forward.

Do not keep the context beyond the call (it refers to the optimizer; keeping
it would keep the optimizer alive, and a deep copy would share it).

Built in: ``"ist"`` (the bandit, default), ``"random"`` (uniform without
replacement, redrawn every step: the paper's random sparse tuning),
:class:`LISALayers` (``"lisa"``: LISA as LMFlow runs it, switched every
``interval_steps``), :class:`FixedLayers`, :class:`WeightedLayers` (e.g.
OwLore's outlier ratios, see :func:`outlier_ratios`), :class:`LayerwiseCKA`
(the seed paper's pretrained input-vs-output CKA ranking, before training),
:class:`CKALayers` (``"cka"``: a frozen-vs-adapted variant after a warm-up) and
:class:`GradNormLayers` (``"gradnorm"``).
"""

from __future__ import annotations

import math
import numbers
import warnings
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .distributed import reduce_probe_losses
from .hooks import _hidden_state, _replace_hidden
from .probes import ProbeBatch, eval_mode
from .scheduler import as_int, check_seed, resolve_layer_count

__all__ = [
    "LayerPolicy",
    "PolicyContext",
    "FixedLayers",
    "WeightedLayers",
    "CKALayers",
    "GradNormLayers",
    "LayerwiseCKA",
    "LISALayers",
    "SafeImportance",
    "layer_grad_norms",
    "linear_cka",
    "outlier_ratios",
]


@dataclass
class PolicyContext:
    """What IST shows a policy in :meth:`LayerPolicy.attach` and :meth:`LayerPolicy.after_step`.

    Attributes:
        model: the model (inside a DDP wrapper: the inner module).
        layers: the ``L`` block modules (``None`` entries with ``layer_of=`` grouping).
        layer_params: the ``L`` lists of the optimizer's parameters in each layer.
        layer_names: the ``L`` qualified names.
        num_steps: optimizer steps taken so far (counting the one just taken, in ``after_step``).
        seed: IST's resolved ``seed`` option (the same on every rank).
        batch: ``(args, kwargs)`` of the last training forward of the model, or ``None``.
    """

    model: nn.Module
    layers: list[nn.Module | None]
    layer_params: list[list[nn.Parameter]]
    layer_names: list[str]
    num_steps: int
    seed: int
    batch: ProbeBatch | None
    _pause_hooks: Callable[[], Any]
    _adapters_off: Callable[[], Any]

    @contextmanager
    def pretrained(self) -> Iterator[None]:
        """Every adapter in the layers scaled by 0 (IST's suppression with ``beta = 0``): the pretrained model.

        In full-layer mode (no adapters) the model is as it is: pretrained only before training.
        """
        with self._adapters_off():
            yield

    @contextmanager
    def inference(self) -> Iterator[None]:
        """No grad, eval mode (dropout off), and IST's hooks idle: forwards here are not training forwards."""
        with self._pause_hooks(), torch.no_grad(), eval_mode(self.model):
            yield

    def run(self, batch: ProbeBatch) -> Any:
        """The model's output on ``batch`` under :meth:`inference`."""
        args, kwargs = batch
        with self.inference():
            return self.model(*args, **kwargs)


class LayerPolicy:
    """Base class of selection policies that do not learn from probes (see the module docstring).

    Attributes:
        num_layers: ``L`` (set by :meth:`bind`).
        active: the layers chosen by the last :meth:`sample_active`.
        uses_probes: ``False`` here.
        wants_gradient_norms: ``False`` here.
    """

    uses_probes = False
    wants_gradient_norms = False

    def __init__(self) -> None:
        self.num_layers = 0
        self.active: list[int] = []

    def bind(self, num_layers: int) -> None:
        if self.num_layers and self.num_layers != num_layers:
            raise ValueError(f"{type(self).__name__} is bound to {self.num_layers} layers, the model has {num_layers}")
        self.num_layers = num_layers

    def attach(self, context: PolicyContext) -> None:
        """Called once after :meth:`bind` with what IST knows of the model (optional)."""

    def observe_gradients(self, norms: torch.Tensor) -> None:
        """``(L,)`` per-layer gradient norms of this step, before the optimizer step (when :attr:`wants_gradient_norms`)."""

    def after_step(self, context: PolicyContext) -> None:
        """Called after each optimizer step, before :meth:`sample_active` (optional)."""

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


class _SeededPolicy(LayerPolicy):
    """A policy with its own generator; ``seed=None`` follows IST's rule (IST's resolved seed, at attach)."""

    def __init__(self, seed: int | None) -> None:
        super().__init__()
        self.seed = check_seed(seed)
        self.generator = torch.Generator()
        # Used alone (no IST to attach to): torch.initial_seed(), as IST's default. attach() re-seeds.
        self.generator.manual_seed(self.seed if self.seed is not None else torch.initial_seed() % 2**63)

    def attach(self, context: PolicyContext) -> None:
        if self.seed is None:
            self.generator.manual_seed(context.seed)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().check_state_dict(state_dict)
        if not isinstance(state_dict.get("generator"), torch.Tensor):
            raise ValueError(f"{type(self).__name__} state is missing its generator state")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.generator.set_state(state_dict["generator"].to("cpu"))


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
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (
            0.0 < float(temperature) < math.inf
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
        self.sizes = torch.tensor([max(1, sum(p.numel() for p in ps)) for ps in context.layer_params], dtype=torch.float64)

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
            chosen = torch.multinomial(self.probabilities(), self.num_active, replacement=False, generator=self.generator)
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


def systematic_sample(pi: torch.Tensor, generator: torch.Generator) -> list[int]:
    """Madow's systematic sampling: ``round(sum(pi))`` distinct indices, index ``i`` included with probability ``pi[i]``.

    One uniform ``u``; the points ``u, u + 1, ...`` fall into the intervals of ``cumsum(pi)``. Every ``pi`` must
    lie in ``[0, 1]``.
    """
    count = int(round(float(pi.sum())))
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    edges = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(pi.to(torch.float64), 0)])
    points = torch.arange(count, dtype=torch.float64) + u
    found = torch.searchsorted(edges, points, right=True) - 1
    chosen = {min(int(i), pi.numel() - 1) for i in found.tolist()}
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
      marginals (systematic sampling). If the potentials are nearly equal,
      ``1 - rho < min_gain`` with ``rho = (sum sqrt(G))^2 / (L * sum G)`` (the
      variance of optimal importance sampling over uniform's: the most any
      rule can gain), the draw is uniform (Katharopoulos and Fleuret,
      arXiv 1803.00942: importance only above a threshold).
    * **Forced coverage**: a layer not trained for ``coverage`` steps is
      trained in the next step (the least recently used first, MISA's rule).

    What this guarantees, by construction: every layer trains with
    probability ``>= gamma * k / L`` at every step (``gamma`` times uniform's),
    so over ``T`` steps its expected number of updates is at least ``gamma``
    times uniform's; no layer goes ``coverage`` steps untrained; every layer
    uses the optimizer's one learning rate. It does not promise a lower loss
    than uniform: that depends on whether ``||grad B||`` tracks what a
    layer's update is worth, which ``opt.importance_report()`` can tell.

    Args:
        active_layers: ``k``, layers per step (int or float fraction of ``L``).
        gamma: uniform share in ``(0, 1]`` (1: uniform, LISA's draw).
        eta: softmax sharpness ``>= 0`` on the mean-normalised potentials.
        decay: moving-average factor in ``[0, 1)``.
        coverage: most steps a layer may go untrained (``>= ceil(L / k)``);
            default ``None``: ``2 * ceil(L / k)``.
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
            raise ValueError(f"Invalid coverage: {self.coverage} (with {self.num_active} of {num_layers} layers per "
                             f"step every layer can train once in {least} steps at the earliest)")
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
        forced = [i for i in forced if int(self.age[i]) >= self.coverage - 1][:k]  # would pass `coverage` untrained
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
        return {**super().state_dict(), "moments": self.moments.clone(), "updates": self.updates.clone(),
                "age": self.age.clone()}

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().check_state_dict(state_dict)
        _require(state_dict, ("moments", "updates", "age"), type(self).__name__)
        for key in ("moments", "updates", "age"):
            value = state_dict[key]
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != (self.num_layers,):
                raise ValueError(f"SafeImportance state has {key} of shape {getattr(value, 'shape', None)}")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.moments = state_dict["moments"].detach().to("cpu", torch.float64).clone()
        self.updates = state_dict["updates"].detach().to("cpu", torch.long).clone()
        self.age = state_dict["age"].detach().to("cpu", torch.long).clone()

    def __repr__(self) -> str:
        return (f"SafeImportance(active_layers={self.active_layers}, gamma={self.gamma}, eta={self.eta}, "
                f"decay={self.decay}, coverage={self.coverage_option}, min_gain={self.min_gain}, seed={self.seed})")


# ---------------------------------------------------------------------- CKA (layer-wise LoRA with CKA)
def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA (Kornblith et al. 2019) of two ``(n, d)`` representations of the same ``n`` rows, in float64.

    ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred ``Xc, Yc``;
    1 for representations equal up to rotation and isotropic scale. Computed
    through the ``n x n`` Gram matrices when ``n`` is the smaller side. Two
    constant representations (no variance) give 1 if they are equal, else 0.
    """
    x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    y = y.detach().reshape(-1, y.shape[-1]).to(torch.float64)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka: {x.shape[0]} rows vs {y.shape[0]}")
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    if x.shape[0] <= min(x.shape[1], y.shape[1]):
        k, l = x @ x.T, y @ y.T
        cross, xx, yy = (k * l).sum(), (k * k).sum(), (l * l).sum()
    else:
        cross = ((y.T @ x) ** 2).sum()
        xx, yy = ((x.T @ x) ** 2).sum(), ((y.T @ y) ** 2).sum()
    denominator = (xx * yy).sqrt()
    if not bool(denominator > 0):
        return torch.tensor(1.0 if torch.equal(x, y) else 0.0, dtype=torch.float64)
    return cross / denominator


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _token_rows(hidden: torch.Tensor, kwargs: Mapping[str, Any]) -> torch.Tensor:
    """``(n, d)``: the hidden state's rows, without padded positions where an ``attention_mask`` says so."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(mask.shape) == tuple(hidden.shape[:2]):
        return hidden[mask.to(hidden.device).bool()]
    return hidden.reshape(-1, hidden.shape[-1])


class CKALayers(LayerPolicy):
    """Train the layers that a short warm-up changed most, measured by linear CKA (then fixed).

    A variant, not the seed paper's rule (that is :class:`LayerwiseCKA`, which
    ranks the pretrained blocks before training).

    After Layer-wise LoRA with CKA (the idea: layers whose representations
    fine-tuning changes most matter most; ``../shared/seeds/003``), as IST's issue 10 defines it:

    * **Warm-up** (optimizer steps ``1..warmup_steps``): *every* layer trains,
      so that each one's adapters (or, in full-layer mode, weights) can show
      how much the task moves them.
    * **Measurement**, right after each of the last ``num_batches`` warm-up
      steps, on that step's training batch (the inputs of its last training
      forward), no grad, eval mode (dropout off): one forward of the model as
      trained so far records each block's hidden-state input ``h_i`` and
      output ``y_i``; a second forward feeds every block the same ``h_i`` but
      runs it with its trainable parameters at their *frozen* values (those
      they had when IST was built; a host copy is kept until the ranking),
      giving ``y0_i``. The layer's score is ``cka_i = linear_cka(y0_i, y_i)``
      over the batch's token positions (padded ones left out where an
      ``attention_mask`` is given). Feeding both the same input measures the
      block's own change, not the change of the blocks below it propagating up.
    * **Ranking**, at the end of step ``warmup_steps``: the ``active_layers``
      layers with the lowest mean CKA over the measured batches (the most
      changed; ties go to the lower index) train in every later step.

    With probes off (this policy never probes) the measurement costs two
    eval forwards per measured batch, once. In a data-parallel run each
    rank measures its own batch and the ranks' CKA values are averaged (the
    same ranking everywhere); FSDP2's sharded parameters are refused (the
    frozen copy would be a rank's shard). Checkpoints taken during the
    warm-up carry the frozen copy (the layers' trainable parameters), so a
    resumed run ranks exactly as an uninterrupted one; after the ranking only
    the ranking is kept.

    Args:
        active_layers: layers trained after the warm-up (int or float fraction of ``L``).
        warmup_steps: optimizer steps in the warm-up (``>= 1``).
        num_batches: measured warm-up steps (``1..warmup_steps``), the last ones.

    Attributes:
        cka: ``(L,)`` float64 mean CKA per layer (NaN until the ranking).
        ranking: layers from most to least changed (empty until the ranking).
        num_measured: batches measured so far.
    """

    def __init__(self, active_layers: int | float = 0.25, *, warmup_steps: int = 20, num_batches: int = 4) -> None:
        super().__init__()
        if as_int(warmup_steps) is None or as_int(warmup_steps) < 1:
            raise ValueError(f"Invalid warmup_steps: {warmup_steps} (need an int >= 1)")
        if as_int(num_batches) is None or not 1 <= as_int(num_batches) <= as_int(warmup_steps):
            raise ValueError(f"Invalid num_batches: {num_batches} (need an int in [1, warmup_steps={warmup_steps}])")
        self.active_layers = active_layers
        self.warmup_steps = as_int(warmup_steps)
        self.num_batches = as_int(num_batches)
        self.num_active = 0
        self.num_steps = 0
        self.num_measured = 0
        self.cka_sum = torch.zeros(0, dtype=torch.float64)
        self.cka = torch.zeros(0, dtype=torch.float64)
        self.ranking: list[int] = []
        self.frozen: list[list[torch.Tensor]] | None = None  # the layers' trainable parameters at IST's construction

    @property
    def ranked(self) -> bool:
        return bool(self.ranking)

    def bind(self, num_layers: int) -> None:
        super().bind(num_layers)
        self.num_active = resolve_layer_count(self.active_layers, num_layers, "active_layers")
        self.cka_sum = torch.zeros(num_layers, dtype=torch.float64)
        self.cka = torch.full((num_layers,), math.nan, dtype=torch.float64)

    def attach(self, context: PolicyContext) -> None:
        if any(block is None for block in context.layers):
            raise ValueError("policy='cka' measures each block's output, so the layers must be modules (not layer_of=)")
        if any(hasattr(p, "full_tensor") for ps in context.layer_params for p in ps):
            raise ValueError(
                "policy='cka' does not support FSDP2 (fully_shard) parameters: its frozen copy of the layers would be "
                "one rank's shard; rank the layers in a run without sharding and pass FixedLayers(ranking)"
            )
        if not self.ranked and self.frozen is None:
            self.frozen = [[p.detach().to("cpu", copy=True) for p in ps] for ps in context.layer_params]

    def sample_active(self) -> list[int]:
        if self.ranked:
            self.active = sorted(self.ranking[: self.num_active])
        else:
            self.active = list(range(self.num_layers))  # the warm-up trains every layer
        return list(self.active)

    def after_step(self, context: PolicyContext) -> None:
        self.num_steps += 1
        if self.ranked or self.num_steps <= self.warmup_steps - self.num_batches:
            return
        if self.frozen is None:
            raise RuntimeError("CKALayers: the frozen copy of the layers is missing (the policy was never attached)")
        local = self._measure(context)
        values = reduce_probe_losses(local)  # the mean over ranks (bit-identical everywhere); itself when alone
        if bool(torch.isfinite(values).all()):
            self.cka_sum += values
            self.num_measured += 1
        if self.num_steps >= self.warmup_steps:
            self._rank()

    def _rank(self) -> None:
        if self.num_measured == 0:
            raise RuntimeError(
                "CKALayers: no warm-up batch could be measured (no training forward of the model was seen before "
                "step(), or a block was not called); call the model passed to IST in train mode with grad enabled"
            )
        self.cka = self.cka_sum / self.num_measured
        self.ranking = sorted(range(self.num_layers), key=lambda i: (float(self.cka[i]), i))
        self.frozen = None  # no longer needed: free the host copy

    def _measure(self, context: PolicyContext) -> torch.Tensor:
        """``(L,)`` CKA of each block's frozen vs adapted output on the context's batch (NaN: nothing measured)."""
        nan = torch.full((self.num_layers,), math.nan, dtype=torch.float64)
        if context.batch is None:
            warnings.warn("CKALayers: no training batch was seen before step(); this warm-up step is not measured",
                          stacklevel=4)
            return nan
        blocks = context.layers
        inputs: dict[int, tuple[tuple, dict]] = {}
        outputs: dict[int, torch.Tensor] = {}
        frozen_outputs: dict[int, torch.Tensor] = {}

        def record_input(index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs.setdefault(index, (args, kwargs))

        def record_output(index: int, into: dict, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is not None:
                into.setdefault(index, tensor)

        swapped: dict[int, list[torch.Tensor]] = {}

        def frozen_input(index: int, module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if index in frozen_outputs or index in swapped or index not in inputs:
                return None  # a repeated call (shared block): measured at its first call only
            hidden, where = _hidden_state(args, kwargs)
            adapted_hidden, _ = _hidden_state(*inputs[index])
            if hidden is None or adapted_hidden is None:
                return None  # no hidden-state input to replace: this layer stays unmeasured (NaN)
            # .data, not copy_: the trained values go back bit for bit, and no second device copy is made
            swapped[index] = [p.data for p in context.layer_params[index]]
            for p, value in zip(context.layer_params[index], self.frozen[index]):
                p.data = value.to(p.device)
            return _replace_hidden(args, kwargs, where, adapted_hidden)

        def restore(index: int) -> None:
            for p, data in zip(context.layer_params[index], swapped.pop(index, [])):
                p.data = data

        def frozen_output(index: int, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if index in swapped:
                restore(index)
                record_output(index, frozen_outputs, module, args, kwargs, output)

        handles = []
        try:
            for index, block in enumerate(blocks):
                handles.append(block.register_forward_pre_hook(functools.partial(record_input, index), with_kwargs=True))
                handles.append(block.register_forward_hook(
                    functools.partial(record_output, index, outputs), with_kwargs=True))
            context.run(context.batch)
            for handle in handles:
                handle.remove()
            handles = []
            for index, block in enumerate(blocks):
                handles.append(block.register_forward_pre_hook(functools.partial(frozen_input, index), with_kwargs=True))
                handles.append(block.register_forward_hook(functools.partial(frozen_output, index), with_kwargs=True))
            context.run(context.batch)
        finally:
            for handle in handles:
                handle.remove()
            for index in list(swapped):  # an exception mid-forward: the trained values go back all the same
                restore(index)

        kwargs = context.batch[1]
        values = nan.clone()
        for index in range(self.num_layers):
            if index in outputs and index in frozen_outputs:
                values[index] = linear_cka(_token_rows(frozen_outputs[index], kwargs), _token_rows(outputs[index], kwargs))
        return values

    def state_dict(self) -> dict[str, Any]:
        state = {
            **super().state_dict(),
            "num_steps": self.num_steps,
            "num_measured": self.num_measured,
            "cka_sum": self.cka_sum.clone(),
            "ranking": list(self.ranking),
        }
        if self.frozen is not None:
            state["frozen"] = [[t.clone() for t in ts] for ts in self.frozen]
        return state

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().check_state_dict(state_dict)
        _require(state_dict, ("num_steps", "num_measured", "cka_sum", "ranking"), type(self).__name__)
        if tuple(state_dict["cka_sum"].shape) != (self.num_layers,):
            raise ValueError(f"CKALayers state has cka_sum of shape {tuple(state_dict['cka_sum'].shape)}")
        if not state_dict["ranking"] and "frozen" not in state_dict:
            raise ValueError("CKALayers state is from the warm-up but has no frozen copy of the layers")
        frozen = state_dict.get("frozen")
        if frozen is not None and self.frozen is not None:
            shapes = [[tuple(t.shape) for t in ts] for ts in frozen]
            if shapes != [[tuple(t.shape) for t in ts] for ts in self.frozen]:
                raise ValueError("CKALayers state's frozen copy does not match this model's layer parameters")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.num_steps = int(state_dict["num_steps"])
        self.num_measured = int(state_dict["num_measured"])
        self.cka_sum = state_dict["cka_sum"].detach().to("cpu", torch.float64).clone()
        self.ranking = [int(i) for i in state_dict["ranking"]]
        if self.ranking:
            self.cka = self.cka_sum / self.num_measured
            self.frozen = None
        else:
            self.cka = torch.full((self.num_layers,), math.nan, dtype=torch.float64)
            self.frozen = [[t.detach().to("cpu").clone() for t in ts] for ts in state_dict["frozen"]]

    def __repr__(self) -> str:
        return (
            f"CKALayers(active_layers={self.active_layers}, warmup_steps={self.warmup_steps}, "
            f"num_batches={self.num_batches})"
        )


def _as_probe_batch(item: Any, device: torch.device | None) -> ProbeBatch:
    """A calibration batch as ``(args, kwargs)``: a mapping is keywords, a tensor one argument, a tuple arguments."""
    if isinstance(item, Mapping):
        args, kwargs = (), dict(item)
    elif isinstance(item, torch.Tensor):
        args, kwargs = (item,), {}
    elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], (tuple, list)) and isinstance(
        item[1], Mapping
    ):
        args, kwargs = tuple(item[0]), dict(item[1])
    elif isinstance(item, (tuple, list)):
        args, kwargs = tuple(item), {}
    else:
        raise TypeError(
            f"LayerwiseCKA: a calibration batch must be a dict of model keywords, a tensor, a tuple of arguments "
            f"or (args, kwargs), not {type(item).__name__}"
        )

    def move(value: Any) -> Any:
        return value.to(device) if isinstance(value, torch.Tensor) and device is not None else value

    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def _feature_rows(hidden: torch.Tensor, kwargs: Mapping[str, Any], tokens: str) -> torch.Tensor:
    """``(n, d)`` rows of a block's hidden state: each sequence's last real token, or every real token."""
    if hidden.dim() < 3:
        return hidden.reshape(-1, hidden.shape[-1])
    if tokens == "all":
        return _token_rows(hidden, kwargs)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(mask.shape) == tuple(hidden.shape[:2]):
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask.bool(), positions, torch.full_like(positions, -1)).amax(dim=1)  # right or left padding
        if bool((last < 0).any()):
            raise ValueError("LayerwiseCKA: a calibration row has no token with attention_mask 1")
    else:
        last = torch.full((hidden.shape[0],), hidden.shape[1] - 1, dtype=torch.long, device=hidden.device)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]


class LayerwiseCKA(LayerPolicy):
    """Layer-wise LoRA with CKA (seed ``003``): before training, tune the blocks that change their input most.

    As the paper's released code defines it (github.com/c2d-usp/Layer-wise-LoRA-with-CKA,
    ``select_layers_decoder.py``): the *pretrained* model (every adapter's
    output scaled by 0, :meth:`PolicyContext.pretrained`) runs, no grad and
    eval mode, on the calibration ``batches`` (the paper: the first 128
    training samples, batch 2); each block ``i``'s input ``h_i`` and output
    ``h_{i+1}`` are recorded as the last real token of each sequence
    (``tokens="last"``; the position of the last ``attention_mask`` 1, so
    right and left padding both work) or every real token (``tokens="all"``).
    Block ``i``'s score is ``linear_cka(h_i, h_{i+1})`` over all calibration
    rows; the ``active_layers`` blocks with the *lowest* CKA (the ones that
    transform their input most; ties to the lower index) train at every step,
    the others never (the paper puts LoRA only on them). A float
    ``active_layers`` is ``floor(f * L)`` layers, as the paper's
    ``ratio_of_layers`` (its default 0.5), at least 1.

    Measured once, in :meth:`attach` (IST's construction): call it before
    training, with the adapters as initialised. One difference from the
    released code on HF decoders: its last block's "output" is
    ``hidden_states[-1]``, which transformers returns after the final norm;
    here every block's output is the block's own output. In a data-parallel
    run each rank measures its batches and the CKA values are averaged.

    Args:
        batches: calibration batches, each a dict of model keywords
            (``input_ids``, ``attention_mask``), a tensor, a tuple of
            arguments, or ``(args, kwargs)``; moved to the model's device.
        active_layers: blocks trained (int count, or float fraction floored).
        tokens: ``"last"`` (the paper) or ``"all"``.

    Attributes:
        cka: ``(L,)`` float64 CKA of each block's input and output.
        ranking: blocks from lowest CKA (most changed) to highest.
        num_rows: calibration rows measured.
    """

    def __init__(self, batches: Any, active_layers: int | float = 0.5, *, tokens: str = "last") -> None:
        super().__init__()
        if tokens not in ("last", "all"):
            raise ValueError(f"Invalid tokens: {tokens!r} (expected 'last' or 'all')")
        if batches is None or isinstance(batches, (torch.Tensor, Mapping)):
            batches = [batches] if batches is not None else []
        self.batches = list(batches)
        if not self.batches:
            raise ValueError("LayerwiseCKA needs calibration batches (e.g. the first 128 training samples)")
        self.active_layers = active_layers
        self.tokens = tokens
        self.num_active = 0
        self.num_rows = 0
        self.cka = torch.zeros(0, dtype=torch.float64)
        self.ranking: list[int] = []

    def bind(self, num_layers: int) -> None:
        super().bind(num_layers)
        count = as_int(self.active_layers)
        if count is None and isinstance(self.active_layers, numbers.Real) and not isinstance(self.active_layers, bool):
            fraction = float(self.active_layers)
            if not 0.0 < fraction <= 1.0:
                raise ValueError(f"Invalid active_layers: {fraction} (a float fraction must lie in (0, 1])")
            count = max(1, math.floor(fraction * num_layers))
        self.num_active = resolve_layer_count(count if count is not None else self.active_layers, num_layers,
                                              "active_layers")
        self.cka = torch.full((num_layers,), math.nan, dtype=torch.float64)

    def attach(self, context: PolicyContext) -> None:
        if any(block is None for block in context.layers):
            raise ValueError("LayerwiseCKA measures each block's input and output, so the layers must be modules "
                             "(not layer_of=)")
        params = [p for ps in context.layer_params for p in ps]
        device = params[0].device if params else None
        inputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(self.num_layers)}
        outputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(self.num_layers)}
        seen: set[tuple[str, int]] = set()
        kwargs_now: dict[str, Any] = {}

        def record_input(index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden, _ = _hidden_state(args, kwargs)
            if hidden is not None and ("in", index) not in seen:  # a shared block: its first call
                seen.add(("in", index))
                inputs[index].append(_feature_rows(hidden, kwargs_now, self.tokens).to("cpu", torch.float64))

        def record_output(index: int, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            hidden = _first_tensor(output)
            if hidden is not None and ("out", index) not in seen:
                seen.add(("out", index))
                outputs[index].append(_feature_rows(hidden, kwargs_now, self.tokens).to("cpu", torch.float64))

        handles = []
        try:
            for index, block in enumerate(context.layers):
                handles.append(block.register_forward_pre_hook(functools.partial(record_input, index), with_kwargs=True))
                handles.append(block.register_forward_hook(functools.partial(record_output, index), with_kwargs=True))
            with context.pretrained():
                for item in self.batches:
                    batch = _as_probe_batch(item, device)
                    seen.clear()
                    kwargs_now.clear()
                    kwargs_now.update(batch[1])
                    context.run(batch)
        finally:
            for handle in handles:
                handle.remove()
        missing = [context.layer_names[i] for i in range(self.num_layers) if not inputs[i] or not outputs[i]]
        if missing:
            raise ValueError(f"LayerwiseCKA: no hidden-state input or output was seen for {missing[:4]}")
        local = torch.stack([
            linear_cka(torch.cat(inputs[i]), torch.cat(outputs[i])) for i in range(self.num_layers)
        ])
        self.num_rows = int(sum(t.shape[0] for t in inputs[0]))
        self.cka = reduce_probe_losses(local)  # the mean over ranks; itself when alone
        self.ranking = sorted(range(self.num_layers), key=lambda i: (float(self.cka[i]), i))

    def sample_active(self) -> list[int]:
        if not self.ranking:
            raise RuntimeError("LayerwiseCKA was never attached (IST measures it at construction)")
        self.active = sorted(self.ranking[: self.num_active])
        return list(self.active)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "cka": self.cka.clone(), "ranking": list(self.ranking)}

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().check_state_dict(state_dict)
        _require(state_dict, ("cka", "ranking"), type(self).__name__)
        if sorted(int(i) for i in state_dict["ranking"]) != list(range(self.num_layers)):
            raise ValueError(f"LayerwiseCKA state has a ranking that is no order of {self.num_layers} layers")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.cka = state_dict["cka"].detach().to("cpu", torch.float64).clone()
        self.ranking = [int(i) for i in state_dict["ranking"]]

    def __repr__(self) -> str:
        return f"LayerwiseCKA(<{len(self.batches)} batches>, active_layers={self.active_layers}, tokens={self.tokens!r})"


def _require(state_dict: Mapping[str, Any], keys: Sequence[str], owner: str) -> None:
    missing = [key for key in keys if key not in state_dict]
    if missing:
        raise ValueError(f"{owner} state is missing {missing}")


# ---------------------------------------------------------------------- OwLore / OWL outlier ratios
def _adapter_internals(block: nn.Module) -> set[int]:
    """ids of modules inside adapters (peft's ``lora_A``..., the library's ``down``/``up``), not their base layers."""
    inside: set[int] = set()
    for module in block.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, nn.Module):
            # the wrapper too: peft's exposes its base layer's weight as .weight, which must count once
            keep = {id(m) for m in base.modules()}
            inside.update(id(m) for m in module.modules() if id(m) not in keep)
    return inside


def outlier_ratios(
    model_or_layers: nn.Module | Sequence[nn.Module],
    *,
    threshold: float = 5.0,
    activation_norms: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Layer-wise outlier ratios of the weights (OWL's LOD), e.g. as :class:`WeightedLayers` weights for OwLore.

    Definition (OWL: Yin et al. 2024, "Outlier Weighed Layerwise Sparsity",
    arXiv 2310.05175; used for sampling by OwLore: Li et al. 2024, "OwLore:
    Outlier-weighed Layerwise Sampled Low-Rank Projection", arXiv 2405.18380):
    every weight ``W_jk`` of the 2-D weight matrices of a block's linear
    layers gets the score ``A_jk = |W_jk|``, or, with activation norms,
    Wanda's ``A_jk = |W_jk| * ||X_k||_2`` (``||X_k||_2``: the L2 norm of input
    feature ``k`` over a calibration set's tokens). A weight is an outlier
    when ``A_jk > threshold * mean(A)``, the mean taken over all scored
    weights of the block; the block's ratio is the fraction of its scored
    weights that are outliers. Adapter weights (peft's ``lora_*``, the
    library's adapters) are not scored, their base layers are.

    Args:
        model_or_layers: the model (its blocks are discovered as IST does, over
            all its parameters) or the blocks themselves (e.g. ``model.model.layers``,
            or ``opt.layer_map.modules``). The order is IST's layer order when IST
            trains every block; otherwise pass the same blocks as ``layers=``.
        threshold: ``M > 0`` (OWL searches 3..10; 5 is used by both papers for LLaMA-7B).
        activation_norms: optional ``{module name: (in_features,) tensor}``, names
            relative to the model (or to each block when blocks are given; the
            same names as ``named_modules()``), for every scored linear layer.

    Returns:
        ``(L,)`` float64 on CPU, each in ``[0, 1]``.
    """
    from .layers import discover_layers  # (layers imports nothing of ours; kept local to keep imports light)

    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 < float(threshold) < math.inf:
        raise ValueError(f"Invalid threshold: {threshold} (need a finite float > 0)")
    if isinstance(model_or_layers, nn.Module) and not isinstance(model_or_layers, (nn.ModuleList, nn.Sequential)):
        model = model_or_layers
        blocks = [m for m in discover_layers(model, list(model.parameters())).modules if m is not None]
        prefix = {id(m): name + "." for name, m in model.named_modules()}
    else:
        blocks = list(model_or_layers)
        prefix = {id(block): "" for block in blocks}
    if not blocks:
        raise ValueError("outlier_ratios: no layers given")
    ratios = []
    for block in blocks:
        skip = _adapter_internals(block)
        scores = []
        for name, module in block.named_modules():
            weight = getattr(module, "weight", None)
            if id(module) in skip or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                continue
            # transformers' GPT-2 Conv1D stores (in, out); nn.Linear (out, in)
            in_dim = 0 if type(module).__name__ == "Conv1D" else 1
            score = weight.detach().abs().to(torch.float64)
            if activation_norms is not None:
                full_name = prefix.get(id(block), "") + name
                norms = activation_norms.get(full_name)
                if norms is None:
                    raise ValueError(f"outlier_ratios: activation_norms has no entry for {full_name!r}")
                norms = torch.as_tensor(norms, dtype=torch.float64, device=score.device).reshape(-1)
                if norms.numel() != weight.shape[in_dim]:
                    raise ValueError(
                        f"outlier_ratios: activation_norms[{full_name!r}] has {norms.numel()} entries, "
                        f"the layer has {weight.shape[in_dim]} input features"
                    )
                score = score * (norms[None, :] if in_dim == 1 else norms[:, None])
            scores.append(score.reshape(-1))
        if not scores:
            raise ValueError(f"outlier_ratios: {type(block).__name__} has no 2-D weight to score")
        flat = torch.cat(scores)
        ratios.append((flat > threshold * flat.mean()).to(torch.float64).mean())
    return torch.stack(ratios).cpu()
