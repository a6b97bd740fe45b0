"""Layer-selection policies: how the layers to train are chosen each step.

IST's own bandit (:class:`~ist_optim.ImportanceScheduler`, ``policy="ist"``)
is one policy among several that differ only in this choice; the freezing,
backward cut, state eviction and exact resume around it are the same for all.

The protocol, which a user's own policy implements (subclass :class:`LayerPolicy`):

``bind(num_layers)``
    called once by IST with the number ``L`` of discovered layers; validate here.
``sample_active() -> list[int]``
    the sorted layers to train in the next step (called at construction and
    after every step); also stored in ``active``.
``uses_probes``
    ``True`` if the policy learns from probe passes: IST then calls
    ``sample_candidates() -> (N_c, L) bool`` and ``update(kept, losses)``
    every ``probe_interval`` steps (see :class:`~ist_optim.ImportanceScheduler`).
``state_dict()`` / ``check_state_dict(sd)`` / ``load_state_dict(sd)``
    tensors, numbers, strings and lists only, so checkpoints load with
    ``torch.load(weights_only=True)``; ``check_state_dict`` raises before
    anything changes.

Optional, for policies that look at the model (the base class's versions do
nothing, so a policy implementing only the above keeps working):

``attach(context)``
    called once, right after ``bind``, with a :class:`PolicyContext` (the
    model, its layer modules and parameters, IST's resolved ``seed``).
``wants_gradient_norms`` / ``observe_gradients(norms)``
    when ``wants_gradient_norms`` is true at a step, IST calls
    ``observe_gradients(norms)`` in that ``step()`` with the ``(L,)`` float64
    L2 norms of each layer's gradients, after the closure and before the
    wrapped optimizer's step (a layer without gradients has norm 0).
``after_step(context)``
    called after every optimizer step that was taken (not after one GradScaler
    skipped), after the probe round and before ``sample_active``; the
    context's ``batch`` is the inputs of that step's last training forward.

Do not keep the context beyond the call (it refers to the optimizer; keeping
it would keep the optimizer alive, and a deep copy would share it).

Built in: ``"ist"`` (the bandit, default), ``"random"`` (uniform without
replacement, redrawn every step: the paper's random sparse tuning),
:class:`SpreadLayers` (``"spread"``: the same marginals, each step's layers spread
evenly through depth), :class:`LISALayers` (``"lisa"``: LISA as LMFlow runs it, switched every
``interval_steps``), :class:`FixedLayers`, :class:`WeightedLayers` (e.g.
OwLore's outlier ratios, see :func:`outlier_ratios`), :class:`LayerwiseCKA`
(the seed paper's pretrained input-vs-output CKA ranking, before training),
:class:`CKALayers` (``"cka"``: a frozen-vs-adapted variant after a warm-up) and
:class:`GradNormLayers` (``"gradnorm"``).
"""

from .bandit import ImportanceScheduler
from .base import LayerPolicy, PolicyContext
from .cka import CKALayers, LayerwiseCKA, linear_cka
from .gradient import GradNormLayers, SafeImportance, layer_grad_norms, systematic_sample
from .outliers import outlier_ratios
from .static import FixedLayers, LISALayers, SpreadLayers, WeightedLayers

__all__ = [
    "ImportanceScheduler",
    "LayerPolicy",
    "PolicyContext",
    "FixedLayers",
    "WeightedLayers",
    "CKALayers",
    "GradNormLayers",
    "LayerwiseCKA",
    "LISALayers",
    "SafeImportance",
    "SpreadLayers",
    "layer_grad_norms",
    "linear_cka",
    "outlier_ratios",
    "systematic_sample",
]
