"""``IST`` and ``ISTAdamW``: Importance-aware Sparse Tuning as a drop-in optimizer.

Each step only the adapters of ``N_u`` layers train; every ``T_c`` steps a few
no-grad probe passes with the other layers' adapters suppressed update the
per-layer importance that the next selections are drawn from (Yao et al.
2024, arXiv 2410.11772).

How a step flows:

1. before every forward, the model hooks (:mod:`ist_optim.hooks`) set
   ``requires_grad`` on the adapters: on for the layers selected for this
   step, off for the rest, so the rest build no graph and get no gradient;
   the lowest selected block cuts backward below itself; the batch is kept
   as the probe input;
2. ``step()`` drops any stale gradient of unselected layers (so AdamW takes no
   step, no weight decay, no momentum for them) and steps the wrapped optimizer;
3. every ``probe_interval`` steps it runs the probe passes
   (:mod:`ist_optim.probes`) and updates importance (:mod:`ist_optim.scheduler`);
4. it draws the layers for the next step and evicts the optimizer state of
   the layers leaving the selection (:mod:`ist_optim.eviction`). Selection
   changes only here, so every micro-batch of an accumulated step trains the
   same layers.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim import optimizer as torch_optimizer

from .distributed import (
    DistributedSupport,
    check_distributed_model,
    is_distributed,
    reduce_probe_losses,
    shared_seed,
    unwrap_model,
)
from .diagnostics import DEFAULT_THRESHOLD, ImportanceReport
from .diagnostics import importance_report as _importance_report
from .eviction import STATE_POLICIES, StateEvictor
from .hooks import ModelHooks, detach_existing_hooks
from .kernels import use_triton
from .layers import LayerMap, discover_layers
from .probes import (
    PROBE_MODES,
    LossFn,
    ProbeLossMissing,
    check_probe_rows,
    has_loss_field,
    hf_causal_lm_loss,
    probe_losses,
    take_rows,
)
from .policies import (
    CKALayers,
    GradNormLayers,
    LayerPolicy,
    LISALayers,
    PolicyContext,
    SafeImportance,
    SpreadLayers,
    layer_grad_norms,
)
from .scheduler import REWARDS, RULES, ImportanceScheduler, as_int, check_seed
from .suppression import KERNEL_CHOICES, BlockResidual, find_adapter_modules, suppress

__all__ = ["IST", "ISTAdamW"]

_STATE_KEY = "ist"  # namespace of the wrapper's own state in state_dict()


class IST(Optimizer):
    r"""Wrap any torch optimizer so it does Importance-aware Sparse Tuning.

    ``IST`` is a :class:`torch.optim.Optimizer` only so that LR schedulers,
    ``GradScaler``, accelerate and HF ``Trainer`` accept it; it shares the
    wrapped optimizer's ``param_groups`` list and ``state`` and delegates the
    parameter update to it.

    Args:
        optimizer: an already-built optimizer whose params include the adapters.
        model: the model those params belong to; its forward gets a pre-hook.
        active_layers: ``N_u``, layers trained per step: int count, or float
            fraction of the ``L`` layers (``1.0`` = all). Default 0.25.
        probe_layers: ``N_v``, layers per probe candidate (int or fraction).
            Default 0.5.
        num_probes: ``N_c``, candidates per importance update; 0 disables the
            importance loop. Default 3.
        probe_interval: ``T_c``, optimizer steps between importance updates; 0
            disables the loop. Default 10.
        suppression: ``beta`` in ``[0, 1]``, the fraction of a suppressed
            adapter's output kept in probes. Default 0.25.
        importance_lr: ``mu`` >= 0. Default 10.0 (paper: 10 commonsense, 100 math).
        rule: ``"reference"`` (the authors' released code, default) or
            ``"paper"``; see :mod:`ist_optim.scheduler`.
        reward: ``"difference"`` (default: ``exp(-L_j) - mean exp(-L)``, as
            the paper and the reference code) or ``"standardized"`` (that
            divided by its std over the round's candidates, so
            ``importance_lr`` alone sets how far one update moves importance;
            meant for few suppressed layers per candidate, e.g.
            ``probe_layers=1``); see :mod:`ist_optim.scheduler`.
        probe_mode: ``"sequential"`` (default) or ``"batched"``; see
            :mod:`ist_optim.probes`.
        probe_rows: how much of the captured batch a probe round runs on: an
            int count of rows, or a float fraction of the batch's rows
            (``max(1, round(f * rows))``); default ``1.0``, every row (the
            paper's and the reference code's probe). The *first* rows are
            taken (a shuffled loader makes them a random subset); an int larger
            than a batch takes all of it. Every tensor of the captured forward's
            inputs and of :meth:`set_loss_inputs` whose dim 0 is the batch size
            (dim 0 of the first tensor argument) is cut alike, so the batch
            must be on dim 0, as for ``probe_mode="batched"`` (which then
            stacks the candidates' copies of the cut rows). A probe round costs
            about ``probe_rows / rows`` of a full one; the reward is then
            measured on fewer rows (noisier). In a distributed run each rank
            probes the first rows of its own batch (a count is per rank) and
            the losses are averaged over ranks as before.
        kernels: for the probe passes: ``"auto"`` (default: the torch path everywhere, until the
            Triton kernels have passed ``bench/gpu_check.py`` on a real GPU), ``"triton"`` (the fused
            in-place kernel for peft LoRA ``Linear`` adapters on CUDA) or ``"torch"``; see
            :mod:`ist_optim.kernels`.
        loss_fn: ``loss_fn(output, *args, **kwargs) -> scalar`` for probes,
            called with the model output and the captured forward inputs, plus
            as keywords what :meth:`set_loss_inputs` registered for the step
            (e.g. labels that are not forward inputs); default ``output.loss``
            (HF models called with ``labels``).
        layers: the blocks, overriding discovery (``nn.ModuleList`` or list).
        layer_of: ``param name -> layer index or None``, overriding discovery
            (the layers then are no modules: no backward cut, no selective checkpointing).
        state_policy: ``"keep"``, ``"offload"`` or ``"drop"`` the optimizer state
            of layers not being trained (see :mod:`ist_optim.eviction`);
            ``"auto"`` (default) keeps, on CPU (host memory is device memory) and on CUDA
            too until offloading has passed ``bench/gpu_check.py`` on a real GPU.
        backward_cut: stop backward at the lowest selected block (exact, see
            :mod:`ist_optim.hooks`); default ``None`` = on unless ``layer_of`` is used.
        checkpoint_unselected: recompute unselected blocks above the lowest
            selected one in backward instead of storing their activations
            (default ``False``; less memory for one extra forward through them).
        seed: seed of the scheduler's generator. Default ``None``: ``torch.initial_seed()``
            (what ``torch.manual_seed`` set), so runs seeded differently draw different layers;
            in a distributed run rank 0's, broadcast once here (launchers often seed ranks apart).
        policy: how the layers are chosen: ``"ist"`` (the importance bandit,
            default), ``"random"`` (uniform without replacement, as LISA and the
            paper's random sparse tuning, a new draw every step; no probes),
            ``"lisa"`` (:class:`~ist_optim.LISALayers`: LISA's uniform draw of
            ``active_layers`` layers, switched every 20 steps as in LMFlow),
            ``"spread"`` (:class:`~ist_optim.SpreadLayers`: ``"random"``'s marginals,
            each step's layers spread evenly through depth; no probes),
            ``"safe"`` (:class:`~ist_optim.SafeImportance` with its defaults:
            ``||grad B||`` importance mixed with uniform, a per-layer floor and
            forced coverage; no probes), ``"cka"``
            (:class:`~ist_optim.CKALayers` with its defaults: rank the layers by
            CKA after a 20-step warm-up, then train the top ``active_layers``; the
            seed paper's own rule, CKA of each pretrained block's input and output
            before training, is :class:`~ist_optim.LayerwiseCKA`, which needs
            calibration batches and so has no name),
            ``"gradnorm"`` (:class:`~ist_optim.GradNormLayers` with its defaults:
            GRASS-style gradient-norm sampling of ``active_layers`` layers, seeded
            with ``seed``), or a :class:`~ist_optim.policies.LayerPolicy`
            (:class:`~ist_optim.FixedLayers`, :class:`~ist_optim.WeightedLayers`,
            the two above with other settings, your own), which then decides how
            many layers train (``active_layers`` applies to the named policies
            only; the probe options to ``"ist"`` and to policies whose ``uses_probes``
            is true). See :mod:`ist_optim.policies`.
        outside_layers: what happens to the optimizer's parameters outside every
            layer (embeddings, final norm, LM head in full-layer mode; a classifier
            head next to adapters): ``"train"`` (default: they train every step,
            as in LISA) or ``"freeze"`` (``requires_grad`` off from construction
            until :meth:`remove_hooks`, so they get no gradient, no update and no
            optimizer state, and the backward cut is not held back by them).
        check_consistency: in a distributed run, compare a hash of the selection, importance and
            generator state across ranks after every step and raise on disagreement (it is always
            compared after the first step); default ``None`` = the
            ``IST_CHECK_CONSISTENCY`` environment variable. See :mod:`ist_optim.distributed`.

    Attributes:
        optimizer: the wrapped optimizer.
        scheduler: the selection policy, a :class:`~ist_optim.policies.LayerPolicy` (the
            :class:`~ist_optim.ImportanceScheduler` for ``"ist"`` and ``"random"``).
        layer_names: qualified names of the ``L`` layers.
        active_layers: sorted indices of the layers trained in the current step.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        model: nn.Module,
        *,
        active_layers: int | float = 0.25,
        probe_layers: int | float = 0.5,
        num_probes: int = 3,
        probe_interval: int = 10,
        suppression: float = 0.25,
        importance_lr: float = 10.0,
        rule: str = "reference",
        reward: str = "difference",
        probe_mode: str = "sequential",
        probe_rows: int | float = 1.0,
        kernels: str = "auto",
        loss_fn: LossFn | None = None,
        layers: nn.ModuleList | Sequence[nn.Module] | None = None,
        layer_of: Callable[[str], int | None] | None = None,
        state_policy: str = "auto",
        backward_cut: bool | None = None,
        checkpoint_unselected: bool = False,
        seed: int | None = None,
        check_consistency: bool | None = None,
        policy: str | LayerPolicy = "ist",
        outside_layers: str = "train",
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, but got {type(optimizer).__name__}")
        if isinstance(optimizer, IST):
            raise TypeError("optimizer is already an IST wrapper; wrap the inner optimizer once")
        _check_model(model)
        check_distributed_model(model)  # DDP/FSDP1 settings IST cannot train under
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, but got {type(loss_fn).__name__}")
        # IST's options, named once here (as torch optimizers build ``defaults``), checked and normalised once
        options, probes_enabled = _validated_options(
            dict(
                policy=policy,
                active_layers=active_layers,
                probe_layers=probe_layers,
                num_probes=num_probes,
                probe_interval=probe_interval,
                suppression=suppression,
                importance_lr=importance_lr,
                rule=rule,
                reward=reward,
                probe_mode=probe_mode,
                probe_rows=probe_rows,
                kernels=kernels,
                state_policy=state_policy,
                backward_cut=backward_cut,
                checkpoint_unselected=checkpoint_unselected,
                seed=seed,
                check_consistency=check_consistency,
                outside_layers=outside_layers,
            )
        )
        if options["seed"] is None:  # rank 0's torch.initial_seed(), broadcast once in a distributed run
            options["seed"] = shared_seed(torch.initial_seed())
        probe_mode, kernels = options["probe_mode"], options["kernels"]
        inner = unwrap_model(model)  # the module inside a DDP wrapper
        if probes_enabled and probe_mode == "batched" and loss_fn is None and hf_causal_lm_loss(inner) is None:
            raise ValueError(
                "probe_mode='batched' needs per-candidate losses: pass loss_fn=(output, *args, **kwargs) -> scalar, "
                "or use an HF causal LM (its loss_function is applied per candidate), or probe_mode='sequential'"
            )

        # An earlier IST's hooks (a re-run notebook cell, a deleted optimizer, a
        # deep-copied model) would fight over requires_grad and have frozen
        # adapters this one must see as trainable: replace them.
        _replace_earlier_hooks(model)
        # Only parameters trainable now are ever toggled: frozen weights in the
        # optimizer (e.g. model.parameters() of a peft model) stay frozen.
        optimizer_params = [p for group in optimizer.param_groups for p in group["params"]]
        trainable = [p for p in optimizer_params if p.requires_grad]
        if not trainable:
            raise ValueError(
                "none of the optimizer's parameters requires grad; add adapters (e.g. peft.get_peft_model) "
                "before building the optimizer"
            )
        self.layer_map: LayerMap = discover_layers(inner, trainable, layers=layers, layer_of=layer_of)
        # one interface for every policy, the bandit ("ist", "random") included
        self.scheduler: LayerPolicy = (
            policy if isinstance(policy, LayerPolicy) else _named_policy(options, len(self.layer_map))
        )
        self.scheduler.bind(len(self.layer_map))
        _check_inner_optimizer(optimizer, self.scheduler)
        self.probes_enabled = probes_enabled
        self.adapters = _probe_targets(model, self.layer_map, probes_enabled, kernels)

        # Optimizer.__init__ sets up the hook registries and the step patch;
        # the empty group is replaced by the shared list right after.
        super().__init__([{"params": []}], {})
        self.optimizer = optimizer
        self.defaults = optimizer.defaults
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.model = model
        # GradScaler hands grad_scale/found_inf to optimizers that unscale in their step (fused AdamW).
        self._step_supports_amp_scaling = getattr(optimizer, "_step_supports_amp_scaling", False)
        self._inner_takes_closure = _step_takes_closure(optimizer)
        self.options = options  # validated and normalised once (_validated_options), saved with every checkpoint
        state_policy = options["state_policy"]
        self.loss_fn = loss_fn
        self._loss_inputs: dict[str, Any] = {}  # set_loss_inputs(), for the coming step's probes
        self.num_steps = 0
        self.num_probe_updates_missed = 0  # probe rounds with no batch, or no loss, to probe with
        self.evictor = StateEvictor(optimizer, self.layer_map.params, state_policy)
        # Frozen outside parameters: the hooks keep them off and restore them with the layers' flags.
        self._frozen_outside = list(self.layer_map.other_params) if outside_layers == "freeze" else []
        for p in self._frozen_outside:
            optimizer.state.pop(p, None)  # no optimizer state for what never trains
        self.hooks = ModelHooks(
            model,
            self.layer_map,
            owner=self,
            backward_cut=backward_cut,
            checkpoint_unselected=checkpoint_unselected,
            frozen=self._frozen_outside,
        )
        if self.probes_enabled and loss_fn is None:
            self.hooks.output_check = _require_loss_field
        self.options["backward_cut"] = self.hooks.backward_cut  # None resolved
        try:
            self.scheduler.attach(self._policy_context())
        except BaseException:
            self.hooks.remove()  # a policy refusing the model (a bad calibration batch) leaves it as it was
            raise
        self._set_selection(self.scheduler.sample_active())
        self.distributed = DistributedSupport(self, check_consistency)
        _remove_hooks_when_collected(self)

    # ------------------------------------------------------------------ selection
    @property
    def layer_names(self) -> list[str]:
        return list(self.layer_map.names)

    @property
    def active_layers(self) -> list[int]:
        return list(self.scheduler.active)

    def _policy_context(self) -> PolicyContext:
        """What a policy may look at, built per call (a policy must not keep it: see :mod:`ist_optim.policies`)."""
        return PolicyContext(
            model=unwrap_model(self.model),
            layers=list(self.layer_map.modules),
            layer_params=self.layer_map.params,
            layer_names=self.layer_names,
            num_steps=self.num_steps,
            seed=self.options["seed"],
            batch=self.hooks.probe_batch,
            _pause_hooks=self._hooks_paused,
            _adapters_off=self._adapters_off,
        )

    def _adapters_off(self) -> Any:
        """Every adapter module in the layers returns its base layer's output (beta = 0)."""
        adapters = find_adapter_modules(self.model, self.layer_map.params)  # never BlockResidual: blocks stay on
        return suppress(adapters, torch.zeros(len(adapters), dtype=torch.float64), kernels="torch")

    @contextmanager
    def _hooks_paused(self) -> Iterator[None]:
        self.hooks.probing = True  # forwards now are no training forwards: nothing captured, no cut
        try:
            yield
        finally:
            self.hooks.probing = False

    def _set_selection(self, active: list[int]) -> None:
        """Make ``active`` the layers of the coming step: hooks, and resident optimizer state."""
        flags = [False] * len(self.layer_map)
        for layer in active:
            flags[layer] = True
        self._active_flags = flags
        self.hooks.set_selection(flags)
        self.evictor.apply(flags)

    def remove_hooks(self) -> None:
        """Remove every hook IST put on the model and restore the ``requires_grad`` flags it found.

        Parameters the user froze since stay frozen (see :mod:`ist_optim.hooks`).

        The optimizer cannot step afterwards (build a plain one, or a new IST).
        """
        self.hooks.remove()
        self.distributed.remove()

    def memory_report(self) -> dict[str, int]:
        """Bytes of optimizer state on the parameters' device and on host, and of gradients; backward-cut counts.

        Returns:
            ``{"optimizer_state_device_bytes", "optimizer_state_host_bytes", "grad_bytes",
            "backward_cuts", "backward_cuts_skipped"}``: the last two count training forwards in which
            backward was cut, and in which a cut would not have been exact and was skipped (the reason
            is in ``opt.hooks.cut_skip_reason``).
        """
        params = [p for group in self.param_groups for p in group["params"]]
        report = self.evictor.memory_report(params)
        report["backward_cuts"] = self.hooks.cut_count
        report["backward_cuts_skipped"] = self.hooks.cut_skip_count
        return report

    def importance_report(
        self,
        batch: Any = None,
        *,
        loss_inputs: dict[str, Any] | None = None,
        groups: int = 2,
        threshold: float = DEFAULT_THRESHOLD,
        train_mode: bool = False,
    ) -> ImportanceReport:
        """Whether layer choice can matter for this model and data: per-layer signal, ``rho``, the bound, a sentence.

        Splits the batch into ``groups`` parts by rows, takes each part's gradients of every layer's
        LoRA ``B`` (all layers, whatever the current selection; all of a layer's trainable parameters
        for other adapters) and reports per layer the two-batch product ``G_l = <g_l(1), g_l(2)>``
        (an unbiased estimate of ``||E g_l||^2``), the heterogeneity ``rho = (sum sqrt G+)^2 / (N sum G+)``
        and ``1 - rho``, the most gradient variance any importance rule can save against uniform choice;
        see :mod:`ist_optim.diagnostics` for the derivation and the ``threshold``. Training is not
        disturbed: no optimizer step, ``.grad``, ``requires_grad``, hooks, train/eval modes and the
        RNG as before (the gradients come from ``torch.autograd.grad``). Under ``torch.distributed``
        every rank must call it; the products are averaged over ranks.

        Args:
            batch: forward inputs, a dict of keyword arguments or ``(args, kwargs)``; default the
                inputs of the last training forward (the probe batch), with what :meth:`set_loss_inputs`
                gave that step.
            loss_inputs: keywords for ``loss_fn`` beyond the forward's inputs (e.g. ``target``), split by rows too.
            groups: parts of the batch (2: two halves); the mean of all pairwise products is used.
            threshold: ``rho`` at or above which uniform choice is called near-optimal (default 0.8).
            train_mode: keep the model's train mode (dropout) instead of ``eval()``.
        """
        return _importance_report(
            self, batch, loss_inputs=loss_inputs, groups=groups, threshold=threshold, train_mode=train_mode
        )

    def set_loss_inputs(self, **values: Any) -> None:
        """Register what the probe ``loss_fn`` needs beyond the forward's inputs, for the coming step.

        E.g. labels a loss computes outside the model (a verbalizer's label ids)::

            opt = ISTAdamW(model, loss_fn=lambda out, *args, target, **kwargs: F.cross_entropy(
                out.logits[:, -1, label_words], target))
            for ids, mask, target in loader:
                out = model(input_ids=ids, attention_mask=mask)
                F.cross_entropy(out.logits[:, -1, label_words], target).backward()
                opt.set_loss_inputs(target=target)   # the probes rerun (ids, mask), then call loss_fn
                opt.step(); opt.zero_grad()

        The values go to ``loss_fn`` as keywords together with the captured
        forward's keyword arguments, in the probe round of the next
        :meth:`step` only; every step forgets them, so a stale target can never
        meet a newer batch. Without probes this step (other steps, or a policy
        without probes) they are simply dropped.
        """
        if self.probes_enabled and self.loss_fn is None:
            raise ValueError(
                "set_loss_inputs: the values are passed to loss_fn, and this IST has none; build it with "
                "loss_fn=(output, *args, **kwargs) -> scalar"
            )
        self._loss_inputs = dict(values)

    # ------------------------------------------------------------------ step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step on the selected layers, then (every ``probe_interval``) an importance update.

        ``closure`` (e.g. ``zero_grad(); loss = model(...); loss.backward(); return loss``)
        is handed to the wrapped optimizer's ``step``, which calls it with grad
        enabled as often as it needs (once for most, several times for
        ``torch.optim.LBFGS``); after every call the unselected layers' gradients are
        dropped. Every call trains the same layers: the selection changes only
        after the wrapped step. The probe passes run once per ``step()``, after the
        wrapped step, and never call the closure: they rerun the model on the
        inputs of its last training forward (the closure's last call, here). An
        optimizer whose ``step()`` takes no argument gets the closure called once
        by IST, before its step.
        """
        if self.hooks.removed:
            raise RuntimeError(
                "this IST optimizer's hooks were removed (remove_hooks(), or a newer IST built on the same model); "
                "it no longer controls which layers train, so it cannot step"
            )
        loss = None
        inner_closure = None
        if closure is not None and self._inner_takes_closure:
            inner_closure = self._closure_for_inner_step(closure)
        else:
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self._drop_unselected_grads(observe=True)
        found_inf = getattr(self, "found_inf", None)  # set by GradScaler when the step unscales itself
        with _forward_amp_scaling(self, self.optimizer), _global_step_hooks_suspended():
            # the global step hooks fired once already, for this optimizer
            if inner_closure is None:
                self.optimizer.step()
            else:
                loss = self.optimizer.step(inner_closure)
        # this step's only: never a newer batch's (read after the closure, which may have set them)
        loss_inputs, self._loss_inputs = self._loss_inputs, {}
        self._report_loss_inputs = (self.hooks.probe_batch, loss_inputs)  # importance_report's default, for this batch
        if found_inf is not None and bool(found_inf.sum() > 0):
            return loss  # the fused step skipped itself on inf/NaN gradients; so does the selection, as without fusion
        self.num_steps += 1
        if self.probes_enabled and self.num_steps % self.options["probe_interval"] == 0:
            self._update_importance(loss_inputs)
        self.scheduler.after_step(self._policy_context())
        self._set_selection(self.scheduler.sample_active())
        self.distributed.after_step(self)  # every rank must now hold the same selection and importance
        return loss

    def _drop_unselected_grads(self, observe: bool) -> None:
        for train, params in zip(self._active_flags, self.layer_map.params):
            if not train:
                for p in params:
                    p.grad = None  # stale or zeroed grads would still move AdamW (momentum, decay)
        for p in self._frozen_outside:
            p.grad = None  # outside_layers="freeze": even if someone turned requires_grad back on
        if observe and self.scheduler.wants_gradient_norms:
            # Before the update, as GRASS measures; under DDP the grads are already all-reduced.
            self.scheduler.observe_gradients(layer_grad_norms(self.layer_map.params))

    def _closure_for_inner_step(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        """``closure`` for the wrapped step: grad on, and the unselected layers' grads dropped after each call."""
        calls = 0

        def inner_closure() -> Any:
            nonlocal calls
            with torch.enable_grad():
                loss = closure()
            self._drop_unselected_grads(observe=calls == 0)  # the first call's grads precede any update
            calls += 1
            return loss

        return inner_closure

    def _update_importance(self, loss_inputs: dict[str, Any]) -> None:
        # Drawn before anything can be skipped: every rank of a distributed run consumes its
        # generator identically, and joins the reduction below, whatever happened locally.
        kept = self.scheduler.sample_candidates()  # (N_c, L)
        losses, why = None, None
        if self.hooks.probe_batch is None:
            why = (
                "no training forward of the model was seen before step(), so there is no probe batch "
                "(call the model you passed to IST in train mode with grad enabled)"
            )
        else:
            beta = torch.where(kept, 1.0, self.options["suppression"]).double()
            self._check_loss_inputs(loss_inputs)
            batch, loss_inputs = take_rows(self.hooks.probe_batch, loss_inputs, self.options["probe_rows"])
            self.hooks.probing = True
            try:
                losses = probe_losses(
                    unwrap_model(self.model),  # not through DDP's forward: no buffer broadcast per probe
                    self.adapters,
                    beta,
                    batch=batch,
                    loss_fn=self._loss_fn_with_inputs(loss_inputs),
                    mode=self.options["probe_mode"],
                    kernels=self.options["kernels"],
                )
            except ProbeLossMissing as error:
                # e.g. HF Trainer removes labels for label_smoothing_factor / compute_loss_func.
                why = str(error)
            finally:
                self.hooks.probing = False
        if is_distributed():
            # The mean over ranks: the same importance everywhere. A rank with nothing to probe
            # contributes NaN, so every rank skips the update together (counted in num_skipped).
            local = losses if losses is not None else torch.full((kept.shape[0],), math.nan, dtype=torch.float64)
            losses = reduce_probe_losses(local)
        if why is not None:
            self._skip_probe_round(why)
        if losses is not None:
            self.scheduler.update(kept, losses)

    def _check_loss_inputs(self, extra: dict[str, Any]) -> None:
        clash = sorted(set(extra) & set(self.hooks.probe_batch[1]))
        if clash and self.loss_fn is not None:
            raise ValueError(
                f"set_loss_inputs: {clash} are also keyword arguments of the model's forward; "
                "register them under other names"
            )

    def _loss_fn_with_inputs(self, extra: dict[str, Any]) -> LossFn | None:
        if not extra or self.loss_fn is None:
            return self.loss_fn
        loss_fn = self.loss_fn
        return lambda output, *args, **kwargs: loss_fn(output, *args, **kwargs, **extra)

    def _skip_probe_round(self, why: str) -> None:
        self.num_probe_updates_missed += 1
        if self.num_probe_updates_missed == 1:
            warnings.warn(f"IST: importance is not updated: {why}", stacklevel=4)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "optimizer" not in self.__dict__:  # the placeholder group of Optimizer.__init__
            return super().add_param_group(param_group)
        # Parameters added later train every step (they are in no layer).
        self.optimizer.add_param_group(param_group)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus the IST state (and options) under ``"ist"``.

        Only tensors, numbers, strings, lists and dicts: loads with
        ``torch.load(weights_only=True)`` (as HF ``Trainer`` does). State-dict
        hooks registered on this optimizer run as in torch.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        self.evictor.synchronize()  # offloaded copies may still be in flight
        state_dict = self.optimizer.state_dict()
        state_dict[_STATE_KEY] = {
            "scheduler": self.scheduler.state_dict(),
            "num_steps": self.num_steps,
            "num_probe_updates_missed": self.num_probe_updates_missed,
            "layer_names": self.layer_names,
            "options": {k: v for k, v in self.options.items() if k in _CHECKPOINTED_OPTIONS},
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or a plain one of the wrapped optimizer, with a warning).

        The ``"ist"`` entry is checked before anything is loaded: a checkpoint of
        other layers raises and leaves this optimizer unchanged. Options that
        differ from the checkpoint's are reported in a warning (this optimizer's win).
        """
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = dict(result)
        ist_state = state_dict.pop(_STATE_KEY, None)
        if ist_state is not None:
            if list(ist_state["layer_names"]) != self.layer_names:
                raise ValueError(
                    f"checkpoint is for {len(ist_state['layer_names'])} layers {list(ist_state['layer_names'])[:3]}..., "
                    f"this optimizer has {len(self.layer_names)} layers {self.layer_names[:3]}..."
                )
            self.scheduler.check_state_dict(ist_state["scheduler"])
            saved = ist_state.get("options", {})
            # (seed only seeds the generator at construction; the loaded generator state replaces it)
            differ = {
                k: (saved[k], self.options[k])
                for k in saved
                if k != "seed" and k in self.options and saved[k] != self.options[k]
            }
            if differ:
                listed = ", ".join(f"{k}: checkpoint {old!r}, now {new!r}" for k, (old, new) in differ.items())
                warnings.warn(f"IST.load_state_dict: options differ from the checkpoint's ({listed})", stacklevel=2)
        self.optimizer.load_state_dict(state_dict)
        for p in self._frozen_outside:
            self.optimizer.state.pop(p, None)  # a checkpoint of a run that trained them: never used here
        # Optimizer.load_state_dict rebinds the inner lists: share them again.
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        # ... and it moved all state to the parameters' devices: evict again.
        self.evictor.reset()
        if ist_state is None:
            warnings.warn(
                "IST.load_state_dict: no 'ist' entry (a plain optimizer checkpoint?); importance starts afresh",
                stacklevel=2,
            )
        else:
            self.scheduler.load_state_dict(ist_state["scheduler"])
            self.num_steps = int(ist_state["num_steps"])
            self.num_probe_updates_missed = int(ist_state["num_probe_updates_missed"])
        self._set_selection(self.scheduler.active)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        # The base class keeps only defaults/state/param_groups; a wrapper needs all of itself,
        # less what others patched onto the instance (an LR scheduler's step wrapper refers to
        # this very object and cannot be pickled).
        self.evictor.synchronize()  # pinned host state may still be filling (deepcopy, pickle read it now)
        state = dict(self.__dict__)
        state.pop("step", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        super().__setstate__({})
        self.hooks.attach(self)  # a copy's hooks serve the copy
        _remove_hooks_when_collected(self)

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return f"{type(self).__name__}(layers={len(self.layer_map)}, {options},\n{inner}\n)"


POLICIES = ("ist", "random", "lisa", "spread", "safe", "cka", "gradnorm")
OUTSIDE_LAYERS = ("train", "freeze")

_CHECKPOINTED_OPTIONS = (
    "policy",
    "active_layers",
    "probe_layers",
    "num_probes",
    "probe_interval",
    "suppression",
    "importance_lr",
    "rule",
    "reward",
    "probe_mode",
    "probe_rows",
    "state_policy",
    "backward_cut",
    "checkpoint_unselected",
    "seed",
    "outside_layers",
)


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, but got {type(model).__name__}")
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
        raise TypeError(
            "model is a torch.compile'd module; IST changes requires_grad every step, which compiled graphs "
            "guard on. Pass the uncompiled module (model._orig_mod) to IST"
        )


def _replace_earlier_hooks(model: nn.Module) -> None:
    """Remove an earlier IST's hooks from ``model`` (restoring the flags they found), with a warning."""
    if detach_existing_hooks(model):
        warnings.warn(
            "IST: the model already carried an IST optimizer's hooks; removed them (the earlier optimizer no "
            "longer trains this model) and restored the requires_grad flags they found",
            stacklevel=3,
        )


def _validated_options(raw: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """IST's options (``raw``: its keyword arguments by name) checked, with clear errors before anything is
    changed, and normalised to Python numbers and strings: the dict ``IST.options`` holds and every checkpoint
    carries (``_CHECKPOINTED_OPTIONS`` of it), returned with whether the probe rounds run. The checks that need
    the model (layer counts, adapters, the loss) stay in ``IST.__init__``.
    """
    options = dict(raw)
    policy = options["policy"]
    if not isinstance(policy, LayerPolicy) and policy not in POLICIES:
        raise ValueError(f"Invalid policy: {policy!r} (expected one of {POLICIES} or a LayerPolicy)")
    options["policy"] = policy if isinstance(policy, str) else type(policy).__name__
    for key in ("active_layers", "probe_layers"):  # numpy numbers -> Python numbers (checkpointable)
        value = options[key]
        if as_int(value) is not None:
            options[key] = as_int(value)
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            options[key] = float(value)  # its range is checked against the layer count by the policy
        else:
            raise TypeError(f"{key} must be an int count or a float fraction, but got {type(value).__name__}")
    options["num_probes"] = _check_int(options["num_probes"], "num_probes", "an int >= 0")
    options["probe_interval"] = _check_int(
        options["probe_interval"], "probe_interval", "an int >= 0; 0 disables probes"
    )
    suppression = options["suppression"]
    if isinstance(suppression, bool) or not isinstance(suppression, numbers.Real) or not 0.0 <= suppression <= 1.0:
        raise ValueError(f"Invalid suppression: {suppression} (beta must lie in [0, 1])")
    options["suppression"] = float(suppression)
    importance_lr = options["importance_lr"]
    if (
        isinstance(importance_lr, bool)
        or not isinstance(importance_lr, numbers.Real)
        or not (0.0 <= float(importance_lr) < math.inf)
    ):
        raise ValueError(f"Invalid importance_lr: {importance_lr} (need a finite float >= 0)")
    options["importance_lr"] = float(importance_lr)
    for key, choices in (  # checked here too: policies other than "ist" and "random" build no bandit
        ("rule", RULES),
        ("reward", REWARDS),
        ("probe_mode", PROBE_MODES),
        ("kernels", KERNEL_CHOICES),
        ("outside_layers", OUTSIDE_LAYERS),
    ):
        if options[key] not in choices:
            raise ValueError(f"Invalid {key}: {options[key]!r} (expected one of {choices})")
    options["probe_rows"] = check_probe_rows(options["probe_rows"])  # numpy numbers -> Python numbers
    if options["state_policy"] not in ("auto", *STATE_POLICIES):
        raise ValueError(
            f"Invalid state_policy: {options['state_policy']!r} (expected 'auto' or one of {STATE_POLICIES})"
        )
    if options["state_policy"] == "auto":
        # on CUDA too: offload's copies have never run on a GPU (bench/gpu_check.py checks them)
        options["state_policy"] = "keep"
    for key in ("backward_cut", "checkpoint_unselected", "check_consistency"):
        flag = options[key]
        if not isinstance(flag, bool) and not (flag is None and key != "checkpoint_unselected"):
            allowed = "a bool" if key == "checkpoint_unselected" else "a bool or None"
            raise TypeError(f"{key} must be {allowed}, but got {type(flag).__name__}")
    options["seed"] = check_seed(options["seed"])
    probes_enabled = options["num_probes"] > 0 and options["probe_interval"] > 0
    probes_enabled = probes_enabled and (policy == "ist" or getattr(policy, "uses_probes", False))
    if probes_enabled and options["suppression"] == 1.0:
        raise ValueError(
            "Invalid suppression: 1.0 with probes on (beta = 1 suppresses nothing, so every candidate has the "
            "same loss and importance can never move); use beta < 1, or num_probes=0 for uniform selection"
        )
    return options, probes_enabled


def _named_policy(options: dict[str, Any], num_layers: int) -> LayerPolicy:
    """The policy a name stands for, built from IST's options."""
    name, count, seed = options["policy"], options["active_layers"], options["seed"]
    if name == "cka":
        return CKALayers(count)
    if name == "gradnorm":
        return GradNormLayers(count, seed=seed)
    if name == "lisa":
        return LISALayers(count, interval_steps=20, seed=seed)
    if name == "spread":
        return SpreadLayers(count, seed=seed)
    if name == "safe":
        return SafeImportance(count, seed=seed)
    return ImportanceScheduler(  # "ist", and "random": no probes, importance stays 0, the draws are uniform
        num_layers,
        active_layers=count,
        probe_layers=options["probe_layers"],
        num_probes=options["num_probes"] if name == "ist" else 0,
        importance_lr=options["importance_lr"],
        rule=options["rule"],
        seed=seed,
        reward=options["reward"],
    )


def _check_inner_optimizer(optimizer: Optimizer, policy: LayerPolicy) -> None:
    """Refuse inner optimizers that would move the layers IST froze for the step."""
    if isinstance(optimizer, torch.optim.LBFGS) and not policy.trains_every_layer:
        raise ValueError(
            "torch.optim.LBFGS keeps one flat curvature history over all its parameters and moves every "
            "parameter along it each step, also those without a gradient, so it would update layers IST froze "
            "for the step; IST wraps LBFGS only with every layer active (active_layers=1.0, or "
            "FixedLayers(all layers)), where it steps exactly as plain LBFGS"
        )


def _probe_targets(model: nn.Module, layer_map: LayerMap, probes_enabled: bool, kernels: str) -> list[list[nn.Module]]:
    """Each layer's modules a probe scales: its adapters, or (full-layer mode, with probes) the block itself."""
    adapters = find_adapter_modules(model, layer_map.params)
    if probes_enabled:
        missing = [name for name, mods in zip(layer_map.names, adapters) if not mods]
        if len(missing) == len(adapters) and all(m is not None for m in layer_map.modules):
            # Full-layer mode: no adapters anywhere, so a probe scales each block's residual update.
            adapters = [[BlockResidual(block)] for block in layer_map.modules]
            missing = []
        if missing:
            raise ValueError(
                f"probes need adapter modules (a module with a base_layer, as peft's) in every layer, but "
                f"{len(missing)} layer(s) have none: {missing[:4]}; set num_probes=0 to train without "
                "the importance loop"
            )
        if kernels == "triton" and not use_triton(layer_map.params[0][0], forced=True):
            raise ValueError(
                "kernels='triton' needs Triton and the model on CUDA (or TRITON_INTERPRET=1 set before "
                "importing on CPU); use kernels='auto'"
            )
    return adapters


def _check_int(value: Any, name: str, need: str) -> int:
    count = as_int(value)
    if count is None or count < 0:
        raise ValueError(f"Invalid {name}: {value} (need {need})")
    return count


def _step_takes_closure(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step`` accepts a closure argument (every ``torch.optim`` optimizer does)."""
    try:
        parameters = inspect.signature(optimizer.step).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) or p.name == "closure"
        for p in parameters
    )


def _require_loss_field(output: Any) -> None:
    """The first training forward's output must carry a loss for the probe passes."""
    if not has_loss_field(output):
        raise TypeError(
            f"IST: the model returned {type(output).__name__}, which has no .loss for the probe passes; pass "
            "loss_fn=(output, *args, **kwargs) -> scalar to IST (it receives this output and the forward's "
            "inputs), or num_probes=0 to train without the importance loop"
        )


def _remove_hooks_when_collected(opt: IST) -> None:
    """Once ``opt`` is gone, its model must train as a plain model again."""
    finalizer = weakref.finalize(opt, ModelHooks.remove, opt.hooks)
    finalizer.atexit = False


@contextmanager
def _forward_amp_scaling(wrapper: IST, inner: Optimizer) -> Iterator[None]:
    """Hand GradScaler's ``grad_scale``/``found_inf`` (set on the wrapper) to the inner optimizer's step."""
    names = [name for name in ("grad_scale", "found_inf") if name in wrapper.__dict__]
    for name in names:
        setattr(inner, name, wrapper.__dict__[name])
    try:
        yield
    finally:
        for name in names:
            inner.__dict__.pop(name, None)


@contextmanager
def _global_step_hooks_suspended() -> Iterator[None]:
    """Hooks from ``torch.optim.optimizer.register_optimizer_step_pre/post_hook`` fire once per step, for the wrapper."""
    registries = (torch_optimizer._global_optimizer_pre_hooks, torch_optimizer._global_optimizer_post_hooks)
    if not any(registries):  # the usual case: nothing to suspend
        yield
        return
    saved = [dict(registry) for registry in registries]
    for registry in registries:
        registry.clear()
    try:
        yield
    finally:
        for registry, hooks in zip(registries, saved):
            added = dict(registry)  # registered during the step: keep them too
            registry.clear()
            registry.update(hooks)
            registry.update(added)


class ISTAdamW(IST):
    """``torch.optim.AdamW`` over the model's trainable parameters, wrapped in :class:`IST`.

    Args:
        model: the model (e.g. a peft model); its trainable parameters are
            optimized unless ``params`` is given.
        lr, betas, eps, weight_decay, amsgrad, maximize, foreach, fused: as in
            :class:`torch.optim.AdamW` (``weight_decay`` defaults to 0.0 here,
            as in the paper's PEFT runs, not AdamW's 0.01).
        params: parameters or param groups to optimize instead of all of the
            model's trainable parameters (e.g. to exempt biases from decay).
        **ist_options: the keyword options of :class:`IST`.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        amsgrad: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]] | None = None,
        **ist_options: Any,
    ) -> None:
        _check_model(model)
        if params is None:
            _replace_earlier_hooks(model)  # before reading requires_grad: an earlier IST froze some adapters
            params = [p for p in model.parameters() if p.requires_grad]
            if not params:
                raise ValueError(
                    f"{type(model).__name__} has no trainable parameters; add adapters (e.g. peft.get_peft_model) "
                    "or pass params="
                )
        adamw = torch.optim.AdamW(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
        )
        super().__init__(adamw, model, **ist_options)
