"""What a reader can see in each figure of the book, written into the figure's PNG.

The book build (``book/_ext/qcourse_html.py``) points the chapters' kernels at
``book/_ext/matplotlibrc``, whose ``figure.hooks`` calls :func:`audit` on every figure that
``pyplot`` creates. When the figure is saved as a PNG (the inline backend's output), the figure
is measured as drawn and the measurements go into the PNG's text chunk ``qcourse-figure`` as
JSON, so that a test of the *built page* (``tests/reader_view.py``) can tell, from the image
file alone, whether every axis carries a label, whether a legend covers data, and how small the
smallest text is. Nothing here changes what the figure looks like.

For each visible axes the record has:

``x`` / ``y``
    ``"label"`` (the axis has a label, or an axes sharing it has one), ``"categories"`` (its tick
    labels are words, which label the axis themselves), ``"none"`` (no tick labels: nothing to
    read on it) or ``"unlabelled"`` (numbers on the ticks and no label: the reader cannot tell
    what they measure);
``legend_covers``
    how many data points (line vertices, scatter points, bar corners) lie under the legend box;
``title``
    the axes' title, to name it in a message.

``min_font_pt`` is the smallest font size of any visible text in the figure, and ``dpi`` the
resolution of the PNG, so that a test can compute the size a reader sees.
"""

from __future__ import annotations

import json
import re

import numpy as np

KEY = "qcourse-figure"
_NUMBER = re.compile(r"^[\s\u2212+\-−]*[\d.,]+(e[+\-−]?\d+)?\s*[%×x]?$|^\$.*\$$|^$")


def _tick_texts(axis) -> list[str]:
    return [t.get_text() for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]


def _axis_state(ax, which: str) -> str:
    axis = ax.xaxis if which == "x" else ax.yaxis
    if not axis.get_visible():
        return "none"
    siblings = (ax.get_shared_x_axes() if which == "x" else ax.get_shared_y_axes()).get_siblings(ax)
    for other in siblings:
        other_axis = other.xaxis if which == "x" else other.yaxis
        if other_axis.label.get_visible() and other_axis.label.get_text().strip():
            return "label"
    texts = _tick_texts(axis)
    if not texts:
        return "none"
    if any(not _NUMBER.match(t.replace("\u2212", "-")) for t in texts):
        return "categories"
    return "unlabelled"


def _densify(xy: np.ndarray, step: float = 2.0, limit: int = 200_000) -> np.ndarray:
    """Points every ``step`` display pixels along a polyline, so that a segment crossing a box
    is seen even when none of its vertices lies inside."""
    xy = xy[np.all(np.isfinite(xy), axis=1)]
    if len(xy) < 2:
        return xy
    seg = np.diff(xy, axis=0)
    n = np.clip(np.ceil(np.hypot(seg[:, 0], seg[:, 1]) / step).astype(int), 1, None)
    if n.sum() > limit:
        return xy
    t = np.concatenate([np.arange(k) / k for k in n])
    start = np.repeat(xy[:-1], n, axis=0)
    return np.concatenate([start + np.repeat(seg, n, axis=0) * t[:, None], xy[-1:]])


def _data_points(ax) -> np.ndarray:
    """Display coordinates of the data drawn in ``ax`` (lines, scatter points, bar corners)."""
    points = []
    for line in ax.get_lines():
        # Reference lines (axhline, axvline: axes coordinates along the line) are not data.
        if line.get_visible() and line.get_transform().contains_branch(ax.transData):
            xy = line.get_xydata()
            if len(xy):
                shown = line.get_transform().transform(xy)
                points.append(_densify(shown) if line.get_linestyle() not in ("None", "", " ")
                              else shown)
    for coll in ax.collections:
        if coll.get_visible() and len(coll.get_offsets()):
            points.append(coll.get_offset_transform().transform(coll.get_offsets()))
    for patch in ax.patches:
        if patch.get_visible() and hasattr(patch, "get_bbox"):
            box = patch.get_bbox().transformed(patch.get_data_transform())
            if box.width > 0 and box.height > 0:
                points.append(box.corners())
    if not points:
        return np.zeros((0, 2))
    xy = np.concatenate(points)
    return xy[np.all(np.isfinite(xy), axis=1)]


def _legend_covers(ax, renderer) -> int:
    legend = ax.get_legend()
    if legend is None or not legend.get_visible():
        return 0
    box = legend.get_window_extent(renderer)
    xy = _data_points(ax)
    axes_box = ax.get_window_extent(renderer)
    inside_axes = ((xy[:, 0] >= axes_box.x0) & (xy[:, 0] <= axes_box.x1)
                   & (xy[:, 1] >= axes_box.y0) & (xy[:, 1] <= axes_box.y1))
    under = ((xy[:, 0] > box.x0) & (xy[:, 0] < box.x1) & (xy[:, 1] > box.y0) & (xy[:, 1] < box.y1))
    return int(np.count_nonzero(under & inside_axes))


def measure(fig, renderer) -> dict:
    """The record described in the module docstring, for ``fig`` as drawn by ``renderer``."""
    axes = []
    for ax in fig.get_axes():
        if not ax.get_visible() or not ax.axison:
            continue
        axes.append({"title": ax.get_title() or fig.get_suptitle(),
                     "x": _axis_state(ax, "x"), "y": _axis_state(ax, "y"),
                     "legend_covers": _legend_covers(ax, renderer)})
    sizes = [t.get_fontsize() for t in fig.findobj(lambda a: hasattr(a, "get_fontsize")
                                                   and hasattr(a, "get_text"))
             if t.get_visible() and t.get_text().strip()]
    return {"axes": axes, "min_font_pt": min(sizes) if sizes else None,
            "dpi": float(fig.dpi)}


def _on_draw(event) -> None:
    fig = event.canvas.figure
    metadata = getattr(fig, "_qcourse_png_metadata", None)
    if metadata is not None:
        metadata[KEY] = json.dumps(measure(fig, event.renderer))


def audit(fig) -> None:
    """``figure.hooks`` entry: record the figure's measurements in every PNG saved from it."""
    canvas = fig.canvas
    base = type(canvas).print_png

    def print_png(filename_or_obj, *args, metadata=None, pil_kwargs=None, **ignored):
        fig._qcourse_png_metadata = dict(metadata or {})
        try:
            return base(canvas, filename_or_obj, metadata=fig._qcourse_png_metadata,
                        pil_kwargs=pil_kwargs)
        finally:
            fig._qcourse_png_metadata = None

    canvas.print_png = print_png
    fig.canvas.mpl_connect("draw_event", _on_draw)
