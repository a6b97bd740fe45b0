"""axolotl plugin: ``plugins: [ist_optim.integrations.axolotl.ISTPlugin]`` and ``ist_*`` config fields.

::

    plugins:
      - ist_optim.integrations.axolotl.ISTPlugin
    ist_active_layers: 0.25
    ist_probe_interval: 10

axolotl calls :meth:`ISTPlugin.post_trainer_create` after building the trainer
(``axolotl/train.py``, ``setup_model_and_trainer``); the plugin hands the
trainer :class:`~ist_optim.integrations.ISTAdamWFactory` through
:func:`~ist_optim.integrations.use_ist`, and axolotl's own
``OptimizerMixin.create_optimizer`` calls it as ``factory()(model, training_args, **kwargs)``
when training starts (``learning_rate``, ``weight_decay``, ``adam_beta1/2``,
``adam_epsilon`` come from the config). ``BasePlugin.create_optimizer`` is not
used: axolotl itself never calls ``PluginManager.create_optimizer``.

axolotl is imported only if installed; without it this module still imports
(so the docs and options can be read) and :class:`ISTPlugin` is a plain class.
"""

from __future__ import annotations

from typing import Any

from .hf import use_ist

try:  # optional: the plugin base class of an installed axolotl
    from axolotl.integrations.base import BasePlugin
except ImportError:  # pragma: no cover - exercised where axolotl is missing
    BasePlugin = object  # type: ignore[assignment,misc]

__all__ = ["IST_CONFIG_FIELDS", "ISTArgs", "ISTPlugin", "ist_options_from_cfg"]

# config field -> ISTAdamW keyword (every IST option a YAML file can hold)
IST_CONFIG_FIELDS = {
    f"ist_{name}": name
    for name in (
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
        "kernels",
        "state_policy",
        "backward_cut",
        "checkpoint_unselected",
        "seed",
        "check_consistency",
        "policy",
        "outside_layers",
    )
}


def ist_options_from_cfg(cfg: Any) -> dict[str, Any]:
    """The IST options set in an axolotl config (fields left out or null keep IST's defaults)."""
    get = cfg.get if hasattr(cfg, "get") else lambda key, default=None: getattr(cfg, key, default)
    return {option: get(field) for field, option in IST_CONFIG_FIELDS.items() if get(field) is not None}


try:
    from pydantic import BaseModel
except ImportError:  # pragma: no cover - axolotl always brings pydantic
    ISTArgs = None
else:

    class ISTArgs(BaseModel):
        """The plugin's config fields, merged into axolotl's config schema (``get_input_args``)."""

        ist_active_layers: int | float | None = None
        ist_probe_layers: int | float | None = None
        ist_num_probes: int | None = None
        ist_probe_interval: int | None = None
        ist_suppression: float | None = None
        ist_importance_lr: float | None = None
        ist_rule: str | None = None
        ist_reward: str | None = None
        ist_probe_mode: str | None = None
        ist_probe_rows: int | float | None = None
        ist_kernels: str | None = None
        ist_state_policy: str | None = None
        ist_backward_cut: bool | None = None
        ist_checkpoint_unselected: bool | None = None
        ist_seed: int | None = None
        ist_check_consistency: bool | None = None
        ist_policy: str | None = None
        ist_outside_layers: str | None = None


class ISTPlugin(BasePlugin):
    """Train with ISTAdamW in axolotl; options are the ``ist_*`` config fields (see :data:`IST_CONFIG_FIELDS`)."""

    def get_input_args(self) -> str:
        return "ist_optim.integrations.axolotl.ISTArgs"

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        # Refuses DeepSpeed / FSDP configs and an `optimizer:` axolotl builds itself, with the reason.
        use_ist(trainer, **ist_options_from_cfg(cfg))
