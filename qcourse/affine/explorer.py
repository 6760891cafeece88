"""Pictures of affine quantization and the chapter's interactive error explorer.

Matplotlib and ipywidgets are imported when a function is called, so the arithmetic never
needs them.  Re-exported by :mod:`qcourse.affine`; see the affine chapter.
"""

from __future__ import annotations

import numpy as np

from qcourse._checks import (
    MAX_SQUARABLE,
    check_instance,
    check_int,
    check_real,
    real_array,
)
from qcourse.affine.error import error_breakdown
from qcourse.affine.quantizer import QParams, choose_qparams, fake_quantize, qrange

__all__ = [
    "error_explorer",
    "explorer_qparams",
    "plot_quantization",
]


# --- pictures and the interactive explorer -----------------------------------------------------


def explorer_qparams(x, *, bits: int, clip: float, zero_point: int) -> QParams:
    r"""Unsigned ``bits``-bit parameters for the explorer: a grid of width ``clip`` x the range.

    :math:`s = c\,(\max(x, 0) - \min(x, 0)) / (2^b - 1)` with the given ``zero_point``, so the
    grid covers :math:`[-s z,\ s (2^b - 1 - z)]`: ``clip`` sets its width, ``zero_point``
    slides it along the real line.  See the affine chapter.
    """
    x = real_array(x, "x", max_abs=MAX_SQUARABLE)
    clip = check_real(clip, "clip", 0.0, 1.0, lo_open=True)
    qmin, qmax = qrange(bits, signed=False)
    span = max(float(x.max()), 0.0) - min(float(x.min()), 0.0)
    scale = clip * span / (qmax - qmin) if span > 0 else 1.0
    return QParams(scale=scale, zero_point=check_int(zero_point, "zero_point"), qmin=qmin,
                   qmax=qmax)


def plot_quantization(x, qparams: QParams, axes=None):
    """Two panels: the values with the representable range, and the error split by source.

    Left: a histogram of ``x`` with the grid's range shaded (and its levels drawn when there
    are at most 64).  Right: histograms of the rounding error and of the clipping error (see
    :func:`error_breakdown`), titled with the SQNR.  Returns the two matplotlib axes.  Per-tensor
    parameters only.  See the affine chapter.
    """
    import matplotlib.pyplot as plt

    check_instance(qparams, "qparams", QParams)
    if qparams.axis is not None:
        raise ValueError("qparams must be per-tensor (axis=None): plot_quantization draws one "
                         "grid")
    x = real_array(x, "x", max_abs=MAX_SQUARABLE).ravel()
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    ax_data, ax_err = axes
    lo, hi = (float(v) for v in qparams.representable_range())
    eb = error_breakdown(x, qparams)
    x_hat = fake_quantize(x, qparams)
    inside = np.clip(x, lo, hi)
    ax_data.hist(x, bins=80, color="0.55")
    ax_data.axvspan(lo, hi, color="tab:green", alpha=0.15, label="representable range")
    if qparams.levels <= 64:
        for level in qparams.scale * (np.arange(qparams.qmin, qparams.qmax + 1)
                                      - qparams.zero_point):
            ax_data.axvline(level, color="tab:green", lw=0.5, alpha=0.6)
    ax_data.axvline(0.0, color="k", lw=0.8)
    ax_data.set_title(f"{qparams.levels} levels, scale {float(qparams.scale):.3g}, "
                      f"zero point {int(qparams.zero_point)}", fontsize=9)
    ax_data.set_xlabel("x")
    ax_data.set_ylabel("values")
    ax_data.set_ylim(0, 1.45 * ax_data.get_ylim()[1])  # headroom: the legend sits above the bars
    ax_data.legend(fontsize=8, loc="upper right")
    clipped = (x < lo) | (x > hi)
    rounding = (inside - x_hat)[~clipped]
    clipping = (x - inside)[clipped]
    ax_err.hist(rounding, bins=60, color="tab:blue", alpha=0.7, label="rounding")
    if clipping.size:
        ax_err.hist(clipping, bins=60, color="tab:red", alpha=0.7, label="clipping")
    ax_err.set_title(f"SQNR {eb.sqnr_db:.1f} dB; MSE rounding {eb.rounding_mse:.2e}, "
                     f"clipping {eb.clipping_mse:.2e}", fontsize=9)
    ax_err.set_xlabel("error x - fake_quantize(x)")
    ax_err.set_ylabel("values")
    ax_err.set_ylim(0, 1.45 * ax_err.get_ylim()[1])
    ax_err.legend(fontsize=8, loc="upper right")
    return axes


def error_explorer(x, *, bits: int = 4):
    """An ipywidgets explorer: bits, clip and zero point against the error histograms.

    Three sliders drive :func:`explorer_qparams` and redraw :func:`plot_quantization`; the zero
    point slider's range follows the bit width.  Returns the widget (display it in a notebook).
    Needs ipywidgets and a live kernel; the book shows a static figure beside it.  See the
    affine chapter.
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    x = real_array(x, "x", max_abs=MAX_SQUARABLE)
    qp0 = choose_qparams(x, bits=bits, signed=False)
    bits_w = widgets.IntSlider(value=bits, min=2, max=8, description="bits")
    clip_w = widgets.FloatSlider(value=1.0, min=0.05, max=1.0, step=0.05, description="clip")
    zp_w = widgets.IntSlider(value=int(qp0.zero_point), min=0, max=2**bits - 1,
                             description="zero point")
    out = widgets.Output()

    def on_bits(change):
        old_max = zp_w.max
        zp_w.max = 2 ** change["new"] - 1
        zp_w.value = min(zp_w.max, round(zp_w.value * zp_w.max / old_max))

    def redraw(*_):
        with out:
            out.clear_output(wait=True)
            qp = explorer_qparams(x, bits=bits_w.value, clip=clip_w.value,
                                  zero_point=zp_w.value)
            fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
            plot_quantization(x, qp, axes=axes)
            fig.tight_layout()
            display(fig)
            plt.close(fig)

    bits_w.observe(on_bits, names="value")
    for w in (bits_w, clip_w, zp_w):
        w.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([bits_w, clip_w, zp_w]), out])
