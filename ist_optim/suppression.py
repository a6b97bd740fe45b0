"""Response suppression: scale an adapter's output by ``beta`` (paper Eq. 8).

One small interface, so the probe passes never touch peft internals directly:

* an *adapter module* is any module with a ``base_layer`` submodule whose
  output the adapter adds to (peft's tuner-layer convention, which users' own
  adapters can follow), i.e. ``out = base_layer(x) + a(x)``;
* :func:`find_adapter_modules` lists them per layer;
* :func:`suppress` is a context manager that makes each layer's adapter
  modules return ``base_layer(x) + beta * a(x)``, with one beta per layer
  (sequential probes) or one per row group (batched probes), and restores
  everything on exit, also when the forward raises.

Three ways to scale, chosen per module:

* vanilla peft LoRA ``Linear`` on the Triton path (CUDA, or forced): the
  forward is swapped for one that adds ``scale * beta[group] * (h @ B.T)``
  to the base output in place with one kernel (``ist_optim.kernels``);
* vanilla peft LoRA (``scaling`` dict, no variant such as DoRA): the adapter
  term is linear in ``scaling``, so multiplying ``scaling`` by beta is exact
  and costs nothing. Also the Triton path's fallback for layers the kernel
  does not cover (``lora_bias``: the bias is inside ``lora_B``, scaled with
  it) and for modules whose forward something else already patched on the
  instance (``fuse_lora``, accelerate): swapping it would bypass that patch;
* ``ist_optim.adapters`` (series and parallel bottlenecks): multiply their
  ``scale`` by beta, exact for the same reason;
* full-layer mode (no adapters): :class:`BlockResidual` scales the block's
  residual update, ``h + beta * (block(h) - h)``;
* anything else (DoRA, other tuners, users' adapters): a forward hook
  recomputes ``base = base_layer(x)`` and returns ``base + beta * (out - base)``
  (one extra base matmul per module; DoRA needs it because a zero scale does
  not switch a DoRA layer off).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .fused_lora import has_linear_up_projections, is_fusable, is_vanilla_lora, lora_forward, patch_forward
from .hooks import _hidden_state

__all__ = ["BlockResidual", "find_adapter_modules", "suppress", "is_adapter_module", "KERNEL_CHOICES"]

Undo = Callable[[], None]


def is_adapter_module(module: nn.Module) -> bool:
    """True for modules following the ``base_layer`` convention."""
    return isinstance(getattr(module, "base_layer", None), nn.Module)


def _own_params(module: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters of ``module`` that are not inside its ``base_layer``."""
    base = {id(p) for p in module.base_layer.parameters()}
    return (p for p in module.parameters() if id(p) not in base)


def find_adapter_modules(model: nn.Module, layer_params: Sequence[Sequence[torch.Tensor]]) -> list[list[nn.Module]]:
    """Adapter modules of each layer: those owning one of that layer's parameters.

    Args:
        model: the model.
        layer_params: ``L`` lists of trainable parameters, one per layer.

    Returns:
        ``L`` lists of adapter modules (a list is empty when a layer's
        parameters belong to no adapter module, e.g. full-layer training).

    Raises:
        ValueError: for adapters IST cannot drive (AdaLoRA, whose rank allocation needs every gradient).
    """
    layer_of_param = {id(p): i for i, group in enumerate(layer_params) for p in group}
    adapters: list[list[nn.Module]] = [[] for _ in layer_params]
    for module in model.modules():
        if not is_adapter_module(module):
            continue
        if any(cls.__name__ == "AdaLoraLayer" for cls in type(module).__mro__):
            raise ValueError(
                "AdaLoRA is not supported: its update_and_allocate() scores every adapter's rank from that "
                "adapter's gradient each step, and IST leaves most adapters without one; use LoRA or DoRA "
                "(peft.LoraConfig) with IST, or AdaLoRA with a plain optimizer"
            )
        layers = {layer_of_param[id(p)] for p in _own_params(module) if id(p) in layer_of_param}
        if len(layers) > 1:
            raise ValueError(f"adapter module {type(module).__name__} holds parameters of layers {sorted(layers)}")
        if layers:
            adapters[layers.pop()].append(module)
    return adapters


