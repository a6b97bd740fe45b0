r"""Can layer choice matter here? A per-layer signal estimate and the bound it puts on any selection rule.

:meth:`IST.importance_report <ist_optim.IST.importance_report>` splits one
batch into two halves by rows (by default the inputs of the last training
forward IST captured, the batch its probes use), computes for each half the
gradients of every layer's LoRA ``B`` matrices (peft's ``lora_B``) with *all*
layers enabled, whatever the current sparse selection, and estimates each
layer's signal by the two-batch product (McCandlish et al., arXiv 1812.06162)

.. math::

    G_l = \langle g_l^{(1)}, g_l^{(2)} \rangle,

an unbiased estimate of :math:`\|\mathbb{E}\, g_l\|^2` for independent halves:
the noise that makes every layer's :math:`\|g_l\|^2` look alike cancels in
expectation. ``B``, not ``A``: the gradient of ``A`` is ``B``-transposed
times the upstream gradient, so it is zero at init (``B = 0``) and grows with
``||B||``, which would rank the layers by how much they were trained already.
For other adapters (bottleneck adapters, DoRA without ``lora_B``, full-layer
mode) every trainable parameter of the layer is used, and the report says so.
With ``groups=m > 2`` the batch is cut into ``m`` parts and ``G_l`` is the mean
of the ``m(m-1)/2`` pairwise products (the same estimator, less variance).

**Heterogeneity.** With :math:`G_l^+ = \max(G_l, 0)`,

.. math::

    \rho = \frac{(\sum_l \sqrt{G_l^+})^2}{N \sum_l G_l^+} \in [1/N, 1],

1 when every layer's signal is the same, :math:`1/N` when one layer holds it all.

**The bound.** Training a random subset :math:`S` of the ``N`` layers, each
included with probability :math:`\pi_l` (:math:`\sum_l \pi_l = k`), the
unbiased sparse estimate :math:`\sum_{l \in S} g_l / \pi_l` of the full
gradient has second moment :math:`\sum_l \|g_l\|^2 / \pi_l`. Taking the
layers' signals :math:`G_l` for :math:`\|g_l\|^2`, uniform choice
(:math:`\pi_l = k/N`) gives :math:`(N/k) \sum_l G_l`; the minimum over all
:math:`\pi` (:math:`\pi_l \propto \sqrt{G_l}`, by Cauchy-Schwarz; the cap
:math:`\pi_l \le 1` can only raise it) is :math:`(\sum_l \sqrt{G_l})^2 / k`.
Their ratio is :math:`\rho` for every ``k``: the optimal importance
sampling has at least :math:`\rho` times uniform's second moment, so

.. math::

    \text{gain} \le 1 - \rho

is the largest fraction of gradient variance that *any* importance rule
(IST's bandit, gradient norms, CKA, ...) can remove against uniform choice
(for one layer, ``k = 1``, this is the variance ratio of optimal versus
uniform importance sampling of Katharopoulos and Fleuret, arXiv 1803.00942;
Stich et al., NeurIPS 2017, make adaptive sampling provably no worse than
uniform, so ``1 - rho`` is also all a safe rule can hope to win).

**The threshold.** Katharopoulos and Fleuret switch importance sampling on
only when its predicted variance reduction pays for its extra cost: a
reduction of the second moment by the factor ``rho`` is worth at most
``1 / rho`` times the batch, so a rule that costs ``c`` more time per step
can pay only when ``1 / rho > 1 + c``. IST's probe rounds cost about 21%
over random choice on the main job (1.32x on a held-out 6-label task), and
``1 / 1.25 = 0.8``: at ``rho >= 0.8`` (default ``threshold``) no importance
rule costing a quarter more per step can gain, and the report calls uniform
choice near-optimal.

**Caveats.** ``G_l`` from one batch is noisy (its standard deviation is of
the order of the per-half ``||g_l||^2`` when the signal is weak); clipping
negative estimates at 0 then makes the signal look *more* concentrated than
it is, so a small ``rho`` with a small ``signal_share`` (``sum G / sum
||g||^2``) is weak evidence: the sentence says so below a share of 0.2, and
calls a batch whose products sum to ``<= 0`` one with no measurable signal
at all. Pass a larger ``batch=`` (or ``groups=4``) for a firmer estimate. ``rho`` bounds the
variance of the gradient estimate, not accuracy; it says when layer choice
*cannot* matter, not that it will.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterator

import torch

from .distributed import is_distributed, reduce_probe_losses, unwrap_model
from .hooks import _set_flag
from .probes import ProbeBatch, _batch_size, _loss_of, _map_rows, as_probe_batch, eval_mode

if TYPE_CHECKING:  # pragma: no cover
    from .optimizer import IST

__all__ = ["ImportanceReport", "heterogeneity", "gain_bound", "importance_report", "DEFAULT_THRESHOLD"]

DEFAULT_THRESHOLD = 0.8  # 1 / 1.25: see the module docstring
# Below this share of signal in the measured ||g||^2 the sentence calls the estimate noisy: the products'
# spread is then of the order of the signal itself (negative ones are clipped, which makes rho look small).
NOISY_SHARE = 0.2
B_MARKERS = ("lora_B.", "lora_embedding_B.")  # peft's LoRA B (Linear/Conv and Embedding)


def heterogeneity(signal: Sequence[float] | torch.Tensor) -> float | None:
    """``rho = (sum_l sqrt(G_l+))^2 / (N sum_l G_l+)`` of the clipped signals; ``None`` when none is positive."""
    g = torch.as_tensor(signal, dtype=torch.float64).clamp(min=0)
    total = float(g.sum())
    if not total > 0:
        return None
    return float(g.sqrt().sum() ** 2 / (g.numel() * total))


def gain_bound(rho: float | None) -> float | None:
    """``1 - rho``: the largest fraction of gradient variance any importance rule can remove against uniform."""
    return None if rho is None else max(0.0, 1.0 - rho)


@dataclass
class ImportanceReport:
    """What :meth:`IST.importance_report` measured; ``str()`` prints a table, :meth:`to_dict` is JSON-ready.

    Attributes:
        layer_names: the ``N`` layers.
        signal: ``G_l``, the two-batch products (unclipped; may be negative).
        noise: mean over the batch parts of ``||g_l||^2`` (signal plus noise).
        rho: heterogeneity of the clipped signals, ``None`` when none is positive.
        gain_bound: ``1 - rho``: at most this fraction less gradient variance than uniform from any rule.
        signal_share: ``sum G / sum ||g||^2``: how much of the measured gradient is signal (1 = noiseless).
        top_layers: the fewest layers holding at least half of the clipped signal, largest first.
        near_uniform: ``rho >= threshold``; ``None`` without signal.
        threshold: the ``rho`` above which uniform choice is called near-optimal.
        sentence: the verdict in words.
        batch_rows: rows in each part of the batch.
        params: which gradients were measured (``"lora_B"`` or the fallback, with why).
        world_size: ranks whose products were averaged (1 without ``torch.distributed``).
    """

    layer_names: list[str]
    signal: list[float]
    noise: list[float]
    rho: float | None
    gain_bound: float | None
    signal_share: float | None
    top_layers: list[int]
    near_uniform: bool | None
    threshold: float
    sentence: str
    batch_rows: list[int]
    params: str
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # plain floats, lists, strings: json.dumps(report.to_dict())

    def __str__(self) -> str:
        rows = "+".join(str(r) for r in self.batch_rows)
        rho = "-" if self.rho is None else f"{self.rho:.3f}"
        gain = "-" if self.gain_bound is None else f"{self.gain_bound:.3f}"
        share = "-" if self.signal_share is None else f"{self.signal_share:.3f}"
        lines = [
            f"importance report: rho {rho}, gain bound {gain}, signal share {share}, batch rows {rows}, "
            f"gradients of {self.params}" + (f", {self.world_size} ranks" if self.world_size > 1 else ""),
            self.sentence,
        ]
        total = sum(max(g, 0.0) for g in self.signal)
        width = max([5, *(len(n) for n in self.layer_names)])
        lines.append(f"  {'#':>3s} {'layer':{width}s} {'G (signal)':>11s} {'||g||^2':>11s} {'share':>6s}")
        for i, (name, g, n) in enumerate(zip(self.layer_names, self.signal, self.noise)):
            part = max(g, 0.0) / total if total > 0 else 0.0
            mark = " *" if i in self.top_layers else ""
            lines.append(f"  {i:3d} {name:{width}s} {g:11.3e} {n:11.3e} {part:6.1%}{mark}")
        if self.top_layers:
            lines.append("  * the fewest layers holding half of the signal")
        return "\n".join(lines)


def _split(value: Any, rows: int, parts: int) -> list[Any]:
    bounds = [round(rows * j / parts) for j in range(parts + 1)]
    return [_map_rows(value, lambda t, a=a, b=b: t[a:b], rows) for a, b in zip(bounds, bounds[1:])]


def _measured_params(opt: IST) -> tuple[list[list[torch.Tensor]], str]:
    """Each layer's ``lora_B`` parameters IST trains (not user-frozen), or all of them where there are none."""
    names = {id(p): n for n, p in unwrap_model(opt.model).named_parameters()}
    frozen = {id(p) for p in opt.hooks.user_frozen}
    layers = [[p for p in params if id(p) not in frozen] for params in opt.layer_map.params]
    b_only = [[p for p in params if any(m in names.get(id(p), "") for m in B_MARKERS)] for params in layers]
    if all(b_only):
        return b_only, "lora_B"
    without = sum(1 for b in b_only if not b)
    return layers, (
        f"all trainable parameters of each layer ({without} of {len(layers)} layers have no peft lora_B: "
        "other adapters or full-layer mode)"
    )


