r"""Ship an integer model: export it to ONNX and to a .tflite flatbuffer, and predict every code.

The deploy chapter (``book/deploy.md``) explains this module.  An integer network is described by
a small list of layers (:class:`Dense`, :class:`Conv2D` -- regular or depthwise --,
:class:`MaxPool2D`, :class:`GlobalAvgPool`, :class:`Flatten`) inside a :class:`DeployModel`;
every weighted layer holds int8
weights, an int32 bias, float32 scales, the output zero point and the clamp of its fused
activation.  From that one description:

* :func:`to_onnx` writes an ONNX model in the **QOperator** form (``QuantizeLinear``,
  ``QLinearConv``, ``QLinearMatMul``, ``QLinearGlobalAveragePool``, integer ``Clip``,
  ``MaxPool``, ``Flatten``) or in the
  **QDQ** form that quantization tools emit (float ``Conv``/``Gemm`` between
  ``DequantizeLinear`` and ``QuantizeLinear`` nodes, which ONNX Runtime fuses back into integer
  kernels);
* :func:`to_tflite` writes a ``.tflite`` flatbuffer (``QUANTIZE``, ``PAD``, ``CONV_2D``,
  ``DEPTHWISE_CONV_2D``, ``MAX_POOL_2D``, ``AVERAGE_POOL_2D``, ``RESHAPE``,
  ``FULLY_CONNECTED``) with the schema
  module and ``flatbuffers`` that the ``ai-edge-litert`` wheel brings -- no TensorFlow;
* :func:`predict_codes` computes, with qcourse's own integer arithmetic, the int8 codes that each
  runtime (:data:`RUNTIMES`) returns for float32 images: ONNX Runtime, and LiteRT's interpreter
  under its three op resolvers, which do *not* agree with one another.  Each runtime's arithmetic
  is a named function of :mod:`qcourse.fixed_point`, :mod:`qcourse.int_matmul` or this module
  (:data:`RUNTIME_ARITHMETIC` lists them);
* :func:`run_onnx` and :func:`run_tflite` run the exported files in the real runtimes, so the two
  can be compared code by code.

``python -m qcourse.deploy export --out DIR`` writes ``DIR/model.onnx`` and ``DIR/model.tflite``
for the course's trained integer network; ``python -m qcourse.deploy run --runtime RUNTIME
--inputs X.npy --out Y.npy`` writes qcourse's prediction of that runtime's output codes.

The package's files hold its parts (every name is reached as ``qcourse.deploy.NAME``):

* ``layers.py`` -- the layers and :class:`DeployModel`, checked when built;
* ``predict.py`` -- what each runtime computes (:data:`RUNTIME_ARITHMETIC`): the input
  quantizations, the requantization conventions (:func:`requantize_layer`) and
  :func:`predict_codes`;
* ``litert.py`` -- :func:`to_tflite` and :func:`run_tflite`; ``onnx.py`` -- :func:`to_onnx` and
  :func:`run_onnx`;
* ``compare.py`` -- :func:`run_runtime`, :func:`agreement` and the probes
  (:func:`random_dense_model`, :func:`adversarial_images`);
* ``course.py`` -- :func:`from_integer_model` and :func:`course_model`;
* ``cli.py`` and ``__main__.py`` -- the command line.
"""

from qcourse.deploy import cli, compare, course, layers, litert, onnx, predict
from qcourse.deploy.cli import *  # noqa: F403 (the names of cli.__all__)
from qcourse.deploy.compare import *  # noqa: F403 (the names of compare.__all__)
from qcourse.deploy.course import *  # noqa: F403 (the names of course.__all__)
from qcourse.deploy.layers import *  # noqa: F403 (the names of layers.__all__)
from qcourse.deploy.litert import *  # noqa: F403 (the names of litert.__all__)
from qcourse.deploy.litert import _interpreter  # noqa: F401 (the tests open an interpreter)
from qcourse.deploy.onnx import *  # noqa: F403 (the names of onnx.__all__)
from qcourse.deploy.predict import *  # noqa: F403 (the names of predict.__all__)
from qcourse.deploy.predict import _tflite_multiplier  # noqa: F401 (the tests check it)

__all__ = [*layers.__all__, *predict.__all__, *litert.__all__, *onnx.__all__, *compare.__all__,
           *course.__all__, *cli.__all__]
