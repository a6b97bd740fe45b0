"""Data-parallel runs (DDP, FSDP2, accelerate, HF Trainer): the same layers and the same importance on every rank.

Every rank must train the same layers each step: a rank that trains other
layers gives no error, only silently diverging replicas under DDP and
mismatched collectives (mixed gradients or a hang) under FSDP2
(``../shared/DESIGN.md`` section 5).

**Selection follows from identical state; nothing is broadcast per step.**
The scheduler's generator is seeded from the ``seed`` option (by default
``torch.initial_seed()`` of rank 0, broadcast once when IST is built, since
launchers often seed ranks apart), and every rank draws from
it in the same order, so the selection is a pure function of (seed, step,
importance). Importance stays identical because the only rank-local input,
the probe losses, is made identical first: :func:`reduce_probe_losses`
gathers the ``(N_c,)`` losses of all ranks and every rank averages them in
the same order in float64, so the result is bit-identical whatever the
backend's reduction order. That costs one tiny collective per probe round
instead of a broadcast (and a synchronisation) every step, and makes a
checkpoint written by any rank valid for all. What identical state cannot
cover is caught by :class:`DistributedSupport`'s consistency check: a
per-rank ``seed`` always, at the first step; a checkpoint loaded on some
ranks only, or anything else that drifts, when ``check_consistency=True`` or
``IST_CHECK_CONSISTENCY=1`` compares every step. (Whether a collective runs
must not depend on rank-local events such as a load: a rank that checked
alone would wait for the others forever.)

Setups that cannot work fail when IST is built, or at the first training
forward when a launcher (accelerate ``prepare``, HF ``Trainer``) wraps the
model after IST was built: DDP without ``find_unused_parameters=True`` or
with ``static_graph=True`` (the set of parameters with gradients changes
every step), reentrant gradient checkpointing under DDP, FSDP1 (FSDP2's
``fully_shard`` is supported), DeepSpeed in any form (:func:`deepspeed_detected`;
checked at the first training forward also in one process when DeepSpeed is
installed). A model wrapped by DDP before IST was built may be passed as is:
layers are discovered on the inner module (so layer names and checkpoints
match a run without DDP) and the hooks go on the wrapper.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .hooks import ModelHooks, _uses_reentrant_checkpointing

T = TypeVar("T")

__all__ = [
    "DistributedSupport",
    "check_distributed_model",
    "check_not_deepspeed",
    "consistency_check_enabled",
    "deepspeed_detected",
    "is_distributed",
    "rank_local",
    "reduce_probe_losses",
    "shared_seed",
    "unwrap_model",
]

ENV_CHECK = "IST_CHECK_CONSISTENCY"


def is_distributed() -> bool:
    """A process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _launched_distributed() -> bool:
    """Distributed now, or launched to be (torchrun and accelerate set ``WORLD_SIZE`` before the group exists)."""
    return is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) > 1


def _is_fsdp1(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(module, FullyShardedDataParallel)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 shards in place and needs no unwrapping)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def consistency_check_enabled(option: bool | None) -> bool:
    """``check_consistency=`` if given, else the ``IST_CHECK_CONSISTENCY`` environment variable."""
    if option is not None:
        return option
    return os.environ.get(ENV_CHECK, "").strip().lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------------- fail fast
