"""The IST bandit, :class:`ImportanceScheduler`: it lives in :mod:`ist_optim.policies.bandit`; this module keeps
the names importable where they always were."""

from ._checks import as_int, check_seed, resolve_layer_count
from .policies.bandit import _MAX_DRAWS_PER_CANDIDATE, REWARDS, RULES, ImportanceScheduler

__all__ = [
    "ImportanceScheduler",
    "resolve_layer_count",
    "RULES",
    "REWARDS",
    "as_int",
    "check_seed",
    "_MAX_DRAWS_PER_CANDIDATE",
]
