"""IST where users already train: HF ``Trainer`` and TRL (:mod:`.hf`), axolotl (:mod:`.axolotl`), ms-swift.

``from ist_optim.integrations import ISTAdamWFactory, use_ist`` imports no transformers;
``ISTCallback`` (a ``transformers.TrainerCallback``) is imported on first use. See ``docs/integrations.md``.
"""

from __future__ import annotations

from typing import Any

from .hf import FSDP_REFUSAL, ISTAdamWFactory, check_launcher, ist_kwargs_from_args, use_ist

__all__ = ["FSDP_REFUSAL", "ISTAdamWFactory", "ISTCallback", "check_launcher", "ist_kwargs_from_args", "use_ist"]


def __getattr__(name: str) -> Any:
    if name == "ISTCallback":  # lazily: importing transformers.TrainerCallback takes seconds
        from .callback import ISTCallback

        return ISTCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
