"""Observers, the streaming histogram and static/dynamic ranges (qcourse.calibration).

Each observer is checked against an independent computation of what it claims: min-max against
the true range and against ``choose_qparams`` of all the data, the moving average against the
recursion written out, percentiles against ``numpy.percentile``, the MSE search against a
brute-force search on the raw samples, the KL search against its defining behaviour (clip
outliers, keep uniform data).  PyTorch's observers are the outside oracle when installed.
"""

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qcourse.affine import (
    QParams,
    choose_qparams,
    fake_quantize,
    qparams_from_range,
    qrange,
)
from qcourse.calibration import (
    EntropyObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
    StreamingHistogram,
    compare_static_dynamic,
    dynamic_fake_quant_hook,
    dynamic_qparams,
    fake_quant_hook,
    histogram_mse,
    histogram_percentile,
    kl_divergence,
    kl_threshold_search,
)
from qcourse.nn import calibrate, compare_observers

ALL_OBSERVERS = [
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    PercentileObserver,
    MSEObserver,
    EntropyObserver,
]


def _batches(x, n):
    return np.array_split(x, n)


def _mse(x, qp):
    return float(np.mean((x - fake_quantize(x, qp)) ** 2))


# --------------------------------------------------------------------------- min-max


def test_minmax_is_the_true_range_over_all_batches():
    rng = np.random.default_rng(0)
    x = rng.standard_t(3, size=5000)
    obs = MinMaxObserver()
    for b in _batches(x, 7):
        assert obs.update(b) is obs
    assert obs.range() == (x.min(), x.max())
    assert obs.num_batches == 7 and obs.num_values == x.size
    assert obs.qparams() == choose_qparams(x)
    sym = MinMaxObserver(bits=4, symmetric=True)
    for b in _batches(x, 3):
        sym.update(b)
    assert sym.qparams() == choose_qparams(x, bits=4, symmetric=True)


def test_minmax_per_channel():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 6)) * np.array([0.1, 1, 2, 5, 10, 50])
    obs = MinMaxObserver(axis=1, signed=False)
    for b in _batches(x, 4):
        obs.update(b)
    np.testing.assert_array_equal(obs.min_val, x.min(axis=0))
    np.testing.assert_array_equal(obs.max_val, x.max(axis=0))
    qp = obs.qparams()
    assert qp.axis == 1 and qp.scale.shape == (6,)
    assert qp == choose_qparams(x, signed=False, axis=1)
    # a weight's rows: axis=0
    w = rng.normal(size=(4, 9))
    assert MinMaxObserver(axis=0).update(w).qparams() == choose_qparams(w, axis=0)


@settings(max_examples=40)
@given(
    hnp.arrays(np.float64, st.integers(1, 60), elements=st.floats(-1e6, 1e6)),
    st.integers(1, 5),
)
def test_minmax_equals_choose_qparams_for_any_split(x, n):
    obs = MinMaxObserver(bits=8, signed=False)
    for b in np.array_split(x, min(n, x.size)):
        obs.update(b)
    try:
        want = choose_qparams(x, bits=8, signed=False)
    except ValueError as exc:  # a range whose scale underflows (all |x| below ~1e-321)
        with pytest.raises(ValueError, match=re.escape(str(exc))):
            obs.qparams()
    else:
        assert obs.qparams() == want


def test_a_range_whose_scale_underflows_is_refused_by_the_observer_and_choose_qparams():
    """Found by Hypothesis (x = [5e-324]): the zero point divided by a scale of 0 before the
    scale was checked, a RuntimeWarning instead of the error that names the problem."""
    x = np.array([5e-324])
    for symmetric in (False, True):
        with pytest.raises(ValueError, match="scale underflows"):
            choose_qparams(x, bits=8, signed=False, symmetric=symmetric)
    with pytest.raises(ValueError, match="scale underflows"):
        MinMaxObserver(bits=8, signed=False).update(x).qparams()