class _Betas:
    """Batched probes' ``(G, L)`` betas, copied to each device and dtype once per :func:`suppress`.

    The adapters' pre-hooks and kernels ask for their layer's column on their
    own device; building it per module per forward would be one host-to-device
    copy each (hundreds per forward on a large model).
    """

    def __init__(self, beta: torch.Tensor):
        self.beta = beta  # (G, L) float64 on the host
        self._copies: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        if key not in self._copies:
            self._copies[key] = self.beta.to(device=device, dtype=dtype)
        return self._copies[key]


class _Column:
    """One layer's per-group betas ``(G,)``, materialised on the device that asks."""

    def __init__(self, betas: _Betas, layer: int):
        self.betas, self.layer = betas, layer

    def numel(self) -> int:
        return self.betas.beta.shape[0]

    def on(self, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.betas.on(device, dtype)[:, self.layer]


def _row_scale(beta: _Column, like: torch.Tensor) -> torch.Tensor:
    """Expand per-group betas ``(G,)`` to a broadcastable ``(rows, 1, ..., 1)`` for ``like``.

    Rows are dim 0 and grouped contiguously (group ``g`` owns rows
    ``[g * rows/G, (g+1) * rows/G)``), which also holds when a model flattens
    ``(batch, seq)`` into one leading dim. Device ops only: no host copy, no sync.
    """
    rows, groups = like.shape[0], beta.numel()
    if rows % groups:
        raise RuntimeError(
            f"batched probes: an adapter saw {rows} rows on dim 0, not a multiple of the {groups} candidates; "
            "the batch must be on dim 0 (use probe_mode='sequential' otherwise)"
        )
    scale = beta.on(like.device, like.dtype)[:, None].expand(groups, rows // groups).reshape(rows)
    return scale.view(rows, *([1] * (like.dim() - 1)))


def _check_not_merged(module: nn.Module) -> None:
    if getattr(module, "merged", False):
        raise RuntimeError(
            f"cannot suppress a merged adapter ({type(module).__name__}); unmerge the adapters before training"
        )


def _scale_for_forwards(module: nn.Module, beta: float | _Column, apply: Callable[[Any], None], restore: Undo) -> Undo:
    """``apply(beta)`` for the duration; per-row betas around each forward, as the row count is in the input.

    ``apply`` multiplies a factor the adapter term is linear in (LoRA's ``scaling``, an adapter's ``scale``)
    by a float or by a ``(rows, 1, ..., 1)`` tensor; ``restore`` puts the original back.
    """
    if isinstance(beta, float):
        apply(beta)
        return restore

    def pre_hook(mod: nn.Module, args: tuple) -> None:
        apply(_row_scale(beta, args[0]))

    def post_hook(mod: nn.Module, args: tuple, output: torch.Tensor) -> None:
        restore()

    handles = [module.register_forward_pre_hook(pre_hook), module.register_forward_hook(post_hook)]

    def undo() -> None:
        for handle in handles:
            handle.remove()
        restore()

    return undo


def _scale_lora_scaling(module: nn.Module, beta: float | _Column) -> Undo:
    """Multiply peft LoRA's ``scaling`` by beta for the duration; exact since the term is linear in it."""
    original = dict(module.scaling)

    def apply(factor: Any) -> None:
        for name, value in original.items():
            module.scaling[name] = value * factor

    return _scale_for_forwards(module, beta, apply, lambda: module.scaling.update(original))


def _scale_output_delta(module: nn.Module, beta: float | _Column) -> Undo:
    """Generic: ``base + beta * (out - base)`` with ``base = base_layer(x)`` recomputed."""

    def hook(mod: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        base = mod.base_layer(args[0])
        scale = beta if isinstance(beta, float) else _row_scale(beta, output)
        return base + scale * (output - base)

    return module.register_forward_hook(hook).remove


class BlockResidual:
    """Full-layer mode (a layer trains all its parameters, no adapters): the block itself is suppressed.

    Its residual update is scaled: ``h + beta * (block(h) - h)`` with ``h`` the
    block's hidden-state input (first positional tensor or ``hidden_states=``);
    ``beta = 0`` skips the block, ``1`` leaves it as it is. For a tuple output
    the first element is the hidden state.
    """

    def __init__(self, block: nn.Module):
        self.block = block


def _scale_block_residual(holder: BlockResidual, beta: float | _Column) -> Undo:
    def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        hidden, _ = _hidden_state(args, kwargs)
        out = output[0] if isinstance(output, tuple) else output
        if not isinstance(hidden, torch.Tensor) or not isinstance(out, torch.Tensor) or hidden.shape != out.shape:
            raise RuntimeError(
                f"full-layer probes scale a block's residual update, but {type(mod).__name__} does not map its "
                "hidden-state input (first positional tensor or hidden_states=) to an output of the same shape; "
                "use adapters, or num_probes=0"
            )
        scale = beta if isinstance(beta, float) else _row_scale(beta, out)
        scaled = hidden + scale * (out - hidden)
        return (scaled, *output[1:]) if isinstance(output, tuple) else scaled

    return holder.block.register_forward_hook(hook, with_kwargs=True).remove


def _fused_lora_probe(module: nn.Module, beta: float | _Column) -> Undo:
    """Vanilla LoRA ``Linear`` on the Triton path: the beta-scaled term is added in place by one kernel."""
    from .kernels import lora_expand

    def expand_in_place(flat, h, lora_b, alpha, groups):
        return lora_expand(flat, h, lora_b, groups, alpha=alpha, out=flat, backend="triton")

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if isinstance(beta, float):  # sequential: beta goes in with scaling, by value
            return lora_forward(module, x, expand_in_place, factor=beta)
        return lora_forward(module, x, expand_in_place, group_scale=beta.on)

    return patch_forward(module, forward)


def _scale_adapter_scale(module: nn.Module, beta: float | _Column) -> Undo:
    """ist_optim's bottleneck adapters: multiply their ``scale`` by beta (the adapter term is linear in it)."""
    original = module.scale

    def apply(factor: Any) -> None:
        module.scale = original * factor

    def restore() -> None:
        module.scale = original

    return _scale_for_forwards(module, beta, apply, restore)


def _strategy(module: nn.Module, kernels: str) -> Callable[[nn.Module, float | _Column], Undo]:
    from .adapters import BottleneckAdapter

    if isinstance(module, BlockResidual):
        return _scale_block_residual
    if isinstance(module, BottleneckAdapter):
        return _scale_adapter_scale
    if not is_vanilla_lora(module):
        return _scale_output_delta
    if kernels == "torch":
        return _scale_lora_scaling
    from .kernels import use_triton

    linear = has_linear_up_projections(module)  # False for LoRA Embedding / Conv layers
    weight = next(iter(module.lora_B.values())).weight if linear else None
    if kernels == "triton":
        if not (linear and use_triton(weight, forced=True)):
            raise RuntimeError(
                "kernels='triton' needs Triton and LoRA Linear adapters on CUDA (or TRITON_INTERPRET=1 on CPU)"
            )
    elif not (linear and use_triton(weight)):
        return _scale_lora_scaling
    if not is_fusable(module) or "forward" in vars(module):
        return _scale_lora_scaling  # lora_bias, or another patch's forward to keep: exact on peft's path
    return _fused_lora_probe


KERNEL_CHOICES = ("auto", "triton", "torch")


@contextmanager
def suppress(adapters: Sequence[Sequence[nn.Module]], beta: torch.Tensor, *, kernels: str = "auto") -> Iterator[None]:
    """Scale each layer's adapter outputs by its beta inside the block.

    Args:
        adapters: ``L`` lists of adapter modules (from :func:`find_adapter_modules`).
        beta: ``(L,)`` one factor per layer, or ``(G, L)`` one per row group
            (batched candidates; the input's dim 0 holds ``G`` equal groups).
            A factor of 1 leaves a layer untouched.
        kernels: ``"auto"`` (Triton for vanilla LoRA ``Linear`` adapters on
            CUDA, torch otherwise), ``"triton"`` (force; raise if it cannot
            run) or ``"torch"``.
    """
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"Invalid kernels: {kernels!r} (expected one of {KERNEL_CHOICES})")
    if beta.dim() == 1:
        beta = beta[None]
    if beta.shape[1] != len(adapters):
        raise ValueError(f"beta has {beta.shape[1]} layers, expected {len(adapters)}")
    beta = beta.detach().to("cpu", torch.float64)
    betas = _Betas(beta)
    undos: list[Undo] = []
    columns = list(zip(*beta.tolist()))  # host numbers once, not an op per layer
    try:
        for layer, modules in enumerate(adapters):
            column = columns[layer]
            if all(b == 1 for b in column):
                continue
            factor: float | _Column = float(column[0]) if len(column) == 1 else _Column(betas, layer)
            for module in modules:
                _check_not_merged(module)
                undos.append(_strategy(module, kernels)(module, factor))
        yield
    finally:
        for undo in reversed(undos):
            undo()