@contextmanager
def _undisturbed(opt: IST, params: list[torch.Tensor], train_mode: bool) -> Iterator[None]:
    """Hooks idle, ``params`` trainable, (eval mode), grad on; flags, modes and RNG exactly restored after."""
    model = unwrap_model(opt.model)
    flags = [(p, p.requires_grad) for p in params]
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    modes = [(m, m.training) for m in model.modules()]
    with opt._hooks_paused(), torch.enable_grad():  # no capture, no backward cut, no flags re-applied
        try:
            for p, _ in flags:
                _set_flag(p, True)  # IST's own write: the hooks do not take it for the user's
            if train_mode:
                yield
            else:
                with eval_mode(model):
                    yield
        finally:
            for p, flag in flags:
                _set_flag(p, flag)
            for m, training in modes:
                m.training = training
            torch.random.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)


def _layer_products(
    opt: IST, layers: list[list[torch.Tensor]], parts: list[ProbeBatch], extras: list[dict[str, Any]], train_mode: bool
) -> torch.Tensor:
    """``(2, N)`` float64: the mean pairwise product of the parts' gradients and the mean ``||g||^2``, per layer."""
    model = unwrap_model(opt.model)
    flat = [p for params in layers for p in params]
    sums = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in flat]
    squares = torch.zeros(len(layers), dtype=torch.float64)
    loss_fn = opt.loss_fn
    with _undisturbed(opt, flat, train_mode):
        for (args, kwargs), extra in zip(parts, extras):
            output = model(*args, **kwargs)
            if extra:
                if loss_fn is None:
                    raise ValueError("loss_inputs are passed to IST's loss_fn, and this IST has none")
                loss = loss_fn(output, *args, **kwargs, **extra)
            else:
                loss = _loss_of(output, (args, kwargs), loss_fn)
            try:
                grads = torch.autograd.grad(loss, flat, allow_unused=True)
            except RuntimeError as error:
                if "checkpoint" in str(error):
                    raise RuntimeError(
                        "importance_report takes the layers' gradients with torch.autograd.grad, which reentrant "
                        "gradient checkpointing does not support; use non-reentrant checkpointing "
                        "(gradient_checkpointing_kwargs={'use_reentrant': False}) or turn it off for the report"
                    ) from error
                raise
            i = 0
            for layer, params in enumerate(layers):
                for _ in params:
                    grad = grads[i]
                    if grad is not None:
                        grad = grad.detach().to(torch.float64)
                        sums[i] += grad
                        squares[layer] += float((grad * grad).sum())
                    i += 1
    m = len(parts)
    total = torch.zeros(len(layers), dtype=torch.float64)
    i = 0
    for layer, params in enumerate(layers):
        for _ in params:
            total[layer] += float((sums[i] * sums[i]).sum())
            i += 1
    # sum_{j<k} <g_j, g_k> = (||sum_j g_j||^2 - sum_j ||g_j||^2) / 2, over m(m-1)/2 pairs
    products = (total - squares) / (m * (m - 1))
    return torch.stack([products, squares / m])


