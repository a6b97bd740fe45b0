"""Model hooks: apply the layer selection, capture the probe batch, cut backward.

Everything IST does to a model goes through :class:`ModelHooks`, and
:meth:`ModelHooks.remove` undoes all of it.

* a forward pre-hook on the model sets ``requires_grad`` on each layer's
  adapters (selected on, others off) before every forward, and keeps the
  inputs of the last training forward as the probe batch;
* **backward cut**: a forward pre-hook on the lowest selected block replaces
  its hidden-state input by a detached tensor, so backward never runs below
  it, even when that input requires grad (``enable_input_require_grads``,
  gradient checkpointing). Nothing below the lowest selected block has a
  gradient to compute, so the selected adapters' gradients are unchanged.
  Under reentrant checkpointing the block's input must require grad or its
  parameters get no gradient, so there the cut makes it a leaf that does;
  elsewhere a plain detach avoids computing an unneeded input gradient;
* **selective checkpointing** (opt-in): blocks above the lowest selected one
  that are not selected themselves only pass gradients through, so their
  forward runs under non-reentrant ``torch.utils.checkpoint``: they keep their
  input instead of all their activations, for one extra forward in backward.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import LayerMap

__all__ = ["ModelHooks"]


def _hidden_state(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, str | int | None]:
    """The block's hidden-state input and where it was passed (position 0 or ``"hidden_states"``)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0], 0
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"], "hidden_states"
    return None, None


def _is_kv_cache(value: Any) -> bool:
    """An HF ``Cache`` (duck-typed, so transformers is not imported here)."""
    return hasattr(value, "get_seq_length") and hasattr(value, "update")


def _uses_reentrant_checkpointing(block: nn.Module) -> bool:
    """True when HF checkpointing of ``block`` is on and not explicitly non-reentrant."""
    if not getattr(block, "gradient_checkpointing", False):
        return False
    func = getattr(block, "_gradient_checkpointing_func", None)
    keywords = getattr(func, "keywords", None) or {}
    return keywords.get("use_reentrant", True) is not False


