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

from qcourse.affine import codebook, error, explorer, onnx, quantizer
from qcourse.affine.codebook import *  # noqa: F403 (the names of codebook.__all__)
from qcourse.affine.error import *  # noqa: F403 (the names of error.__all__)
from qcourse.affine.explorer import *  # noqa: F403 (the names of explorer.__all__)
from qcourse.affine.onnx import *  # noqa: F403 (the names of onnx.__all__)
from qcourse.affine.quantizer import *  # noqa: F403 (the names of quantizer.__all__)

__all__ = [*quantizer.__all__, *onnx.__all__, *error.__all__, *codebook.__all__, *explorer.__all__]