def _sentence(
    rho: float | None,
    gain: float | None,
    top: list[int],
    names: list[str],
    threshold: float,
    below: int,
    n: int,
    rows: int,
    share: float | None,
) -> tuple[str, bool | None]:
    if rho is None or share is None or share <= 0:
        what = "every layer's two-batch product G <= 0" if rho is None else "the layers' products G sum to <= 0"
        return (
            f"no measurable signal: {what} (batch too small or too noisy: {rows} rows); pass a larger batch= "
            "to tell whether layer choice can matter",
            None,
        )
    notes = []
    if below:
        notes.append(f"{below} of {n} layers measured G <= 0: below the noise of this batch")
    if share < NOISY_SHARE:
        notes.append(f"signal is {share:.0%} of ||g||^2: a noisy estimate, a larger batch= firms it up")
    note = f" ({'; '.join(notes)})" if notes else ""
    if rho >= threshold:
        return (
            f"rho = {rho:.2f}: the layers' signals are nearly equal; uniform layer choice is near-optimal here "
            f"(at most {gain:.0%} less gradient variance from any importance rule){note}",
            True,
        )
    shown = ", ".join(f"{i} ({names[i]})" for i in top[:6]) + (", ..." if len(top) > 6 else "")
    return (
        f"rho = {rho:.2f}: signal concentrated in layers [{shown}]; importance-aware choice can pay "
        f"(up to {gain:.0%} less gradient variance than uniform){note}",
        False,
    )


