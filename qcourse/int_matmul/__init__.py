"""Integer-only matrix multiplication: a quantized linear layer computed with integers.

The int_matmul chapter (``book/int_matmul.md``) derives everything in this package from the
affine map ``r = scale * (q - zero_point)``.  A linear layer ``y = x W^T + b`` whose input, weight
and output are quantized becomes

.. math::

    q_y = Z_y + \\frac{S_x S_W}{S_y}\\Big(\\sum_k (q_{x,k} - Z_x)(q_{W,k} - Z_W) + q_b\\Big),

an integer matrix product, a few integer corrections for the zero points (most of them constant,
folded into an int32 bias once), and one *requantization*: a multiplication of the int32
accumulator by the real number :math:`M = S_x S_W / S_y`, a rounding, the output zero point and
a clamp.  Every name is reached as ``qcourse.int_matmul.NAME``; the files hold its parts:

* ``arithmetic.py`` -- **the derivation, term by term**: :func:`zero_point_terms`,
  :func:`fold_zero_points`, :func:`quantize_bias`; and **requantization in the two conventions
  used in practice**: :func:`requantize_float` (a float32 multiplier and round half to even, as
  ONNX Runtime and PyTorch do; :func:`float_multiplier` computes the multiplier the way ONNX
  Runtime does) and :func:`requantize_fixed_point` (a 31-bit integer multiplier and a shift, as
  TensorFlow Lite's ``MultiplyByQuantizedMultiplier`` does, through :mod:`qcourse.fixed_point`);
* ``onnx.py`` -- **the ONNX operators** :func:`matmul_integer` (``MatMulInteger``) and
  :func:`qlinear_matmul` (``QLinearMatMul``), bit for bit as ONNX Runtime's CPU kernels compute
  them, each with a plain NumPy twin (:func:`matmul_integer_reference`,
  :func:`qlinear_matmul_reference`); the fast versions run the compiled int8 GEMM of
  :mod:`qcourse.kernels`;
* ``conv_ops.py`` -- the ONNX convolution operators :func:`conv_integer` (``ConvInteger``) and
  :func:`qlinear_conv` (``QLinearConv``), requantized as :func:`qlinear_matmul` is: the whole
  definitions in plain NumPy (im2col and one integer product per group;
  :func:`qlinear_conv_reference`), and the 2-D cases of ``QLinearConv`` on the conv chapter's
  compiled kernels (:func:`qcourse.conv.conv2d_int8`);
* ``layer.py`` -- **a whole layer**: :class:`QuantizedLinear` (per-tensor or per-channel weights,
  int32 bias, fused ReLU / ReLU6), its float and fake-quant counterparts (:func:`linear_float`,
  :meth:`QuantizedLinear.fake_quant_forward`) and :func:`activation_range`;
* ``litert.py`` -- **LiteRT's other requantizations**: :func:`double_multiplier` and
  :func:`requantize_double_half_away` (its reference fully-connected kernel),
  :func:`requantize_fixed_point_half_up` (its built-in kernels on ruy), compared in the deploy
  chapter.

Nothing here wraps around silently: an int32 accumulator that would overflow raises
``ValueError`` unless the caller asks for ONNX's wrap-around with ``overflow="wrap"``.
"""

from qcourse.int_matmul import arithmetic, conv_ops, layer, litert, onnx
from qcourse.int_matmul.arithmetic import *  # noqa: F403 (the names of arithmetic.__all__)
from qcourse.int_matmul.conv_ops import *  # noqa: F403 (the names of conv_ops.__all__)
from qcourse.int_matmul.layer import *  # noqa: F403 (the names of layer.__all__)
from qcourse.int_matmul.litert import *  # noqa: F403 (the names of litert.__all__)
from qcourse.int_matmul.onnx import *  # noqa: F403 (the names of onnx.__all__)

__all__ = [*arithmetic.__all__, *onnx.__all__, *conv_ops.__all__, *layer.__all__,
           *litert.__all__]
