"""The scalar predicates every layer validates with (one definition each).

Booleans are not numbers here (``True`` is not an integer count), numpy scalars are. Each caller
words its own one-line error, naming its parameter and the allowed range.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["finite", "is_int", "is_real"]


def is_real(x: object) -> bool:
    """A real number (Python or numpy), not a bool."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def is_int(x: object) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def finite(x: object) -> bool:
    """A finite real number."""
    return is_real(x) and math.isfinite(float(x))