def _top_layers(signal: torch.Tensor) -> list[int]:
    g = signal.clamp(min=0)
    total = float(g.sum())
    if not total > 0:
        return []
    top, held = [], 0.0
    for i in torch.argsort(g, descending=True, stable=True).tolist():
        top.append(i)
        held += float(g[i])
        if held >= 0.5 * total:
            break
    return top


def _local_products(
    opt: IST,
    layers: list[list[torch.Tensor]],
    batch: Any,
    loss_inputs: Mapping[str, Any] | None,
    groups: int,
    train_mode: bool,
) -> tuple[int, torch.Tensor]:
    """This rank's rows and ``(2, N)`` products, from ``batch`` or the captured one."""
    if batch is None:
        captured = opt.hooks.probe_batch
        if captured is None:
            raise RuntimeError(
                "importance_report: no batch captured yet; call it after a training step (a forward of the model in "
                "train mode with grad enabled), or pass batch="
            )
        batch = captured
        if loss_inputs is None:
            paired = getattr(opt, "_report_loss_inputs", None)  # what set_loss_inputs gave that batch's step
            if paired is not None and paired[0] is captured:
                loss_inputs = paired[1]
    batch = as_probe_batch(batch)
    loss_inputs = dict(loss_inputs or {})
    rows = _batch_size((batch[0], {**batch[1], **loss_inputs}))
    if rows < groups:
        raise ValueError(
            f"importance_report needs >= {groups} rows to split the batch into {groups} parts (two independent "
            f"gradient estimates at least), but the batch has {rows}; pass a larger batch="
        )
    parts = _split(batch, rows, groups)
    extras = _split(loss_inputs, rows, groups) if loss_inputs else [{}] * groups
    return rows, _layer_products(opt, layers, parts, extras, train_mode)


def importance_report(
    opt: IST,
    batch: Any = None,
    *,
    loss_inputs: Mapping[str, Any] | None = None,
    groups: int = 2,
    threshold: float = DEFAULT_THRESHOLD,
    train_mode: bool = False,
) -> ImportanceReport:
    """The report of :meth:`IST.importance_report` (see the module docstring for what it estimates)."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 2:
        raise ValueError(f"Invalid groups: {groups!r} (need an int >= 2: two halves at least)")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"Invalid threshold: {threshold!r} (rho lies in [1/N, 1])")
    if opt.hooks.removed:
        raise RuntimeError("this IST optimizer's hooks were removed; build a new one to report on the model")
    if any(hasattr(p, "full_tensor") for params in opt.layer_map.params for p in params):
        raise NotImplementedError("importance_report does not support sharded (FSDP2 DTensor) parameters")
    layers, params = _measured_params(opt)
    names = list(opt.layer_names)
    world, rows, failure = 1, 0, None
    try:
        rows, local = _local_products(opt, layers, batch, loss_inputs, groups, train_mode)
    except (RuntimeError, ValueError, TypeError) as error:
        if not is_distributed():
            raise
        failure = error  # every rank must still join the reduction below, or the others hang
        local = torch.full((2, len(names)), math.nan, dtype=torch.float64)
    if is_distributed():  # the mean over ranks of each rank's products: the same report everywhere
        import torch.distributed as dist

        local = reduce_probe_losses(local)
        world = dist.get_world_size()
        if failure is not None:
            raise failure
        if bool(local.isnan().any()):
            raise RuntimeError("importance_report failed on another rank (no captured batch, or too few rows there)")
    signal, noise = local[0], local[1]
    rho = heterogeneity(signal)
    gain = gain_bound(rho)
    noise_total = float(noise.sum())
    share = float(signal.sum()) / noise_total if noise_total > 0 else None
    top = _top_layers(signal)
    names = list(opt.layer_names)
    below = int((signal <= 0).sum())
    sentence, near = _sentence(rho, gain, top, names, float(threshold), below, len(names), rows, share)
    bounds = [round(rows * j / groups) for j in range(groups + 1)]  # this rank's parts
    return ImportanceReport(
        layer_names=names,
        signal=[float(v) for v in signal],
        noise=[float(v) for v in noise],
        rho=rho,
        gain_bound=gain,
        signal_share=share if share is None or math.isfinite(share) else None,
        top_layers=top,
        near_uniform=near,
        threshold=float(threshold),
        sentence=sentence,
        batch_rows=[b - a for a, b in zip(bounds, bounds[1:])],
        params=params,
        world_size=world,
    )
