"""Small checks shared by IST and the policies: integer-like values, seeds, layer counts (no package imports)."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

__all__ = ["as_int", "check_seed", "resolve_layer_count"]


def as_int(value: Any) -> int | None:
    """``value`` as a Python int if it is an integer (``int``, numpy integers, 0-dim int tensors), else ``None``."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_seed(seed: Any) -> int | None:
    """``seed`` as an int (numpy integers accepted), or ``None``; anything else raises ``TypeError``."""
    if seed is not None and as_int(seed) is None:
        raise TypeError(f"seed must be an int or None, but got {type(seed).__name__}")
    return None if seed is None else as_int(seed)


def resolve_layer_count(value: int | float, num_layers: int, name: str) -> int:
    """Turn an ``int`` count or a ``float`` fraction of ``num_layers`` into a count.

    A float ``f`` in ``(0, 1]`` gives ``max(1, floor(f * num_layers + 0.5))``;
    an int must lie in ``[1, num_layers]``. ``1`` means one layer, ``1.0`` all.
    numpy integers and floats are accepted as ints and floats.
    """
    count = as_int(value)
    if count is None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be an int count or a float fraction, but got {type(value).__name__}")
    if count is None:
        value = float(value)
        if not (0.0 < value <= 1.0) or math.isnan(value):
            raise ValueError(f"Invalid {name}: {value} (a float fraction must lie in (0, 1])")
        return max(1, math.floor(value * num_layers + 0.5))
    if not 1 <= count <= num_layers:
        raise ValueError(f"Invalid {name}: {count} (an int count must lie in [1, {num_layers}], the number of layers)")
    return count
