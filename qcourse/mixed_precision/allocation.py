r"""Bits per layer: what a choice costs to store and to run, and how to choose under a budget.

The accounting of the HAWQ tables (:func:`model_size_bits`, :func:`bops`), the bit allocation
under a size budget (:func:`allocate_bits_exhaustive`, :func:`allocate_bits_greedy`), the
Pareto front and Spearman's rank correlation the chapter compares methods with, and the
published ResNet50 table (:data:`HAWQ_RESNET50`) with the arithmetic that reads it.  The checks
the package shares are at the top.  Re-exported by :mod:`qcourse.mixed_precision`; see the
mixed_precision chapter.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from qcourse import nn
from qcourse._checks import (
    check_bool,
    check_int,
    check_labels,
    check_real,
    check_sequence,
    real_array,
)
from qcourse.nn import (
    Linear,
    Module,
    ReLU,
    Sequential,
)
from qcourse.nn.core import _check_model_input

__all__ = [
    "FLOAT_BITS",
    "HAWQ_RESNET50",
    "HAWQ_SOURCE",
    "Allocation",
    "HawqRow",
    "allocate_bits_exhaustive",
    "allocate_bits_greedy",
    "bops",
    "mixed_precision_shares",
    "model_size_bits",
    "pareto_front",
    "scaled_size_bops",
    "spearman",
]

#: Bounds of the size-like arguments: the configurations scored at once by the exhaustive
#: search, and the weights of one layer (so that sizes in bits stay exact in int64).
_MAX_CONFIGS = 2**24
_MAX_WEIGHTS = 2**40

#: Bit width that stands for "left in float" in the accounting (float32).
FLOAT_BITS = 32


# --------------------------------------------------------------------------- checks


def _check_model(model) -> Sequential:
    if not isinstance(model, Sequential):
        raise TypeError(f"model must be a qcourse.nn.Sequential, got {type(model).__name__}")
    return model


def _check_ops(model) -> list[tuple[str, Module]]:
    """The layers of ``model`` for the curvature functions: Linear, ReLU and ReLU6 only."""
    _check_model(model)
    ops = model.named_modules()
    for name, layer in ops:
        if not isinstance(layer, (Linear, ReLU)):
            raise TypeError(
                f"the curvature functions support Linear, ReLU and ReLU6 layers; layer "
                f"{name!r} is a {type(layer).__name__}"
            )
    if not isinstance(ops[-1][1], Linear):
        raise ValueError("the last layer of model must be Linear (it produces the logits)")
    return ops


def _check_layer(model: Sequential, layer) -> int:
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a layer name (str), got {type(layer).__name__}")
    if layer not in model.names:
        raise ValueError(f"layer {layer!r} is not in the model; its layers are {model.names}")
    if not isinstance(model[layer], Linear):
        raise ValueError(
            f"layer {layer!r} is a {type(model[layer]).__name__}; only Linear layers have "
            f"weights to quantize (Linear layers: {nn.linear_layers(model)})"
        )
    return model.names.index(layer)


def _check_data(X, y, model: Sequential) -> tuple[np.ndarray, np.ndarray]:
    X = _check_model_input(model, X, "X")
    y = check_labels(y, "y", X.shape[0])
    return X, y


def _check_direction(v, shape: tuple[int, ...], name: str = "v") -> np.ndarray:
    arr = np.asarray(v)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"{name} must have the shape of the layer's weight {shape}, "
                         f"got {arr.shape}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or Inf; expected finite values")
    return arr


# --------------------------------------------------------------------------- layers and bits


def _bits_value(value, name: str, *, allow_float: bool, low: int) -> int:
    """A bit width: an int in [low, 16], or FLOAT_BITS / None for float when allowed."""
    if value is None:
        if allow_float:
            return FLOAT_BITS
        raise ValueError(f"{name} must be a bit width, got None")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int bit width, got {type(value).__name__}")
    value = int(value)
    if value == FLOAT_BITS and allow_float:
        return value
    if not low <= value <= 16:
        extra = f" or {FLOAT_BITS}/None for float" if allow_float else ""
        raise ValueError(f"{name} must be between {low} and 16{extra}, got {value}")
    return value


def _bits_map(bits, names: Sequence[str], name: str, *, low: int = 2) -> dict[str, int]:
    """Normalize ``bits`` (one width for all layers, or a mapping layer -> width) to a dict over
    ``names``; layers missing from a mapping stay float (FLOAT_BITS)."""
    if isinstance(bits, Mapping):
        unknown = [k for k in bits if k not in names]
        if unknown:
            raise ValueError(f"{name} names {unknown}, which are not Linear layers of the model "
                             f"{list(names)}")
        return {n: _bits_value(bits.get(n), f"{name}[{n!r}]", allow_float=True, low=low)
                for n in names}
    value = _bits_value(bits, name, allow_float=True, low=low)
    return dict.fromkeys(names, value)


# --------------------------------------------------------------------------- accounting


def _check_infos(infos) -> list[nn.LayerInfo]:
    infos = check_sequence(infos, "infos")
    if not infos or not all(isinstance(i, nn.LayerInfo) for i in infos):
        raise TypeError("infos must be a non-empty list of LayerInfo (from qcourse.nn.layer_info)")
    return infos


def model_size_bits(infos, w_bits, *, overhead: bool = False, per_channel: bool = True) -> int:
    r"""Storage of the weights, in bits: :math:`\sum_l n_l\, b_w^{(l)}`.

    ``infos`` comes from :func:`layer_info`; ``w_bits`` is one width for all layers or a
    mapping ``{layer: bits}`` (missing layers, ``None`` and 32 mean float32; widths 1 to 16).
    This is the "Size" column of the HAWQ tables (weights only).  With ``overhead=True`` the
    count adds what an integer model also stores: a 32-bit bias per output, and a 32-bit scale
    per output channel (``per_channel``) or per tensor for every quantized layer.  See the
    mixed_precision chapter.
    """
    infos = _check_infos(infos)
    bmap = _bits_map(w_bits, [i.name for i in infos], "w_bits", low=1)
    overhead = check_bool(overhead, "overhead")
    per_channel = check_bool(per_channel, "per_channel")
    total = sum(i.weights * bmap[i.name] for i in infos)
    if overhead:
        for i in infos:
            total += 32 * i.bias
            if bmap[i.name] != FLOAT_BITS:
                total += 32 * (i.out_features if per_channel else 1)
    return int(total)


def bops(infos, w_bits, a_bits=None) -> int:
    r"""Bit operations per example: :math:`\sum_l b_w^{(l)}\, b_a^{(l)}\, \mathrm{MACs}_l`.

    A multiply-accumulate of a :math:`b_w`-bit weight by a :math:`b_a`-bit activation counts as
    :math:`b_w b_a` bit operations (the area of a multiplier grows with the product of its
    operand widths), the measure of the BOPS column of the HAWQ tables.  ``a_bits=None``
    gives each layer's activation the bit width of its weights (W\ *b*\ A\ *b*, the HAWQ
    convention); otherwise the same forms as ``w_bits`` (float = 32).  See the mixed_precision
    chapter.
    """
    infos = _check_infos(infos)
    names = [i.name for i in infos]
    wmap = _bits_map(w_bits, names, "w_bits", low=1)
    amap = wmap if a_bits is None else _bits_map(a_bits, names, "a_bits", low=1)
    return int(sum(i.macs * wmap[i.name] * amap[i.name] for i in infos))


# --------------------------------------------------------------------------- allocation


class Allocation(NamedTuple):
    """A bit width per layer (``bits``), its total ``cost`` (sum of the per-layer costs), its
    weight storage ``size_bits``, and how many configurations the search ``evaluated``."""

    bits: dict
    cost: float
    size_bits: int
    evaluated: int


def _allocation_problem(costs, n_weights, budget_bits, choices):
    if not isinstance(costs, Mapping) or not costs:
        raise TypeError("costs must be a non-empty mapping {layer: {bits: cost}}")
    if not isinstance(n_weights, Mapping):
        raise TypeError("n_weights must be a mapping {layer: number of weights}")
    names = list(costs)
    if set(n_weights) != set(names):
        raise ValueError(f"n_weights must have the layers of costs {names}, got {list(n_weights)}")
    choices = tuple(sorted(set(_bits_value(b, "each entry of choices", allow_float=True, low=1)
                               for b in check_sequence(choices, "choices"))))
    if not choices:
        raise ValueError("choices must list at least one bit width")
    C = np.empty((len(names), len(choices)))
    S = np.empty((len(names), len(choices)), dtype=np.int64)
    for i, n in enumerate(names):
        row = costs[n]
        if not isinstance(row, Mapping):
            raise TypeError(f"costs[{n!r}] must be a mapping {{bits: cost}}")
        missing = [b for b in choices if b not in row]
        if missing:
            raise ValueError(f"costs[{n!r}] has no cost for bits {missing} (choices {choices})")
        for j, b in enumerate(choices):
            C[i, j] = check_real(row[b], f"costs[{n!r}][{b}]")
        S[i] = check_int(n_weights[n], f"n_weights[{n!r}]", 1, _MAX_WEIGHTS) * np.array(choices)
    budget_bits = check_int(budget_bits, "budget_bits", 0, 2**62)
    smallest = int(S[:, 0].sum())
    if budget_bits < smallest:
        raise ValueError(
            f"budget_bits={budget_bits} is below the smallest possible size {smallest} "
            f"(every layer at {choices[0]} bits)"
        )
    return names, choices, C, S, budget_bits


def allocate_bits_exhaustive(costs, n_weights, budget_bits: int, choices=(4, 8),
                             max_configs: int = 2**20) -> Allocation:
    r"""The exact optimum of the bit-allocation problem, by trying every configuration.

    .. math::

        \min_{b_1, \ldots, b_L \in \mathcal{B}} \sum_l c_l(b_l)
        \quad \text{subject to} \quad \sum_l n_l b_l \le \text{budget}

    ``costs[layer][bits]`` is :math:`c_l(b)` (e.g. :func:`hawq_omega`, or a measured loss
    increase), ``n_weights[layer]`` is :math:`n_l`, ``choices`` is :math:`\mathcal{B}`.  All
    :math:`|\mathcal{B}|^L` configurations are scored at once with NumPy (at most
    ``max_configs`` of them); among the feasible ones the lowest cost wins, ties going to the
    smaller size, then to the first in enumeration order.  For large ``L`` use
    :func:`allocate_bits_greedy` (or an integer linear program, as HAWQ-V3 does).  See the
    mixed_precision chapter.

    Bounds: ``max_configs`` in [1, 2**24], each ``n_weights`` in [1, 2**40], ``budget_bits``
    in [0, 2**62].
    """
    names, choices, C, S, budget = _allocation_problem(costs, n_weights, budget_bits, choices)
    L, K = C.shape
    max_configs = check_int(max_configs, "max_configs", 1, _MAX_CONFIGS)
    if K**L > max_configs:
        raise ValueError(f"{K}^{L} = {K**L} configurations exceed max_configs={max_configs}; "
                         f"use allocate_bits_greedy for this many layers")
    idx = np.array(list(itertools.product(range(K), repeat=L)), dtype=np.int64).reshape(-1, L)
    rows = np.arange(L)
    total_cost = C[rows, idx].sum(axis=1)
    total_size = S[rows, idx].sum(axis=1)
    feasible = np.flatnonzero(total_size <= budget)
    order = np.lexsort((feasible, total_size[feasible], total_cost[feasible]))
    best = feasible[order[0]]
    bits = {n: choices[k] for n, k in zip(names, idx[best], strict=True)}
    return Allocation(bits, float(total_cost[best]), int(total_size[best]), int(idx.shape[0]))


def allocate_bits_greedy(costs, n_weights, budget_bits: int, choices=(4, 8)) -> Allocation:
    r"""A greedy bit allocation: start with every layer at the widest choice, then, while the
    model is over budget, lower one layer by one step, choosing the move with the smallest
    cost increase per bit saved,

    .. math::

        \arg\min_l \frac{c_l(b_l^-) - c_l(b_l)}{n_l (b_l - b_l^-)} .

    It needs :math:`O(L^2 |\mathcal{B}|)` evaluations instead of :math:`|\mathcal{B}|^L`, and
    is not always optimal: the last layer it lowers may save far more than needed, where a
    smaller layer would have done (a knapsack is not solved by ratios).  Ties go to the earlier
    layer.  Same arguments as :func:`allocate_bits_exhaustive`.  See the mixed_precision
    chapter.

    Bounds: each ``n_weights`` in [1, 2**40], ``budget_bits`` in [0, 2**62].
    """
    names, choices, C, S, budget = _allocation_problem(costs, n_weights, budget_bits, choices)
    L, K = C.shape
    level = np.full(L, K - 1)
    evaluated = 1
    while S[np.arange(L), level].sum() > budget:
        best, best_ratio = -1, np.inf
        for i in range(L):
            if level[i] == 0:
                continue
            evaluated += 1
            ratio = (C[i, level[i] - 1] - C[i, level[i]]) / (S[i, level[i]] - S[i, level[i] - 1])
            if ratio < best_ratio:
                best, best_ratio = i, ratio
        level[best] -= 1
    rows = np.arange(L)
    bits = {n: choices[k] for n, k in zip(names, level, strict=True)}
    return Allocation(bits, float(C[rows, level].sum()), int(S[rows, level].sum()), evaluated)


# --------------------------------------------------------------------------- curves and ranks


def pareto_front(sizes, scores) -> np.ndarray:
    """Indices of the points on the size-score Pareto front, by increasing size.

    A point is on the front when no other point is at most as large *and* scores at least as
    high with one of the two strictly better.  Of identical points the first is kept.  See the
    mixed_precision chapter.
    """
    s = real_array(sizes, "sizes", ndim=1)
    a = real_array(scores, "scores", ndim=1)
    if s.shape != a.shape:
        raise ValueError(f"sizes and scores must be non-empty 1-D arrays of one length, got "
                         f"shapes {s.shape} and {a.shape}")
    keep = []
    for i in range(s.size):
        dominated = np.any((s <= s[i]) & (a >= a[i]) & ((s < s[i]) | (a > a[i])))
        duplicate = np.any((s[:i] == s[i]) & (a[:i] == a[i]))
        if not dominated and not duplicate:
            keep.append(i)
    keep = np.array(keep, dtype=np.int64)
    return keep[np.argsort(s[keep], kind="stable")]


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size)
    sx = x[order]
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    r"""Spearman's rank correlation: the Pearson correlation of the ranks (ties get the average
    of the ranks they span), :math:`+1` when ``b`` orders the items exactly as ``a`` does,
    :math:`-1` when exactly reversed.  Used to compare Hessian and one-at-a-time rankings of
    layers.  See the mixed_precision chapter."""
    a = real_array(a, "a", ndim=1)
    b = real_array(b, "b", ndim=1)
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"a and b must be 1-D of one length >= 2, got shapes {a.shape} and "
                         f"{b.shape}")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = np.sqrt(np.sum(ra * ra) * np.sum(rb * rb))
    if denom == 0:
        raise ValueError(f"{'a' if np.all(ra == 0) else 'b'} must not have all values equal: "
                         f"Spearman's correlation is undefined then")
    return float(np.sum(ra * rb) / denom)


# --------------------------------------------------------------------------- the HAWQ table


class HawqRow(NamedTuple):
    """One row of the HAWQ-V3 ResNet50 table: ``method``; integer-only (``int_only``) and
    uniform (``uniform``) quantization; the method's own float baseline top-1
    (``baseline_top1``, %); ``precision`` (W\\ *b*\\ A\\ *b*); ``size_mb`` (weights, MB);
    ``gbops`` (G bit operations per image); quantized ``top1`` (%)."""

    method: str
    int_only: bool
    uniform: bool
    baseline_top1: float
    precision: str
    size_mb: float
    gbops: float
    top1: float


#: Where :data:`HAWQ_RESNET50` comes from.
HAWQ_SOURCE = ("Yao et al., 2021, 'HAWQ-V3: Dyadic Neural Network Quantization', ICML, the "
               "ResNet50 results on ImageNet, as reproduced in the EE-508 course slides "
               "('Hessian Aware trace-Weighted Quantization, Results: ResNet50')")

#: The published ResNet50 table (ImageNet top-1), rows in the order of the source.
HAWQ_RESNET50 = (
    HawqRow("Baseline", True, True, 77.72, "W32A32", 97.8, 3951, 77.72),
    HawqRow("Integer Only (Jacob et al., 2018)", True, True, 76.40, "W8A8", 24.5, 247, 74.90),
    HawqRow("RVQuant (Park et al., 2018)", False, False, 75.92, "W8A8", 24.5, 247, 75.67),
    HawqRow("HAWQ-V3", True, True, 77.72, "W8A8", 24.5, 247, 77.58),
    HawqRow("PACT (Choi et al., 2018)", False, True, 76.90, "W5A5", 16.0, 101, 76.70),
    HawqRow("LQ-Nets (Zhang et al., 2018)", False, False, 76.50, "W4A32", 13.1, 486, 76.40),
    HawqRow("RVQuant (Park et al., 2018)", False, False, 75.92, "W5A5", 16.0, 101, 75.60),
    HawqRow("HAQ (Wang et al., 2019)", False, False, 76.15, "WMPA32", 9.62, 520, 75.48),
    HawqRow("OneBitwidth (Chin et al., 2020)", False, True, 76.70, "W1*A8", 12.3, 494, 76.70),
    HawqRow("HAWQ-V3", True, True, 77.72, "W4/8A4/8", 18.7, 154, 75.39),
    HawqRow("HAWQ-V3 + DIST", True, True, 77.72, "W4/8A4/8", 18.7, 154, 76.73),
)


def scaled_size_bops(base_size: float, base_bops: float, w_bits: int, a_bits: int
                     ) -> tuple[float, float]:
    r"""Size and BOPs of a uniformly quantized model from those of its float32 baseline:

    .. math::

        \text{size} = \text{size}_{32} \cdot \frac{b_w}{32}, \qquad
        \text{BOPs} = \text{BOPs}_{32 \times 32} \cdot \frac{b_w\, b_a}{32 \cdot 32},

    exact when every layer uses the same widths (the size counts weights only).  See the
    mixed_precision chapter.
    """
    base_size = check_real(base_size, "base_size", 0, lo_open=True)
    base_bops = check_real(base_bops, "base_bops", 0, lo_open=True)
    w = _bits_value(w_bits, "w_bits", allow_float=True, low=1)
    a = _bits_value(a_bits, "a_bits", allow_float=True, low=1)
    return base_size * w / FLOAT_BITS, base_bops * w * a / FLOAT_BITS**2


def mixed_precision_shares(size: float, bops_: float, base_size: float, base_bops: float,
                           low: int = 4, high: int = 8) -> tuple[float, float]:
    r"""Invert the accounting of a W\ *low*/*high* A\ *low*/*high* model: the share of the weights
    kept at ``high`` bits and the share of the MACs run at W\ *high* A\ *high*.

    If a fraction :math:`f` of the weights is at ``high`` bits and the rest at ``low``,
    :math:`\text{size}/\text{size}_{32} = (\text{low} + (\text{high} - \text{low}) f)/32`; if
    a fraction :math:`g` of the MACs runs at W\ *high* A\ *high* and the rest at W\ *low*
    A\ *low*, :math:`\text{BOPs}/\text{BOPs}_{32} = (\text{low}^2 + (\text{high}^2 -
    \text{low}^2) g)/32^2`.  Returns ``(f, g)``; values outside [0, 1] mean the numbers do not
    fit that model (``ValueError`` is not raised: the caller decides).  See the mixed_precision
    chapter.
    """
    size = check_real(size, "size", 0, lo_open=True)
    bops_ = check_real(bops_, "bops_", 0, lo_open=True)
    base_size = check_real(base_size, "base_size", 0, lo_open=True)
    base_bops = check_real(base_bops, "base_bops", 0, lo_open=True)
    low = _bits_value(low, "low", allow_float=False, low=1)
    high = _bits_value(high, "high", allow_float=False, low=1)
    if high <= low:
        raise ValueError(f"high must be > low, got low={low}, high={high}")
    f = (FLOAT_BITS * size / base_size - low) / (high - low)
    g = (FLOAT_BITS**2 * bops_ / base_bops - low**2) / (high**2 - low**2)
    return float(f), float(g)
