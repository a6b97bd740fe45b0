"""ms-swift external plugin: ``--external_plugins <this file> --optimizer ist``.

::

    swift sft --model ... --train_type lora \\
        --external_plugins "$(python -m ist_optim.integrations.swift_path)" \\
        --optimizer ist --optim_args "active_layers=0.25,probe_interval=10"

ms-swift imports the file (``BaseArguments._import_external_plugins``) before
it builds the trainer, and its trainers create the optimizer through
``optimizers_map[args.optimizer](args, trainer)``; this file registers
``"ist"`` there. ``--optim_args`` (``key=value`` pairs) are IST options;
``lr``, ``weight_decay``, betas and eps come from swift's own arguments.
"""

from __future__ import annotations

import ast
from typing import Any

from swift.optimizers import OptimizerCallback, optimizers_map

from ist_optim.integrations.hf import ISTAdamWFactory


def parse_optim_args(text: str | None) -> dict[str, Any]:
    """``"active_layers=0.25,probe_interval=10,rule=paper"`` -> ``{"active_layers": 0.25, ...}``."""
    options: dict[str, Any] = {}
    for item in (text or "").replace(" ", "").split(","):
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"--optim_args for --optimizer ist: {item!r} is not key=value")
        key, value = item.split("=", 1)
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value  # a bare word: a string option such as rule=paper
    return options


class ISTOptimizerCallback(OptimizerCallback):
    """ms-swift's optimizer hook for ``--optimizer ist``: ISTAdamW on the model swift built."""

    def create_optimizer(self, model: Any = None) -> Any:
        trainer = self.trainer
        if trainer.optimizer is None:
            options = parse_optim_args(getattr(self.args, "optim_args", None))
            trainer.optimizer = ISTAdamWFactory()(trainer.model if model is None else model, self.args, **options)
        return trainer.optimizer


optimizers_map["ist"] = ISTOptimizerCallback
