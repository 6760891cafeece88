"""Affine (uniform) quantization: ``r = scale * (q - zero_point)``.

The affine chapter (``book/affine.md``) explains everything in this package: how a real range
``[rmin, rmax]`` becomes a ``scale`` and an integer ``zero_point``, how a tensor is quantized
(round half to even, then clamp to ``[qmin, qmax]``) and dequantized, where the error comes from
(rounding inside the range, clipping outside it), what per-tensor, per-channel and per-group
parameters cost in storage, how int4 and int2 values are packed into bytes, and how a k-means
codebook compares with the uniform grid at the same number of bits.  Every name is reached as
``qcourse.affine.NAME``; the files hold one idea each:

* ``quantizer.py`` -- the course's own model of quantization (:class:`QParams`,
  :func:`qrange`, :func:`qparams_from_range`, :func:`choose_qparams`, :func:`quantize`,
  :func:`dequantize`, :func:`fake_quantize`, the weight quantizer :func:`quantize_weight`,
  :func:`pack_int` / :func:`unpack_int`), which computes in float64 and validates everything;
* ``onnx.py`` -- exact reproductions of the ONNX operators :func:`quantize_linear` and
  :func:`dequantize_linear`, which compute in float32 exactly as ONNX Runtime's CPU kernels do
  (the tests compare them with ONNX Runtime bit for bit);
* ``error.py`` -- measuring the error (:func:`sqnr_db`, :func:`error_breakdown`,
  :func:`clip_sweep`, :func:`grid_occupancy`) and the storage cost (:func:`effective_bits`);
* ``codebook.py`` -- the k-means codebook;
* ``explorer.py`` -- the pictures and the interactive explorer (matplotlib, ipywidgets).
"""

from qcourse.affine.codebook import (
    codebook_dequantize,
    codebook_effective_bits,
    codebook_quantize,
    kmeans_codebook,
)
from qcourse.affine.error import (
    ErrorBreakdown,
    clip_sweep,
    effective_bits,
    error_breakdown,
    grid_occupancy,
    sqnr_db,
)
from qcourse.affine.explorer import error_explorer, explorer_qparams, plot_quantization
from qcourse.affine.onnx import dequantize_linear, quantize_linear
from qcourse.affine.quantizer import (
    QParams,
    choose_qparams,
    dequantize,
    fake_quantize,
    pack_int,
    qparams_from_range,
    qrange,
    quantize,
    quantize_weight,
    storage_dtype,
    unpack_int,
)

__all__ = [
    "ErrorBreakdown",
    "QParams",
    "choose_qparams",
    "clip_sweep",
    "codebook_dequantize",
    "codebook_effective_bits",
    "codebook_quantize",
    "dequantize",
    "dequantize_linear",
    "effective_bits",
    "error_breakdown",
    "error_explorer",
    "explorer_qparams",
    "fake_quantize",
    "grid_occupancy",
    "kmeans_codebook",
    "pack_int",
    "plot_quantization",
    "qparams_from_range",
    "qrange",
    "quantize",
    "quantize_linear",
    "quantize_weight",
    "sqnr_db",
    "storage_dtype",
    "unpack_int",
]