def test_moving_average_matches_the_recursion():
    rng = np.random.default_rng(2)
    batches = [rng.normal(loc=i * 0.1, scale=1 + i, size=50) for i in range(6)]
    c = 0.3
    obs = MovingAverageMinMaxObserver(averaging_constant=c)
    lo, hi = batches[0].min(), batches[0].max()
    obs.update(batches[0])
    for b in batches[1:]:
        obs.update(b)
        lo = lo + c * (b.min() - lo)
        hi = hi + c * (b.max() - hi)
    rmin, rmax = obs.range()
    assert rmin == pytest.approx(lo, rel=1e-14) and rmax == pytest.approx(hi, rel=1e-14)
    # the exact extremes are still recorded
    allx = np.concatenate(batches)
    assert obs.min_val == allx.min() and obs.max_val == allx.max()
    assert obs.qparams() == qparams_from_range(rmin, rmax)


def test_moving_average_per_channel_and_default_constant():
    rng = np.random.default_rng(3)
    batches = [rng.normal(size=(20, 3)) * (k + 1) for k in range(4)]
    obs = MovingAverageMinMaxObserver(axis=1)
    assert obs.averaging_constant == 0.01  # PyTorch's default
    lo, hi = batches[0].min(axis=0), batches[0].max(axis=0)
    obs.update(batches[0])
    for b in batches[1:]:
        obs.update(b)
        lo = lo + 0.01 * (b.min(axis=0) - lo)
        hi = hi + 0.01 * (b.max(axis=0) - hi)
    rmin, rmax = obs.range()
    np.testing.assert_allclose(rmin, lo, rtol=1e-14)
    np.testing.assert_allclose(rmax, hi, rtol=1e-14)
    assert obs.qparams().scale.shape == (3,)


# --------------------------------------------------------------------------- the histogram


@settings(max_examples=40)
@given(
    st.lists(
        st.tuples(st.floats(-1e3, 1e3), st.floats(1e-3, 1e3), st.integers(1, 40)),
        min_size=1, max_size=6,
    ),
    st.integers(8, 64),
    st.integers(0, 2**16),
)
def test_streaming_histogram_equals_direct_binning_on_the_final_lattice(specs, bins, seed):
    rng = np.random.default_rng(seed)
    batches = [rng.normal(loc, scale, size=n) for loc, scale, n in specs]
    h = StreamingHistogram(bins)
    for b in batches:
        h.update(b)
    x = np.concatenate(batches)
    edges, counts = h.occupied()
    assert counts.sum() == x.size == h.total
    assert counts.size <= bins and counts[0] > 0 and counts[-1] > 0
    k = np.floor(x / h.width).astype(np.int64)
    direct = np.bincount(k - k.min())
    np.testing.assert_array_equal(counts, direct)
    assert edges[0] == k.min() * h.width
    # the order of the batches does not matter
    h2 = StreamingHistogram(bins)
    for b in batches[::-1]:
        h2.update(b)
    if h2.width == h.width:
        np.testing.assert_array_equal(h2.occupied()[1], counts)


def test_histogram_fold_to_absolute_values():
    rng = np.random.default_rng(4)
    x = rng.normal(size=1000)
    h = StreamingHistogram(64).update(x)
    edges, counts = h.abs_counts()
    assert edges[0] == 0.0 and counts.sum() == x.size
    k = np.floor(x / h.width).astype(np.int64)
    abs_k = np.where(k >= 0, k, -k - 1)
    np.testing.assert_array_equal(counts, np.bincount(abs_k))


def test_constant_batches_and_growth():
    h = StreamingHistogram(16).update(np.full(10, 3.0))
    assert h.occupied()[1].sum() == 10
    h.update(np.array([-100.0, 500.0]))
    edges, counts = h.occupied()
    assert counts.sum() == 12 and edges[0] <= -100 and edges[-1] > 500


