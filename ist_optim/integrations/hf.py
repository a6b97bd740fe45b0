"""IST in Hugging Face ``Trainer`` and TRL: an optimizer factory, a one-line hook-up, and launcher refusals.

``Trainer(optimizer_cls_and_kwargs=(cls, kwargs))`` treats a ``cls`` that is
not a ``torch.optim.Optimizer`` subclass as a factory: it calls
``cls()(model, **kwargs)`` with the model the trainer built (a TRL
``SFTTrainer``'s peft model, built from ``peft_config``), in
``create_optimizer`` (``transformers.trainer_optimizer.is_optimizer_factory``;
the pattern transformers uses for Muon and Dion). That is what
:class:`ISTAdamWFactory` is. axolotl's trainers call factories as
``cls()(model, training_args, **kwargs)``; the factory takes that form too.

Trainers without ``optimizer_cls_and_kwargs`` (TRL ``DPOTrainer``,
``GRPOTrainer``) still call ``Trainer.create_optimizer``, which reads the
attribute: :func:`use_ist` sets it on a built trainer, and adds
:class:`~ist_optim.integrations.callback.ISTCallback`, which refuses to
start training when the trainer's optimizer turned out not to be IST.

Refused, with the reason (:func:`check_launcher`): DeepSpeed in any form (see
:func:`ist_optim.distributed.deepspeed_detected`), and FSDP applied by
accelerate or ``Trainer``. transformers builds the optimizer before
accelerate shards the model with FSDP2 (``fully_shard`` replaces every
parameter by a new ``DTensor``, so IST's layers, hooks and state would refer
to parameters the model no longer uses), and with FSDP1 after wrapping
(flat parameters fix ``requires_grad`` at wrap time; refused by
:func:`~ist_optim.distributed.check_distributed_model`).

This module imports no transformers at import time (``import ist_optim`` stays light).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..distributed import _accelerate_shared_state, _env_flag, check_distributed_model, check_not_deepspeed
from ..optimizer import ISTAdamW

__all__ = ["FSDP_REFUSAL", "ISTAdamWFactory", "check_launcher", "ist_kwargs_from_args", "use_ist"]

FSDP_REFUSAL = (
    "IST cannot be built by HF Trainer/accelerate under FSDP: {why}. With FSDP2 transformers builds the "
    "optimizer before accelerate shards the model, and fully_shard replaces every parameter by a new DTensor, "
    "so IST's layers, hooks and optimizer state would refer to parameters the model no longer uses; FSDP1's "
    "flat parameters fix requires_grad when it wraps, and IST changes it every step. Shard the model yourself "
    "with torch.distributed.fsdp.fully_shard (each block, then the root), build IST on the sharded model and "
    "write the training loop, or use DDP (TrainingArguments(ddp_find_unused_parameters=True))"
)


def _fsdp_detected() -> str | None:
    """accelerate's FSDP plugin (what ``Trainer.is_fsdp_enabled`` reads), else ``ACCELERATE_USE_FSDP``."""
    shared = _accelerate_shared_state()
    if shared:
        kind = shared.get("distributed_type")
        if getattr(kind, "value", kind) == "FSDP" or shared.get("fsdp_plugin") is not None:
            return "accelerate's FSDP plugin is active (TrainingArguments(fsdp=...) or accelerate launch --use_fsdp)"
        return None
    if _env_flag("ACCELERATE_USE_FSDP"):
        return "ACCELERATE_USE_FSDP is set (accelerate launch --use_fsdp, or an Accelerator with an FSDP plugin)"
    return None


def check_launcher(model: nn.Module | None = None) -> None:
    """Raise ``ValueError`` (why, and what to use instead) if a trainer would run IST under DeepSpeed or its FSDP.

    Args:
        model: the model the trainer hands the factory, checked for a DeepSpeed engine, ZeRO-3
            parameters, DDP settings IST cannot train under and FSDP1 wrapping.
    """
    check_not_deepspeed(model)
    why = _fsdp_detected()
    if why is not None:
        raise ValueError(FSDP_REFUSAL.format(why=why))
    if model is not None:
        check_distributed_model(model)


