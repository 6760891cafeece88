r"""Calibration: choosing the real range ``[rmin, rmax]`` that a tensor is quantized over.

The calibration chapter (``book/calibration.md``) explains every function here.  Quantization
maps a range onto :math:`2^b` levels (:func:`qcourse.affine.qparams_from_range`); the question
this module answers is *which range*.  A range that covers every value seen (min-max) never
clips, but one outlier stretches the step for all other values.  A narrower range rounds the
bulk more finely and clips the tail.  Each *observer* makes this trade-off in its own way:

* :class:`MinMaxObserver` -- the running minimum and maximum (per tensor or per channel);
* :class:`MovingAverageMinMaxObserver` -- an exponential moving average of per-batch extremes
  (PyTorch's definition);
* :class:`PercentileObserver` -- the ``p``-th and ``(100 - p)``-th percentiles;
* :class:`MSEObserver` -- the range whose fake quantization has the smallest mean squared error
  on the data seen;
* :class:`EntropyObserver` -- the threshold whose quantized distribution is closest in
  Kullback-Leibler divergence to the original (TensorRT's procedure, Migacz 2017).

All share one interface: ``observer.update(batch)`` any number of times (it returns the
observer), then ``observer.range()`` and ``observer.qparams()``.  The histogram observers keep a
:class:`StreamingHistogram`, whose memory does not grow with the data.

Static calibration fixes the range once, from calibration data; dynamic quantization measures
it on every batch at run time (:func:`dynamic_qparams`, :func:`compare_static_dynamic`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from qcourse._checks import (
    MAX_BINS,
    MAX_ELEMENTS,
    MAX_SQUARABLE,
    check_bool,
    check_instance,
    check_int,
    check_real,
    real_array,
)
from qcourse._deprecated import moved_names
from qcourse.affine import (
    QParams,
    choose_qparams,
    error_breakdown,
    fake_quantize,
    qparams_from_range,
    qrange,
)

__all__ = [
    "EntropyObserver",
    "MSEObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "PercentileObserver",
    "StaticDynamicComparison",
    "StreamingHistogram",
    "compare_static_dynamic",
    "dynamic_fake_quant_hook",
    "dynamic_qparams",
    "fake_quant_hook",
    "histogram_mse",
    "histogram_percentile",
    "kl_divergence",
    "kl_threshold_search",
]


# --------------------------------------------------------------------------- the histogram


class StreamingHistogram:
    r"""A fixed-size histogram that grows its range by merging bins, never by re-sampling.

    The bins sit on the lattice :math:`[k w, (k+1) w)` for integers :math:`k`, anchored at
    real 0, and ``bins`` consecutive lattice cells are stored.  The first batch sets the width
    :math:`w = (\max - \min) / (\text{bins} - 2)`, so its values fill the window.  When a later
    batch falls outside the window, the width doubles -- each pair of cells :math:`2K, 2K + 1`
    merges exactly into cell :math:`K` -- until the old contents and the new batch fit.  Since
    :math:`\lfloor x / 2w \rfloor = \lfloor \lfloor x / w \rfloor / 2 \rfloor` (and dividing
    by 2 is exact in floating point), the result always equals the histogram of *all* values
    seen, binned directly on the final lattice: the order of the batches does not matter.  The
    price is resolution: after a doubling the data may fill only about half of the window.
    ``include_zero=True`` makes the window always reach real 0 (for histograms of
    :math:`|x|`, whose bins must start at 0).

    See the calibration chapter.

    Attributes
    ----------
    bins : int
    width : float or None
        Current bin width (``None`` before the first update).
    start : int
        Lattice index of the first stored bin.
    counts : numpy.ndarray, int64, shape (bins,)
    total : int
        Number of values seen.

    Bounds: ``bins`` is an int in [8, 2**24].
    """

    def __init__(self, bins: int = 2048, *, include_zero: bool = False):
        self.bins = check_int(bins, "bins", 8, MAX_BINS)
        self.include_zero = check_bool(include_zero, "include_zero")
        self.reset()

    def reset(self) -> None:
        self.width: float | None = None
        self.start = 0
        self.counts = np.zeros(self.bins, dtype=np.int64)
        self.total = 0
        self._k_lo = 0
        self._k_hi = -1

    def _index(self, v: float) -> int:
        return int(math.floor(v / self.width))

    def _double(self) -> None:
        new_start = self.start // 2
        pos = (self.start + np.arange(self.bins)) // 2 - new_start
        self.counts = np.bincount(pos, weights=self.counts, minlength=self.bins)[: self.bins]
        self.counts = np.rint(self.counts).astype(np.int64)
        self.start = new_start
        self.width *= 2.0
        self._k_lo //= 2
        self._k_hi //= 2

    def update(self, x) -> StreamingHistogram:
        """Add the values of ``x`` (finite reals, any shape, not empty); returns ``self``."""
        x = real_array(x, "x").ravel()
        lo, hi = float(x.min()), float(x.max())
        if self.include_zero:  # keep real 0 inside the window (it is not counted)
            lo, hi = min(lo, 0.0), max(hi, 0.0)
        if self.width is None:
            span = hi - lo
            if span > 0:
                self.width = span / (self.bins - 2)
            else:  # a constant batch: any positive width works; later batches double it
                self.width = max(abs(lo), 1e-12) * 2.0**-20
        while True:
            d_lo, d_hi = self._index(lo), self._index(hi)
            need_lo = d_lo if self.total == 0 else min(self._k_lo, d_lo)
            need_hi = d_hi if self.total == 0 else max(self._k_hi, d_hi)
            if need_hi - need_lo + 1 <= self.bins:
                break
            self._double()
        if need_lo != self.start:
            moved = np.zeros(self.bins, dtype=np.int64)
            if self.total:
                a, b = self._k_lo - self.start, self._k_hi - self.start + 1
                moved[self._k_lo - need_lo: self._k_hi - need_lo + 1] = self.counts[a:b]
            self.counts = moved
            self.start = need_lo
        idx = np.floor(x / self.width).astype(np.int64) - self.start
        self.counts += np.bincount(idx, minlength=self.bins)
        self._k_lo, self._k_hi = need_lo, need_hi
        self.total += x.size
        return self

    def occupied(self) -> tuple[np.ndarray, np.ndarray]:
        """``(edges, counts)`` of the bins from the lowest to the highest non-empty one.

        ``edges`` has one more entry than ``counts``: bin ``i`` is ``[edges[i], edges[i+1])``.
        """
        if self.total == 0:
            raise RuntimeError("the histogram is empty: call update() with data first")
        k = np.arange(self._k_lo, self._k_hi + 2, dtype=np.float64)
        counts = self.counts[self._k_lo - self.start: self._k_hi - self.start + 1].copy()
        return k * self.width, counts

    def abs_counts(self) -> tuple[np.ndarray, np.ndarray]:
        r"""The histogram of :math:`|x|` on bins :math:`[0, w), [w, 2w), \ldots` (exact fold).

        Cell :math:`k \ge 0` holds :math:`x \in [kw, (k+1)w)`; cell :math:`k < 0` holds
        :math:`x \in [kw, (k+1)w)`, i.e. :math:`|x| \in ((-k-1)w, -kw]`, and goes to abs bin
        :math:`-k-1`.
        """
        edges, counts = self.occupied()
        k = np.arange(self._k_lo, self._k_hi + 1)
        abs_idx = np.where(k >= 0, k, -k - 1)
        n = int(abs_idx.max()) + 1
        folded = np.bincount(abs_idx, weights=counts, minlength=n)
        return np.arange(n + 1, dtype=np.float64) * self.width, np.rint(folded).astype(np.int64)


#: Largest |edge| and count of a histogram: edges are cubed by histogram_mse (1e100 cubed is
#: 1e300) and counts summed.
_MAX_EDGE = 1e100
_MAX_COUNT = 1e250


def _check_histogram(edges, counts) -> tuple[np.ndarray, np.ndarray]:
    """``(edges, counts)`` of a histogram: 1-D, ``len(edges) == len(counts) + 1``, edges finite
    and strictly increasing, counts finite, non-negative, with a positive total."""
    edges = real_array(edges, "edges", ndim=1, max_abs=_MAX_EDGE)
    counts = real_array(counts, "counts", ndim=1, max_abs=_MAX_COUNT)
    if edges.size != counts.size + 1:
        raise ValueError(f"edges must have one more entry than counts, got {edges.shape} and "
                         f"{counts.shape}")
    if np.any(np.diff(edges) <= 0):
        raise ValueError("edges must be strictly increasing")
    if np.any(counts < 0) or counts.sum() <= 0:
        raise ValueError("counts must be non-negative with a positive total")
    return edges, counts


def histogram_percentile(edges, counts, percentile: float) -> float:
    r"""The ``percentile``-th percentile of histogrammed data, interpolated inside its bin.

    With :math:`C_j` the cumulative count up to and including bin :math:`j` and
    :math:`t = N p / 100`, find the first bin with :math:`C_j \ge t` and return
    :math:`e_j + (t - C_{j-1}) / c_j \cdot (e_{j+1} - e_j)`, treating the values as spread
    uniformly over the bin.  The answer is within one bin width of ``numpy.percentile`` on the
    raw data (up to the spacing of neighbouring samples).  See the calibration chapter.
    """
    edges, counts = _check_histogram(edges, counts)
    p = check_real(percentile, "percentile", 0.0, 100.0, lo_open=False)
    cum = np.cumsum(counts)
    target = cum[-1] * p / 100.0
    if target <= 0:
        j = int(np.flatnonzero(counts > 0)[0])
        return float(edges[j])
    j = int(np.searchsorted(cum, target, side="left"))
    j = min(j, counts.size - 1)
    before = cum[j - 1] if j > 0 else 0.0
    frac = (target - before) / counts[j] if counts[j] > 0 else 1.0
    return float(edges[j] + frac * (edges[j + 1] - edges[j]))


def histogram_mse(edges, counts, qparams: QParams) -> float:
    r"""Mean squared error of fake-quantizing histogrammed data, assuming each bin is uniform.

    Let :math:`s` be the scale and :math:`[L, H] = [s(q_{\min} - z), s(q_{\max} - z)]` the
    representable range.  The error of one value :math:`t` is :math:`(t - L)^2` below
    :math:`L`, :math:`(t - H)^2` above :math:`H`, and inside the range the squared distance to
    the nearest grid point.  Its integral :math:`G(x) = \int_L^x e(t)\,dt` has a closed form:

    .. math::

        G(x) = \begin{cases}
        (x - L)^3 / 3 & x < L \\
        n s^3/12 + r^3/3,\ \ n = \operatorname{round}((x - L)/s),\ r = x - L - n s
            & L \le x \le H \\
        (q_{\max} - q_{\min}) s^3 / 12 + (x - H)^3 / 3 & x > H
        \end{cases}

    (each full grid cell contributes :math:`\int_{-s/2}^{s/2} u^2 du = s^3/12`).  A bin
    :math:`[a, b)` holding :math:`c` values contributes :math:`c\,(G(b) - G(a)) / (b - a)`, and
    the MSE is the sum over bins divided by the total count.  Exact when the values are uniform
    within each bin.  Per-tensor parameters only.  See the calibration chapter.
    """
    if not isinstance(qparams, QParams):
        raise TypeError(f"qparams must be a QParams, got {type(qparams).__name__}")
    if qparams.axis is not None:
        raise ValueError("histogram_mse needs per-tensor qparams (axis=None)")
    edges, counts = _check_histogram(edges, counts)
    return float(_grid_mse(edges, counts, qparams.scale.reshape(1), qparams.zero_point.reshape(1),
                           qparams.qmin, qparams.qmax)[0])


def _grid_mse(edges, counts, scale, zero_point, qmin: int, qmax: int) -> np.ndarray:
    """:func:`histogram_mse` for K candidate grids at once (``scale``, ``zero_point``: (K,))."""
    s = np.asarray(scale, dtype=np.float64)[:, None]
    z = np.asarray(zero_point, dtype=np.float64)[:, None]
    low, high = s * (qmin - z), s * (qmax - z)
    x = edges[None, :]
    # G(x) = G_inside(clip(x)) + (x - clip(x))^3 / 3: below L, G_inside(L) = 0; above H,
    # G_inside(H) = (qmax - qmin) s^3 / 12.
    xc = np.clip(x, low, high)
    v = xc - low
    n = np.rint(v / s)
    r = v - n * s
    out = x - xc
    g = n * (s * s * s / 12.0) + (r * r * r + out * out * out) / 3.0
    per_bin = counts * np.diff(g, axis=1) / np.diff(edges)
    return per_bin.sum(axis=1) / counts.sum()


def kl_divergence(p, q) -> float:
    r"""Kullback-Leibler divergence :math:`D(P \| Q) = \sum_i P_i \log(P_i / Q_i)` in nats.

    ``p`` and ``q`` are histograms (non-negative counts of the same length); each is normalized
    to sum to 1.  Terms with :math:`P_i = 0` contribute 0; a bin with :math:`P_i > 0` and
    :math:`Q_i = 0` makes the divergence infinite (smooth ``q`` first to avoid that, as
    :func:`kl_threshold_search` does).  See the calibration chapter.
    """
    p = real_array(p, "p", ndim=1, max_abs=_MAX_COUNT)
    q = real_array(q, "q", ndim=1, max_abs=_MAX_COUNT)
    if p.shape != q.shape:
        raise ValueError(f"p and q must be 1-D histograms of the same length, got {p.shape} "
                         f"and {q.shape}")
    if np.any(p < 0) or np.any(q < 0) or p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("p and q must be non-negative with positive sums")
    p = p / p.sum()
    q = q / q.sum()
    mask = p > 0
    if np.any(q[mask] == 0):
        return math.inf
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def _smooth(h: np.ndarray, eps: float) -> np.ndarray:
    h = h / h.sum()
    h = h + eps
    return h / h.sum()


def kl_threshold_search(abs_counts, levels: int, *, eps: float = 1e-4):
    r"""TensorRT's entropy calibration on a histogram of :math:`|x|` (Migacz, 2017).

    For every candidate number of kept bins :math:`i = \text{levels}, \ldots, n`:

    1. reference :math:`P`: bins :math:`0..i-1`, with the counts of all bins :math:`\ge i` (the
       values that clipping at :math:`i w` saturates) added to bin :math:`i - 1`;
    2. candidate :math:`Q`: the same :math:`i` bins *without* the outliers, merged into
       ``levels`` groups -- group :math:`j` holds bins
       :math:`\lfloor j i / L \rfloor .. \lfloor (j+1) i / L \rfloor - 1` -- and expanded back,
       each group's total shared equally among its non-empty bins (empty bins stay empty);
    3. both normalized and smoothed, :math:`h \leftarrow (h + \epsilon) / \sum (h + \epsilon)`
       with :math:`\epsilon = 10^{-4}`, so that a bin empty in :math:`Q` but not in :math:`P`
       costs a large but finite penalty;
    4. :math:`D(P \| Q)` by :func:`kl_divergence`.

    The chosen :math:`i` minimizes the divergence (the first one on ties); the threshold is the
    upper edge of the kept bins, :math:`i w` (TensorRT's description uses the middle of the next
    bin, :math:`(i + 0.5) w`; the difference is half a bin).

    Returns
    -------
    best_i : int
        Number of bins kept; ``n`` (no clipping) if the histogram has at most ``levels`` bins.
    candidates : numpy.ndarray of int
    divergences : numpy.ndarray of float

    Bounds: ``levels`` in [2, 2**24], ``eps`` in (0, 1]; counts finite, at most 1e250.
    """
    hist = real_array(abs_counts, "abs_counts", ndim=1, max_abs=_MAX_COUNT)
    levels = check_int(levels, "levels", 2, MAX_BINS)
    eps = check_real(eps, "eps", 0.0, 1.0, lo_open=True)
    if np.any(hist < 0) or hist.sum() <= 0:
        raise ValueError("abs_counts must be a 1-D histogram: non-negative, positive total")
    n = hist.size
    if n <= levels:
        return n, np.array([n]), np.array([0.0])
    candidates = np.arange(levels, n + 1)
    divergences = np.empty(candidates.size)
    tail = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # tail[i] = sum(hist[i:])
    nonzero = hist > 0
    cum = np.concatenate([[0.0], np.cumsum(hist)])                # cum[i] = sum(hist[:i])
    cum_nz = np.concatenate([[0], np.cumsum(nonzero)])
    j = np.arange(levels + 1)
    for c, i in enumerate(candidates):
        bounds = (j * i) // levels                    # group g holds bins bounds[g]..bounds[g+1]-1
        group_sum = cum[bounds[1:]] - cum[bounds[:-1]]
        group_nz = cum_nz[bounds[1:]] - cum_nz[bounds[:-1]]
        share = np.divide(group_sum, group_nz, out=np.zeros(levels), where=group_nz > 0)
        q = np.where(nonzero[:i], np.repeat(share, np.diff(bounds)), 0.0)
        p = hist[:i].copy()
        p[-1] += tail[i]
        if cum[i] == 0:  # every kept bin is empty: this threshold cannot represent the data
            divergences[c] = math.inf
            continue
        # kl_divergence(_smooth(p), _smooth(q)) without re-validating the inputs every time
        ps, qs = _smooth(p, eps), _smooth(q, eps)
        divergences[c] = float(np.sum(ps * np.log(ps / qs)))
    best = int(candidates[int(np.argmin(divergences))])
    return best, candidates, divergences


# --------------------------------------------------------------------------- observers


class Observer:
    """The interface every observer shares; subclasses decide the range.

    Parameters
    ----------
    bits : int, default 8
    signed : bool, default True
    symmetric : bool, default False
    narrow_range : bool, default False
        Passed on to :func:`qcourse.affine.qparams_from_range`.

    ``update(batch)`` records a batch (finite reals, not empty) and returns the observer;
    ``range()`` returns the calibrated ``(rmin, rmax)``; ``qparams()`` turns it into
    :class:`~qcourse.affine.QParams`.  ``min_val`` and ``max_val`` always hold the exact
    extremes seen (per channel for per-channel observers).  Asking for a range before any
    ``update`` raises ``RuntimeError``.  See the calibration chapter.
    """

    axis: int | None = None

    def __init__(self, *, bits: int = 8, signed: bool = True, symmetric: bool = False,
                 narrow_range: bool = False):
        self.qmin, self.qmax = qrange(bits, signed, narrow_range)  # validates the three
        if not isinstance(symmetric, (bool, np.bool_)):
            raise TypeError(f"symmetric must be True or False, got {type(symmetric).__name__}")
        self.bits = int(bits)
        self.signed = bool(signed)
        self.symmetric = bool(symmetric)
        self.narrow_range = bool(narrow_range)
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen."""
        self.min_val = None
        self.max_val = None
        self.num_batches = 0
        self.num_values = 0

    def update(self, batch) -> Observer:
        x = real_array(batch, "batch")
        self._observe(x)
        self.num_batches += 1
        self.num_values += x.size
        return self

    def _observe(self, x: np.ndarray) -> None:
        lo, hi = float(x.min()), float(x.max())
        self.min_val = lo if self.min_val is None else min(self.min_val, lo)
        self.max_val = hi if self.max_val is None else max(self.max_val, hi)

    def _require_data(self) -> None:
        if self.num_batches == 0:
            raise RuntimeError(
                f"{type(self).__name__} has seen no data: call update(batch) at least once "
                f"before range() or qparams()"
            )

    def range(self):
        """The calibrated real range ``(rmin, rmax)`` (floats, or arrays per channel)."""
        self._require_data()
        return self._range()

    def _range(self):  # pragma: no cover - interface
        raise NotImplementedError

    def qparams(self) -> QParams:
        """:func:`~qcourse.affine.qparams_from_range` of :meth:`range` with this observer's
        settings."""
        rmin, rmax = self.range()
        return qparams_from_range(rmin, rmax, bits=self.bits, signed=self.signed,
                                  symmetric=self.symmetric, narrow_range=self.narrow_range,
                                  axis=self.axis)

    def _clip_to_seen(self, lo: float, hi: float) -> tuple[float, float]:
        """Intersect a clipping interval with the range of the data actually seen."""
        lo = min(max(lo, self.min_val), self.max_val)
        hi = max(min(hi, self.max_val), self.min_val)
        return lo, hi

    def __repr__(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        sign = "signed" if self.signed else "unsigned"
        return f"{type(self).__name__}(bits={self.bits}, {sign}, {kind})"


class MinMaxObserver(Observer):
    r"""The running extremes: :math:`r_{\min} = \min_t \min x_t`, :math:`r_{\max} = \max_t
    \max x_t` over all batches :math:`t`.

    Never clips a value it has seen; one outlier sets the step for everything.  With ``axis``
    set, keeps one range per index along ``axis`` (per-channel, e.g. ``axis=1`` for the
    features of a (batch, features) activation, ``axis=0`` for the rows of a weight).
    Matches PyTorch's ``MinMaxObserver`` / ``PerChannelMinMaxObserver``.  See the calibration
    chapter.
    """

    def __init__(self, *, bits: int = 8, signed: bool = True, symmetric: bool = False,
                 narrow_range: bool = False, axis: int | None = None):
        if axis is not None and (isinstance(axis, (bool, np.bool_))
                                 or not isinstance(axis, (int, np.integer))):
            raise TypeError(f"axis must be an int or None, got {type(axis).__name__}")
        self.axis = None if axis is None else int(axis)
        super().__init__(bits=bits, signed=signed, symmetric=symmetric,
                         narrow_range=narrow_range)

    def _batch_extremes(self, x: np.ndarray):
        if self.axis is None:
            return float(x.min()), float(x.max())
        if not -x.ndim <= self.axis < x.ndim:
            raise ValueError(f"axis={self.axis} is out of range for a batch of shape {x.shape}")
        ax = self.axis % x.ndim
        others = tuple(i for i in range(x.ndim) if i != ax)
        lo, hi = x.min(axis=others), x.max(axis=others)
        if self.min_val is not None and lo.shape != np.shape(self.min_val):
            raise ValueError(
                f"batch has {lo.size} channels along axis {self.axis}, earlier batches had "
                f"{np.size(self.min_val)}"
            )
        return lo, hi

    def _observe(self, x: np.ndarray) -> None:
        lo, hi = self._batch_extremes(x)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = np.minimum(self.min_val, lo)
            self.max_val = np.maximum(self.max_val, hi)
            if self.axis is None:
                self.min_val, self.max_val = float(self.min_val), float(self.max_val)

    def _range(self):
        return self.min_val, self.max_val


class MovingAverageMinMaxObserver(MinMaxObserver):
    r"""Exponential moving average of each batch's extremes (PyTorch's definition).

    The first batch sets :math:`r_{\min} = \min x_1`, :math:`r_{\max} = \max x_1`; every later
    batch moves them a fraction :math:`c` (``averaging_constant``) of the way:

    .. math::

        r_{\min} \leftarrow r_{\min} + c\,(\min x_t - r_{\min}), \qquad
        r_{\max} \leftarrow r_{\max} + c\,(\max x_t - r_{\max}).

    An occasional extreme batch moves the range only by :math:`c` times its excess, so the
    range follows the *typical* batch rather than the worst; values beyond it are clipped.
    ``min_val``/``max_val`` still record the exact extremes.  See the calibration chapter.
    """

    def __init__(self, averaging_constant: float = 0.01, *, bits: int = 8, signed: bool = True,
                 symmetric: bool = False, narrow_range: bool = False, axis: int | None = None):
        self.averaging_constant = check_real(averaging_constant, "averaging_constant", 0.0,
                                             1.0, lo_open=True)
        super().__init__(bits=bits, signed=signed, symmetric=symmetric,
                         narrow_range=narrow_range, axis=axis)

    def reset(self) -> None:
        super().reset()
        self.avg_min = None
        self.avg_max = None

    def _observe(self, x: np.ndarray) -> None:
        lo, hi = self._batch_extremes(x)
        c = self.averaging_constant
        if self.avg_min is None:
            self.avg_min, self.avg_max = lo, hi
        else:
            self.avg_min = self.avg_min + c * (lo - self.avg_min)
            self.avg_max = self.avg_max + c * (hi - self.avg_max)
        super()._observe(x)

    def _range(self):
        return self.avg_min, self.avg_max


class _HistogramObserver(Observer):
    """Shared machinery: a :class:`StreamingHistogram` of the values (per tensor), or of their
    magnitudes :math:`|x|` when the class sets ``_magnitudes`` (bins from real 0 up)."""

    _magnitudes = False

    def __init__(self, *, bins: int = 2048, bits: int = 8, signed: bool = True,
                 symmetric: bool = False, narrow_range: bool = False):
        self.histogram = StreamingHistogram(bins, include_zero=self._magnitudes)
        super().__init__(bits=bits, signed=signed, symmetric=symmetric,
                         narrow_range=narrow_range)

    def reset(self) -> None:
        super().reset()
        self.histogram.reset()

    def _observe(self, x: np.ndarray) -> None:
        super()._observe(x)
        self.histogram.update(np.abs(x) if self._magnitudes else x)


class PercentileObserver(_HistogramObserver):
    r"""Clip at percentiles: :math:`r_{\max} = P_{p}(x)`, :math:`r_{\min} = P_{100-p}(x)`.

    Percentiles are read off the streaming histogram (:func:`histogram_percentile`, linear
    inside a bin), so they are within one bin width of ``numpy.percentile`` on all the data --
    without storing it.  With ``symmetric=True`` the threshold is the ``p``-th percentile of
    :math:`|x|` and the range is :math:`[-t, t]` (intersected with the data's range).  A fixed
    percentile clips a fixed *fraction* of the values, however far out they lie.  See the
    calibration chapter.

    Bounds: ``percentile`` in (50, 100], ``bins`` in [8, 2**24].
    """

    def __init__(self, percentile: float = 99.99, *, bins: int = 2048, bits: int = 8,
                 signed: bool = True, symmetric: bool = False, narrow_range: bool = False):
        self.percentile = check_real(percentile, "percentile", 50.0, 100.0, lo_open=True)
        super().__init__(bins=bins, bits=bits, signed=signed, symmetric=symmetric,
                         narrow_range=narrow_range)

    def _range(self):
        if self.symmetric:
            edges, counts = self.histogram.abs_counts()
            t = histogram_percentile(edges, counts, self.percentile)
            return self._clip_to_seen(-t, t)
        edges, counts = self.histogram.occupied()
        hi = histogram_percentile(edges, counts, self.percentile)
        lo = histogram_percentile(edges, counts, 100.0 - self.percentile)
        return self._clip_to_seen(lo, hi)


class MSEObserver(_HistogramObserver):
    r"""The range that minimizes the quantization MSE of the data seen, searched on a grid.

    Candidates shrink the min-max range :math:`[m, M]` (widened to contain 0) by a factor
    :math:`\alpha_k = k / K`, :math:`k = 1..K` (``num_candidates``), and each is scored by
    :func:`histogram_mse` -- the exact MSE of the histogram, with the real ``scale`` and
    ``zero_point`` of that candidate, so rounding of the zero point is accounted for.  For an
    asymmetric range with both tails (:math:`m < 0 < M`), the best :math:`\alpha` is then
    refined by one round of coordinate search: the lower end over :math:`\beta m` with the
    upper end fixed, then the upper end over :math:`\beta M` with the lower end fixed (same
    grid).  After :meth:`range`, ``candidates_`` and ``mse_`` hold the shrink search
    (ranges and MSEs) for plotting.  See the calibration chapter.

    Bounds: ``num_candidates`` in [2, 2**24], ``bins`` in [8, 2**24].
    """

    def __init__(self, num_candidates: int = 200, *, bins: int = 2048, bits: int = 8,
                 signed: bool = True, symmetric: bool = False, narrow_range: bool = False):
        self.num_candidates = check_int(num_candidates, "num_candidates", 2, MAX_BINS)
        super().__init__(bins=bins, bits=bits, signed=signed, symmetric=symmetric,
                         narrow_range=narrow_range)

    def _scores(self, edges, counts, lo, hi) -> np.ndarray:
        """MSE of every candidate range ``[lo[k], hi[k]]`` (vectorized over k)."""
        qp = qparams_from_range(lo, hi, bits=self.bits, signed=self.signed,
                                symmetric=self.symmetric, narrow_range=self.narrow_range, axis=0)
        return _grid_mse(edges, counts.astype(np.float64), qp.scale, qp.zero_point, qp.qmin,
                         qp.qmax)

    def _range(self):
        edges, counts = self.histogram.occupied()
        m, big_m = min(self.min_val, 0.0), max(self.max_val, 0.0)
        if m == big_m:  # all zeros: nothing to search
            return self.min_val, self.max_val
        alphas = np.arange(1, self.num_candidates + 1) / self.num_candidates
        mse = self._scores(edges, counts, alphas * m, alphas * big_m)
        k = int(np.argmin(mse))
        self.candidates_ = np.stack([alphas * m, alphas * big_m], axis=1)
        self.mse_ = mse
        lo, hi = alphas[k] * m, alphas[k] * big_m
        if not self.symmetric and m < 0 < big_m:
            best = mse[k]
            ones = np.ones_like(alphas)
            lo_scores = self._scores(edges, counts, alphas * m, hi * ones)
            j = int(np.argmin(lo_scores))
            if lo_scores[j] < best:
                best, lo = lo_scores[j], alphas[j] * m
            hi_scores = self._scores(edges, counts, lo * ones, alphas * big_m)
            j = int(np.argmin(hi_scores))
            if hi_scores[j] < best:
                best, hi = hi_scores[j], alphas[j] * big_m
        return self._clip_to_seen(float(lo), float(hi))


class EntropyObserver(_HistogramObserver):
    r"""KL-divergence (entropy) calibration, TensorRT's procedure (Migacz 2017).

    Keeps a :class:`StreamingHistogram` of :math:`|x|` (``bins=2048`` as in TensorRT) and runs
    :func:`kl_threshold_search` with ``levels`` the number of grid levels the positive side
    gets: :math:`2^b` when the data seen are non-negative and the range is asymmetric (a ReLU
    output on an unsigned or asymmetric grid), else :math:`2^{b-1}`.  The threshold :math:`T`
    becomes the range :math:`[-T, T]` intersected with the data's range (so ``[0, T]`` for
    non-negative data).

    With ``flatten_zero_bin=True`` (the default), bin 0 -- which holds every exact zero, half
    of a ReLU output -- is given the count of bin 1 before the search, as NVIDIA's open-source
    implementation of the procedure (pytorch-quantization) does; otherwise that spike dominates
    both distributions and the search clips far too hard.  After :meth:`range`,
    ``thresholds_`` and ``divergences_`` hold the search for plotting.  See the calibration
    chapter.

    Bounds: ``bins`` in [8, 2**24]; ``bits`` as for :func:`qcourse.affine.qrange`.
    """

    _magnitudes = True

    def __init__(self, *, bins: int = 2048, bits: int = 8, signed: bool = True,
                 symmetric: bool = False, narrow_range: bool = False,
                 flatten_zero_bin: bool = True):
        self.flatten_zero_bin = check_bool(flatten_zero_bin, "flatten_zero_bin")
        super().__init__(bins=bins, bits=bits, signed=signed, symmetric=symmetric,
                         narrow_range=narrow_range)

    @property
    def levels(self) -> int:
        one_sided = self.min_val is not None and self.min_val >= 0 and not self.symmetric
        return 2**self.bits if one_sided else 2 ** (self.bits - 1)

    def _range(self):
        amax = max(abs(self.min_val), abs(self.max_val))
        if amax == 0:
            return self.min_val, self.max_val
        edges, counts = self.histogram.occupied()
        width = self.histogram.width
        first = int(round(edges[0] / width))
        full = np.concatenate([np.zeros(first, dtype=np.int64), counts])  # bins from |x| = 0
        if self.flatten_zero_bin and full.size > 1:
            full[0] = full[1]
        if full.sum() == 0:  # only exact zeros besides the flattened bin: keep the full range
            return self.min_val, self.max_val
        best, cands, divs = kl_threshold_search(full, self.levels)
        self.thresholds_ = cands * width
        self.divergences_ = divs
        t = min(best * width, amax)
        return self._clip_to_seen(-t, t)


# ------------------------------------------------------------------ static and dynamic ranges


def fake_quant_hook(qparams: QParams) -> Callable:
    """A forward hook (for ``register_forward_hook``) that replaces a layer's output by its
    fake-quantized copy with the fixed ``qparams``: a statically quantized activation.  See the
    calibration chapter."""
    if not isinstance(qparams, QParams):
        raise TypeError(f"qparams must be a QParams, got {type(qparams).__name__}")

    def hook(module, inp, out):
        return fake_quantize(out, qparams)

    return hook


def dynamic_qparams(x, *, bits: int = 8, signed: bool = True, symmetric: bool = False,
                    narrow_range: bool = False, per_row: bool = False) -> QParams:
    r"""Run-time (dynamic) parameters from the batch itself: min-max of ``x``.

    Per tensor: one range :math:`[\min x, \max x]` for the batch.  ``per_row=True``: one range
    per row of a 2-D ``x`` (each example of a batch gets its own scale, ``axis=0``), so an
    outlier in one example no longer coarsens the others.  The cost is an extra pass over
    ``x`` (a min and a max per element) before quantizing, and a requantization multiplier
    that cannot be folded in ahead of time.  See the calibration chapter.
    """
    x = real_array(x, "x")
    if check_bool(per_row, "per_row"):
        if x.ndim != 2:
            raise ValueError(f"per_row=True needs a 2-D (batch, features) x, got shape {x.shape}")
        return choose_qparams(x, bits=bits, signed=signed, symmetric=symmetric,
                              narrow_range=narrow_range, axis=0)
    return choose_qparams(x, bits=bits, signed=signed, symmetric=symmetric,
                          narrow_range=narrow_range)


def dynamic_fake_quant_hook(*, bits: int = 8, signed: bool = True, symmetric: bool = False,
                            per_row: bool = False) -> Callable:
    """A forward hook that fake-quantizes each output with :func:`dynamic_qparams` of that very
    output (dynamic quantization).  See the calibration chapter."""
    qrange(bits, signed)  # validate now, not at the first forward
    symmetric = check_bool(symmetric, "symmetric")
    per_row = check_bool(per_row, "per_row")

    def hook(module, inp, out):
        qp = dynamic_qparams(out, bits=bits, signed=signed, symmetric=symmetric, per_row=per_row)
        return fake_quantize(out, qp)

    return hook


@dataclass(frozen=True)
class StaticDynamicComparison:
    """Error and run-time cost of static versus dynamic ranges (see
    :func:`compare_static_dynamic`)."""

    static_mse: float
    dynamic_mse: float
    static_sqnr_db: float
    dynamic_sqnr_db: float
    static_clipped_fraction: float
    num_batches: int
    range_reads: int
    range_comparisons: int
    qparams_computed: int


def compare_static_dynamic(x, static_qparams: QParams, *, batch_size: int, bits: int = 8,
                           signed: bool = True, symmetric: bool = False,
                           per_row: bool = False) -> StaticDynamicComparison:
    r"""Quantize the rows of ``x`` batch by batch with a fixed range and with per-batch ranges.

    Static: every batch uses ``static_qparams`` (from calibration).  Dynamic: every batch gets
    :func:`dynamic_qparams` (per tensor, or per row).  Errors are over all of ``x``.  The cost
    of dynamic ranges is counted, not timed: each batch is read once more to find its range
    (``range_reads`` = number of elements), with two comparisons per element
    (``range_comparisons``), and ``qparams_computed`` scale/zero-point pairs are computed at run
    time (one per batch, or one per row).  A static range costs none of these.  See the
    calibration chapter.

    Bounds: ``batch_size`` in [1, 2**28]; ``|x|`` at most 1e150 (the errors are squared).
    """
    x = real_array(x, "x", ndim=2, max_abs=MAX_SQUARABLE)
    check_instance(static_qparams, "static_qparams", QParams)
    batch_size = check_int(batch_size, "batch_size", 1, MAX_ELEMENTS)
    per_row = check_bool(per_row, "per_row")
    static_hat, dynamic_hat = np.empty_like(x), np.empty_like(x)
    n_batches = 0
    n_params = 0
    for s in range(0, x.shape[0], batch_size):
        b = x[s:s + batch_size]
        static_hat[s:s + batch_size] = fake_quantize(b, static_qparams)
        qp = dynamic_qparams(b, bits=bits, signed=signed, symmetric=symmetric, per_row=per_row)
        dynamic_hat[s:s + batch_size] = fake_quantize(b, qp)
        n_batches += 1
        n_params += qp.scale.size
    signal = float(np.sum(x * x))

    def sqnr(hat):
        noise = float(np.sum((x - hat) ** 2))
        if signal == 0.0:
            return math.nan
        return math.inf if noise == 0.0 else 10.0 * math.log10(signal / noise)

    return StaticDynamicComparison(
        static_mse=float(np.mean((x - static_hat) ** 2)),
        dynamic_mse=float(np.mean((x - dynamic_hat) ** 2)),
        static_sqnr_db=sqnr(static_hat),
        dynamic_sqnr_db=sqnr(dynamic_hat),
        static_clipped_fraction=error_breakdown(x, static_qparams).clipped_fraction,
        num_batches=n_batches,
        range_reads=int(x.size),
        range_comparisons=int(2 * x.size),
        qparams_computed=n_params,
    )


__getattr__ = moved_names(__name__, {
    "calibrate": "qcourse.nn.calibrate",
    "compare_observers": "qcourse.nn.compare_observers",
})