@pytest.mark.parametrize("percentile", [50.0, 90.0, 99.0, 99.9])
@pytest.mark.parametrize("dist", ["normal", "relu_t", "uniform"])
def test_histogram_percentile_within_one_bin_of_numpy(percentile, dist):
    rng = np.random.default_rng(5)
    x = {
        "normal": rng.normal(size=100_000),
        "relu_t": np.maximum(rng.standard_t(4, size=100_000), 0),
        "uniform": rng.uniform(-2, 5, size=100_000),
    }[dist]
    h = StreamingHistogram(2048)
    for b in _batches(x, 5):
        h.update(b)
    edges, counts = h.occupied()
    ours = histogram_percentile(edges, counts, percentile)
    assert abs(ours - np.percentile(x, percentile)) <= h.width * 1.001


def test_percentile_observer_matches_numpy():
    rng = np.random.default_rng(6)
    x = rng.standard_t(5, size=200_000)
    obs = PercentileObserver(99.9)
    for b in _batches(x, 10):
        obs.update(b)
    width = obs.histogram.width
    lo, hi = obs.range()
    assert abs(hi - np.percentile(x, 99.9)) <= width
    assert abs(lo - np.percentile(x, 0.1)) <= width
    sym = PercentileObserver(99.0, symmetric=True).update(x)
    t = np.percentile(np.abs(x), 99.0)
    lo, hi = sym.range()
    assert abs(max(-lo, hi) - t) <= sym.histogram.width
    assert obs.qparams() == qparams_from_range(*obs.range())


def test_histogram_percentile_interpolates_inside_the_bin():
    edges, counts = np.array([0.0, 1.0, 2.0, 4.0]), np.array([2, 2, 4])
    assert histogram_percentile(edges, counts, 25.0) == 1.0      # 2 of 8 values: end of bin 0
    assert histogram_percentile(edges, counts, 12.5) == 0.5      # halfway through bin 0
    assert histogram_percentile(edges, counts, 75.0) == 3.0      # halfway through [2, 4)
    assert histogram_percentile(edges, counts, 0.0) == 0.0
    assert histogram_percentile(edges, counts, 100.0) == 4.0


def test_percentile_100_is_the_maximum():
    x = np.array([0.0, 1.0, 2.0, 7.5])
    obs = PercentileObserver(100.0, bins=8).update(x)
    assert obs.range() == (0.0, 7.5)


# --------------------------------------------------------------------------- MSE


def test_histogram_mse_is_exact_for_values_uniform_in_their_bins():
    # 400 evenly spaced points in each bin approximate "uniform within the bin" very closely
    edges = np.linspace(-1.0, 3.0, 41)
    counts = np.arange(1, 41) % 7 + 1
    per = 400
    x = np.concatenate([
        a + (np.arange(per) + 0.5) / per * (b - a)
        for a, b in zip(edges[:-1], edges[1:], strict=True)
    ])
    weights = np.repeat(counts, per)
    for lo, hi, bits in [(-1.0, 3.0, 4), (-0.5, 2.0, 3), (0.0, 1.0, 2), (-1.0, 3.0, 8)]:
        qp = qparams_from_range(lo, hi, bits=bits)
        empirical = np.average((x - fake_quantize(x, qp)) ** 2, weights=weights)
        assert histogram_mse(edges, counts, qp) == pytest.approx(empirical, rel=2e-3, abs=1e-9)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("dist", ["relu_t", "normal"])
def test_mse_observer_is_close_to_brute_force_optimum(bits, dist):
    rng = np.random.default_rng(7)
    if dist == "relu_t":
        x, signed, symmetric = np.maximum(rng.standard_t(4, size=40_000), 0), False, False
    else:
        x, signed, symmetric = rng.normal(size=40_000), True, True
    obs = MSEObserver(bits=bits, signed=signed, symmetric=symmetric)
    for b in _batches(x, 4):
        obs.update(b)
    chosen = _mse(x, obs.qparams())
    lo, hi = min(x.min(), 0), x.max()
    brute = min(
        _mse(x, qparams_from_range(a * lo, a * hi, bits=bits, signed=signed, symmetric=symmetric))
        for a in np.linspace(0.02, 1.0, 500)
    )
    assert chosen <= brute * 1.03, (chosen, brute)
    # and the search really clips when it should: at low bits the best range is not min-max
    if bits <= 4:
        assert _mse(x, obs.qparams()) < _mse(x, choose_qparams(x, bits=bits, signed=signed,
                                                               symmetric=symmetric))


