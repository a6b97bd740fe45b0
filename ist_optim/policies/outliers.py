"""OwLore / OWL layer-wise outlier ratios, e.g. as :class:`~ist_optim.policies.WeightedLayers` weights."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import nn


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
    from ..layers import discover_layers  # (layers imports nothing of ours; kept local to keep imports light)

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
