"""Probe passes: one no-grad forward per candidate set with the others suppressed.

``sequential`` runs one forward per candidate on the probe batch (memory of a
single eval forward, works with any loss). ``batched`` stacks the ``N_c``
candidates along dim 0 of one forward, each copy of the batch with its own
per-layer beta (fewer, larger kernels; logits ``N_c`` times larger). Both must
give the same losses; the tests check that they do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from .suppression import suppress

__all__ = ["PROBE_MODES", "ProbeBatch", "ProbeLossMissing", "probe_losses", "eval_mode", "hf_causal_lm_loss"]

PROBE_MODES = ("sequential", "batched")

ProbeBatch = tuple[tuple[Any, ...], dict[str, Any]]
LossFn = Callable[..., torch.Tensor]


class ProbeLossMissing(RuntimeError):
    """The probe forward returned an output whose ``loss`` is ``None`` (e.g. HF models called without labels)."""


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the duration, restoring every module's own flag after."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def _batch_size(batch: ProbeBatch) -> int:
    args, kwargs = batch
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise RuntimeError("batched probes need at least one tensor argument with a batch dim 0")


def _map_rows(value: Any, fn: Callable[[torch.Tensor], torch.Tensor], rows: int) -> Any:
    """Apply ``fn`` to every tensor in ``value`` (nested dicts/lists/tuples) whose dim 0 is ``rows``."""
    if isinstance(value, torch.Tensor):
        return fn(value) if value.dim() > 0 and value.shape[0] == rows else value
    if isinstance(value, dict):
        mapped = {k: _map_rows(v, fn, rows) for k, v in value.items()}
        try:  # keep ModelOutput and other dict subclasses
            return type(value)(**mapped)
        except TypeError:
            return mapped
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_map_rows(v, fn, rows) for v in value)
    return value


def _loss_of(output: Any, batch: ProbeBatch, loss_fn: LossFn | None) -> torch.Tensor:
    args, kwargs = batch
    if loss_fn is not None:
        return loss_fn(output, *args, **kwargs)
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    if loss is None and has_loss_field(output):
        raise ProbeLossMissing(
            f"the probe forward returned {type(output).__name__} with loss=None (no labels in the batch?); pass "
            "loss_fn=(output, *args, **kwargs) -> scalar to compute it"
        )
    if not isinstance(loss, torch.Tensor):
        raise RuntimeError(
            f"probe forward returned {type(output).__name__} with no .loss; pass loss_fn=(output, *args, **kwargs) "
            "-> scalar at construction, or call opt.step(closure)"
        )
    return loss


def has_loss_field(output: Any) -> bool:
    """``output`` can carry a loss: an HF ``ModelOutput`` (or any object with ``.loss``) or a dict with ``"loss"``."""
    return hasattr(output, "loss") or (isinstance(output, dict) and "loss" in output)


def hf_causal_lm_loss(model: nn.Module) -> Callable[..., torch.Tensor] | None:
    """The model's own causal-LM ``loss_function(logits, labels, vocab_size)``, if it is an HF causal LM.

    Recognised by the loss function itself (``ForCausalLMLoss``: GPT-2's
    ``GPT2LMHeadModel`` as well as every ``*ForCausalLM``), not by class name.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    vocab_size = getattr(getattr(inner, "config", None), "vocab_size", None)
    if vocab_size is None:
        return None
    try:
        loss_function = getattr(inner, "loss_function", None)
    except Exception:  # a property that cannot resolve a loss for this model
        return None
    if getattr(loss_function, "__name__", None) != "ForCausalLMLoss" and not type(inner).__name__.endswith(
        "ForCausalLM"
    ):
        return None
    if loss_function is None:
        return None
    return lambda logits, labels: loss_function(logits=logits, labels=labels, vocab_size=vocab_size)


def probe_losses(
    model: nn.Module,
    adapters: Sequence[Sequence[nn.Module]],
    beta: torch.Tensor,
    *,
    batch: ProbeBatch | None = None,
    closure: Callable[[], Any] | None = None,
    loss_fn: LossFn | None = None,
    mode: str = "sequential",
    kernels: str = "auto",
) -> torch.Tensor:
    """Loss of each candidate, the model in ``eval()`` mode and no grad.

    Args:
        model: the model (its forward is called as in training).
        adapters: ``L`` lists of adapter modules.
        beta: ``(N_c, L)`` per-candidate, per-layer factor (1 kept, ``beta`` suppressed).
        batch: ``(args, kwargs)`` of a training forward; ignored when ``closure`` is given.
        closure: returns the loss of a forward (called under ``torch.no_grad()``).
        loss_fn: ``loss_fn(output, *args, **kwargs)``; default ``output.loss``.
        mode: ``"sequential"`` or ``"batched"`` (a closure always runs sequentially).
        kernels: ``"auto"``, ``"triton"`` or ``"torch"``: see :func:`~ist_optim.suppression.suppress`.

    Returns:
        ``(N_c,)`` float64 losses on CPU.
    """
    if mode not in PROBE_MODES:
        raise ValueError(f"Invalid probe_mode: {mode!r} (expected one of {PROBE_MODES})")
    if batch is None and closure is None:
        raise ValueError("probe_losses needs a batch or a closure")
    with eval_mode(model), torch.no_grad():
        if closure is not None or mode == "sequential":
            losses = []
            for row in beta:
                with suppress(adapters, row, kernels=kernels):
                    if closure is not None:
                        loss = closure()
                    else:
                        loss = _loss_of(model(*batch[0], **batch[1]), batch, loss_fn)
                losses.append(torch.as_tensor(loss).detach().to("cpu", torch.float64).reshape(()))
            return torch.stack(losses)
        return _batched_losses(model, adapters, beta, batch, loss_fn, kernels)


def _batched_losses(
    model: nn.Module,
    adapters: Sequence[Sequence[nn.Module]],
    beta: torch.Tensor,
    batch: ProbeBatch,
    loss_fn: LossFn | None,
    kernels: str,
) -> torch.Tensor:
    groups, rows = beta.shape[0], _batch_size(batch)
    args, kwargs = _map_rows(batch, lambda t: t.repeat(groups, *([1] * (t.dim() - 1))), rows)
    hf_loss = None
    if loss_fn is None:
        hf_loss = hf_causal_lm_loss(model)
        if hf_loss is None or "labels" not in kwargs:
            raise RuntimeError(
                "probe_mode='batched' needs per-candidate losses: pass loss_fn=(output, *args, **kwargs) -> scalar, "
                "or use an HF causal LM called with labels=, or probe_mode='sequential'"
            )
        kwargs = dict(kwargs)
        labels = kwargs.pop("labels")  # the model's own loss would mix the candidates
    with suppress(adapters, beta, kernels=kernels):
        output = model(*args, **kwargs)
    losses = []
    for g in range(groups):
        rows_of = lambda t, g=g: t[g * rows : (g + 1) * rows]  # noqa: E731
        output_g = _map_rows(output, rows_of, groups * rows)
        if hf_loss is not None:
            loss = hf_loss(output_g.logits, rows_of(labels))
        else:
            args_g, kwargs_g = _map_rows((args, kwargs), rows_of, groups * rows)
            loss = loss_fn(output_g, *args_g, **kwargs_g)
        losses.append(torch.as_tensor(loss).detach().to("cpu", torch.float64).reshape(()))
    return torch.stack(losses)