def _check_ddp(ddp: DistributedDataParallel, blocks: list[nn.Module | None] | None) -> None:
    if not ddp.find_unused_parameters:
        raise ValueError(
            "IST under DistributedDataParallel needs find_unused_parameters=True: the layers not selected in a "
            "step get no gradient, which DDP otherwise reports as an error at the next step. Wrap with "
            "DistributedDataParallel(model, find_unused_parameters=True); with HF Trainer set "
            "TrainingArguments(ddp_find_unused_parameters=True); with accelerate pass "
            "kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]"
        )
    if ddp.static_graph:
        raise ValueError(
            "IST under DistributedDataParallel cannot use static_graph=True: the parameters that get gradients "
            "change every step. Wrap with static_graph=False (the default) and find_unused_parameters=True "
            "(HF Trainer: ddp_static_graph=False)"
        )
    modules = blocks if blocks is not None else list(ddp.module.modules())
    if any(block is not None and _uses_reentrant_checkpointing(block) for block in modules):
        raise ValueError(
            "IST under DistributedDataParallel cannot use reentrant gradient checkpointing (DDP marks a "
            "parameter ready twice when a reentrant checkpoint recomputes it). Use non-reentrant "
            "checkpointing: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
            "{'use_reentrant': False}) (HF Trainer: gradient_checkpointing_kwargs={'use_reentrant': False})"
        )


def _check_fsdp1(module: nn.Module) -> None:
    if not getattr(module, "_use_orig_params", True):
        raise ValueError(
            "IST cannot train an FSDP1 model with use_orig_params=False: FSDP1 flattens each unit's parameters "
            "into one FlatParameter whose requires_grad is fixed at wrap time, and IST freezes and unfreezes "
            "layers every step. Shard with FSDP2 instead (torch.distributed.fsdp.fully_shard per block, then the "
            "root) before building IST"
        )
    raise ValueError(
        "IST does not support FSDP1 (FullyShardedDataParallel): it is untested with per-step layer selection. "
        "Shard with FSDP2 instead (torch.distributed.fsdp.fully_shard per block, then the root) before building IST"
    )


DEEPSPEED_REFUSAL = (
    "IST cannot train under DeepSpeed: {why}. IST freezes and unfreezes the adapters of whole layers every "
    "step and evicts the optimizer state of the layers it leaves out, parameter by parameter; DeepSpeed ZeRO "
    "partitions parameters, gradients and optimizer state into flat buffers built once, when it initialises, "
    "and replaces the optimizer (transformers' deepspeed_init drops one passed with Trainer(optimizers=...) "
    "and trains with its own, so IST would take no step). Use DDP instead (torchrun or accelerate launch "
    "without DeepSpeed; HF Trainer: TrainingArguments(ddp_find_unused_parameters=True)), or FSDP2: shard "
    "with torch.distributed.fsdp.fully_shard (each block, then the root) before building IST"
)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _accelerate_shared_state(partial: bool = False) -> dict[str, Any]:
    """accelerate's ``AcceleratorState`` attributes if an ``Accelerator`` exists in this process, else ``{}``.

    ``partial``: else ``PartialState``'s (``TrainingArguments`` creates one, with ``distributed_type ==
    DEEPSPEED`` under ``deepspeed=``, before any ``Accelerator`` exists). Read without importing accelerate
    or instantiating a state: each is a shared-state singleton whose attributes live in one class-level dict.
    """
    module = sys.modules.get("accelerate.state")
    for name in ("AcceleratorState", "PartialState") if partial else ("AcceleratorState",):
        shared = getattr(getattr(module, name, None), "_shared_state", None)
        if isinstance(shared, dict) and shared:
            return shared
    return {}


def _called_by_deepspeed() -> bool:
    """A DeepSpeed engine's frame is on the call stack (only module names are read, never frame locals)."""
    if "deepspeed" not in sys.modules:
        return False
    frame = sys._getframe(1)
    for _ in range(64):
        if frame is None:
            return False
        if str(frame.f_globals.get("__name__", "")).startswith("deepspeed.runtime"):
            return True
        frame = frame.f_back
    return False


