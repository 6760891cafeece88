"""Helpers the test files share: central finite differences, the check every gradient test makes.

``numeric_gradient`` differentiates a scalar function with respect to every entry of an array it
reads (the array is perturbed in place and restored); ``derivative`` differentiates a scalar
function of one real number.  Both use the central difference
:math:`(f(t + h) - f(t - h)) / 2h`, whose error is :math:`O(h^2)` plus the rounding error of
:math:`f` divided by :math:`h`: in float64, ``h = 1e-6`` leaves about six correct digits.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def numeric_gradient(f: Callable[[], float], x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central differences of ``f()`` with respect to each entry of ``x``, which ``f`` reads.

    Each entry is set to ``x[i] + h`` and ``x[i] - h`` in place and then restored exactly, so
    ``x`` may be a model's weight or a layer's input that ``f`` uses."""
    grad = np.zeros_like(x)
    for i in np.ndindex(*x.shape):
        old = x[i]
        x[i] = old + h
        up = f()
        x[i] = old - h
        down = f()
        x[i] = old
        grad[i] = (up - down) / (2 * h)
    return grad


def derivative(f: Callable, t, h: float = 1e-6):
    """Central difference of a function of one real number at ``t``: ``(f(t + h) - f(t - h)) /
    2h``.  ``t`` may be an array when ``f`` works element by element."""
    return (f(t + h) - f(t - h)) / (2 * h)
