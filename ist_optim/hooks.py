"""Model hooks: apply the layer selection, capture the probe batch, cut backward.

Everything IST does to a model goes through :class:`ModelHooks`, and
:meth:`ModelHooks.remove` undoes all of it (and nothing else).

* **selection**: each layer's parameters get ``requires_grad`` on when the
  layer is selected and off otherwise, re-applied before every forward of the
  model. Only parameters that were trainable when IST was built are ever
  touched, and :meth:`~ModelHooks.remove` restores the flags found then;
* **the user's own flags**: a ``requires_grad_(False)`` (or ``requires_grad = False``)
  by anyone but IST on one of those parameters freezes it: IST keeps it off at
  every selection until someone sets it ``True`` again, and then schedules it
  again. A ``True`` on a parameter that is not user-frozen changes nothing: that
  it is trainable is the user's; *when* it trains (its layer is selected) is
  IST's, so an unselected parameter set ``True`` is off again at once (a
  watched write) or from the next forward (an unwatched one). To see a ``False`` written while IST itself has the parameter off
  (its layer not selected), the writes are watched: plain ``nn.Parameter`` objects
  get a subclass (same name, ``isinstance`` unchanged, pickles as
  ``nn.Parameter``) whose ``__setattr__`` and ``requires_grad_`` report to
  the hooks (not a ``requires_grad`` property: torch.compile recurses into one); :meth:`~ModelHooks.remove` gives them their class back.
  Other parameter types (e.g. FSDP2's ``DTensor`` parameters) are not
  re-classed; for them a change is seen only where the flag differs from what
  IST last set (a ``False`` on a selected parameter), so freeze those before
  building IST or while their layer is selected. User-frozen parameters stay
  frozen after :meth:`~ModelHooks.remove`;
* **probe batch**: the inputs of the last training forward of the model
  (train mode, grad enabled) are kept for the probe passes, without
  arguments that only change how the caller scales the loss
  (HF ``Trainer``'s ``num_items_in_batch``);
* **backward cut**: at the first *call* of a selected block in a training
  forward, the block's hidden-state input is replaced by a detached tensor,
  so backward stops there. That is exact only when nothing upstream needs a
  gradient, so it is decided per forward from the autograd graph of that
  input: if it reaches any leaf that requires grad (a trainable parameter, a
  prompt trained outside the model and passed as ``inputs_embeds``, a
  perturbation added by a hook), except the output of the model's
  ``get_input_embeddings()`` (which HF's ``enable_input_require_grads`` makes
  a leaf only so that checkpointed blocks get gradients), or (with trainable
  parameters outside the selected layers) a reentrant checkpoint whose
  insides autograd cannot show, the cut is skipped and the reason kept in :attr:`~ModelHooks.cut_skip_reason`.
  Repeated calls of a block in one forward are never cut. Checkpointed
  blocks are recomputed in backward; the recompute cuts exactly where the
  forward did (non-reentrant: the same input tensor, marked; reentrant: the
  first pass runs without grad, so the decision is recorded there and the
  recompute makes the cut input a leaf that requires grad, without which the
  block's parameters would get no gradient). HF transformers >= 5 checkpoints
  a block's ``forward`` after its hooks: there the cut itself is made a leaf
  that requires grad under reentrant checkpointing, for the same reason;
* **selective checkpointing** (opt-in): unselected blocks that only pass
  gradients through (an input requires grad) run under non-reentrant
  ``torch.utils.checkpoint``: they keep their inputs, not all their
  activations, and recompute once in backward.

A model can carry the hooks of one live IST only. The hooks hold their
optimizer weakly: when it is gone (deleted, or the model was deep-copied
without it) they restore the flags and remove themselves.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import LayerMap

__all__ = ["ModelHooks", "detach_existing_hooks"]

# The C-level descriptor: IST's own writes go through it, so only others' writes are reported.
_REQUIRES_GRAD = torch._C.TensorBase.requires_grad
# parameter -> weakref of the ModelHooks that watches its requires_grad writes
_WATCHERS: Any = torch.utils.weak.WeakIdKeyDictionary()
_WATCHED_CLASSES: dict[type, type] = {}  # nn.Parameter -> its watched subclass (one, made once)

# Keyword arguments that only tell the model how the caller scales its loss
# (HF Trainer divides by the token count of the whole accumulated batch); the
# probe losses must be the mean loss of the batch, whatever the caller adds.
CALLER_ONLY_KWARGS = ("num_items_in_batch",)

# Backward node of torch.utils.checkpoint(use_reentrant=True): the parameters
# used inside it are invisible in the graph until it recomputes in backward.
_OPAQUE_NODES = ("CheckpointFunctionBackward",)

_CUT_MARK = "_ist_cut_block"  # set on a block input that was cut, for the non-reentrant recompute

# A leaf upstream that is neither a parameter nor behind the forward's inputs: a tensor made to require
# grad inside the forward (e.g. an adversarial perturbation added by a hook). Its owner may read its grad.
_UNKNOWN_LEAF = "a tensor that requires grad (made inside the forward, e.g. by a hook)"


def _hidden_state(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, str | int | None]:
    """The block's hidden-state input and where it was passed (position 0 or ``"hidden_states"``)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0], 0
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"], "hidden_states"
    return None, None


