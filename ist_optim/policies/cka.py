"""Layer-wise LoRA with CKA: the seed paper's pretrained input-vs-output rule and a frozen-vs-adapted variant."""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..distributed import rank_local, reduce_probe_losses
from ..hooks import _hidden_state, _replace_hidden
from ..probes import ProbeBatch, as_probe_batch
from .._checks import as_int, resolve_layer_count
from .base import LayerPolicy, PolicyContext, _require


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA (Kornblith et al. 2019) of two ``(n, d)`` representations of the same ``n`` rows, in float64.

    ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred ``Xc, Yc``;
    1 for representations equal up to rotation and isotropic scale. Computed
    through the ``n x n`` Gram matrices when ``n`` is the smaller side. Two
    constant representations (no variance) give 1 if they are equal, else 0.
    """
    x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    y = y.detach().reshape(-1, y.shape[-1]).to(torch.float64)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka: {x.shape[0]} rows vs {y.shape[0]}")
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    if x.shape[0] <= min(x.shape[1], y.shape[1]):
        k, l = x @ x.T, y @ y.T
        cross, xx, yy = (k * l).sum(), (k * k).sum(), (l * l).sum()
    else:
        cross = ((y.T @ x) ** 2).sum()
        xx, yy = ((x.T @ x) ** 2).sum(), ((y.T @ y) ** 2).sum()
    denominator = (xx * yy).sqrt()
    if not bool(denominator > 0):
        return torch.tensor(1.0 if torch.equal(x, y) else 0.0, dtype=torch.float64)
    return cross / denominator


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _token_rows(hidden: torch.Tensor, kwargs: Mapping[str, Any]) -> torch.Tensor:
    """``(n, d)``: the hidden state's rows, without padded positions where an ``attention_mask`` says so."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(mask.shape) == tuple(hidden.shape[:2]):
        return hidden[mask.to(hidden.device).bool()]
    return hidden.reshape(-1, hidden.shape[-1])


