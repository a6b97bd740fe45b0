"""Layer discovery: which trainable parameters belong to which transformer block.

No class-name map: the layers are the blocks of the model's *stack(s)*, the
``nn.ModuleList`` or ``nn.Sequential`` containers with at least two children
holding trainable parameters. Containers inside another stack's blocks are
parts of a block (attention heads, experts) and are skipped; of the outermost
stacks, those at least half as long as the longest are kept (an encoder and
a decoder, a vision and a language tower), which leaves out short lists such
as a few task heads. In an ``nn.Sequential`` only the children of its most
common class are blocks (an embedding or head kept in the same Sequential is
not). That covers LLaMA-style ``model.layers``, GPT-2 ``transformer.h``, BERT
``encoder.layer``, T5 encoder and decoder, ViT, nanoGPT-style
``nn.Sequential`` blocks and users' own models. ``opt.layer_names`` says what
was chosen; ``layers=`` or ``layer_of=`` override it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from collections import Counter
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
    layers: nn.ModuleList | nn.Sequential | Sequence[nn.Module] | None = None,
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
            if isinstance(layers, nn.Module) and not isinstance(layers, (nn.ModuleList, nn.Sequential)):
                raise TypeError(
                    "layers must be an nn.ModuleList, an nn.Sequential or a list of modules, not a single module"
                )
            candidates = list(layers)
            for block in candidates:
                if not isinstance(block, nn.Module):
                    raise TypeError(f"layers must hold nn.Module objects, but got {type(block).__name__}")
            searched = f"the {len(candidates)} modules passed as layers="
        else:
            candidates, lists = _stack_blocks(model, wanted)
            searched = f"{len(lists)} nn.ModuleList/nn.Sequential container(s) of {type(model).__name__}" + (
                f" ({', '.join(lists[:6])}{', ...' if len(lists) > 6 else ''})" if lists else ""
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


def _stack_blocks(model: nn.Module, wanted: set[int]) -> tuple[list[nn.Module], list[str]]:
    """The blocks of the model's outermost stacks (see the module docstring), and every container's name."""
    containers = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential))]

    def holding(container: nn.Module) -> list[nn.Module]:
        children = [c for c in container.children() if any(id(p) in wanted for p in c.parameters())]
        if isinstance(container, nn.Sequential) and children:
            counts = Counter(type(c) for c in children)
            common = max(counts, key=lambda cls: counts[cls])  # first seen wins a tie
            children = [c for c in children if type(c) is common]
        return children

    for min_blocks in (2, 1):  # a one-block model (e.g. ALBERT's shared group) still has a layer
        stacks = [(name, m, holding(m)) for name, m in containers]
        stacks = [(name, m, blocks) for name, m, blocks in stacks if len(blocks) >= min_blocks]
        outermost = [
            (name, m, blocks)
            for name, m, blocks in stacks
            if not any(other is not m and _inside(name, other_name) for other_name, other, _ in stacks)
        ]
        if any(_is_composite(blocks) for _, _, blocks in outermost):  # blocks, not a list of bare layers (heads)
            outermost = [stack for stack in outermost if _is_composite(stack[2])]
        if outermost:
            longest = max(len(blocks) for _, _, blocks in outermost)
            kept = [blocks for _, _, blocks in outermost if 2 * len(blocks) >= longest]
            return [block for blocks in kept for block in blocks], [name or "<root>" for name, _ in containers]
    return [], [name or "<root>" for name, _ in containers]


def _is_composite(blocks: list[nn.Module]) -> bool:
    """Blocks built of submodules (transformer blocks, peft-wrapped layers), not bare ``nn.Linear`` and the like."""
    return any(next(block.children(), None) is not None for block in blocks)


def _inside(name: str, container_name: str) -> bool:
    """``name`` is a module below ``container_name`` (the root module's name is ``""``)."""
    return container_name == "" or name.startswith(container_name + ".")