def _replace_hidden(args: tuple, kwargs: dict, where: str | int, value: torch.Tensor) -> tuple[tuple, dict]:
    if where == 0:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


def _tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in nested tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _graph_nodes(tensor: torch.Tensor) -> Iterator[Any]:
    """Every node of ``tensor``'s autograd graph, once each (an ``AccumulateGrad`` node's ``.variable`` is a leaf)."""
    seen: set[Any] = set()
    stack = [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(next_node for next_node, _ in node.next_functions)


def _leaves(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The leaves that require grad in ``tensor``'s autograd graph (``tensor`` itself if it is one)."""
    if not tensor.requires_grad:
        return []
    if tensor.grad_fn is None:
        return [tensor]
    return [node.variable for node in _graph_nodes(tensor) if hasattr(node, "variable")]


def _input_embeddings(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs HF's ``enable_input_require_grads`` marks: every ``get_input_embeddings()``.

    As HF does, asked of every submodule that has the method (T5's encoder and decoder stacks have their own).
    """
    found: dict[int, nn.Module] = {}
    for module in model.modules():
        getter = getattr(module, "get_input_embeddings", None)
        if getter is None:
            continue
        try:
            embeddings = getter()
        except (NotImplementedError, AttributeError):
            continue
        if isinstance(embeddings, nn.Module):
            found.setdefault(id(embeddings), embeddings)
    return list(found.values())


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


def _storage_key(index: int, tensor: torch.Tensor) -> tuple:
    """Identifies a block input across reentrant checkpointing's detach (same memory, new tensor)."""
    return index, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride())


def _set_flag(p: torch.Tensor, value: bool) -> None:
    """IST's own write of ``p.requires_grad`` (not reported as the user's)."""
    _REQUIRES_GRAD.__set__(p, value)


def _report_write(p: torch.Tensor, value: Any) -> None:
    owner = _WATCHERS.get(p)
    hooks = owner() if owner is not None else None
    if hooks is not None:
        hooks._user_set(p, bool(value))


def _watched_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``requires_grad`` writes are reported to the watching hooks."""
    watched = _WATCHED_CLASSES.get(cls)
    if watched is None:

        def requires_grad_(self: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
            result = cls.requires_grad_(self, requires_grad)
            _report_write(self, requires_grad)
            return result

        def __setattr__(self: torch.Tensor, name: str, value: Any) -> None:  # noqa: N807
            cls.__setattr__(self, name, value)  # first: an invalid write raises and changes nothing
            if name == "requires_grad":
                _report_write(self, value)

        # No requires_grad property: torch.compile recurses into an overridden tensor descriptor.
        namespace = {
            "__setattr__": __setattr__,
            "requires_grad_": requires_grad_,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
            "_ist_unwatched_class": cls,
        }
        watched = _WATCHED_CLASSES[cls] = type(cls.__name__, (cls,), namespace)
    return watched


def _watch(p: torch.Tensor, hooks: ModelHooks) -> None:
    _WATCHERS[p] = weakref.ref(hooks)
    if type(p) is nn.Parameter:  # other types (DTensor parameters, quantized ones) keep their class
        p.__class__ = _watched_class(nn.Parameter)


def _unwatch(p: torch.Tensor, hooks: ModelHooks) -> None:
    owner = _WATCHERS.get(p)
    if owner is not None and owner() not in (hooks, None):
        return  # another IST's hooks watch it now
    _WATCHERS.pop(p, None)
    base = type(p).__dict__.get("_ist_unwatched_class")
    if base is not None:
        p.__class__ = base


def detach_existing_hooks(model: nn.Module) -> int:
    """Remove the hooks of any earlier IST found on ``model`` or its submodules; returns how many."""
    found: dict[int, ModelHooks] = {}
    for module in model.modules():
        for hook in (*module._forward_pre_hooks.values(), *module._forward_hooks.values()):
            owner = getattr(getattr(hook, "func", hook), "__self__", None)
            if isinstance(owner, ModelHooks):
                found[id(owner)] = owner
        forward = module.__dict__.get("forward")
        owner = getattr(getattr(forward, "func", None), "__self__", None)
        if isinstance(owner, ModelHooks):
            found[id(owner)] = owner
    for hooks in found.values():
        hooks.remove()
    return len(found)


@dataclass
class _Forward:
    """Book-keeping of one training forward of the model."""

    inputs: tuple[tuple, dict]
    selected_seen: bool = False
    needed: dict[int, str] | None = None  # id -> description of tensors whose gradient is needed
    # the input embeddings' outputs, held (not just their ids) so no other tensor can reuse an id mid-forward
    input_embeddings: dict[int, torch.Tensor] = field(default_factory=dict)

    def is_input_embedding(self, tensor: torch.Tensor) -> bool:
        return self.input_embeddings.get(id(tensor)) is tensor


class ModelHooks:
    """The hooks one IST optimizer installs on its model.

    Args:
        model: the model whose forward the user calls.
        layer_map: the layers (from :func:`~ist_optim.discover_layers`).
        owner: the optimizer these hooks serve (held weakly).
        backward_cut: cut backward at the first selected block; ``None``: when
            the layers are modules (not with ``layer_of`` grouping).
        checkpoint_unselected: recompute unselected blocks that pass gradients
            through in backward instead of storing their activations.
        frozen: parameters outside the layers kept at ``requires_grad=False``
            (IST's ``outside_layers="freeze"``); restored with the layers' flags.

    Attributes:
        probe_batch: ``(args, kwargs)`` of the last training forward, or ``None``.
        probing: set while probe passes run (the hooks then do nothing).
        cut_count: training forwards in which backward was cut.
        cut_skip_count: training forwards in which a cut was possible but not exact, so skipped.
        cut_skip_reason: why the last cut was skipped (``None`` if never).
        removed: the hooks were removed; they do nothing any more.
    """

    def __init__(
        self,
        model: nn.Module,
        layer_map: LayerMap,
        *,
        owner: object,
        backward_cut: bool | None,
        checkpoint_unselected: bool,
        frozen: list[nn.Parameter] | None = None,
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
        self.removed = False
        self.cut_count = 0
        self.cut_skip_count = 0
        self.cut_skip_reason: str | None = None
        self.output_check: Any = None  # called once with the output of the first training forward
        self._owner: weakref.ref | None = weakref.ref(owner)
        self._frozen = list(frozen or [])
        self._found_flags = [(p, p.requires_grad) for params in layer_map.params for p in params]
        self._found_flags += [(p, p.requires_grad) for p in self._frozen]
        # The layers' parameters, flat; per parameter: the flag IST last left on it, and whether
        # someone else froze it (then it stays off at every selection until someone turns it on).
        self._managed = [p for params in layer_map.params for p in params]
        self._ist_flags = [p.requires_grad for p in self._managed]
        self._user_frozen = [False] * len(self._managed)
        self._index: dict[int, int] = {}  # id(param) -> position in _managed
        self._watch_params()
        self._flags: list[bool] = [False] * len(layer_map)
        self._selected_ids: set[int] = set()
        self._forwards: list[_Forward | None] = []  # one entry per model call in progress
        self._reentrant_cuts: set[tuple] = set()  # storage keys of block inputs to cut when recomputed

        self._handles = [
            model.register_forward_pre_hook(self._before_model_forward, with_kwargs=True),
            model.register_forward_hook(self._after_model_forward, always_call=True),
        ]
        if backward_cut:
            for index, block in enumerate(self.blocks):
                hook = functools.partial(self._before_block_forward, index)
                self._handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
            for embeddings in _input_embeddings(model):
                self._handles.append(embeddings.register_forward_hook(self._after_input_embeddings))
        self._patched_forwards: list[tuple[nn.Module, Any, Any]] = []  # (block, ours, the one we replaced)
        if checkpoint_unselected:
            for index, block in enumerate(self.blocks):
                previous = block.__dict__.get("forward")
                ours = functools.partial(self._block_forward, index, block.forward)
                block.forward = ours
                self._patched_forwards.append((block, ours, previous))

    # ------------------------------------------------------------------ ownership
    def attach(self, owner: object) -> None:
        """Serve ``owner`` (after the optimizer was deep-copied or unpickled with these hooks)."""
        self._owner = weakref.ref(owner)
        if not self.removed:
            self._watch_params()
            self._apply_flags()

    def _is_stale(self) -> bool:
        owner = self._owner() if self._owner is not None else None
        return owner is None or getattr(owner, "hooks", None) is not self

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_owner"] = None  # a weakref cannot be pickled; the optimizer re-attaches on load
        return state

    def __deepcopy__(self, memo: dict) -> ModelHooks:
        import copy

        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        owner = self._owner() if self._owner is not None else None
        if owner is None or id(owner) not in memo:
            # The model was copied without its optimizer (yet: deepcopy((model, opt)) copies the
            # optimizer next and re-attaches): until an optimizer attaches, the copy trains as a plain
            # model. Unattached, the hooks remove themselves at the copy's first forward (its hook
            # dicts are still being copied now).
            new._owner = None
            new._index = {id(p): i for i, p in enumerate(new._managed)}
            new._restore_flags()
        return new

    # ------------------------------------------------------------------ selection
    def set_selection(self, flags: list[bool]) -> None:
        """``flags[i]``: layer ``i`` trains in the coming step."""
        self._flags = list(flags)
        self._selected_ids = {id(p) for train, params in zip(flags, self.layer_map.params) if train for p in params}
        self._reentrant_cuts.clear()  # recomputes of earlier steps' forwards are over
        if not self.removed:
            self._apply_flags()

    @property
    def user_frozen(self) -> list[torch.Tensor]:
        """The layers' parameters someone other than IST set to ``requires_grad=False`` (kept off until set on)."""
        return [p for p, frozen in zip(self._managed, self._user_frozen) if frozen]

    def _watch_params(self) -> None:
        self._index = {id(p): i for i, p in enumerate(self._managed)}
        for p in self._managed:
            _watch(p, self)

    def _user_set(self, p: torch.Tensor, value: bool) -> None:
        """Someone other than IST wrote ``p.requires_grad = value`` (reported by the watched class)."""
        i = self._index.get(id(p))
        if i is not None and not self.removed and self._managed[i] is p:
            self._user_frozen[i] = not value
            if value and id(p) not in self._selected_ids:
                # An unselected parameter turned on (peft's disable_adapter() turns every adapter on when it
                # exits, e.g. after DPO's reference forward) is off again at once, not only at the next forward:
                # backward may still recompute a checkpointed block of this step's forward, which must see the
                # flags that forward saw.
                _set_flag(p, False)
                self._ist_flags[i] = False

    def _apply_flags(self) -> None:
        i = 0
        for train, params in zip(self._flags, self.layer_map.params):
            for p in params:
                flag = p.requires_grad
                if flag != self._ist_flags[i]:
                    # Changed by someone else, also where the write was not watched (not a plain Parameter).
                    self._user_frozen[i] = not flag
                want = train and not self._user_frozen[i]
                if flag != want:
                    _set_flag(p, want)
                self._ist_flags[i] = want
                i += 1
        for p in self._frozen:
            if p.requires_grad:
                _set_flag(p, False)

    def _restore_flags(self) -> None:
        """The flags found at construction, except that a parameter the user froze since stays frozen."""
        for p, flag in self._found_flags:
            i = self._index.get(id(p))
            if i is not None and self._managed[i] is p:
                if p.requires_grad != self._ist_flags[i]:
                    self._user_frozen[i] = not p.requires_grad  # a last unwatched change
                flag = flag and not self._user_frozen[i]
                self._ist_flags[i] = flag
            _set_flag(p, flag)
        for p in self._managed:
            _unwatch(p, self)

    def _in_training_forward(self) -> _Forward | None:
        return self._forwards[-1] if self._forwards else None

    def _before_model_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.removed:
            self._remove_handles()
            return
        if self._is_stale():
            if self._owner is not None:  # (None: copied or unpickled without an optimizer; nothing to say)
                warnings.warn(
                    "IST: this model carries the hooks of an IST optimizer that no longer exists or was replaced; "
                    "removed them and restored requires_grad",
                    stacklevel=2,
                )
            self.remove()
            return
        training = not self.probing and module.training and torch.is_grad_enabled()
        if not self.probing:
            # Re-applied every forward: an unselected parameter someone turned on is off again; one
            # someone turned off stays off (see the module docstring).
            self._apply_flags()
        if training:
            kwargs = {k: v for k, v in kwargs.items() if k not in CALLER_ONLY_KWARGS}
            self.probe_batch = (args, kwargs)
        self._forwards.append(_Forward((args, kwargs)) if training else None)

    def _after_model_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._forwards:
            forward = self._forwards.pop()
            if forward is not None and self.output_check is not None:
                check, self.output_check = self.output_check, None
                check(output)

    # ------------------------------------------------------------------ backward cut
    def _after_input_embeddings(self, module: nn.Module, args: tuple, output: Any) -> None:
        forward = self._in_training_forward()
        if forward is not None and isinstance(output, torch.Tensor):
            # HF's enable_input_require_grads makes this output a leaf that requires grad
            # (in place, so this object): the one leaf whose gradient nobody reads.
            forward.input_embeddings[id(output)] = output

    def _before_block_forward(self, index: int, block: nn.Module, args: tuple, kwargs: dict) -> Any:
        if self.removed or self.probing:
            return None
        forward = self._in_training_forward()
        if forward is None:
            if torch.is_grad_enabled() and block.training:
                return self._replay_cut(index, args, kwargs)  # a checkpointed block recomputing in backward
            return None
        hidden, where = _hidden_state(args, kwargs)
        first_selected = self._flags[index] and not forward.selected_seen
        if self._flags[index]:
            forward.selected_seen = True
        if hidden is not None and not torch.is_grad_enabled():
            self._reentrant_cuts.discard(_storage_key(index, hidden))  # a stale decision for this memory
        if not first_selected or hidden is None or not hidden.requires_grad:
            return None  # nothing to cut: no gradient flows back through this input
        reason = self._upstream_needs_grad(forward, hidden)
        if reason is not None:
            self._skip_cut(index, reason)
            return None
        self.cut_count += 1
        if not torch.is_grad_enabled():
            # First pass of reentrant checkpointing (no graph is built here): cut when it recomputes.
            self._reentrant_cuts.add(_storage_key(index, hidden))
            return None
        setattr(hidden, _CUT_MARK, index)  # a non-reentrant recompute must cut the same way
        cut = hidden.detach()
        if _uses_reentrant_checkpointing(block):
            # HF checkpoints the block's forward, after this hook: reentrant checkpointing gives
            # the block's parameters gradients only if its input requires grad.
            cut.requires_grad_(True)
        return _replace_hidden(args, kwargs, where, cut)

    def _replay_cut(self, index: int, args: tuple, kwargs: dict) -> Any:
        hidden, where = _hidden_state(args, kwargs)
        if hidden is None:
            return None
        if getattr(hidden, _CUT_MARK, None) == index:  # non-reentrant: the very tensor the forward cut
            return _replace_hidden(args, kwargs, where, hidden.detach())
        if _storage_key(index, hidden) in self._reentrant_cuts:
            # Reentrant: the block's parameters get gradients only if its input requires grad.
            return _replace_hidden(args, kwargs, where, hidden.detach().requires_grad_(True))
        return None

    def _needed(self, forward: _Forward) -> dict[int, str]:
        """Names for the tensors whose gradient someone may read: trainable parameters, the caller's input leaves.

        Built only when the graph walk meets a leaf or an opaque node (not on the common path, where
        the only leaf upstream is the input embeddings' output).
        """
        if forward.needed is None:
            needed = {id(p): f"parameter {name!r}" for name, p in self.model.named_parameters() if p.requires_grad}
            for p in self.layer_map.other_params:
                if p.requires_grad:
                    needed.setdefault(id(p), "an optimizer parameter outside the layers")
            for t in _tensors(forward.inputs):  # what the caller built the inputs from wants its gradient
                for leaf in _leaves(t):
                    needed.setdefault(id(leaf), "a tensor the model's inputs were computed from, which requires grad")
            forward.needed = needed
        return forward.needed

    def _upstream_needs_grad(self, forward: _Forward, hidden: torch.Tensor) -> str | None:
        """Why cutting backward at ``hidden`` would lose a gradient someone needs, or ``None`` if it would not."""
        if hidden.grad_fn is None:  # a leaf itself
            if forward.is_input_embedding(hidden):
                return None
            return self._needed(forward).get(id(hidden), _UNKNOWN_LEAF)
        for node in _graph_nodes(hidden):
            variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
            if variable is not None and not forward.is_input_embedding(variable):
                return self._needed(forward).get(id(variable), _UNKNOWN_LEAF)
            if type(node).__name__ in _OPAQUE_NODES and any(
                pid not in self._selected_ids for pid in self._needed(forward)
            ):
                return "a reentrant checkpoint (whose trainable parameters autograd cannot show until backward)"
        return None

    def _skip_cut(self, index: int, reason: str) -> None:
        self.cut_skip_count += 1
        if self.cut_skip_reason is None:
            name = self.layer_map.names[index]
            warnings.warn(
                f"IST: backward cut skipped at layer {name!r}: {reason} is upstream of it and needs a gradient, so "
                "backward runs below it (exact, without the cut's savings); opt.memory_report() counts cut and "
                "skipped forwards, opt.hooks.cut_skip_reason says why",
                stacklevel=4,
            )
        self.cut_skip_reason = reason

    # ------------------------------------------------------------------ selective checkpointing
    def _block_forward(self, index: int, forward: Any, *args: Any, **kwargs: Any) -> Any:
        block = self.blocks[index]
        if (
            not self.removed
            and not self._flags[index]
            and self._in_training_forward() is not None
            and torch.is_grad_enabled()
            and not getattr(block, "gradient_checkpointing", False)  # HF already checkpoints it
            and any(t.requires_grad for t in _tensors((args, kwargs)))  # it passes gradients through
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
        """Remove every hook and patched forward; restore the ``requires_grad`` flags found at construction.

        A parameter the user froze meanwhile stays frozen; watched parameters get their own class back.
        """
        if not self.removed:
            self._restore_flags()
        self.removed = True
        self._remove_handles()

    def _remove_handles(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for block, ours, previous in self._patched_forwards:
            if block.__dict__.get("forward") is ours:
                if previous is None:
                    del block.forward  # back to the class's forward
                else:
                    block.forward = previous
            # else something patched over ours since; ours is a pass-through now (removed=True)
        self._patched_forwards = []