def test_mse_refinement_fixes_a_lopsided_range():
    # a long negative tail next to a short, dense positive bulk: shrinking both ends by the
    # same factor must either clip the bulk or keep the tail; adjusting each end fixes that
    rng = np.random.default_rng(8)
    x = np.concatenate([-np.abs(rng.standard_t(2, size=5000)) * 0.5,
                        rng.uniform(0, 1, size=20000)])
    obs = MSEObserver(bits=4).update(x)
    chosen = _mse(x, obs.qparams())
    assert chosen < 0.5 * float(np.min(obs.mse_))
    lo, hi = obs.range()
    assert x.min() < lo < 0 < hi <= x.max()


def test_mse_refinement_handles_two_different_tails():
    rng = np.random.default_rng(8)
    x = np.concatenate([-np.abs(rng.normal(scale=0.3, size=20_000)),
                        np.abs(rng.standard_t(3, size=20_000)) * 2])
    obs = MSEObserver(bits=4).update(x)
    lo, hi = obs.range()
    chosen = _mse(x, obs.qparams())
    shrink_only = float(np.min(obs.mse_))
    assert chosen <= shrink_only * 1.01
    # a coarse 2-D brute force over both ends cannot do much better
    brute = min(
        _mse(x, qparams_from_range(a * x.min(), b * x.max(), bits=4))
        for a in np.linspace(0.1, 1, 19) for b in np.linspace(0.05, 1, 39)
    )
    assert chosen <= brute * 1.03
    assert hi < x.max() and lo >= x.min()


# --------------------------------------------------------------------------- KL / entropy


def test_kl_divergence_values():
    assert kl_divergence([1, 2, 3], [2, 4, 6]) == 0.0
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_divergence([1, 1], [1, 3]) == pytest.approx(expected, rel=1e-14)
    assert kl_divergence([1, 1], [0, 1]) == math.inf
    assert kl_divergence([0, 1], [1, 1]) == pytest.approx(math.log(2))


@settings(max_examples=50)
@given(
    hnp.arrays(np.float64, 12, elements=st.floats(0, 100)),
    hnp.arrays(np.float64, 12, elements=st.floats(0.01, 100)),
)
def test_kl_divergence_is_non_negative(p, q):
    if p.sum() > 0:
        assert kl_divergence(p, q) >= -1e-12


def test_kl_observer_clips_outliers():
    rng = np.random.default_rng(9)
    x = np.concatenate([np.abs(rng.normal(size=100_000)), [40.0, 55.0, 70.0]])
    obs = EntropyObserver(signed=False)
    for b in _batches(x, 3):
        obs.update(b)
    lo, hi = obs.range()
    # every outlier is clipped, the bulk (99.9 % of it below 3.3) is kept.  The search cannot
    # go below `levels` bins (256 here), which bounds how hard it can clip.
    assert np.percentile(x, 99.9) < hi < 40.0
    assert lo == x.min()
    two_sided = EntropyObserver().update(np.concatenate([rng.normal(size=50_000), [-60.0]]))
    lo, hi = two_sided.range()
    assert -10 < lo < -3 and 3 < hi < 10


def test_kl_observer_keeps_uniform_data():
    rng = np.random.default_rng(10)
    x = rng.uniform(0, 1, size=100_000)
    for bits in (8, 4):
        _, hi = EntropyObserver(bits=bits, signed=False).update(x).range()
        assert hi >= 0.95 * x.max()


