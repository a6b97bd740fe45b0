"""The IST bandit: layer importance, the samplers that use it, and the update rules.

Pure torch; knows nothing about models or optimizers, so it can be used alone
(e.g. to drive a custom training loop) and tested on hand-made examples.

Sign convention (the paper's): ``importance[i]`` higher means "layer ``i``
matters more, train it more often". Two rule sets are available
(``../shared/DESIGN.md`` section 1):

``"paper"`` (Yao et al. 2024, Eqs. 6-10)
    train: ``p_i ~ U(0, sigmoid(I_i))``, the ``N_u`` largest ``p_i`` train.
    probe: ``N_c`` uniformly random *kept* sets of ``N_v`` layers; every layer
    outside a set is suppressed. Update ``I_i += mu * r_j`` for ``i`` in kept
    set ``j``.

``"reference"`` (the authors' released ``ist.py``, sign flipped to ours)
    train: ``multinomial(sigmoid(I), N_u)`` without replacement.
    probe: draws the ``N_v`` layers to *suppress* with
    ``multinomial(sigmoid(-I), N_v)``; kept set = complement. Update
    ``I_i -= mu * r_j * g_i`` for ``i`` in suppressed set ``j``, with
    ``g = sigmoid(I) * (1 - sigmoid(I))`` taken once before the ``N_c`` updates.

In both, ``r_j = exp(-L_j) - mean_k exp(-L_k)`` (``reward="difference"``, the
default). Note that ``probe_layers`` counts kept layers under ``"paper"`` and
suppressed layers under ``"reference"``, as in each source; at the default 0.5
the two coincide.

``reward="standardized"`` (opt-in, this library's) divides the rewards of a
round by their standard deviation over the ``N_c`` candidates,
``r_j = (v_j - mean_k v_k) / std_k(v_k)`` with ``v = exp(-L)`` and the
population std (all rewards 0 when every candidate has the same loss). The
rewards of a round are then scale-free (their squares sum to ``N_c``): how far
one update moves importance is set by ``importance_lr`` alone, not by how much
the candidates' losses happen to differ. That matters when candidates differ
by little, e.g. with few suppressed layers per candidate (``probe_layers=1``
under ``"reference"``), where the difference rewards are ~0.01 and
``importance_lr=10`` moves importance by a few hundredths per update
(README, "Why IST's importance does not separate in short runs").
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from .._checks import as_int, check_seed, resolve_layer_count  # noqa: F401 (re-exported)
from .base import LayerPolicy

__all__ = ["ImportanceScheduler", "resolve_layer_count", "RULES", "REWARDS"]

RULES = ("reference", "paper")
REWARDS = ("difference", "standardized")

# Rejection sampling for distinct candidate sets gives up after this many draws
# per candidate and accepts a repeat (possible when importance is very peaked).
_MAX_DRAWS_PER_CANDIDATE = 64


class ImportanceScheduler(LayerPolicy):
    """Per-layer importance and the two IST loops' sampling and update rules: the ``"ist"`` policy.

    A :class:`~ist_optim.policies.LayerPolicy` that learns from probes (``uses_probes`` while
    ``num_probes > 0``; with 0, ``policy="random"``, importance stays 0 and the draws are uniform).

    Args:
        num_layers: ``L``, the number of layers that hold adapters.
        active_layers: ``N_u``, layers trained each step (int, or float fraction of L).
        probe_layers: ``N_v``, layers per probe candidate set (int or fraction);
            kept layers under ``rule="paper"``, suppressed under ``"reference"``.
        num_probes: ``N_c``, candidate sets per importance update (0 disables).
        importance_lr: ``mu``, the importance learning rate.
        rule: ``"reference"`` (default) or ``"paper"``; see the module docstring.
        reward: ``"difference"`` (default, paper Eq. 9 and the reference code)
            or ``"standardized"`` (divided by the round's std over candidates);
            see the module docstring.
        seed: seed of the scheduler's own ``torch.Generator`` (the global RNG
            is never touched, so dropout and data order are unaffected).

    Attributes:
        importance: ``(L,)`` float32 tensor, higher = more important.
        active: sorted list of the layers chosen by the last :meth:`sample_active`.
        num_updates: importance updates applied.
        num_skipped: updates skipped because a probe loss was not finite.
    """

    def __init__(
        self,
        num_layers: int,
        *,
        active_layers: int | float = 0.25,
        probe_layers: int | float = 0.5,
        num_probes: int = 3,
        importance_lr: float = 10.0,
        rule: str = "reference",
        seed: int = 0,
        reward: str = "difference",
    ) -> None:
        if as_int(num_layers) is None or as_int(num_layers) < 1:
            raise ValueError(f"Invalid num_layers: {num_layers} (need a positive int)")
        if rule not in RULES:
            raise ValueError(f"Invalid rule: {rule!r} (expected one of {RULES})")
        if reward not in REWARDS:
            raise ValueError(f"Invalid reward: {reward!r} (expected one of {REWARDS})")
        if as_int(num_probes) is None or as_int(num_probes) < 0:
            raise ValueError(f"Invalid num_probes: {num_probes} (need an int >= 0)")
        if (
            isinstance(importance_lr, bool)
            or not isinstance(importance_lr, numbers.Real)
            or not 0.0 <= float(importance_lr) < math.inf
        ):
            raise ValueError(f"Invalid importance_lr: {importance_lr} (need a finite float >= 0)")
        if as_int(seed) is None:
            raise TypeError(f"seed must be an int, but got {type(seed).__name__}")
        num_layers, num_probes, seed = as_int(num_layers), as_int(num_probes), as_int(seed)

        super().__init__()
        self.num_layers = num_layers
        self.num_active = resolve_layer_count(active_layers, num_layers, "active_layers")
        self.num_probe_layers = resolve_layer_count(probe_layers, num_layers, "probe_layers")
        self.num_probes = num_probes
        self.importance_lr = float(importance_lr)
        self.rule = rule
        self.reward = reward
        self.seed = seed

        # One reward needs at least one other candidate to be compared with, and
        # distinct sets need enough of them to exist.
        if num_probes == 1:
            raise ValueError("Invalid num_probes: 1 (rewards are relative to the mean over candidates; use 0 or >= 2)")
        if self.num_probe_layers == num_layers and num_probes > 0:
            raise ValueError(
                f"Invalid probe_layers: {probe_layers} (a candidate set of all {num_layers} layers "
                "leaves nothing to compare; use fewer probe_layers)"
            )
        num_distinct = math.comb(num_layers, self.num_probe_layers)
        if num_probes > num_distinct:
            raise ValueError(
                f"Invalid num_probes: {num_probes} (only {num_distinct} distinct sets of "
                f"{self.num_probe_layers} out of {num_layers} layers exist; lower num_probes or change probe_layers)"
            )

        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self.importance = torch.zeros(num_layers, dtype=torch.float32)
        self.active: list[int] = []
        self.num_updates = 0
        self.num_skipped = 0

    @property
    def uses_probes(self) -> bool:  # type: ignore[override]
        return self.num_probes > 0

    # ------------------------------------------------------------------ fine-tuning loop
    def sample_active(self) -> list[int]:
        """Draw the layers to train next and store them in :attr:`active`.

        Returns:
            Sorted list of ``N_u`` distinct layer indices.
        """
        if self.num_active == self.num_layers:
            chosen = torch.arange(self.num_layers)
        elif self.rule == "paper":
            scores = torch.rand(self.num_layers, generator=self.generator) * torch.sigmoid(self.importance)
            chosen = torch.topk(scores, self.num_active).indices
        else:
            chosen = torch.multinomial(
                torch.sigmoid(self.importance), self.num_active, replacement=False, generator=self.generator
            )
        self.active = sorted(chosen.tolist())
        return list(self.active)

    # ------------------------------------------------------------------ importance loop
    def sample_candidates(self) -> torch.Tensor:
        """Draw ``N_c`` candidate sets for one importance update.

        Returns:
            ``(N_c, L)`` bool tensor, ``True`` where a layer is *kept* (full
            adapter output) in that candidate; the others are suppressed.
        """
        masks: list[torch.Tensor] = []
        seen: set[tuple[bool, ...]] = set()
        for _ in range(self.num_probes):
            for _ in range(_MAX_DRAWS_PER_CANDIDATE):
                mask = self._draw_kept_mask()
                key = tuple(mask.tolist())
                if key not in seen:
                    break
            seen.add(key)
            masks.append(mask)
        return torch.stack(masks) if masks else torch.zeros(0, self.num_layers, dtype=torch.bool)

    def _draw_kept_mask(self) -> torch.Tensor:
        mask = torch.zeros(self.num_layers, dtype=torch.bool)
        if self.rule == "paper":
            kept = torch.randperm(self.num_layers, generator=self.generator)[: self.num_probe_layers]
            mask[kept] = True
        else:
            suppressed = torch.multinomial(
                torch.sigmoid(-self.importance), self.num_probe_layers, replacement=False, generator=self.generator
            )
            mask[:] = True
            mask[suppressed] = False
        return mask

    @staticmethod
    def rewards(losses: torch.Tensor, reward: str = "difference") -> torch.Tensor:
        """Rewards of one round's candidates, ``(N_c,) -> (N_c,)``.

        ``"difference"``: ``r_j = exp(-L_j) - mean_k exp(-L_k)`` (paper Eq. 9).
        ``"standardized"``: the same divided by ``std_k exp(-L_k)`` (population
        std, so ``sum_j r_j**2 = N_c``); all zeros when that std is 0.
        """
        value = torch.exp(-losses.double())
        centred = value - value.mean()
        if reward == "standardized":
            spread = centred.pow(2).mean().sqrt()
            # Equal losses (e.g. every candidate suppresses only adapters that never trained, whose
            # output is exactly 0): nothing to learn, not a division by zero.
            centred = centred / spread if spread > 0 else torch.zeros_like(centred)
        elif reward != "difference":
            raise ValueError(f"Invalid reward: {reward!r} (expected one of {REWARDS})")
        return centred.float()

    def update(self, kept: torch.Tensor, losses: torch.Tensor) -> bool:
        """Apply one importance update from the probe losses.

        Args:
            kept: ``(N_c, L)`` bool, as returned by :meth:`sample_candidates`.
            losses: ``(N_c,)`` probe losses, candidate ``j`` run with the layers
                outside ``kept[j]`` suppressed.

        Returns:
            ``True`` if applied, ``False`` if skipped because a loss was not
            finite (counted in :attr:`num_skipped`).
        """
        losses = torch.as_tensor(losses).detach().to("cpu", torch.float64).reshape(-1)
        kept = torch.as_tensor(kept, dtype=torch.bool).to("cpu")
        if kept.shape != (losses.numel(), self.num_layers):
            raise ValueError(f"kept has shape {tuple(kept.shape)}, expected ({losses.numel()}, {self.num_layers})")
        if not bool(torch.isfinite(losses).all()):
            self.num_skipped += 1
            return False
        reward = self.rewards(losses, self.reward)  # (N_c,)
        if self.rule == "paper":
            delta = (kept.float() * reward[:, None]).sum(0)
        else:
            sig = torch.sigmoid(self.importance)
            grad_scale = sig * (1.0 - sig)  # taken once, before the N_c updates
            delta = -((~kept).float() * reward[:, None]).sum(0) * grad_scale
        self.importance += self.importance_lr * delta
        self.num_updates += 1
        return True

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Tensors, ints, floats, strings and lists only: loads with ``weights_only=True``."""
        return {
            "importance": self.importance.clone(),
            "generator": self.generator.get_state(),
            "active": list(self.active),
            "num_updates": self.num_updates,
            "num_skipped": self.num_skipped,
            "num_layers": self.num_layers,
            "rule": self.rule,
            "reward": self.reward,
        }

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Raise ``ValueError`` if ``state_dict`` cannot be loaded into this scheduler (changes nothing)."""
        missing = {"importance", "generator", "active", "num_updates", "num_skipped", "num_layers", "rule"}
        missing -= set(state_dict)
        if missing:
            raise ValueError(f"scheduler state is missing {sorted(missing)}")
        if state_dict["num_layers"] != self.num_layers:
            raise ValueError(
                f"loaded state is for {state_dict['num_layers']} layers, but this scheduler has {self.num_layers}"
            )
        if state_dict["rule"] != self.rule:
            raise ValueError(f"loaded state uses rule={state_dict['rule']!r}, but this scheduler uses {self.rule!r}")
        saved_reward = state_dict.get("reward", "difference")  # checkpoints from before the option
        if saved_reward != self.reward:
            raise ValueError(f"loaded state uses reward={saved_reward!r}, but this scheduler uses {self.reward!r}")
        if tuple(state_dict["importance"].shape) != (self.num_layers,):
            raise ValueError(f"loaded importance has shape {tuple(state_dict['importance'].shape)}")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.check_state_dict(state_dict)
        self.importance = state_dict["importance"].detach().to("cpu", torch.float32).clone()
        self.generator.set_state(state_dict["generator"].to("cpu"))
        self.active = [int(i) for i in state_dict["active"]]
        self.num_updates = int(state_dict["num_updates"])
        self.num_skipped = int(state_dict["num_skipped"])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_layers={self.num_layers}, active_layers={self.num_active}, "
            f"probe_layers={self.num_probe_layers}, num_probes={self.num_probes}, "
            f"importance_lr={self.importance_lr}, rule={self.rule!r}, reward={self.reward!r}, seed={self.seed})"
        )
