"""The policy protocol: :class:`LayerPolicy`, what IST shows a policy (:class:`PolicyContext`), seeded policies."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..probes import ProbeBatch, eval_mode
from .._checks import check_seed


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

    @property
    def trains_every_layer(self) -> bool:
        """True when the policy selects every layer at every step (IST then wraps optimizers such as LBFGS)."""
        return self.num_layers > 0 and getattr(self, "num_active", None) == self.num_layers

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


def _require(state_dict: Mapping[str, Any], keys: Sequence[str], owner: str) -> None:
    missing = [key for key in keys if key not in state_dict]
    if missing:
        raise ValueError(f"{owner} state is missing {missing}")