class CKALayers(LayerPolicy):
    """Train the layers that a short warm-up changed most, measured by linear CKA (then fixed).

    A variant, not the seed paper's rule (that is :class:`LayerwiseCKA`, which
    ranks the pretrained blocks before training).

    After Layer-wise LoRA with CKA (the idea: layers whose representations
    fine-tuning changes most matter most; ``../shared/seeds/003``), as IST's issue 10 defines it:

    * **Warm-up** (optimizer steps ``1..warmup_steps``): *every* layer trains,
      so that each one's adapters (or, in full-layer mode, weights) can show
      how much the task moves them.
    * **Measurement**, right after each of the last ``num_batches`` warm-up
      steps, on that step's training batch (the inputs of its last training
      forward), no grad, eval mode (dropout off): one forward of the model as
      trained so far records each block's hidden-state input ``h_i`` and
      output ``y_i``; a second forward feeds every block the same ``h_i`` but
      runs it with its trainable parameters at their *frozen* values (those
      they had when IST was built; a host copy is kept until the ranking),
      giving ``y0_i``. The layer's score is ``cka_i = linear_cka(y0_i, y_i)``
      over the batch's token positions (padded ones left out where an
      ``attention_mask`` is given). Feeding both the same input measures the
      block's own change, not the change of the blocks below it propagating up.
    * **Ranking**, at the end of step ``warmup_steps``: the ``active_layers``
      layers with the lowest mean CKA over the measured batches (the most
      changed; ties go to the lower index) train in every later step.

    With probes off (this policy never probes) the measurement costs two
    eval forwards per measured batch, once. In a data-parallel run each
    rank measures its own batch and the ranks' CKA values are averaged (the
    same ranking everywhere); FSDP2's sharded parameters are refused (the
    frozen copy would be a rank's shard). Checkpoints taken during the
    warm-up carry the frozen copy (the layers' trainable parameters), so a
    resumed run ranks exactly as an uninterrupted one; after the ranking only
    the ranking is kept.

    Args:
        active_layers: layers trained after the warm-up (int or float fraction of ``L``).
        warmup_steps: optimizer steps in the warm-up (``>= 1``).
        num_batches: measured warm-up steps (``1..warmup_steps``), the last ones.

    Attributes:
        cka: ``(L,)`` float64 mean CKA per layer (NaN until the ranking).
        ranking: layers from most to least changed (empty until the ranking).
        num_measured: batches measured so far.
    """

    def __init__(self, active_layers: int | float = 0.25, *, warmup_steps: int = 20, num_batches: int = 4) -> None:
        super().__init__()
        if as_int(warmup_steps) is None or as_int(warmup_steps) < 1:
            raise ValueError(f"Invalid warmup_steps: {warmup_steps} (need an int >= 1)")
        if as_int(num_batches) is None or not 1 <= as_int(num_batches) <= as_int(warmup_steps):
            raise ValueError(f"Invalid num_batches: {num_batches} (need an int in [1, warmup_steps={warmup_steps}])")
        self.active_layers = active_layers
        self.warmup_steps = as_int(warmup_steps)
        self.num_batches = as_int(num_batches)
        self.num_active = 0
        self.num_steps = 0
        self.num_measured = 0
        self.cka_sum = torch.zeros(0, dtype=torch.float64)
        self.cka = torch.zeros(0, dtype=torch.float64)
        self.ranking: list[int] = []
        self.frozen: list[list[torch.Tensor]] | None = None  # the layers' trainable parameters at IST's construction

    @property
    def ranked(self) -> bool:
        return bool(self.ranking)

    def bind(self, num_layers: int) -> None:
        super().bind(num_layers)
        self.num_active = resolve_layer_count(self.active_layers, num_layers, "active_layers")
        self.cka_sum = torch.zeros(num_layers, dtype=torch.float64)
        self.cka = torch.full((num_layers,), math.nan, dtype=torch.float64)

    def attach(self, context: PolicyContext) -> None:
        if any(block is None for block in context.layers):
            raise ValueError("policy='cka' measures each block's output, so the layers must be modules (not layer_of=)")
        if any(hasattr(p, "full_tensor") for ps in context.layer_params for p in ps):
            raise ValueError(
                "policy='cka' does not support FSDP2 (fully_shard) parameters: its frozen copy of the layers would be "
                "one rank's shard; rank the layers in a run without sharding and pass FixedLayers(ranking)"
            )
        if not self.ranked and self.frozen is None:
            self.frozen = [[p.detach().to("cpu", copy=True) for p in ps] for ps in context.layer_params]

    def sample_active(self) -> list[int]:
        if self.ranked:
            self.active = sorted(self.ranking[: self.num_active])
        else:
            self.active = list(range(self.num_layers))  # the warm-up trains every layer
        return list(self.active)

    def after_step(self, context: PolicyContext) -> None:
        self.num_steps += 1
        if self.ranked or self.num_steps <= self.warmup_steps - self.num_batches:
            return
        if self.frozen is None:
            raise RuntimeError("CKALayers: the frozen copy of the layers is missing (the policy was never attached)")
        local = rank_local(
            lambda: self._measure(context), "CKALayers' measurement of the warm-up batch"
        )  # before the reduce that waits for all
        values = reduce_probe_losses(local)  # the mean over ranks (bit-identical everywhere); itself when alone
        if bool(torch.isfinite(values).all()):
            self.cka_sum += values
            self.num_measured += 1
        if self.num_steps >= self.warmup_steps:
            self._rank()

    def _rank(self) -> None:
        if self.num_measured == 0:
            raise RuntimeError(
                "CKALayers: no warm-up batch could be measured (no training forward of the model was seen before "
                "step(), or a block was not called); call the model passed to IST in train mode with grad enabled"
            )
        self.cka = self.cka_sum / self.num_measured
        self.ranking = sorted(range(self.num_layers), key=lambda i: (float(self.cka[i]), i))
        self.frozen = None  # no longer needed: free the host copy

    def _measure(self, context: PolicyContext) -> torch.Tensor:
        """``(L,)`` CKA of each block's frozen vs adapted output on the context's batch (NaN: nothing measured)."""
        nan = torch.full((self.num_layers,), math.nan, dtype=torch.float64)
        if context.batch is None:
            warnings.warn(
                "CKALayers: no training batch was seen before step(); this warm-up step is not measured",
                stacklevel=7,  # the user's opt.step(): IST.step, after_step, rank_local, its lambda, here
            )
            return nan
        blocks = context.layers
        inputs: dict[int, tuple[tuple, dict]] = {}
        outputs: dict[int, torch.Tensor] = {}
        frozen_outputs: dict[int, torch.Tensor] = {}

        def record_input(index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs.setdefault(index, (args, kwargs))

        def record_output(index: int, into: dict, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is not None:
                into.setdefault(index, tensor)

        swapped: dict[int, list[torch.Tensor]] = {}

        def frozen_input(index: int, module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if index in frozen_outputs or index in swapped or index not in inputs:
                return None  # a repeated call (shared block): measured at its first call only
            hidden, where = _hidden_state(args, kwargs)
            adapted_hidden, _ = _hidden_state(*inputs[index])
            if hidden is None or adapted_hidden is None:
                return None  # no hidden-state input to replace: this layer stays unmeasured (NaN)
            # .data, not copy_: the trained values go back bit for bit, and no second device copy is made
            swapped[index] = [p.data for p in context.layer_params[index]]
            for p, value in zip(context.layer_params[index], self.frozen[index]):
                p.data = value.to(p.device)
            return _replace_hidden(args, kwargs, where, adapted_hidden)

        def restore(index: int) -> None:
            for p, data in zip(context.layer_params[index], swapped.pop(index, [])):
                p.data = data

        def frozen_output(index: int, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if index in swapped:
                restore(index)
                record_output(index, frozen_outputs, module, args, kwargs, output)

        handles = []
        try:
            for index, block in enumerate(blocks):
                handles.append(
                    block.register_forward_pre_hook(functools.partial(record_input, index), with_kwargs=True)
                )
                handles.append(
                    block.register_forward_hook(functools.partial(record_output, index, outputs), with_kwargs=True)
                )
            context.run(context.batch)
            for handle in handles:
                handle.remove()
            handles = []
            for index, block in enumerate(blocks):
                handles.append(
                    block.register_forward_pre_hook(functools.partial(frozen_input, index), with_kwargs=True)
                )
                handles.append(block.register_forward_hook(functools.partial(frozen_output, index), with_kwargs=True))
            context.run(context.batch)
        finally:
            for handle in handles:
                handle.remove()
            for index in list(swapped):  # an exception mid-forward: the trained values go back all the same
                restore(index)

        kwargs = context.batch[1]
        values = nan.clone()
        for index in range(self.num_layers):
            if index in outputs and index in frozen_outputs:
                values[index] = linear_cka(
                    _token_rows(frozen_outputs[index], kwargs), _token_rows(outputs[index], kwargs)
                )
        return values

    def state_dict(self) -> dict[str, Any]:
        state = {
            **super().state_dict(),
            "num_steps": self.num_steps,
            "num_measured": self.num_measured,
            "cka_sum": self.cka_sum.clone(),
            "ranking": list(self.ranking),
        }
        if self.frozen is not None:
            state["frozen"] = [[t.clone() for t in ts] for ts in self.frozen]
        return state

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().check_state_dict(state_dict)
        _require(state_dict, ("num_steps", "num_measured", "cka_sum", "ranking"), type(self).__name__)
        if tuple(state_dict["cka_sum"].shape) != (self.num_layers,):
            raise ValueError(f"CKALayers state has cka_sum of shape {tuple(state_dict['cka_sum'].shape)}")
        if not state_dict["ranking"] and "frozen" not in state_dict:
            raise ValueError("CKALayers state is from the warm-up but has no frozen copy of the layers")
        frozen = state_dict.get("frozen")
        if frozen is not None and self.frozen is not None:
            shapes = [[tuple(t.shape) for t in ts] for ts in frozen]
            if shapes != [[tuple(t.shape) for t in ts] for ts in self.frozen]:
                raise ValueError("CKALayers state's frozen copy does not match this model's layer parameters")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.num_steps = int(state_dict["num_steps"])
        self.num_measured = int(state_dict["num_measured"])
        self.cka_sum = state_dict["cka_sum"].detach().to("cpu", torch.float64).clone()
        self.ranking = [int(i) for i in state_dict["ranking"]]
        if self.ranking:
            self.cka = self.cka_sum / self.num_measured
            self.frozen = None
        else:
            self.cka = torch.full((self.num_layers,), math.nan, dtype=torch.float64)
            self.frozen = [[t.detach().to("cpu").clone() for t in ts] for ts in state_dict["frozen"]]

    def __repr__(self) -> str:
        return (
            f"CKALayers(active_layers={self.active_layers}, warmup_steps={self.warmup_steps}, "
            f"num_batches={self.num_batches})"
        )


def _as_probe_batch(item: Any, device: torch.device | None) -> ProbeBatch:
    """A calibration batch as ``(args, kwargs)`` (a tuple of arguments allowed), moved to ``device``."""
    args, kwargs = as_probe_batch(item, args_tuple=True, what="LayerwiseCKA: a calibration batch")

    def move(value: Any) -> Any:
        return value.to(device) if isinstance(value, torch.Tensor) and device is not None else value

    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


NO_REAL_TOKEN = "LayerwiseCKA: a calibration row has no token with attention_mask 1"


def _has_row_without_real_token(kwargs: Mapping[str, Any]) -> bool:
    mask = kwargs.get("attention_mask")
    return isinstance(mask, torch.Tensor) and mask.dim() == 2 and bool((mask == 0).all(dim=1).any())


def _feature_rows(hidden: torch.Tensor, kwargs: Mapping[str, Any], tokens: str) -> torch.Tensor:
    """``(n, d)`` rows of a block's hidden state: each sequence's last real token, or every real token."""
    if hidden.dim() < 3:
        return hidden.reshape(-1, hidden.shape[-1])
    if tokens == "all":
        return _token_rows(hidden, kwargs)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(mask.shape) == tuple(hidden.shape[:2]):
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask.bool(), positions, torch.full_like(positions, -1)).amax(dim=1)  # right or left padding
        if bool((last < 0).any()):
            raise ValueError(NO_REAL_TOKEN)
    else:
        last = torch.full((hidden.shape[0],), hidden.shape[1] - 1, dtype=torch.long, device=hidden.device)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]


def _base_rewriting_inits(model: nn.Module) -> list[str]:
    """peft LoRA inits that change the base weights (PiSSA, OLoRA, CorDA, LoftQ, EVA's init keeps them: not listed)."""
    found = []
    for config in getattr(model, "peft_config", {}).values():
        init = getattr(config, "init_lora_weights", True)
        if isinstance(init, str) and init.lower().split("_")[0] in ("pissa", "olora", "corda", "loftq"):
            found.append(init)
        elif getattr(config, "loftq_config", None):
            found.append("loftq")
    return found


class LayerwiseCKA(LayerPolicy):
    """Layer-wise LoRA with CKA (seed ``003``): before training, tune the blocks that change their input most.

    As the paper's released code defines it (github.com/c2d-usp/Layer-wise-LoRA-with-CKA,
    ``select_layers_decoder.py``): the *pretrained* model (every adapter's
    output scaled by 0, :meth:`PolicyContext.pretrained`) runs, no grad and
    eval mode, on the calibration ``batches`` (the paper: the first 128
    training samples, batch 2); each block ``i``'s input ``h_i`` and output
    ``h_{i+1}`` are recorded as the last real token of each sequence
    (``tokens="last"``; the position of the last ``attention_mask`` 1, so
    right and left padding both work) or every real token (``tokens="all"``).
    Block ``i``'s score is ``linear_cka(h_i, h_{i+1})`` over all calibration
    rows; the ``active_layers`` blocks with the *lowest* CKA (the ones that
    transform their input most; ties to the lower index) train at every step,
    the others never (the paper puts LoRA only on them). A float
    ``active_layers`` is ``floor(f * L)`` layers, as the paper's
    ``ratio_of_layers`` (its default 0.5), at least 1.

    Measured once, in :meth:`attach` (IST's construction): call it before
    training, with the adapters as initialised. One difference from the
    released code on HF decoders: its last block's "output" is
    ``hidden_states[-1]``, which transformers returns after the final norm;
    here every block's output is the block's own output. In a data-parallel
    run each rank measures its batches and the CKA values are averaged.

    Refused: peft LoRA inits that rewrite the base weights (PiSSA, OLoRA,
    CorDA, LoftQ), where adapters at 0 are not the pretrained model.

    Args:
        batches: calibration batches, each a dict of model keywords
            (``input_ids``, ``attention_mask``), a tensor, a tuple of
            arguments, or ``(args, kwargs)``; moved to the model's device.
            Padding is found through an ``attention_mask`` keyword only: pass
            padded batches as dicts.
        active_layers: blocks trained (int count, or float fraction floored).
        tokens: ``"last"`` (the paper) or ``"all"``.

    Attributes:
        cka: ``(L,)`` float64 CKA of each block's input and output.
        ranking: blocks from lowest CKA (most changed) to highest.
        num_rows: calibration rows measured.
    """

    def __init__(self, batches: Any, active_layers: int | float = 0.5, *, tokens: str = "last") -> None:
        super().__init__()
        if tokens not in ("last", "all"):
            raise ValueError(f"Invalid tokens: {tokens!r} (expected 'last' or 'all')")
        if batches is None or isinstance(batches, (torch.Tensor, Mapping)):
            batches = [batches] if batches is not None else []
        self.batches = list(batches)
        if not self.batches:
            raise ValueError("LayerwiseCKA needs calibration batches (e.g. the first 128 training samples)")
        self.active_layers = active_layers
        self.tokens = tokens
        self.num_active = 0
        self.num_rows = 0
        self.cka = torch.zeros(0, dtype=torch.float64)
        self.ranking: list[int] = []

    def bind(self, num_layers: int) -> None:
        super().bind(num_layers)
        count = as_int(self.active_layers)
        if count is None and isinstance(self.active_layers, numbers.Real) and not isinstance(self.active_layers, bool):
            fraction = float(self.active_layers)
            if not 0.0 < fraction <= 1.0:
                raise ValueError(f"Invalid active_layers: {fraction} (a float fraction must lie in (0, 1])")
            count = max(1, math.floor(fraction * num_layers))
        self.num_active = resolve_layer_count(
            count if count is not None else self.active_layers, num_layers, "active_layers"
        )
        self.cka = torch.full((num_layers,), math.nan, dtype=torch.float64)

    def attach(self, context: PolicyContext) -> None:
        if any(block is None for block in context.layers):
            raise ValueError(
                "LayerwiseCKA measures each block's input and output, so the layers must be modules (not layer_of=)"
            )
        rewritten = _base_rewriting_inits(context.model)
        if rewritten:
            raise ValueError(
                f"LayerwiseCKA ranks the pretrained model, but this peft model's LoRA init ({rewritten}) rewrote the "
                "base weights, so scaling the adapters by 0 does not give it back; rank the blocks on a model with "
                "LoRA's default init (or before get_peft_model) and pass FixedLayers(ranking[:n])"
            )
        params = [p for ps in context.layer_params for p in ps]
        device = params[0].device if params else None
        # the ranks agree twice: on the batches before any forward (a sharded FSDP2 forward all-gathers, and a rank
        # that stopped before it would leave the others there), and on the measurement before the reduce
        batches = rank_local(lambda: self._checked_batches(device), "LayerwiseCKA's check of the calibration batches")
        local = rank_local(
            lambda: self._measure(context, batches), "LayerwiseCKA's measurement of the calibration batches"
        )
        self.cka = reduce_probe_losses(local)  # the mean over ranks; itself when alone
        self.ranking = sorted(range(self.num_layers), key=lambda i: (float(self.cka[i]), i))

    def _checked_batches(self, device: torch.device | None) -> list[ProbeBatch]:
        """The calibration batches as ``(args, kwargs)`` on ``device``, each checked."""
        batches = [_as_probe_batch(item, device) for item in self.batches]
        if self.tokens == "last" and any(_has_row_without_real_token(kwargs) for _, kwargs in batches):
            raise ValueError(NO_REAL_TOKEN)
        return batches

    def _measure(self, context: PolicyContext, batches: list[ProbeBatch]) -> torch.Tensor:
        """This rank's CKA of each pretrained block's input and output on the calibration batches."""
        inputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(self.num_layers)}
        outputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(self.num_layers)}
        seen: set[tuple[str, int]] = set()
        kwargs_now: dict[str, Any] = {}

        def record_input(index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden, _ = _hidden_state(args, kwargs)
            if hidden is not None and ("in", index) not in seen:  # a shared block: its first call
                seen.add(("in", index))
                inputs[index].append(_feature_rows(hidden, kwargs_now, self.tokens).to("cpu", torch.float64))

        def record_output(index: int, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            hidden = _first_tensor(output)
            if hidden is not None and ("out", index) not in seen:
                seen.add(("out", index))
                outputs[index].append(_feature_rows(hidden, kwargs_now, self.tokens).to("cpu", torch.float64))

        handles = []
        try:
            for index, block in enumerate(context.layers):
                handles.append(
                    block.register_forward_pre_hook(functools.partial(record_input, index), with_kwargs=True)
                )
                handles.append(block.register_forward_hook(functools.partial(record_output, index), with_kwargs=True))
            with context.pretrained():
                for batch in batches:
                    seen.clear()
                    kwargs_now.clear()
                    kwargs_now.update(batch[1])
                    context.run(batch)
        finally:
            for handle in handles:
                handle.remove()
        missing = [context.layer_names[i] for i in range(self.num_layers) if not inputs[i] or not outputs[i]]
        if missing:
            raise ValueError(f"LayerwiseCKA: no hidden-state input or output was seen for {missing[:4]}")
        self.num_rows = int(sum(t.shape[0] for t in inputs[0]))
        return torch.stack([linear_cka(torch.cat(inputs[i]), torch.cat(outputs[i])) for i in range(self.num_layers)])

    def sample_active(self) -> list[int]:
        if not self.ranking:
            raise RuntimeError("LayerwiseCKA was never attached (IST measures it at construction)")
        self.active = sorted(self.ranking[: self.num_active])
        return list(self.active)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "cka": self.cka.clone(), "ranking": list(self.ranking)}

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().check_state_dict(state_dict)
        _require(state_dict, ("cka", "ranking"), type(self).__name__)
        if sorted(int(i) for i in state_dict["ranking"]) != list(range(self.num_layers)):
            raise ValueError(f"LayerwiseCKA state has a ranking that is no order of {self.num_layers} layers")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.cka = state_dict["cka"].detach().to("cpu", torch.float64).clone()
        self.ranking = [int(i) for i in state_dict["ranking"]]

    def __repr__(self) -> str:
        return (
            f"LayerwiseCKA(<{len(self.batches)} batches>, active_layers={self.active_layers}, tokens={self.tokens!r})"
        )
