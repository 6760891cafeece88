r"""A tiny NumPy neural network with the forward and backward passes written out.

This is the float model that the calibration, ptq, qat and mixed_precision chapters quantize.
It is small on purpose: a :class:`Linear` layer computes :math:`y = x W^T + b` with ``weight``
of shape (out, in) (the layout of PyTorch and of the int_matmul chapter), :class:`ReLU` and
:class:`ReLU6` clamp, a :class:`Sequential` chains named layers, :func:`make_mlp` builds the
course's multilayer perceptron, and :func:`train` fits the model with softmax cross-entropy and
Adam (or SGD with momentum).  These live in ``nn/core.py``.

Every layer can carry *forward hooks*, the mechanism the quantization chapters use to look at
activations (:func:`feed_activations`, :func:`capture_activations`, :func:`calibrate`) and to
change them (a hook that returns a fake-quantized copy of a layer's output, for post-training
quantization).  Gradients flow through a hook as if it were the identity: the straight-through
rule.  What works on a whole model -- :func:`copy_model`, :func:`swapped_weights`,
:func:`predict`, :func:`accuracy`, :func:`evaluate`, the activation passes, the layer counts --
lives in ``nn/tools.py``.

:mod:`qcourse.nn.cnn` adds the convolutional layers (:class:`Conv2d` with stride, padding and
groups, :class:`BatchNorm2d`, pooling, :class:`Flatten`) for images in NCHW layout.

Everything is float32 by default; pass ``dtype=np.float64`` to build a model for gradient checks.

``qcourse/nn/lm.py`` adds a decoder-only byte-level transformer (:class:`TransformerLM`) with its
layers (:class:`Embedding`, :class:`LayerNorm`, :class:`GELU`, :class:`CausalSelfAttention`,
...) and generation; ``qcourse/nn/lm_training.py`` its data, loss, training, evaluation and the
shipped weights, trained on the Python reference text.  The transformer, kv_cache and
weight_only chapters quantize it.
"""

from qcourse._deprecated import moved_names
from qcourse.nn import cnn, core, lm, lm_training, tools
from qcourse.nn.cnn import *  # noqa: F403 (the names of cnn.__all__)
from qcourse.nn.core import *  # noqa: F403 (the names of core.__all__)
from qcourse.nn.lm import *  # noqa: F403 (the names of lm.__all__)
from qcourse.nn.lm_training import *  # noqa: F403 (the names of lm_training.__all__)
from qcourse.nn.tools import *  # noqa: F403 (the names of tools.__all__)

__all__ = [*core.__all__, *tools.__all__, *cnn.__all__, *lm.__all__, *lm_training.__all__]

__getattr__ = moved_names(__name__, {"MLP": "qcourse.nn.make_mlp"})