def deepspeed_detected(model: nn.Module | None = None, *, in_forward: bool = False) -> str | None:
    """Where DeepSpeed is seen, in words, or ``None``.

    Looked for: a DeepSpeed module around or inside ``model`` (``DeepSpeedEngine``), parameters partitioned
    by ZeRO-3 (their ``ds_id``), accelerate's DeepSpeed plugin (``AcceleratorState().distributed_type ==
    DEEPSPEED``, what HF ``Trainer.is_deepspeed_enabled`` reads; before an ``Accelerator`` exists,
    ``PartialState``'s, which ``TrainingArguments(deepspeed=...)`` sets), or, before either exists,
    ``ACCELERATE_USE_DEEPSPEED`` (set by ``TrainingArguments(deepspeed=...)`` and ``accelerate launch
    --use_deepspeed``; accelerate's state, once it exists, wins: with ``use_cpu=True`` it ignores the
    variable). ``in_forward``: also a DeepSpeed engine calling the model right now (read from the stack).
    """
    if model is not None:
        for module in model.modules():
            if type(module).__module__.split(".")[0] == "deepspeed":
                return f"the model is wrapped by DeepSpeed ({type(module).__name__})"
        if any(hasattr(p, "ds_id") for p in model.parameters()):
            return "the model's parameters are partitioned by DeepSpeed ZeRO-3"
    shared = _accelerate_shared_state(partial=True)
    if shared:
        kind = shared.get("distributed_type")
        if getattr(kind, "value", kind) == "DEEPSPEED" or shared.get("deepspeed_plugins") is not None:
            return "accelerate runs DeepSpeed (HF Trainer: TrainingArguments(deepspeed=...))"
    elif _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "ACCELERATE_USE_DEEPSPEED is set (TrainingArguments(deepspeed=...) or accelerate launch --use_deepspeed)"
    if in_forward and _called_by_deepspeed():
        return "a DeepSpeed engine is calling the model"
    return None


def check_not_deepspeed(model: nn.Module | None = None, *, in_forward: bool = False) -> None:
    """Raise ``ValueError`` saying why and what to use instead if :func:`deepspeed_detected` sees DeepSpeed."""
    why = deepspeed_detected(model, in_forward=in_forward)
    if why is not None:
        raise ValueError(DEEPSPEED_REFUSAL.format(why=why))


def _deepspeed_installed() -> bool:
    global _DEEPSPEED_INSTALLED
    if _DEEPSPEED_INSTALLED is None:
        import importlib.util

        _DEEPSPEED_INSTALLED = importlib.util.find_spec("deepspeed") is not None
    return _DEEPSPEED_INSTALLED


_DEEPSPEED_INSTALLED: bool | None = None


def check_distributed_model(model: nn.Module, blocks: list[nn.Module | None] | None = None) -> None:
    """Raise ``ValueError`` naming the fix if ``model`` is wrapped or sharded in a way IST cannot train.

    Args:
        model: the model passed to IST (a DDP wrapper, an FSDP2-sharded model, or a plain module).
        blocks: the layer modules, to look for reentrant checkpointing (default: every submodule).
    """
    check_not_deepspeed(model)
    if isinstance(model, DistributedDataParallel):
        _check_ddp(model, blocks)
    for module in model.modules():
        if _is_fsdp1(module):
            _check_fsdp1(module)


def _enclosing_wrapper(model: nn.Module) -> nn.Module | None:
    """The DDP or FSDP1 module whose forward is calling ``model`` right now (read from the call stack).

    accelerate and HF Trainer wrap the model after the optimizer was built, and a
    wrapper keeps no link a child could follow, so the wrapper is found where it
    calls the model: a few frames up from the model's forward pre-hook.
    """
    codes = {DistributedDataParallel.forward.__code__, DistributedDataParallel._run_ddp_forward.__code__}
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        codes.add(FullyShardedDataParallel.forward.__code__)
    except ImportError:  # pragma: no cover
        pass
    frame = sys._getframe(1)
    for _ in range(64):
        if frame is None:
            return None
        # Only the wrappers' own frames: reading f_locals snapshots a frame's locals, which would keep
        # the caller's objects (the optimizer itself) alive after they delete them.
        if frame.f_code in codes:
            owner = frame.f_locals.get("self")
            if getattr(owner, "module", None) is model:
                return owner
        frame = frame.f_back
    return None


