"""``ISTCallback``: a training run whose optimizer is not IST stops before its first step, saying why."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ..optimizer import IST

__all__ = ["ISTCallback", "find_ist"]


def find_ist(optimizer: Any) -> IST | None:
    """The IST inside ``optimizer`` (itself, or under accelerate's or DeepSpeed's wrappers' ``.optimizer``)."""
    for _ in range(4):
        if isinstance(optimizer, IST):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


class ISTCallback(TrainerCallback):
    """Refuse, at ``on_train_begin``, a run in which the trainer's optimizer is not an IST.

    transformers can replace or never build the optimizer you asked for without a word: under DeepSpeed
    ``deepspeed_init`` drops one passed with ``optimizers=``, and a DeepSpeed config with its own
    ``optimizer`` section never calls ``create_optimizer`` (so no factory runs); a trainer subclass may
    override ``create_optimizer``. :func:`~ist_optim.integrations.use_ist` adds this callback; add it
    yourself with ``Trainer(..., callbacks=[ISTCallback()])``.
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if find_ist(optimizer) is None:
            raise RuntimeError(
                f"ISTCallback: the trainer is about to train with {type(optimizer).__name__}, not with IST. "
                "Something replaced or bypassed it: DeepSpeed (its config's `optimizer` section, or "
                "deepspeed_init dropping optimizers=; IST cannot train under DeepSpeed, use DDP or FSDP2), or a "
                "trainer whose create_optimizer ignores optimizer_cls_and_kwargs"
            )
