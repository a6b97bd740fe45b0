"""Layer discovery: which trainable parameters belong to which transformer block.

No class-name map: the blocks are the children of the outermost
``nn.ModuleList`` (or lists, e.g. an encoder and a decoder stack) whose
children hold trainable parameters. That covers LLaMA-style ``model.layers``,
GPT-2 ``transformer.h``, BERT ``encoder.layer``, ``blocks`` and users' own
models; ``layers=`` or ``layer_of=`` override it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LayerMap", "discover_layers"]


@dataclass
class LayerMap:
    """Trainable parameters grouped by layer.

    Attributes:
        names: ``L`` qualified module names of the layers (``"model.layers.3"``),
            or ``"layer_of:3"`` when grouping came from a ``layer_of`` function.
        modules: the ``L`` block modules (``None`` for ``layer_of`` grouping).
        params: ``L`` lists of the optimizer's parameters inside each layer.
        other_params: optimizer parameters outside every layer (trained every step).
    """

    names: list[str]
    modules: list[nn.Module | None]
    params: list[list[nn.Parameter]]
    other_params: list[nn.Parameter]

    def __len__(self) -> int:
        return len(self.names)


def _owned_by(params: Iterable[torch.Tensor], wanted: set[int]) -> list[torch.Tensor]:
    out, seen = [], set()
    for p in params:
        if id(p) in wanted and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def discover_layers(
    model: nn.Module,
    optimizer_params: Sequence[torch.Tensor],
    *,
    layers: nn.ModuleList | Sequence[nn.Module] | None = None,
    layer_of: Callable[[str], int | None] | None = None,
) -> LayerMap:
    """Group ``optimizer_params`` by the block of ``model`` that holds them.

    Args:
        model: the model whose forward the optimizer trains.
        optimizer_params: the parameters in the wrapped optimizer's groups.
        layers: explicit blocks, in order (overrides discovery).
        layer_of: ``name -> index or None`` over ``model.named_parameters()``
            (overrides discovery; ``None`` = outside every layer).

    Layers are only the blocks that hold at least one optimizer parameter, in
    model order, so LoRA on blocks 4..11 of 12 gives 8 layers.

    Raises:
        ValueError: when no block holds an optimizer parameter, naming what was searched.
    """
    if layers is not None and layer_of is not None:
        raise ValueError("pass at most one of layers= and layer_of=")
    wanted = {id(p) for p in optimizer_params}
    module_names = {id(m): n for n, m in model.named_modules()}

    if layer_of is not None:
        if not callable(layer_of):
            raise TypeError(f"layer_of must be callable (name -> int or None), but got {type(layer_of).__name__}")
        by_index: dict[int, list[torch.Tensor]] = {}
        for name, p in model.named_parameters():
            if id(p) not in wanted:
                continue
            index = layer_of(name)
            if index is None:
                continue
            if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                raise ValueError(f"layer_of({name!r}) returned {index!r}; expected a non-negative int or None")
            by_index.setdefault(index, []).append(p)
        order = sorted(by_index)
        groups = [by_index[i] for i in order]
        names = [f"layer_of:{i}" for i in order]
        modules: list[nn.Module | None] = [None] * len(order)
        searched = "the indices returned by layer_of"
    else:
        if layers is not None:
            if isinstance(layers, nn.Module) and not isinstance(layers, nn.ModuleList):
                raise TypeError("layers must be an nn.ModuleList or a list of modules, not a single module")
            candidates = list(layers)
            for block in candidates:
                if not isinstance(block, nn.Module):
                    raise TypeError(f"layers must hold nn.Module objects, but got {type(block).__name__}")
            searched = f"the {len(candidates)} modules passed as layers="
        else:
            candidates, lists = _outermost_block_lists(model, wanted)
            searched = (
                f"{len(lists)} nn.ModuleList(s) of {type(model).__name__}"
                + (f" ({', '.join(lists[:6])}{', ...' if len(lists) > 6 else ''})" if lists else "")
            )
        groups, names, modules = [], [], []
        for block in candidates:
            owned = _owned_by(block.parameters(), wanted)
            if owned:
                groups.append(owned)
                names.append(module_names.get(id(block), type(block).__name__))
                modules.append(block)

    if not groups:
        raise ValueError(
            f"found no trainable (optimizer) parameters inside any layer; searched {searched}. "
            "Make the adapters trainable (e.g. peft.get_peft_model), or pass layers= (the blocks) "
            "or layer_of= (parameter name -> layer index or None)."
        )
    in_layers = {id(p) for group in groups for p in group}
    if sum(len(g) for g in groups) != len(in_layers):
        raise ValueError("a parameter belongs to two layers; the layers must not share parameters")
    other = [p for p in _owned_by(optimizer_params, wanted) if id(p) not in in_layers]
    return LayerMap(names=names, modules=modules, params=groups, other_params=other)


def _outermost_block_lists(model: nn.Module, wanted: set[int]) -> tuple[list[nn.Module], list[str]]:
    """Children of the outermost ``ModuleList``s holding wanted params, and all lists' names."""
    all_lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    holding = [
        (name, m) for name, m in all_lists if any(id(p) in wanted for p in m.parameters())
    ]
    outermost = [
        (name, m)
        for name, m in holding
        if not any(other is not m and name.startswith(other_name + ".") for other_name, other in holding)
    ]
    blocks = [child for _, m in outermost for child in m]
    return blocks, [name or "<root>" for name, _ in all_lists]