# ---------------------------------------------------------------------- collectives
def _collective_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo (and the CPU side of "cpu:gloo,cuda:nccl") takes CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather(value: torch.Tensor) -> torch.Tensor:
    """``(world_size, *value.shape)``: every rank's ``value``, in rank order, on CPU."""
    value = value.to(_collective_device())
    parts = [torch.empty_like(value) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, value)
    return torch.stack(parts).cpu()


def shared_seed(seed: int) -> int:
    """IST's default seed: ``seed`` folded into ``[0, 2**63)``, and in a distributed run rank 0's.

    The default follows ``torch.initial_seed()``, which launchers often set per
    rank (``seed + rank``) while every rank must draw the same layers: one
    broadcast when IST is built. (An explicit ``seed=`` is never broadcast, so
    per-rank seeds passed on purpose still fail the consistency check.)
    """
    seed = int(seed) % 2**63
    if not is_distributed():
        return seed
    value = torch.tensor([seed], dtype=torch.int64, device=_collective_device())
    dist.broadcast(value, src=0)
    return int(value.item())


def rank_local(work: Callable[[], T], what: str) -> T:
    """``work()``, rank-local work followed by a collective, whose failure on one rank fails every rank.

    A rank that raised alone would leave the others waiting in the collective
    that follows until the process group's timeout. So the ranks first agree
    on whether every one succeeded: the failing rank raises its own error, the
    others a ``RuntimeError`` naming the ranks that failed. ``work()`` itself
    must enter no collective (a rank failing inside one leaves the others in
    it): run the unwrapped module, and check inputs before any sharded
    (FSDP2) forward. Not distributed: ``work()`` as it is.
    """
    error: BaseException | None = None
    try:
        result = work()
    except BaseException as caught:  # KeyboardInterrupt on one rank too: the others must not wait for it
        if not is_distributed():
            raise
        error = caught
    if is_distributed():
        flags = _gather(torch.tensor([error is not None], dtype=torch.int64)).flatten().tolist()
        failed = [rank for rank, flag in enumerate(flags) if flag]
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(
                f"{what} failed on rank(s) {failed} (the error is in their output); every rank stops here instead "
                "of waiting for them in the next collective"
            )
    return result