def test_kl_levels_follow_the_grid():
    pos = np.abs(np.random.default_rng(11).normal(size=100))
    assert EntropyObserver(bits=8, signed=False).update(pos).levels == 256
    assert EntropyObserver(bits=8, signed=False, symmetric=True).update(pos).levels == 128
    assert EntropyObserver(bits=8).update(pos - 0.5).levels == 128


def _reference_kl_search(hist, levels, eps=1e-4):
    """The procedure written out with loops, independently of the library's vectorization."""
    hist = [float(h) for h in hist]
    out = []
    for i in range(levels, len(hist) + 1):
        p = hist[:i]
        p[-1] += sum(hist[i:])
        q = [0.0] * i
        for g in range(levels):
            members = [k for k in range(i) if (g * i) // levels <= k < ((g + 1) * i) // levels]
            filled = [k for k in members if hist[k] > 0]
            for k in filled:
                q[k] = sum(hist[k2] for k2 in members) / len(filled)
        if sum(hist[:i]) == 0:
            out.append(math.inf)
            continue
        ps = [v / sum(p) + eps for v in p]
        qs = [v / sum(q) + eps for v in q]
        ps = [v / sum(ps) for v in ps]
        qs = [v / sum(qs) for v in qs]
        out.append(sum(a * math.log(a / b) for a, b in zip(ps, qs, strict=True)))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_threshold_search_matches_the_procedure_written_out(seed):
    rng = np.random.default_rng(seed)
    hist = rng.integers(0, 50, size=60) * (rng.random(60) < 0.7)
    hist[0] = 0 if seed == 2 else hist[0]
    levels = [4, 8, 16][seed]
    best, cands, divs = kl_threshold_search(hist, levels)
    expected = _reference_kl_search(hist, levels)
    np.testing.assert_allclose(divs, expected, rtol=1e-10)
    assert cands.tolist() == list(range(levels, 61))
    assert best == cands[int(np.argmin(expected))]


def test_kl_threshold_search_on_a_short_histogram_keeps_everything():
    best, cands, divs = kl_threshold_search(np.array([5, 0, 3, 1]), levels=8)
    assert best == 4 and cands.tolist() == [4]


def test_kl_search_with_exactly_representable_histogram():
    # a histogram with one non-empty bin per level: keeping every bin loses nothing
    hist = np.zeros(64)
    hist[::4] = 10
    best, cands, divs = kl_threshold_search(hist, levels=16)
    assert divs[cands == 64][0] == pytest.approx(0.0, abs=1e-12)
    assert best == 61 or divs.min() == pytest.approx(0.0, abs=1e-12)


def test_flattening_the_zero_bin_matters_for_relu_outputs():
    rng = np.random.default_rng(12)
    x = np.maximum(rng.standard_t(4, size=50_000), 0)  # about half exact zeros
    _, with_flat = EntropyObserver(bits=4, signed=False).update(x).range()
    _, without = EntropyObserver(bits=4, signed=False, flatten_zero_bin=False).update(x).range()
    assert without < with_flat


# --------------------------------------------------------------------------- all observers


@pytest.mark.parametrize("cls", ALL_OBSERVERS)
@pytest.mark.parametrize("bits, signed, symmetric", [
    (8, True, False), (8, False, False), (8, True, True), (4, False, False), (2, True, True),
    (4, False, True),
])
def test_every_observer_returns_valid_qparams(cls, bits, signed, symmetric):
    rng = np.random.default_rng(13)
    x = rng.standard_t(3, size=(500, 8)).astype(np.float32) + 0.3
    obs = cls(bits=bits, signed=signed, symmetric=symmetric)
    for b in _batches(x, 3):
        obs.update(b)
    qp = obs.qparams()
    assert isinstance(qp, QParams) and qp.axis is None
    assert (qp.qmin, qp.qmax) == qrange(bits, signed)
    assert float(qp.scale) > 0 and qp.qmin <= int(qp.zero_point) <= qp.qmax
    lo, hi = obs.range()
    assert x.min() <= lo <= hi <= x.max()
    low, high = qp.representable_range()
    assert low <= 0 <= high
    assert fake_quantize(x, qp).dtype == np.float32
    obs.reset()
    with pytest.raises(RuntimeError, match="no data"):
        obs.qparams()


@pytest.mark.parametrize("cls", ALL_OBSERVERS)
def test_every_observer_handles_all_zero_and_constant_data(cls):
    zeros = cls().update(np.zeros(50))
    assert zeros.range() == (0.0, 0.0)
    assert float(zeros.qparams().scale) == 1.0
    const = cls(signed=False).update(np.full(20, 2.5))
    lo, hi = const.range()
    assert lo == hi == 2.5
    assert fake_quantize(np.array([2.5]), const.qparams())[0] == pytest.approx(2.5, rel=1e-2)


@pytest.mark.parametrize("cls", ALL_OBSERVERS)
def test_every_observer_accepts_integer_and_float32_batches(cls):
    obs = cls().update(np.arange(-5, 20, dtype=np.int32)).update(np.ones(3, dtype=np.float32))
    assert isinstance(obs.qparams(), QParams)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("cls", ALL_OBSERVERS)
@pytest.mark.parametrize(
    "batch, exc, match",
    [
        (np.array([]), ValueError, "empty"),
        (np.array([1.0, np.nan]), ValueError, "NaN"),
        (np.array([np.inf, 1.0]), ValueError, "NaN/Inf"),
        (np.array(["a", "b"]), TypeError, "real numbers"),
        (np.array([1 + 2j]), TypeError, "real numbers"),
    ],
)
def test_observers_reject_bad_batches(cls, batch, exc, match):
    obs = cls()
    with pytest.raises(exc, match=match):
        obs.update(batch)
    assert obs.num_batches == 0
    with pytest.raises(RuntimeError, match="update"):
        obs.range()


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: MinMaxObserver(bits=1), ValueError, "bits"),
        (lambda: MinMaxObserver(bits=8.0), TypeError, "bits"),
        (lambda: MinMaxObserver(signed="yes"), TypeError, "signed"),
        (lambda: MinMaxObserver(symmetric=1), TypeError, "symmetric"),
        (lambda: MinMaxObserver(axis=1.0), TypeError, "axis"),
        (lambda: MovingAverageMinMaxObserver(0.0), ValueError, "averaging_constant"),
        (lambda: MovingAverageMinMaxObserver(1.5), ValueError, "averaging_constant"),
        (lambda: PercentileObserver(30.0), ValueError, "percentile"),
        (lambda: PercentileObserver(101.0), ValueError, "percentile"),
        (lambda: PercentileObserver(float("nan")), ValueError, "percentile"),
        (lambda: MSEObserver(num_candidates=1), ValueError, "num_candidates"),
        (lambda: EntropyObserver(bins=4), ValueError, "bins"),
    ],
)
def test_observers_reject_bad_settings(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_per_channel_observers_reject_inconsistent_batches():
    obs = MinMaxObserver(axis=1).update(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="channels"):
        obs.update(np.zeros((4, 5)))
    with pytest.raises(ValueError, match="out of range"):
        MinMaxObserver(axis=2).update(np.zeros((4, 3)))


def test_helpers_reject_bad_input():
    qp = qparams_from_range(-1.0, 1.0)
    with pytest.raises(ValueError, match="one more entry"):
        histogram_mse(np.arange(3.0), np.ones(3), qp)
    with pytest.raises(ValueError, match="per-tensor"):
        histogram_mse(np.arange(3.0), np.ones(2), choose_qparams(np.eye(2), axis=0))
    with pytest.raises(TypeError, match="QParams"):
        histogram_mse(np.arange(3.0), np.ones(2), (1.0, 0))
    with pytest.raises(ValueError, match="same length"):
        kl_divergence([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="non-negative"):
        kl_divergence([1, -2], [1, 2])
    with pytest.raises(ValueError, match="percentile"):
        histogram_percentile(np.arange(3.0), np.ones(2), 120.0)
    with pytest.raises(RuntimeError, match="empty"):
        StreamingHistogram().occupied()
    with pytest.raises(ValueError, match="2-D"):
        dynamic_qparams(np.zeros(5), per_row=True)
    with pytest.raises(ValueError, match="2-D"):
        compare_static_dynamic(np.zeros(5), qp, batch_size=2)
    with pytest.raises(TypeError, match="QParams"):
        fake_quant_hook("not qparams")
    with pytest.raises(ValueError, match="bits"):
        dynamic_fake_quant_hook(bits=40)


# --------------------------------------------------------------------------- static vs dynamic


def test_dynamic_qparams_follow_the_run_time_formula():
    # S = (x_max - x_min) / (2^b - 1), Z = round(-x_min / S) on an unsigned grid
    rng = np.random.default_rng(14)
    x = rng.normal(size=(8, 16))
    qp = dynamic_qparams(x, bits=8, signed=False)
    s = (x.max() - x.min()) / 255
    assert float(qp.scale) == pytest.approx(s, rel=1e-15)
    assert int(qp.zero_point) == int(np.rint(-x.min() / s))
    rows = dynamic_qparams(x, bits=8, signed=False, per_row=True)
    assert rows.axis == 0
    np.testing.assert_allclose(rows.scale, (x.max(axis=1) - x.min(axis=1)) / 255, rtol=1e-15)


def test_compare_static_dynamic_errors_and_costs():
    rng = np.random.default_rng(15)
    x = rng.normal(size=(100, 32)) * rng.uniform(0.2, 3, size=(100, 1))
    static = MinMaxObserver().update(x[:20]).qparams()  # calibrated on a fifth of the data
    rep = compare_static_dynamic(x, static, batch_size=10)
    expected_static = _mse(x, static)
    assert rep.static_mse == pytest.approx(expected_static, rel=1e-12)
    dyn = np.concatenate([fake_quantize(b, dynamic_qparams(b)) for b in np.split(x, 10)])
    assert rep.dynamic_mse == pytest.approx(float(np.mean((x - dyn) ** 2)), rel=1e-12)
    assert rep.num_batches == 10 and rep.qparams_computed == 10
    assert rep.range_reads == x.size and rep.range_comparisons == 2 * x.size
    assert rep.static_clipped_fraction > 0  # the calibration data missed some extremes
    assert rep.dynamic_sqnr_db > rep.static_sqnr_db
    per_row = compare_static_dynamic(x, static, batch_size=10, per_row=True)
    assert per_row.qparams_computed == 100
    assert per_row.dynamic_mse < rep.dynamic_mse


# --------------------------------------------------------------------------- with a model


@pytest.fixture(scope="module")
def model_and_data(digits, trained_mlp):
    (Xtr, _), (Xte, yte) = digits
    model, _ = trained_mlp((64, 32, 10), epochs=5)
    return model, Xtr, Xte, yte


def test_calibrate_sees_the_layer_activations(model_and_data):
    from qcourse.nn import capture_activations

    model, Xtr, _, _ = model_and_data
    X = Xtr[:300]
    acts = capture_activations(model, X)
    out = calibrate(model, "act1", X, MinMaxObserver(), batch_size=64)
    assert out.num_batches == 5
    assert out.range() == (float(acts["act1"].output.min()), float(acts["act1"].output.max()))
    inp = calibrate(model, "fc2", X, MinMaxObserver(), where="input")
    assert inp.range() == out.range()
    assert not model["act1"]._forward_hooks, "calibrate left its hook behind"
    with pytest.raises(ValueError, match="where"):
        calibrate(model, "act1", X, MinMaxObserver(), where="weights")
    with pytest.raises(TypeError, match="Observer"):
        calibrate(model, "act1", X, object())


def test_fake_quant_hooks_put_activations_on_the_grid(model_and_data):
    model, Xtr, _, _ = model_and_data
    qp = calibrate(model, "act1", Xtr[:200], MinMaxObserver(bits=3, signed=False)).qparams()
    seen = []
    with model["act1"].register_forward_hook(fake_quant_hook(qp)):
        with model["fc2"].register_forward_pre_hook(lambda m, x: seen.append(x)):
            model(Xtr[:50])
    levels = np.unique(np.round(seen[0] / float(qp.scale), 6))
    assert levels.size <= 8 and np.allclose(levels, np.round(levels))
    seen.clear()
    with model["act1"].register_forward_hook(dynamic_fake_quant_hook(bits=2, signed=False)):
        with model["fc2"].register_forward_pre_hook(lambda m, x: seen.append(x)):
            model(Xtr[:50])
    assert np.unique(seen[0]).size <= 4


def test_compare_observers_rows(model_and_data):
    from qcourse.nn import accuracy

    model, Xtr, Xte, yte = model_and_data
    rows = compare_observers(
        model, "act1",
        {"minmax16": MinMaxObserver(bits=16, signed=False),
         "mse2": MSEObserver(bits=2, signed=False)},
        Xte, Xte, yte,  # calibrated on the evaluation data itself: nothing is clipped
    )
    assert [r.name for r in rows] == ["minmax16", "mse2"]
    # 16 bits is indistinguishable from float; 2 bits is not free
    assert rows[0].accuracy == pytest.approx(accuracy(model, Xte, yte), abs=1 / len(yte) + 1e-12)
    assert rows[0].sqnr_db > 80 and rows[1].sqnr_db < 20
    assert rows[1].mse > rows[0].mse
    # the observers saw exactly what calibrate() would have shown them
    for row, fresh in zip(rows, (MinMaxObserver(bits=16, signed=False),
                                 MSEObserver(bits=2, signed=False)), strict=True):
        expected = calibrate(model, "act1", Xte, fresh, batch_size=128)
        assert (row.rmin, row.rmax) == expected.range()
        assert row.qparams == expected.qparams()
    with pytest.raises(TypeError, match="Observer"):
        compare_observers(model, "act1", {"bad": object()}, Xte, Xte, yte)


# --------------------------------------------------------------------------- PyTorch oracle


def test_minmax_observers_match_pytorch():
    torch = pytest.importorskip(
        "torch", reason="PyTorch is not installed; it is the oracle for the min-max observers"
    )
    from torch.ao.quantization import observer as tobs

    rng = np.random.default_rng(16)
    batches = [(rng.normal(size=(32, 6)) * (1 + k)).astype(np.float32) for k in range(5)]
    cases = [
        (tobs.MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine),
         MinMaxObserver(bits=8, signed=False)),
        (tobs.MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_affine),
         MinMaxObserver(bits=8, signed=True)),
        (tobs.MovingAverageMinMaxObserver(averaging_constant=0.01, dtype=torch.quint8,
                                          qscheme=torch.per_tensor_affine),
         MovingAverageMinMaxObserver(0.01, bits=8, signed=False)),
        (tobs.PerChannelMinMaxObserver(ch_axis=1, dtype=torch.qint8,
                                       qscheme=torch.per_channel_affine),
         MinMaxObserver(bits=8, signed=True, axis=1)),
    ]
    for theirs, ours in cases:
        for b in batches:
            theirs(torch.from_numpy(b))
            ours.update(b)
        scale, zero_point = theirs.calculate_qparams()
        qp = ours.qparams()
        np.testing.assert_allclose(scale.numpy().astype(np.float64).reshape(qp.scale.shape),
                                   qp.scale, rtol=1e-5)
        np.testing.assert_array_equal(zero_point.numpy().astype(np.int64)
                                      .reshape(qp.zero_point.shape), qp.zero_point)
        rmin, rmax = ours.range()
        np.testing.assert_allclose(theirs.min_val.numpy().reshape(np.shape(rmin)), rmin,
                                   rtol=1e-6)
        np.testing.assert_allclose(theirs.max_val.numpy().reshape(np.shape(rmax)), rmax,
                                   rtol=1e-6)
