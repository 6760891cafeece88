r"""A tiny NumPy neural network with the forward and backward passes written out.

This is the float model that the calibration, ptq, qat and mixed_precision chapters quantize.
It is small on purpose: a :class:`Linear` layer computes :math:`y = x W^T + b` with ``weight``
of shape (out, in) (the layout of PyTorch and of the int_matmul chapter), :class:`ReLU` and
:class:`ReLU6` clamp, a :class:`Sequential` chains named layers, and :func:`train` fits the
model with softmax cross-entropy and Adam (or SGD with momentum).

Every layer can carry *forward hooks*, the mechanism the quantization chapters use to look at
activations (:func:`capture_activations`, for calibration) and to change them (a hook that
returns a fake-quantized copy of a layer's output, for post-training quantization).  Gradients
flow through a hook as if it were the identity: the straight-through rule.

:mod:`qcourse.nn.cnn` adds the convolutional layers (:class:`Conv2d` with stride, padding and
groups, :class:`BatchNorm2d`, pooling, :class:`Flatten`) for images in NCHW layout.

Everything is float32 by default; pass ``dtype=np.float64`` to build a model for gradient checks.

``qcourse/nn/lm.py`` adds a decoder-only byte-level transformer (:class:`TransformerLM`) with its
layers (:class:`Embedding`, :class:`LayerNorm`, :class:`GELU`, :class:`CausalSelfAttention`,
...), trained on the Python reference text; the transformer, kv_cache and weight_only chapters
quantize it.
"""

from qcourse.nn.cnn import AvgPool2d, BatchNorm2d, Conv2d, Flatten, GlobalAvgPool2d
from qcourse.nn.core import (
    MLP,
    SGD,
    Adam,
    HookHandle,
    LayerActivations,
    Linear,
    Module,
    ReLU,
    ReLU6,
    Sequential,
    accuracy,
    capture_activations,
    make_optimizer,
    predict,
    softmax,
    softmax_cross_entropy,
    train,
    train_epoch,
)
from qcourse.nn.lm import (
    GELU,
    CausalSelfAttention,
    Embedding,
    FeedForward,
    KVCache,
    LayerNorm,
    LMConfig,
    LMEvaluation,
    LMTraining,
    TrainedLM,
    TransformerBlock,
    TransformerLM,
    evaluate_lm,
    generate,
    linear_inputs,
    lm_loss,
    lm_windows,
    load_lm,
    one_blas_thread,
    random_windows,
    save_lm,
    shipped_lm_path,
    train_lm,
    train_reference_lm,
)

__all__ = [
    "MLP",
    "SGD",
    "Adam",
    "HookHandle",
    "LayerActivations",
    "Linear",
    "Module",
    "ReLU",
    "ReLU6",
    "Sequential",
    "accuracy",
    "capture_activations",
    "make_optimizer",
    "predict",
    "softmax",
    "softmax_cross_entropy",
    "train",
    "train_epoch",
    "AvgPool2d",
    "BatchNorm2d",
    "Conv2d",
    "Flatten",
    "GlobalAvgPool2d",
    # the language model (qcourse/nn/lm.py)
    "CausalSelfAttention",
    "Embedding",
    "FeedForward",
    "GELU",
    "KVCache",
    "LMConfig",
    "LMEvaluation",
    "LMTraining",
    "LayerNorm",
    "TrainedLM",
    "TransformerBlock",
    "TransformerLM",
    "evaluate_lm",
    "generate",
    "linear_inputs",
    "lm_loss",
    "lm_windows",
    "load_lm",
    "one_blas_thread",
    "random_windows",
    "save_lm",
    "shipped_lm_path",
    "train_lm",
    "train_reference_lm",
]