def reduce_probe_losses(losses: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of each candidate's probe loss, bit-identical on every rank.

    The probe losses are the only rank-local input of the importance update;
    their mean over ranks is the loss of the global batch when every rank's
    batch has the same number of loss terms (as DDP's gradient average assumes).
    Gathering and summing locally in rank order, in float64, gives every rank
    the same bits, which an all-reduce does not promise on every backend.

    Args:
        losses: ``(N_c,)`` this rank's probe losses.

    Returns:
        ``(N_c,)`` float64 on CPU; ``losses`` itself when not distributed.
    """
    if not is_distributed():
        return losses
    return _gather(losses.detach().to(torch.float64)).mean(dim=0)


def _fingerprint(opt: Any) -> int:
    """A 63-bit hash of what must agree across ranks: step, selection, importance, generator state."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(repr(opt.num_steps).encode())
    state = opt.scheduler.state_dict()  # any selection policy: its whole state (importance, generator, ...)
    for key in sorted(state):
        value = state[key]
        digest.update(key.encode())
        digest.update(value.numpy().tobytes() if isinstance(value, torch.Tensor) else repr(value).encode())
    return int.from_bytes(digest.digest(), "little") >> 1


class DistributedSupport:
    """What one IST does for a data-parallel run; a no-op in a single process.

    Args:
        opt: the IST optimizer (its ``model``, ``hooks``, ``scheduler`` and ``layer_map`` are read).
        check_consistency: compare the ranks' state after every step (``None``: ``IST_CHECK_CONSISTENCY``).

    Attributes:
        check_every_step: the consistency check runs after every step.
        verify_next_step: the check runs after the next step (the first step, on every rank alike).
    """

    def __init__(self, opt: Any, check_consistency: bool | None) -> None:
        self.check_every_step = consistency_check_enabled(check_consistency)
        self.verify_next_step = True
        self._handle = None
        hooks: ModelHooks = opt.hooks
        if _launched_distributed():
            # DDP registers only the parameters that require grad when it wraps: a launcher that wraps
            # after IST was built must see every adapter trainable. The selection is applied again
            # before every forward, so the first step is unaffected.
            hooks._restore_flags()
        launched = _launched_distributed()
        if (launched and not isinstance(opt.model, DistributedDataParallel)) or _deepspeed_installed():
            # Only where a launcher may wrap the model later: the check reads the call stack, which
            # torch.compile cannot trace, so single-process runs go without it unless DeepSpeed is
            # installed (HF Trainer's deepspeed_init drops an IST passed with optimizers= and trains on
            # with its own optimizer, also in one process: the first training forward refuses that).
            self._handle = opt.model.register_forward_pre_hook(
                _WrapperCheck(hooks, opt.layer_map.modules, wrappers=launched), with_kwargs=True, prepend=True
            )

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def after_step(self, opt: Any) -> None:
        """Raise ``RuntimeError`` if the ranks' steps, selections, importance or generators differ."""
        if not (self.check_every_step or self.verify_next_step) or not is_distributed():
            return
        self.verify_next_step = False
        hashes = _gather(torch.tensor([_fingerprint(opt)], dtype=torch.int64)).reshape(-1)
        if bool((hashes == hashes[0]).all()):
            return
        # Rare path: every rank saw the mismatch, so every rank joins this second collective.
        mine = {
            "step": opt.num_steps,
            "active": list(opt.scheduler.active),
            "importance": [round(float(x), 6) for x in getattr(opt.scheduler, "importance", [])],
            "seed": opt.options["seed"],
        }
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, mine)
        listed = "\n".join(f"  rank {rank}: {state}" for rank, state in enumerate(states))
        raise RuntimeError(
            "IST: ranks disagree on the layer selection or importance (every rank must train the same layers):\n"
            f"{listed}\nBuild IST with the same seed on every rank, load the same checkpoint on every rank, and "
            "give every rank a batch (probe losses are averaged across ranks)"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handle"] = None  # the copied model's hook dict holds its own copy of the check
        return state


class _WrapperCheck:
    """Forward pre-hook: at the first training forward, check a DDP/FSDP1 wrapper added after IST was built."""

    def __init__(self, hooks: ModelHooks, blocks: list[nn.Module | None], wrappers: bool = True) -> None:
        self.hooks = hooks
        self.blocks = blocks
        self.wrappers = wrappers  # False: one process, only the DeepSpeed check
        self.done = False
        self.num_params = sum(len(params) for params in hooks.layer_map.params)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.done or self.hooks.removed:
            self._remove_from(module)  # checked once, or its IST is gone: leave a plain model
            return
        if not (module.training and torch.is_grad_enabled()):
            return
        self.done = True
        check_not_deepspeed(in_forward=True)
        if not self.wrappers:
            return
        wrapper = _enclosing_wrapper(module)
        if isinstance(wrapper, DistributedDataParallel):
            _check_ddp(wrapper, self.blocks)
        elif wrapper is not None:
            _check_fsdp1(wrapper)
        current = {id(p) for p in module.parameters()}
        if sum(id(p) in current for params in self.hooks.layer_map.params for p in params) < self.num_params:
            raise ValueError(
                "IST: the model's parameters were replaced after IST was built (fully_shard, or FSDP applied by "
                "accelerate/Trainer), so IST would select parameters the model no longer uses. Shard the model "
                "with fully_shard before building IST, and pass IST to the training loop as it is"
            )

    def _remove_from(self, module: nn.Module) -> None:
        # By identity, not through a handle: a deep-copied model holds a copy of this check.
        for key, hook in list(module._forward_pre_hooks.items()):
            if hook is self:
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)