def ist_kwargs_from_args(args: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with AdamW's settings taken from ``TrainingArguments`` where ``kwargs`` does not give them.

    ``lr`` from ``learning_rate``, ``weight_decay``, ``betas`` from ``adam_beta1``/``adam_beta2``, ``eps`` from
    ``adam_epsilon``: what ``Trainer`` would give ``torch.optim.AdamW``.
    """
    merged = dict(kwargs)
    merged.setdefault("lr", args.learning_rate)
    merged.setdefault("weight_decay", args.weight_decay)
    merged.setdefault("betas", (args.adam_beta1, args.adam_beta2))
    merged.setdefault("eps", args.adam_epsilon)
    return merged


class ISTAdamWFactory:
    """Build :class:`~ist_optim.ISTAdamW` on the model a trainer built.

    ::

        trainer = SFTTrainer(model=model, args=args, train_dataset=data, peft_config=LoraConfig(...),
                             optimizer_cls_and_kwargs=(ISTAdamWFactory, {"lr": 2e-4, "active_layers": 0.25}))

    Not a ``torch.optim.Optimizer`` subclass on purpose: that is how transformers tells a factory from an
    optimizer class. Called as ``ISTAdamWFactory()(model, **kwargs)`` (transformers) or
    ``ISTAdamWFactory()(model, training_args, **kwargs)`` (axolotl); ``kwargs`` are ``ISTAdamW``'s
    (``lr``, ``weight_decay``, ... and every IST option). transformers passes a factory no
    ``TrainingArguments``, so ``lr`` is required there (the LR scheduler then scales it as it scales
    AdamW's); given ``training_args``, AdamW's settings missing from ``kwargs`` come from it.
    """

    def __call__(self, model: nn.Module, training_args: Any = None, /, **kwargs: Any) -> ISTAdamW:
        if not isinstance(model, nn.Module):
            raise TypeError(f"ISTAdamWFactory: model must be an nn.Module, but got {type(model).__name__}")
        check_launcher(model)
        if training_args is not None:
            kwargs = ist_kwargs_from_args(training_args, kwargs)
        if "lr" not in kwargs:
            raise TypeError(
                "ISTAdamWFactory needs lr: transformers calls optimizer factories with the model and your kwargs "
                "only, not with TrainingArguments, so its learning_rate never reaches the factory. Pass it: "
                "optimizer_cls_and_kwargs=(ISTAdamWFactory, {'lr': 2e-4, ...}) (or use use_ist(trainer, ...), "
                "which takes it from trainer.args)"
            )
        return ISTAdamW(model, **kwargs)

    def __repr__(self) -> str:
        return "ISTAdamWFactory()"


def use_ist(trainer: Any, **kwargs: Any) -> Any:
    """Make an already-built HF/TRL trainer train with :class:`~ist_optim.ISTAdamW`; returns the trainer.

    For trainers without ``optimizer_cls_and_kwargs`` (TRL ``DPOTrainer``, ``GRPOTrainer``, ...): one line
    after building it, ``use_ist(trainer, active_layers=0.25)``. ``kwargs`` are ``ISTAdamW``'s; ``lr``,
    ``weight_decay``, ``betas`` and ``eps`` default to ``trainer.args``' (as ``Trainer`` builds AdamW). The
    optimizer is built when training starts, on the model the trainer holds then, and
    :class:`~ist_optim.integrations.callback.ISTCallback` refuses to train if it is not IST after all
    (a DeepSpeed config with its own ``optimizer`` section, a ``create_optimizer`` override).

    Raises:
        ValueError: the trainer already has an optimizer or another ``optimizer_cls_and_kwargs``, or
            runs under DeepSpeed or FSDP (see :func:`check_launcher`).
    """
    if getattr(trainer, "optimizer", None) is not None:
        raise ValueError(
            f"use_ist: the trainer already has an optimizer ({type(trainer.optimizer).__name__}, passed with "
            "optimizers=); build the trainer without it"
        )
    existing = getattr(trainer, "optimizer_cls_and_kwargs", None)
    if existing is not None and existing[0] is not ISTAdamWFactory:
        raise ValueError(
            f"use_ist: the trainer was given optimizer_cls_and_kwargs=({getattr(existing[0], '__name__', existing[0])},"
            " ...) already (in axolotl: an `optimizer:` it builds itself); remove it to train with IST"
        )
    if getattr(trainer, "is_deepspeed_enabled", False):
        check_not_deepspeed()  # accelerate's state says why
        raise ValueError("use_ist: the trainer runs under DeepSpeed, which IST cannot train under")
    if getattr(trainer, "is_fsdp_enabled", False):
        raise ValueError(FSDP_REFUSAL.format(why="the trainer has FSDP enabled"))
    check_launcher(getattr(trainer, "model", None))
    trainer.optimizer_cls_and_kwargs = (ISTAdamWFactory, ist_kwargs_from_args(trainer.args, kwargs))
    from .callback import ISTCallback  # imports transformers

    if not any(isinstance(cb, ISTCallback) for cb in trainer.callback_handler.callbacks):
        trainer.add_callback(ISTCallback())
    return trainer
