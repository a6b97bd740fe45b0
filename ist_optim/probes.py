"""Probe passes: one no-grad forward per candidate set with the others suppressed.

``sequential`` runs one forward per candidate on the probe batch (memory of a
single eval forward, works with any loss). ``batched`` stacks the ``N_c``
candidates along dim 0 of one forward, each copy of the batch with its own
per-layer beta (fewer, larger kernels; logits ``N_c`` times larger). Both must
give the same losses; the tests check that they do.

Cheaper rounds without changing what they measure: the forwards run under
``torch.inference_mode()`` (no autograd bookkeeping at all, not even version
counters; the losses are the same bits as under ``no_grad``), and
``probe_rows`` (:func:`take_rows`) probes on the first rows of the captured
batch instead of all of them, every batch-shaped tensor sliced alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Iterator

import math
import numbers

import torch
from torch import nn

from .suppression import suppress

__all__ = [
    "PROBE_MODES",
    "ProbeBatch",
    "ProbeLossMissing",
    "probe_losses",
    "eval_mode",
    "hf_causal_lm_loss",
    "check_probe_rows",
    "probe_row_count",
    "take_rows",
]

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


def _batch_size(batch: ProbeBatch, why: str = "batched probes") -> int:
    args, kwargs = batch
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise RuntimeError(f"{why} need at least one tensor argument with a batch dim 0")


def as_probe_batch(batch: Any, *, args_tuple: bool = False, what: str = "batch") -> ProbeBatch:
    """A user's batch as ``(args, kwargs)``: a mapping is the forward's keywords, a tensor its one argument,
    ``(args, kwargs)`` both; with ``args_tuple``, any other tuple or list is the positional arguments."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if (
        isinstance(batch, (tuple, list))
        and len(batch) == 2
        and isinstance(batch[0], (tuple, list))
        and isinstance(batch[1], Mapping)
    ):
        return tuple(batch[0]), dict(batch[1])
    if args_tuple and isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    forms = (
        "a dict of forward keyword arguments, a tensor, "
        + ("a tuple of arguments " if args_tuple else "")
        + "or (args, kwargs)"
    )
    raise TypeError(f"{what} must be {forms}, but got {type(batch).__name__}")


def check_probe_rows(value: Any) -> int | float:
    """``probe_rows`` as a Python int count (>= 1) or float fraction in ``(0, 1]``; anything else raises."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"probe_rows must be an int count or a float fraction, but got {type(value).__name__}")
    if isinstance(value, numbers.Integral):
        if int(value) < 1:
            raise ValueError(f"Invalid probe_rows: {value} (an int count of rows must be >= 1)")
        return int(value)
    value = float(value)
    if math.isnan(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"Invalid probe_rows: {value} (a float fraction of the batch's rows must lie in (0, 1])")
    return value


def probe_row_count(probe_rows: int | float, rows: int) -> int:
    """Rows probed of a batch of ``rows``: an int count capped at ``rows``; a fraction ``f`` gives
    ``max(1, floor(f * rows + 0.5))`` (as layer fractions are rounded), so ``1.0`` is every row."""
    if isinstance(probe_rows, float):
        return min(rows, max(1, math.floor(probe_rows * rows + 0.5)))
    return min(rows, probe_rows)


def take_rows(batch: ProbeBatch, extra: dict[str, Any], probe_rows: int | float) -> tuple[ProbeBatch, dict[str, Any]]:
    """The first rows of a captured batch and of the loss inputs registered with it.

    The batch size is dim 0 of the first tensor in ``batch`` (as for batched
    probes); every tensor in ``batch`` and ``extra`` (nested in dicts, lists and
    tuples too) whose dim 0 has that size is cut to its first
    :func:`probe_row_count` rows; other values (a ``(1, T)`` position tensor,
    a label-word list, numbers) pass unchanged. A tensor that only happens to
    have that many entries on dim 0 is cut too, as for batched probes.

    Returns ``(batch, extra)`` themselves when every row is kept (``probe_rows=1.0``
    without looking at the batch at all).
    """
    if isinstance(probe_rows, float) and probe_rows == 1.0:
        return batch, extra
    rows = _batch_size(batch, why="probe_rows other than 1.0 (all rows)")
    keep = probe_row_count(probe_rows, rows)
    if keep == rows:
        return batch, extra
    first = lambda t: t[:keep]  # noqa: E731
    return _map_rows(batch, first, rows), _map_rows(extra, first, rows)


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


_no_autograd = torch.inference_mode  # the tests swap in torch.no_grad for the reference


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
    """Loss of each candidate, the model in ``eval()`` mode and no grad (``inference_mode`` for a batch).

    Args:
        model: the model (its forward is called as in training).
        adapters: ``L`` lists of adapter modules.
        beta: ``(N_c, L)`` per-candidate, per-layer factor (1 kept, ``beta`` suppressed).
        batch: ``(args, kwargs)`` of a training forward; ignored when ``closure`` is given.
        closure: returns the loss of a forward (called under ``torch.no_grad()``, not ``inference_mode``:
            what a closure builds or keeps may meet autograd later).
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
    # inference_mode for the batch: the same kernels as no_grad (same bits), less bookkeeping per op. Its
    # outputs (inference tensors) never leave this function; the inputs are the training forward's own
    # tensors, read only. A closure's forwards keep no_grad: user code may keep what it computes.
    no_autograd = torch.no_grad() if closure is not None else _no_autograd()
    with eval_mode(model), no_autograd:
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
