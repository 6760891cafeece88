r"""Mixed precision: how many bits each layer gets, and how to decide.

The mixed_precision chapter (``book/mixed_precision.md``) explains everything in this package.
A network does not have to use one bit width everywhere: a layer whose loss surface is flat
can take 4-bit weights at little cost, a layer sitting in a sharp valley needs 8.  This package
measures that *sensitivity* in two ways and turns it into a bit allocation:

* **one layer at a time** (:func:`layer_sensitivity`): quantize the weights of one layer to
  ``b`` bits, keep every other layer in float, and measure the change in loss and accuracy;
* **second order** (HAWQ, Dong et al. 2019/2020, Yao et al. 2021): the Hessian of the loss with
  respect to a layer's weights, seen through Hessian-vector products (:func:`hvp`, exact or by
  central finite differences of the analytic gradient), its trace estimated by Hutchinson's
  method (:func:`hutchinson_trace`) or computed exactly for this small network
  (:func:`exact_hessian_trace`), and the sensitivity
  :math:`\Omega = \operatorname{tr}(H)/n \cdot \lVert Q(W) - W \rVert^2` (:func:`hawq_omega`).

Bit allocation under a size budget is a small knapsack: :func:`allocate_bits_exhaustive`
searches all :math:`K^L` configurations (exact, for small ``L``), :func:`allocate_bits_greedy`
demotes one layer at a time (for large ``L``).  :func:`model_size_bits` and :func:`bops` do the
accounting of the HAWQ tables (size of the weights; bit operations
:math:`\sum_l b_w^{(l)} b_a^{(l)} \mathrm{MACs}_l`), and :data:`HAWQ_RESNET50` holds the
published ResNet50 table that the chapter reproduces.

The curvature functions work on a :class:`qcourse.nn.Sequential` of ``Linear``, ``ReLU`` and
``ReLU6`` layers and compute in float64 on copies of the weights; the model is never modified.
:func:`network_hessian_traces` estimates the traces of any network that backpropagates (the
course CNN's convolutions), by finite differences of its own gradients.
Every name is reached as ``qcourse.mixed_precision.NAME``; the files hold one idea each:
``sensitivity.py`` (measured: one layer, or every configuration, at a time), ``curvature.py``
(predicted: Hessian traces and Omega) and ``allocation.py`` (accounting, allocation, the HAWQ
table).
"""

from qcourse._deprecated import moved_names
from qcourse.mixed_precision import allocation, curvature, sensitivity
from qcourse.mixed_precision.allocation import *  # noqa: F403 (the names of allocation.__all__)
from qcourse.mixed_precision.curvature import *  # noqa: F403 (the names of curvature.__all__)
from qcourse.mixed_precision.sensitivity import *  # noqa: F403 (the names of sensitivity.__all__)

__all__ = [*sensitivity.__all__, *curvature.__all__, *allocation.__all__]

__getattr__ = moved_names(__name__, {
    "LayerInfo": "qcourse.nn.LayerInfo",
    "evaluate_model": "qcourse.nn.evaluate",
    "layer_info": "qcourse.nn.layer_info",
    "linear_layers": "qcourse.nn.linear_layers",
})