class ModelHooks:
    """The hooks one IST optimizer installs on its model.

    Args:
        model: the model whose forward the user calls.
        layer_map: the layers (from :func:`~ist_optim.discover_layers`).
        backward_cut: cut backward at the lowest selected block; ``None``: when
            the layers are modules (not with ``layer_of`` grouping).
        checkpoint_unselected: recompute unselected blocks above the lowest
            selected one in backward instead of storing their activations.

    Attributes:
        probe_batch: ``(args, kwargs)`` of the last training forward, or ``None``.
        probing: set while probe passes run (the hooks then do nothing).
        cut_count: forwards in which the backward cut was applied (for tests and reports).
    """

    def __init__(
        self, model: nn.Module, layer_map: LayerMap, *, backward_cut: bool | None, checkpoint_unselected: bool
    ):
        self.model = model
        self.layer_map = layer_map
        self.blocks = layer_map.modules
        if backward_cut is None:  # on wherever the layers are modules
            backward_cut = all(block is not None for block in self.blocks)
        if (backward_cut or checkpoint_unselected) and any(block is None for block in self.blocks):
            raise ValueError(
                "backward_cut and checkpoint_unselected need the layers as modules; layer_of= only groups "
                "parameters (pass layers= instead, or backward_cut=False, checkpoint_unselected=False)"
            )
        self.backward_cut = backward_cut
        self.checkpoint_unselected = checkpoint_unselected
        self.probe_batch: tuple[tuple, dict] | None = None
        self.probing = False
        self.cut_count = 0
        self._flags: list[bool] = [False] * len(layer_map)
        self._lowest = 0
        self._upstream_checked = False
        self._upstream_order: list[str] = []
        self._upstream_trace: list[Any] = []
        self._upstream_warned = False
        self._handles = [model.register_forward_pre_hook(self._before_model_forward, with_kwargs=True)]
        if backward_cut:
            for index, block in enumerate(self.blocks):
                hook = functools.partial(self._before_block_forward, index)
                self._handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
        self._patched_forwards: list[nn.Module] = []
        if checkpoint_unselected:
            for index, block in enumerate(self.blocks):
                block.forward = functools.partial(self._block_forward, index, block.forward)
                self._patched_forwards.append(block)

    # ------------------------------------------------------------------ selection
    def set_selection(self, flags: list[bool]) -> None:
        """``flags[i]``: layer ``i`` trains in the coming step."""
        self._flags = list(flags)
        self._lowest = flags.index(True) if any(flags) else len(flags)

    def _training_forward(self) -> bool:
        return not self.probing and self.model.training and torch.is_grad_enabled()

    def _before_model_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.probing:
            return
        # Re-applied every forward: holds even if peft or the user reset requires_grad.
        for train, params in zip(self._flags, self.layer_map.params):
            for p in params:
                if p.requires_grad != train:
                    p.requires_grad_(train)
        if self._training_forward():
            self.probe_batch = (args, kwargs)
            if self.backward_cut and not self._upstream_checked:
                self._check_nothing_trains_upstream(module)

    # ------------------------------------------------------------------ backward cut
    def _check_nothing_trains_upstream(self, model: nn.Module) -> None:
        """Turn the cut off if a trainable parameter outside the layers runs before the first block.

        Decided once, on the first training forward, from the order modules run in.
        """
        self._upstream_checked = True
        other = {id(p) for p in self.layer_map.other_params}
        if not other:
            return
        owners = [m for m in model.modules() if any(id(p) in other for p in m.parameters(recurse=False))]
        order: list[str] = []
        first_block = self.blocks[0]
        handles = [m.register_forward_pre_hook(lambda mod, args: order.append("other")) for m in owners]

        def first_block_seen(mod: nn.Module, args: Any) -> None:
            order.append("block")
            for handle in handles:  # later calls do not matter
                handle.remove()

        handles.append(first_block.register_forward_pre_hook(first_block_seen))
        self._upstream_trace = handles  # removed at the first block, or in remove()
        self._upstream_order = order

    def _upstream_trains(self) -> bool:
        return bool(self._upstream_order) and self._upstream_order[0] == "other"

    def _before_block_forward(self, index: int, block: nn.Module, args: tuple, kwargs: dict) -> Any:
        if index != self._lowest or not self._training_forward():
            return None
        hidden, where = _hidden_state(args, kwargs)
        if hidden is None or not hidden.requires_grad:
            return None
        if self._upstream_trains():
            if not self._upstream_warned:
                self._upstream_warned = True
                warnings.warn(
                    "IST: trainable parameters outside the layers run before the first block (e.g. a trained "
                    "embedding); backward must reach them, so the backward cut is off",
                    stacklevel=2,
                )
            return None
        cut = hidden.detach()
        if _uses_reentrant_checkpointing(block):
            cut.requires_grad_(True)
        self.cut_count += 1
        if where == 0:
            return (cut, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": cut}

    # ------------------------------------------------------------------ selective checkpointing
    def _block_forward(self, index: int, forward: Any, *args: Any, **kwargs: Any) -> Any:
        block = self.blocks[index]
        if (
            index > self._lowest
            and not self._flags[index]
            and self._training_forward()
            and not getattr(block, "gradient_checkpointing", False)  # HF already checkpoints it
        ):
            # As HF's own checkpointing does: a KV cache would be written twice
            # (forward and recompute), and training never reads it.
            if kwargs.get("use_cache"):
                kwargs["use_cache"] = False
            args = tuple(None if _is_kv_cache(a) else a for a in args)
            kwargs = {k: None if _is_kv_cache(v) else v for k, v in kwargs.items()}
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    # ------------------------------------------------------------------ teardown
    def remove(self) -> None:
        """Remove every hook and patched forward; make every adapter trainable again."""
        for handle in self._handles + self._upstream_trace:
            handle.remove()
        self._handles = []
        for block in self._patched_forwards:
            del block.forward  # back to the class's forward
        self._patched_forwards = []
        for params in self.layer_map.params:
            for p in params:
                p.requires_grad_(True)
